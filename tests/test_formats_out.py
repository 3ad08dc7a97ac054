"""``merge --format``: the average written back in the input's own shape, and loaded the way that
tool's user loads it: nanoGPT's ``sample.py`` code path (``torch.load``, ``GPTConfig(**model_args)``,
``_orig_mod.`` stripped, ``load_state_dict``), Lightning's ``load_from_checkpoint``, and
``dcp.load`` into a freshly built model's state dict. Inputs are written by the tools themselves
(nanoGPT's ``train.py`` dict saved by ``torch.save`` from a compiled model, a Lightning ``Trainer``,
``dcp.save``); every tensor is compared with an fp64 average of what the tool itself loads."""

from __future__ import annotations

import argparse
import errno
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner

from ckptavg import average, discover
from ckptavg.cli import cli
from ckptavg.cli.options import format_option
from ckptavg.errors import OutputError, UsageError
from ckptavg.io.formats import FORMATS
from conftest import tree_hash

WINDOW = 3


def _merge(run: Path, out: Path, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["merge", str(run), "--window", str(WINDOW), "-o", str(out), "--quiet", *args])
    return r.exit_code, r.stdout, r.stderr


def _oracle(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """fp64 uniform average of the last WINDOW state dicts; integer tensors from the newest."""
    last = sds[-WINDOW:]
    return {n: (sum(sd[n].double() for sd in last) / len(last)).to(t.dtype) if t.is_floating_point() else t
            for n, t in last[-1].items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for n, t in want.items():
        assert got[n].dtype == t.dtype, n
        torch.testing.assert_close(got[n], t, rtol=1e-6, atol=1e-7, msg=n)


def _manifest(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "ckptavg.json").read_text())


def test_cli_choices_are_the_library_formats() -> None:
    assert tuple(format_option(lambda: None).__click_params__[0].type.choices) == FORMATS  # type: ignore[attr-defined]


# --- nanoGPT: model.py's GPT, abridged (same module names, so the same state dict keys) --------------
@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.0
    bias: bool = True


class _Attn(torch.nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c_attn = torch.nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = torch.nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head = c.n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _Block(torch.nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = torch.nn.LayerNorm(c.n_embd), _Attn(c), torch.nn.LayerNorm(c.n_embd)
        self.mlp = torch.nn.ModuleDict({"c_fc": torch.nn.Linear(c.n_embd, 4 * c.n_embd),
                                        "c_proj": torch.nn.Linear(4 * c.n_embd, c.n_embd)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](torch.nn.functional.gelu(self.mlp["c_fc"](self.ln_2(x))))


class GPT(torch.nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.transformer = torch.nn.ModuleDict(dict(
            wte=torch.nn.Embedding(c.vocab_size, c.n_embd), wpe=torch.nn.Embedding(c.block_size, c.n_embd),
            h=torch.nn.ModuleList([_Block(c) for _ in range(c.n_layer)]), ln_f=torch.nn.LayerNorm(c.n_embd)))
        self.lm_head = torch.nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


NANO_STEPS = [5, 10, 15, 20]


@pytest.fixture(scope="module")
def nanogpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.py's checkpoint dict every 5 iterations (``ckpt_{iter}.pt``, as LAWA users patch it),
    of a compiled model: its state dict keys carry ``_orig_mod.`` (``torch.compile(model).state_dict()``
    gives exactly these keys, tied storages included; building it costs ~20 s of dynamo import)."""
    out = tmp_path_factory.mktemp("nanogpt") / "out"
    out.mkdir()
    torch.manual_seed(0)
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=64, dropout=0.0)
    model = GPT(GPTConfig(**model_args))  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"batch_size": 4, "learning_rate": 1e-2, "compile": True, "out_dir": str(out)}
    for it in range(1, NANO_STEPS[-1] + 1):
        x = torch.randint(0, 64, (4, 16))
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, 64), torch.roll(x, -1, 1).view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if it in NANO_STEPS:
            compiled = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
            torch.save({"model": compiled, "optimizer": opt.state_dict(), "model_args": model_args,
                        "iter_num": it, "best_val_loss": loss.detach(), "config": config}, out / f"ckpt_{it}.pt")
    return out


def _sample_py_model(out_dir: Path) -> tuple[GPT, dict]:  # type: ignore[type-arg]
    """nanoGPT's sample.py, init_from='resume', verbatim apart from the device."""
    checkpoint = torch.load(out_dir / "ckpt.pt", map_location="cpu")
    gptconf = GPTConfig(**checkpoint["model_args"])
    model = GPT(gptconf)
    state_dict = checkpoint["model"]
    unwanted_prefix = "_orig_mod."
    for k, _v in list(state_dict.items()):
        if k.startswith(unwanted_prefix):
            state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
    model.load_state_dict(state_dict)
    return model, checkpoint


def test_nanogpt(nanogpt_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    code, stdout, stderr = _merge(nanogpt_run, out, "--format", "nanogpt")
    assert code == 0, stderr
    assert "sample.py" in stdout and "optimizer" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "ckptavg.json"]
    inputs = [torch.load(nanogpt_run / f"ckpt_{s}.pt", weights_only=False) for s in NANO_STEPS]
    want = _oracle([i["model"] for i in inputs])
    raw = torch.load(out / "ckpt.pt")
    assert all(k.startswith("_orig_mod.") for k in raw["model"])  # keys exactly as the input's
    _assert_same(raw["model"], want)
    model, ckpt = _sample_py_model(out)
    loaded = model.state_dict()
    for k, t in want.items():
        torch.testing.assert_close(loaded[k.removeprefix("_orig_mod.")], t, rtol=1e-6, atol=1e-7, msg=k)
    newest = inputs[-1]
    assert "optimizer" not in ckpt
    assert ckpt["model_args"] == newest["model_args"] and ckpt["config"] == newest["config"]
    assert ckpt["iter_num"] == NANO_STEPS[-1] and torch.equal(ckpt["best_val_loss"], newest["best_val_loss"])
    fmt = _manifest(out)["format"]
    assert fmt["name"] == "nanogpt" and fmt["dropped"] == ["optimizer"] and fmt["file"] == "ckpt.pt"
    assert [i["step"] for i in _manifest(out)["inputs"]] == NANO_STEPS[-WINDOW:]


def test_same_is_the_inputs_format_and_hf_says_how_to_load(nanogpt_run: Path, tmp_path: Path) -> None:
    code, stdout, _ = _merge(nanogpt_run, tmp_path / "same", "--format", "same")
    assert code == 0 and (tmp_path / "same" / "ckpt.pt").is_file()
    assert torch.equal(torch.load(tmp_path / "same" / "ckpt.pt")["model"]["_orig_mod.lm_head.weight"],
                       torch.load(tmp_path / "same" / "ckpt.pt")["model"]["_orig_mod.transformer.wte.weight"])
    code, stdout, _ = _merge(nanogpt_run, tmp_path / "hf")
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    assert "--format nanogpt" in stdout and "load with:" in stdout
    r = CliRunner().invoke(cli, ["list", str(nanogpt_run)])
    assert r.exit_code == 0 and "--format same" in r.stdout
    assert json.loads(CliRunner().invoke(cli, ["list", str(nanogpt_run), "--json"]).stdout)["input_format"] == "nanogpt"


def test_dry_run_counts_one_model_in_memory(nanogpt_run: Path, tmp_path: Path) -> None:
    def pf(*args: str) -> dict:  # type: ignore[type-arg]
        r = CliRunner().invoke(cli, ["merge", str(nanogpt_run), "-k", "3", "-o", str(tmp_path / "x"), "--dry-run",
                                     "--json", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["preflight"]  # type: ignore[no-any-return]

    hf, nano = pf(), pf("--format", "nanogpt")
    assert nano["memory_bytes"] - hf["memory_bytes"] == nano["write_bytes"] > 0
    assert nano["format"] == "nanogpt" and not (tmp_path / "x").exists()


def test_write_failure_leaves_nothing(nanogpt_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = tree_hash(nanogpt_run)
    real = torch.save

    def full_disk(obj: object, f: object, *a: object, **k: object) -> None:
        real({"partial": torch.zeros(10)}, f)  # some bytes reach the file first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=r"avg/ckpt\.pt: No space left on device"):
        average(nanogpt_run, tmp_path / "avg", selection=None, output_format="nanogpt", progress=False)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary, no lock
    assert tree_hash(nanogpt_run) == before


# --- refusals: one line, exit 2, nothing written --------------------------------------------------
@pytest.mark.parametrize("fmt,layout,words", [
    pytest.param("lightning", "safetensors", "not a Lightning checkpoint", id="lightning-from-hf"),
    pytest.param("nanogpt", "bin", "not a nanoGPT checkpoint", id="nanogpt-from-bin"),
    pytest.param("same", "pt-nested", "no format ckptavg writes back", id="same-from-deepspeed-like"),
    pytest.param("nanogpt", "pt-file", "not a nanoGPT checkpoint", id="nanogpt-without-model_args"),
])
def test_refused_when_the_format_cannot_be_made(make_run, tmp_path: Path, fmt: str, layout: str,  # type: ignore[no-untyped-def]
                                               words: str) -> None:
    run, _ = make_run(layout)
    for extra in ((), ("--dry-run",)):
        code, stdout, stderr = _merge(run, tmp_path / "out", "--format", fmt, *extra)
        assert code == 2, stderr
        assert words in stderr and len(stderr.strip().splitlines()) == 1 and "--format hf" in stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match=words):
        average(run, tmp_path / "out", output_format=fmt, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no output, temporary or lock file


def test_bad_combinations(make_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, _ = make_run("safetensors")
    code, _, stderr = _merge(run, tmp_path / "o", "--format", "dcp", "--max-shard-size", "1KB")
    assert code == 2 and "--max-shard-size" in stderr
    code, _, stderr = _merge(run, tmp_path / "o", "--format", "nanogtp")
    assert code == 2 and "nanogtp" in stderr
    with pytest.raises(UsageError, match="output folder"):
        average(run, output_format="dcp")
    assert not (tmp_path / "o").exists()


# --- DCP: torchtitan keeps the model's keys at the top, OLMo-core under "model" ------------------
DCP_STEPS = [1, 2, 3, 4]


def _dcp_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(32, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 32))


def _quiet_dcp(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():  # "torch.distributed is disabled … single process": intended
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs, no_dist=True)


@pytest.fixture(scope="module", params=["torchtitan", "olmo-core"])
def dcp_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list]:  # type: ignore[type-arg]
    layout = request.param
    run = tmp_path_factory.mktemp(layout) / "run"
    model = _dcp_module()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sds = []
    for step in DCP_STEPS:
        x = torch.randint(0, 32, (4, 8))
        torch.nn.functional.cross_entropy(model(x).view(-1, 32), x.view(-1)).backward()
        opt.step()
        opt.zero_grad()
        if layout == "torchtitan":
            state = {**model.state_dict(), "optimizer": opt.state_dict(), "train_state": {"step": step}}
            folder = run / f"step-{step}"
        else:
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            folder = run / f"step{step}" / "model_and_optim"
        _quiet_dcp(dcp.save, state, checkpoint_id=folder)
        sds.append({k: v.clone() for k, v in model.state_dict().items()})
    return layout, run, sds


def _dcp_user_load(folder: Path, nested: bool) -> dict[str, torch.Tensor]:
    sd = {k: torch.zeros_like(v) for k, v in _dcp_module().state_dict().items()}  # a freshly built model's
    _quiet_dcp(dcp.load, {"model": sd} if nested else sd, checkpoint_id=folder)
    return sd


def test_dcp(dcp_run: tuple[str, Path, list], tmp_path: Path) -> None:  # type: ignore[type-arg]
    layout, run, sds = dcp_run
    out = tmp_path / "avg"
    code, stdout, stderr = _merge(run, out, "--format", "same")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp", "ckptavg.json"]
    nested = layout == "olmo-core"
    _assert_same(_dcp_user_load(out, nested), _oracle(sds))
    md = dcp.FileSystemReader(str(out)).read_metadata()  # the test's own output
    prefix = "model." if nested else ""
    assert set(md.state_dict_metadata) == {prefix + k for k in sds[0]}  # model only: no optimizer entries
    fmt = _manifest(out)["format"]
    assert fmt["name"] == "dcp" and fmt["model_key"] == ("model" if nested else None)
    assert fmt["dropped"] == (["optim"] if nested else ["optimizer", "train_state"])
    assert discover(out)[0].tensors.keys() == sds[0].keys()  # type: ignore[union-attr]  # and ckptavg reads it back


def test_dcp_from_safetensors(make_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, states = make_run("safetensors", dtype=torch.bfloat16)
    out = average(run, tmp_path / "avg", output_format="dcp", progress=False)  # all 5 steps
    sd = {k: torch.zeros_like(v) for k, v in states[100].items()}
    _quiet_dcp(dcp.load, sd, checkpoint_id=out)
    want = {k: (sum(s[k].double() for s in states.values()) / len(states)).to(torch.bfloat16) for k in sd}
    for k in sd:
        assert torch.equal(sd[k], want[k]), k  # integer values: the average is exact


def test_dcp_write_failure_leaves_nothing(dcp_run: tuple[str, Path, list], tmp_path: Path,  # type: ignore[type-arg]
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, run, _ = dcp_run
    before = tree_hash(run)

    def fail(self: object, *a: object, **k: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", fail)
    code, _, stderr = _merge(run, tmp_path / "avg", "--format", "dcp")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "avg" in stderr, stderr
    assert list(tmp_path.iterdir()) == []
    assert tree_hash(run) == before


# --- Lightning: the tiny module of test_tools_lightning.py, trained by a real Trainer --------------
_SKIP = "lightning is not installed (pip install --no-deps lightning)"
EVERY, MAX_STEPS = 4, 16  # steps 4, 8, 12, 16


def _tiny():  # type: ignore[no-untyped-def]
    L = pytest.importorskip("lightning", reason=_SKIP)

    class Tiny(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self, args: argparse.Namespace, opt: object, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            self.norm = torch.nn.BatchNorm1d(4)  # running stats and an int64 num_batches_tracked

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.norm(x))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 4)]

    return Tiny


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    L = pytest.importorskip("lightning", reason=_SKIP)
    from lightning.fabric.utilities.data import AttributeDict
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = tmp_path_factory.mktemp("lightning")
    run = root / "checkpoints"
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    ckpt = ModelCheckpoint(dirpath=run, every_n_train_steps=EVERY, save_top_k=-1)
    trainer = L.Trainer(max_steps=MAX_STEPS, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=root)
    trainer.fit(_tiny()(argparse.Namespace(layers=2), AttributeDict(width=16)),
                torch.utils.data.DataLoader(data, batch_size=4))
    return run


@pytest.mark.slow
def test_lightning(lightning_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    code, stdout, stderr = _merge(lightning_run, out, "--format", "lightning")
    assert code == 0, stderr
    assert "load_from_checkpoint" in stdout and "optimizer_states, lr_schedulers" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["ckptavg.json", "model.ckpt"]
    steps = list(range(EVERY, MAX_STEPS + 1, EVERY))
    inputs = [torch.load(next(lightning_run.glob(f"*step={s}.ckpt")), weights_only=False) for s in steps]
    want = _oracle([i["state_dict"] for i in inputs])
    # The Lightning user's way. torch ≥ 2.6 loads weights_only, so hparams holding a Namespace need it
    # allowed (the inputs' AttributeDict, which weights_only cannot rebuild at all, is a plain dict here).
    with torch.serialization.safe_globals([argparse.Namespace]):
        model = _tiny().load_from_checkpoint(out / "model.ckpt")
    _assert_same(dict(model.state_dict()), want)
    assert model.hparams.args == argparse.Namespace(layers=2) and model.hparams.opt == {"width": 16}
    ckpt = torch.load(out / "model.ckpt", weights_only=False)
    newest = inputs[-1]
    assert "optimizer_states" not in ckpt and "lr_schedulers" not in ckpt
    assert ckpt["global_step"] == newest["global_step"] == MAX_STEPS and ckpt["epoch"] == newest["epoch"]
    assert set(ckpt) == set(newest) - {"optimizer_states", "lr_schedulers"}
    fmt = _manifest(out)["format"]
    assert fmt["name"] == "lightning" and fmt["dropped"] == ["optimizer_states", "lr_schedulers"]
    assert math.isclose(sum(i["weight"] for i in _manifest(out)["inputs"]), 1.0)
    # and the Lightning user who merges to the default HF folder is told how to get a .ckpt instead
    code, stdout, _ = _merge(lightning_run, tmp_path / "hf")
    assert code == 0 and "--format lightning" in stdout
    assert "--format same" in CliRunner().invoke(cli, ["list", str(lightning_run)]).stdout


@pytest.mark.slow
def test_lightning_replaces_only_its_own_output(lightning_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    assert _merge(lightning_run, out, "--format", "lightning")[0] == 0
    first = (out / "model.ckpt").read_bytes()
    code, _, stderr = _merge(lightning_run, out, "--format", "lightning")
    assert code == 1 and "--force" in stderr
    assert _merge(lightning_run, out, "--format", "lightning", "--force", "--window", "2")[0] == 0
    assert (out / "model.ckpt").read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]

