"""Tiny real artefacts: GPT-NeoX state dicts from a transformers config, written in every
checkpoint layout a user meets. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FORMATS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded", "pt-nested", "pt-file", "bin-legacy"]


def tiny_config():  # type: ignore[no-untyped-def]
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="session")
def base_state_dict() -> dict[str, torch.Tensor]:
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    return {k: v.clone().contiguous() for k, v in GPTNeoXForCausalLM(tiny_config()).state_dict().items()}


def integer_state(base: dict[str, torch.Tensor], seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Same names/shapes as ``base`` with small integer values: sums and means by powers of two are
    exact, so streamed results can be compared to the oracle with ``torch.equal``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(-8, 9, v.shape, generator=g).to(dtype) for k, v in base.items()}


def random_state(base: dict[str, torch.Tensor], seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}


def _save_sharded_bin(sd: dict[str, torch.Tensor], d: Path) -> None:
    names = list(sd)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, d / fname)
        wm.update({k: fname for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def write_checkpoint(root: Path, step: int, sd: dict[str, torch.Tensor], fmt: str) -> Path:
    """Write one checkpoint of the run at ``root`` in layout ``fmt``; returns its location."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    if fmt == "pt-file":  # nanoGPT/LAWA style: a file per step holding {'model': sd, ...}
        p = root / f"ckpt_{step}.pt"
        torch.save({"model": sd, "iter_num": step, "optimizer": {}}, p)
        return p
    d = root / f"step{step}"
    d.mkdir()
    tiny_config().save_pretrained(d)
    if fmt == "safetensors":
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "safetensors-sharded":
        names = list(sd)
        half = len(names) // 2
        wm = {}
        for i, part in enumerate((names[:half], names[half:]), 1):
            fname = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, d / fname, metadata={"format": "pt"})
            wm.update({k: fname for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    elif fmt == "bin":
        torch.save(sd, d / "pytorch_model.bin")
    elif fmt == "bin-legacy":
        torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    elif fmt == "bin-sharded":
        _save_sharded_bin(sd, d)
    elif fmt == "pt-nested":  # DeepSpeed-like: a single .pt in the step dir, state dict under 'module'
        torch.save({"module": sd, "global_steps": step}, d / "mp_rank_00_model_states.pt")
    else:
        raise ValueError(fmt)
    return d


RunFactory = Callable[..., tuple[Path, dict[int, dict[str, torch.Tensor]]]]


@pytest.fixture
def make_run(tmp_path: Path, base_state_dict: dict[str, torch.Tensor]) -> RunFactory:
    """make_run(fmt, steps, dtype=float32, values="integer") -> (run folder, {step: state dict})."""

    def factory(fmt: str = "safetensors", steps=(100, 200, 300, 400, 500), dtype=torch.float32,
                values: str = "integer", name: str = "run", extra: dict | None = None):  # type: ignore[no-untyped-def]
        root = tmp_path / name
        states = {}
        for i, s in enumerate(steps):
            make = integer_state if values == "integer" else random_state
            sd = make(base_state_dict, seed=1000 + i, dtype=dtype)
            if extra:
                sd.update({k: v(i) for k, v in extra.items()})
            write_checkpoint(root, s, sd, fmt)
            states[s] = sd
        return root, states

    return factory


def tree_hash(path: Path) -> dict[str, str]:
    """Every file under ``path`` → sha256, to prove inputs are untouched."""
    import hashlib

    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def demo_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's real trained trajectory (``ckptavg.demo.build_run``: tiny Pythia on the synthetic
    language, step0/1/2/4/…/600 in Pythia's layout). Trained once (~40 s on 2 cores) and kept in
    pytest's cache folder, keyed by the training config, so later sessions reuse it."""
    import shutil

    from ckptavg.demo import DEMO, RUN_NAME, build_run

    name = f"ckptavg-demo-{DEMO.key()}"
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return build_run(tmp_path_factory.mktemp("demo") / RUN_NAME, progress=False)[0]
    root = cache.mkdir(name)
    for old in root.parent.glob("ckptavg-demo-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)  # runs of an older recipe
    return build_run(root / RUN_NAME, progress=False)[0]
