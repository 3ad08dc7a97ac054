"""Tiny real artefacts: GPT-NeoX state dicts from a transformers config, written in every
checkpoint layout a user meets. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _click_results_as_in_8_2() -> None:
    """The tests read ``result.stderr`` apart from stdout, as click 8.2 captures them. click 8.1
    (ckptavg's floor, tested by the minimum-versions lane) needs ``mix_stderr=False`` for that, and
    then leaves stderr out of ``result.output``, which 8.2 keeps as both."""
    import inspect

    from click import testing

    if "mix_stderr" not in inspect.signature(testing.CliRunner.__init__).parameters:
        return
    init = testing.CliRunner.__init__

    def __init__(self, *args, mix_stderr=False, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, mix_stderr=mix_stderr, **kwargs)

    testing.CliRunner.__init__ = __init__  # type: ignore[method-assign]
    testing.Result.output = property(  # type: ignore[method-assign,assignment]
        lambda self: self.stdout + (self.stderr if self.stderr_bytes is not None else ""))


_click_results_as_in_8_2()

# GPT-NeoX's output matrix in a model's state dict: transformers ≥ 5 calls it lm_head, 4.x (the
# minimum-versions lane) embed_out. Read from the package metadata: importing transformers is slow.
HEAD = "lm_head.weight" if int(version("transformers").split(".")[0]) >= 5 else "embed_out.weight"

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


# A scored run for eval, sweep and demo tests: 5 tiny GPT-NeoX HF directories (steps 100..500) with a
# BPE tokenizer trained on the packaged task and a held-out text; nothing is downloaded.
EVAL_STEPS = (100, 200, 300, 400, 500)
TASK_DATA = Path(__file__).resolve().parents[1] / "ckptavg" / "tasks" / "ckptavg_basics" / "ckptavg_basics.jsonl"
HELD_OUT = [
    "The opposite of cold is hot, and the opposite of night is day.",
    "One mouse, two mice; one goose, two geese; one child, two children.",
    "Today I sing; yesterday I sang. Today I swim; yesterday I swam.",
    "A week has seven days and a year has twelve months.",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    corpus = [d["question"] + " " + " ".join(d["choices"]) for d in docs] + HELD_OUT
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=192, special_tokens=["<|endoftext|>", "<unk>"],
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """runs/tiny/step{100..500}: HF directories (safetensors, config.json, tokenizer files)."""
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    centre = GPTNeoXForCausalLM(config).state_dict()
    root = tmp_path_factory.mktemp("runs") / "tiny"
    for i, step in enumerate(EVAL_STEPS):
        g = torch.Generator().manual_seed(i)
        d = root / f"step{step}"
        d.mkdir(parents=True)
        save_file({k: (v + 0.2 * torch.randn(v.shape, generator=g)).contiguous() for k, v in centre.items()},
                  d / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(d)
        tokenizer.save_pretrained(d)
    return root


@pytest.fixture(scope="session")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text")
    (d / "valid.txt").write_text(" ".join(HELD_OUT))
    (d / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT))
    return {"txt": d / "valid.txt", "jsonl": d / "valid.jsonl"}
