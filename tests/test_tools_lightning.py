"""A run written by a real Lightning ``Trainer`` with ``ModelCheckpoint``'s default names
(``epoch=E-step=N.ckpt``), ``save_last=True`` (``last.ckpt``, not a step) and hyper-parameters
holding an ``argparse.Namespace`` and an ``AttributeDict``: pickled objects that ckptavg allows by
name and nothing else. Averages are checked against an fp64 average of ``torch.load(…)["state_dict"]``."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptavg import discover
from ckptavg.cli import cli
from ckptavg.errors import CheckpointError

_SKIP = "lightning is not installed (pip install --no-deps lightning)"

EVERY = 8  # ModelCheckpoint(every_n_train_steps=8) …
MAX_STEPS = 40  # … over 40 steps (2.5 epochs of 16 batches): steps 8, 16, 24, 32, 40
STEPS = list(range(EVERY, MAX_STEPS + 1, EVERY))


def _module():  # type: ignore[no-untyped-def]
    L = pytest.importorskip("lightning", reason=_SKIP)

    class Tiny(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self, args: argparse.Namespace, opt: object, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()  # args (a Namespace) and opt (an AttributeDict) are pickled as objects
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            self.norm = torch.nn.BatchNorm1d(4)  # running stats and an int64 num_batches_tracked

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.norm(x))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    return Tiny


def _trusted_load(path: Path) -> dict[str, object]:
    """The oracle: the full unpickler, with Lightning's real classes — on a file this test has just
    had Lightning write (even with those classes allowed, torch's weights_only unpickler refuses an
    AttributeDict: it only fills plain dicts, which is why ckptavg rebuilds it as one)."""
    return torch.load(path, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    L = pytest.importorskip("lightning", reason=_SKIP)
    from lightning.fabric.utilities.data import AttributeDict
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = tmp_path_factory.mktemp("lightning")
    run = root / "checkpoints"
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    ckpt = ModelCheckpoint(dirpath=run, every_n_train_steps=EVERY, save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_steps=MAX_STEPS, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=root)
    model = _module()(argparse.Namespace(layers=2, name="tiny"), AttributeDict(width=16))
    trainer.fit(model, loader)
    assert (run / "last.ckpt").is_file()
    return run


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    (path,) = run.glob(f"epoch=*-step={step}.ckpt")
    sd = _trusted_load(path)["state_dict"]
    assert isinstance(sd, dict)
    return sd


def _expected(run: Path, weights: dict[int, float]) -> dict[str, torch.Tensor]:
    sds = {s: _state(run, s) for s in weights}
    total = sum(weights.values())
    newest = sds[max(sds)]
    return {name: (sum(sds[s][name].double() * (w / total) for s, w in weights.items()).to(t.dtype)
                   if t.is_floating_point() else t) for name, t in newest.items()}


def _assert_output(out: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7, msg=name)
    model = _module()(argparse.Namespace(), {})
    model.load_state_dict(got)  # loads back into the LightningModule


@pytest.mark.slow
def test_list(lightning_run: Path) -> None:
    traj = discover(lightning_run)
    assert traj.steps == STEPS
    assert "num_batches_tracked" in " ".join(traj[0].tensors or {})
    assert [n.split(": ")[0] for n in traj.ignored] == [str(lightning_run / "last.ckpt")]
    result = CliRunner().invoke(cli, ["list", str(lightning_run), "--json"])
    assert result.exit_code == 0, result.output
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == STEPS


@pytest.mark.slow
def test_merge_window(lightning_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(lightning_run), "--window", "3", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_output(out, _expected(lightning_run, dict.fromkeys(STEPS[-3:], 1.0)))


@pytest.mark.slow
def test_merge_ema(lightning_run: Path, tmp_path: Path) -> None:
    out, h = tmp_path / "ema", 10.0
    result = CliRunner().invoke(cli, ["merge", str(lightning_run), "--method", "ema", "--half-life", str(h),
                                      "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_output(out, _expected(lightning_run, {s: 0.5 ** ((MAX_STEPS - s) / h) for s in STEPS}))


@pytest.mark.slow
def test_series(lightning_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "series"
    result = CliRunner().invoke(cli, ["series", str(lightning_run), "--window", "2", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for s in STEPS[1:]:
        _assert_output(out / f"step{s}", _expected(lightning_run, {s - EVERY: 1.0, s: 1.0}))


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


@pytest.mark.parametrize("extra", [
    pytest.param(_Evil(), id="builtins.print"),
    pytest.param(Path("x"), id="pathlib"),
])
def test_other_globals_beside_allowed_ones_are_still_refused(tmp_path: Path, extra: object) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"args": argparse.Namespace(a=1),
                                                                         "x": extra}}, buf)
    (tmp_path / "epoch=0-step=1.ckpt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="asks for the global"):
        discover(tmp_path)


def test_megatron_args_namespace_is_allowed(tmp_path: Path) -> None:
    sd = {"w": torch.arange(4.0)}
    torch.save({"args": argparse.Namespace(tensor_model_parallel_size=1, lr=1e-3), "iteration": 7, "model": sd},
               tmp_path / "model_optim_rng.pt")  # as Megatron's save_checkpoint does
    traj = discover(tmp_path / "model_optim_rng.pt")
    assert list(traj[0].tensors or {}) == ["w"]
