# Two entry points, both self-installing on a fresh machine:
#   make demo   - the main job: build an example trajectory and average it
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
# Installed only when the venv has no torch yet. A bare "torch" requirement on a machine without
# torch pulls the CUDA build (several GB); 2.13.0 resolves to the CPU wheel on our machines.
# Elsewhere: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
# eval: lm-eval for `ckptavg eval` and its tests.
# demo: lm-eval and matplotlib for `ckptavg demo` (make demo) and its tests.
# plot, ray: matplotlib for `ckptavg plot`, Ray for `ckptavg sweep --executor ray`, and their tests.
# tools: Lightning, for the tests that train with it and average its checkpoints.
EXTRAS ?= test,eval,demo,plot,ray,tools
PY := $(VENV)/bin/python
DEMO_OUT ?= example

.PHONY: install demo test test-fast test-min test-newest lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(VENV)/bin/ckptavg demo --out $(DEMO_OUT)

# The full suite, after ruff and mypy (CI runs this).
test: lint
	$(PY) -m pytest -q

# Under a minute: everything but the tests marked slow (training, Ray, wheels, the README end to end).
test-fast: install
	$(PY) -m pytest -q -m "not slow" -x

# The fast suite at each end of the supported range (README "Install"), each in a fresh venv
# under /tmp/ckptavg-envs: constraints-min.txt, then the newest releases. CI runs both.
test-min:
	.ci/env-test min

test-newest:
	.ci/env-test newest

lint: install
	$(VENV)/bin/ruff check ckptavg tests benchmarks
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
