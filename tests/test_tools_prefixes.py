"""Runs saved from wrapped models, custom-code models, and folders that hold no weights.

- ``torch.compile`` (``_orig_mod.``) and DDP (``module.``, gloo, world size 1) state dicts saved with
  ``torch.save`` beside a ``config.json``: the HF output strips the prefix (checked against the
  model the config builds) and records it; the oracle is the wrapper's own ``load_state_dict``
  followed by the inner model's ``state_dict()``; without a ``config.json`` names are kept.
- A custom model class (``auto_map``) saved with ``save_pretrained``: its ``.py`` files are copied, so
  ``AutoModel.from_pretrained(out, trust_remote_code=True)`` loads the average.
- Folders that look like a checkpoint but hold no weights say what they hold instead.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg import discover
from ckptavg.cli import cli
from ckptavg.keys import common_prefix, strip_plan
from conftest import tiny_config

STEPS = [2, 4, 6, 8]  # a checkpoint every 2 of 8 SGD steps


def _train_and_save(wrapped: torch.nn.Module, inner: torch.nn.Module, run: Path) -> None:
    """Train ``wrapped`` (whose forward is GPT-NeoX's) and save ``wrapped.state_dict()`` with the config."""
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for step in range(1, STEPS[-1] + 1):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step in STEPS:
            d = run / f"step{step}"
            d.mkdir(parents=True)
            torch.save(wrapped.state_dict(), d / "pytorch_model.bin")
            inner.config.save_pretrained(d)  # type: ignore[operator]


def _neox() -> torch.nn.Module:
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(tiny_config())


@pytest.fixture(scope="session")
def compiled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("compiled") / "run"
    model = _neox()
    compiled = torch.compile(model, backend="eager")  # the real OptimizedModule wrapper; eager: no C++ toolchain needed
    _train_and_save(compiled, model, run)
    assert next(iter(torch.load(run / "step2" / "pytorch_model.bin", weights_only=True))).startswith("_orig_mod.")
    return run


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.distributed as dist

    root = tmp_path_factory.mktemp("ddp")
    run = root / "run"
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _neox()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _train_and_save(ddp, model, run)
    finally:
        dist.destroy_process_group()
    assert next(iter(torch.load(run / "step2" / "pytorch_model.bin", weights_only=True))).startswith("module.")
    return run


def _wrapped_load(run: Path, step: int, prefix: str) -> dict[str, torch.Tensor]:
    """The wrapper's own loading: load_state_dict into the wrapped model (DDP in a fresh gloo group of
    one), read the inner model's names."""
    import tempfile

    import torch.distributed as dist

    model = _neox()
    sd = torch.load(run / f"step{step}" / "pytorch_model.bin", weights_only=True)
    if prefix == "_orig_mod.":
        torch.compile(model, backend="eager").load_state_dict(sd)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
            try:
                torch.nn.parallel.DistributedDataParallel(model).load_state_dict(sd)
            finally:
                dist.destroy_process_group()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _expected(run: Path, prefix: str, weights: dict[int, float]) -> dict[str, torch.Tensor]:
    sds = {s: _wrapped_load(run, s, prefix) for s in weights}
    total = sum(weights.values())
    return {n: (sum(sds[s][n].double() * (w / total) for s, w in weights.items()).to(t.dtype)
                if t.is_floating_point() else t) for n, t in sds[max(sds)].items()}


def _assert_hf(out: Path, want: dict[str, torch.Tensor], prefix: str) -> None:
    from transformers import GPTNeoXForCausalLM

    model, info = GPTNeoXForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = model.state_dict()
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7, msg=name)
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["keys"]["stripped_prefix"] == prefix and "GPTNeoXForCausalLM" in record["keys"]["checked"]


