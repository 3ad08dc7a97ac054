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
# DeepSpeed, for the tests that train ZeRO 1/2/3 runs on CPU (tests/test_tools_deepspeed.py). Not an
# extra: it publishes no wheel, and its sdist's setup.py imports torch, so it is built against the
# venv's torch (--no-build-isolation, its build requirements installed first); DS_BUILD_OPS=0 skips
# compiling CUDA ops (the CPU comm op it needs is JIT-built with ninja on first use). Pinned: the
# checkpoint layout ckptavg reads is tested against this version. A failed install does not fail
# make install: those tests then skip, saying why.
DEEPSPEED_SPEC ?= deepspeed==0.19.8
# Megatron-Core, for the tests that train a GPT with it on CPU and average its torch_dist checkpoints
# (tests/test_tools_megatron.py). Not in an extra either: its wheels are per Python version and
# platform, and one that does not resolve must not fail make install (the tests then skip).
MEGATRON_SPEC ?= megatron-core==0.16.1
PY := $(VENV)/bin/python
DEMO_OUT ?= example
STUDY_OUT ?= study

.PHONY: install demo study figures test test-fast test-min test-newest lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation \
		einops hjson msgpack ninja py-cpuinfo "$(DEEPSPEED_SPEC)" || echo "deepspeed did not install: its tests will skip"
	$(PY) -m pip install -q "$(MEGATRON_SPEC)" || echo "megatron-core did not install: its tests will skip"
	touch $@

demo: install
	$(VENV)/bin/ckptavg demo --out $(DEMO_OUT)

# The averaging study (README "Study"): 12 runs of the demo, ~10 min on 2 idle cores; cached in $(STUDY_OUT).
study: install
	$(VENV)/bin/ckptavg study --out $(STUDY_OUT)

# The README's figures, from scratch or from the cached runs: the demo's, `ckptavg inspect` of the
# demo run, and the study's. Training and scoring are deterministic: a second run writes the same bytes.
figures: install
	mkdir -p $(DEMO_OUT) && $(VENV)/bin/ckptavg demo --out $(DEMO_OUT) --quiet > $(DEMO_OUT)/demo.txt
	$(VENV)/bin/ckptavg inspect $(DEMO_OUT)/pythia-critter --quiet --plot docs/inspect-demo.png > /dev/null
	$(VENV)/bin/ckptavg study --out $(STUDY_OUT) --quiet > /dev/null
	cp $(DEMO_OUT)/lawa.png docs/lawa.png
	cp $(STUDY_OUT)/study.png docs/study.png
	sha256sum docs/lawa.png docs/inspect-demo.png docs/study.png

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
	rm -rf $(VENV) $(DEMO_OUT) $(STUDY_OUT) *.egg-info