@pytest.mark.slow
@pytest.mark.parametrize("which,prefix", [("compiled", "_orig_mod."), ("ddp", "module.")])
def test_prefixed_runs_become_hf_folders(which: str, prefix: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    run = request.getfixturevalue(f"{which}_run")
    r = CliRunner().invoke(cli, ["list", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert [c["step"] for c in json.loads(r.stdout)["checkpoints"]] == STEPS
    out = tmp_path / "lawa3"
    r = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    _assert_hf(out, _expected(run, prefix, dict.fromkeys(STEPS[-3:], 1.0)), prefix)
    out, h = tmp_path / "ema", 3.0
    r = CliRunner().invoke(cli, ["merge", str(run), "--method", "ema", "--half-life", str(h), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    _assert_hf(out, _expected(run, prefix, {s: 0.5 ** ((STEPS[-1] - s) / h) for s in STEPS}), prefix)
    out = tmp_path / "series"
    r = CliRunner().invoke(cli, ["series", str(run), "--window", "2", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    for a, b in zip(STEPS, STEPS[1:]):
        _assert_hf(out / f"step{b}", _expected(run, prefix, {a: 1.0, b: 1.0}), prefix)


@pytest.mark.slow
def test_without_a_config_the_names_are_kept(compiled_run: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(compiled_run, run)
    for c in run.glob("step*/config.json"):
        c.unlink()
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["merge", str(run), "--window", "2", "-o", str(out), "-q"]).exit_code == 0
    got = load_file(out / "model.safetensors")
    assert all(k.startswith("_orig_mod.") for k in got) and "keys" not in json.loads((out / "ckptavg.json").read_text())
    want = _expected(compiled_run, "_orig_mod.", dict.fromkeys(STEPS[-2:], 1.0))
    for name, t in want.items():
        torch.testing.assert_close(got[f"_orig_mod.{name}"], t, rtol=1e-6, atol=1e-7, msg=name)


def test_real_model_prefixes_are_not_stripped(tmp_path: Path) -> None:
    """A tied Llama's own names all start with ``model.``: the config-built model says they are real."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=True)
    d = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(d)
    from safetensors.torch import load_file

    names = list(load_file(d / "model.safetensors"))
    assert common_prefix(names) == "model."
    assert strip_plan(names, d) is None
    wrapped = [f"module.{n}" for n in names]  # …but a DDP wrapper around it is stripped, and only the wrapper
    plan = strip_plan(wrapped, d)
    assert plan is not None and plan[0] == "module." and "LlamaForCausalLM" in plan[1]["checked"]


_CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "ckptavg-tiny"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''
_MODELING_PY = '''
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig


class TinyModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.proj(x)
'''


@pytest.mark.slow
def test_custom_code_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModel

    pkg = tmp_path / "src" / "ckptavg_tiny_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_tiny.py").write_text(textwrap.dedent(_CONFIG_PY))
    (pkg / "modeling_tiny.py").write_text(textwrap.dedent(_MODELING_PY))
    monkeypatch.syspath_prepend(str(pkg.parent))
    from ckptavg_tiny_pkg.configuration_tiny import TinyConfig  # type: ignore[import-not-found]
    from ckptavg_tiny_pkg.modeling_tiny import TinyModel  # type: ignore[import-not-found]

    TinyConfig.register_for_auto_class()
    TinyModel.register_for_auto_class("AutoModel")
    torch.manual_seed(0)
    model = TinyModel(TinyConfig(width=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    run = tmp_path / "run"
    for step in range(1, STEPS[-1] + 1):
        x = torch.randn(4, 8)
        (model(x) - x.flip(1)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step in STEPS:
            model.save_pretrained(run / f"step{step}")
    assert "auto_map" in json.loads((run / "step2" / "config.json").read_text())
    sys.modules.pop("ckptavg_tiny_pkg.modeling_tiny", None)

    out = tmp_path / "lawa3"
    r = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert {"configuration_tiny.py", "modeling_tiny.py"} <= {p.name for p in out.iterdir()}
    loaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    sds = [AutoModel.from_pretrained(run / f"step{s}", trust_remote_code=True).state_dict() for s in STEPS[-3:]]
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, (sum(sd[name].double() for sd in sds) / 3).float(), rtol=1e-6, atol=1e-7)
    assert "modeling_tiny.py" in json.loads((out / "ckptavg.json").read_text())["files"]


# Folders that look like a checkpoint but hold no weight files: each says what it holds.
def _dcp_without_metadata(d: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(4)}, checkpoint_id=str(d))
    (d / ".metadata").unlink()


def _zero_shards_only(d: Path) -> None:
    d.mkdir(parents=True)
    for r in range(2):
        torch.save({"optimizer_state_dict": {}}, d / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def _adapter_config_only(d: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'ckptavg[tools]')")
    peft.LoraConfig(r=4, target_modules=["q"]).save_pretrained(d)


def _accelerate_without_model(d: Path) -> None:
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'ckptavg[tools]')")
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.prepare(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))  # the model never prepared
    acc.save_state(str(d))


def _lightning_pair(d: Path) -> None:
    d.mkdir(parents=True)
    for s in (4, 8):
        torch.save({"state_dict": {"w": torch.ones(2)}}, d / f"epoch=0-step={s}.ckpt")


@pytest.mark.parametrize("make,says", [
    pytest.param(_dcp_without_metadata, "torch.distributed.checkpoint shards (__0_0.distcp) but no .metadata", id="dcp"),
    pytest.param(_zero_shards_only, "DeepSpeed ZeRO optimizer shards (bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt, "
                 "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt) and no *_model_states.pt", id="zero"),
    pytest.param(_adapter_config_only, "a PEFT adapter_config.json but no adapter_model.safetensors", id="peft"),
    pytest.param(_accelerate_without_model, "accelerate's save_state wrote no model here", id="accelerate"),
    pytest.param(_lightning_pair, "2 Lightning checkpoints (epoch=0-step=4.ckpt, epoch=0-step=8.ckpt) in one",
                 id="lightning"),
    pytest.param(lambda d: d.mkdir(parents=True), "holds no weight files: it is empty", id="empty"),
])
def test_folders_without_weights_say_what_they_hold(tmp_path: Path, make, says: str) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    make(run / "step8")
    r = CliRunner().invoke(cli, ["merge", str(run), "--window", "1", "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and says in r.output, r.output
    assert r.output.startswith(f"Error: {run / 'step8'}") and r.output.count("\n") == 1
    assert "index.json" not in r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="holds no weight files|Lightning checkpoints"):
        discover(run)
