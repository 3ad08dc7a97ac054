"""Runs written by real ``accelerate`` ``save_state`` with ``automatic_checkpoint_naming=True``:
``checkpoints/checkpoint_0, checkpoint_1, …`` (N counts saves) holding ``model.safetensors``,
``optimizer.bin``, ``scheduler.bin`` and ``random_states_0.pkl``. The real step comes from the
optimizer's step count (AdamW) or a registered step counter (``custom_checkpoint_0.pkl``); with
neither (plain SGD) the steps are save indices and step-distance weightings are refused. The oracle
is accelerate's own ``load_state`` into a fresh prepared model, averaged in fp64; outputs are loaded
back with ``accelerate.utils.load_checkpoint_in_model``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg import discover
from ckptavg.cli import cli

pytestmark = pytest.mark.slow
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'ckptavg[tools]')")

EVERY, MAX_STEPS = 3, 12  # save_state every 3 optimizer steps: checkpoint_0 … checkpoint_3 = steps 3, 6, 9, 12
STEPS = list(range(EVERY, MAX_STEPS + 1, EVERY))


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


class _Counter:
    """A user's step counter, registered for checkpointing: accelerate saves its state_dict()."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def _prepare(project: Path, optimizer: str, counter: _Counter | None = None):  # type: ignore[no-untyped-def]
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(project),
                                                                    automatic_checkpoint_naming=True))
    model = _model()
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.05))
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    model, opt, sched = acc.prepare(model, opt, sched)
    if counter is not None:
        acc.register_for_checkpointing(counter)
    return acc, model, opt, sched


def _train(project: Path, optimizer: str, count: bool = False) -> Path:
    torch.manual_seed(0)
    counter = _Counter() if count else None
    acc, model, opt, sched = _prepare(project, optimizer, counter)
    g = torch.Generator().manual_seed(0)
    for step in range(1, MAX_STEPS + 1):
        x = torch.randn(8, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if counter is not None:
            counter.step = step
        if step % EVERY == 0:
            acc.save_state()
    return project / "checkpoints"


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("accelerate")
    out = {"adamw": _train(root / "adamw", "adamw"), "sgd": _train(root / "sgd", "sgd"),
           "counter": _train(root / "counter", "sgd", count=True)}
    names = sorted(p.name for p in (out["adamw"] / "checkpoint_0").iterdir())
    assert names == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    assert (out["counter"] / "checkpoint_0" / "custom_checkpoint_0.pkl").is_file()
    return out


def _loaded(folder: Path, optimizer: str) -> dict[str, torch.Tensor]:
    """accelerate's own reading of a save_state folder: load_state into a fresh prepared model."""
    acc, model, _, _ = _prepare(folder.parent.parent / "oracle", optimizer)
    acc.load_state(str(folder))
    return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def _expected(run: Path, optimizer: str, weights: dict[int, float]) -> dict[str, torch.Tensor]:
    """fp64 average; weights keyed by save index N (checkpoint_N)."""
    sds = {i: _loaded(run / f"checkpoint_{i}", optimizer) for i in weights}
    total = sum(weights.values())
    return {n: sum(sds[i][n].double() * (w / total) for i, w in weights.items()).float() for n in sds[max(sds)]}


def _assert_output(out: Path, want: dict[str, torch.Tensor]) -> None:
    from accelerate.utils import load_checkpoint_in_model

    model = _model()
    load_checkpoint_in_model(model, str(out), strict=True)
    got = model.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7, msg=name)


def _list(run: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(cli, ["list", str(run), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name,step_from", [("adamw", "optimizer.bin"), ("counter", "custom_checkpoint_0.pkl")])
def test_steps_come_from_the_folders(runs: dict[str, Path], name: str, step_from: str) -> None:
    traj = discover(runs[name])
    assert traj.steps == STEPS and [c.step_from for c in traj] == [step_from] * len(STEPS)
    assert [Path(c.location).name for c in traj] == [f"checkpoint_{i}" for i in range(len(STEPS))]
    doc = _list(runs[name])
    assert [c["step"] for c in doc["checkpoints"]] == STEPS and doc["steps_are_save_indices"] is False
    text = CliRunner().invoke(cli, ["list", str(runs[name])]).output
    assert f"note: steps from {step_from} inside each checkpoint folder" in text


def test_merge_window(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(runs["adamw"]), "--window", "3", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_output(out, _expected(runs["adamw"], "adamw", {1: 1.0, 2: 1.0, 3: 1.0}))
    assert [i["step"] for i in json.loads((out / "ckptavg.json").read_text())["inputs"]] == STEPS[1:]


def test_merge_ema_half_life_in_real_steps(runs: dict[str, Path], tmp_path: Path) -> None:
    out, h = tmp_path / "ema", 4.0
    result = CliRunner().invoke(cli, ["merge", str(runs["adamw"]), "--method", "ema", "--half-life", str(h),
                                      "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_output(out, _expected(runs["adamw"], "adamw", {i: 0.5 ** ((MAX_STEPS - s) / h) for i, s in enumerate(STEPS)}))


def test_series_window(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "series"
    result = CliRunner().invoke(cli, ["series", str(runs["adamw"]), "--window", "2", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step")) == sorted(f"step{s}" for s in STEPS[1:])
    for i, s in enumerate(STEPS[1:], 1):
        _assert_output(out / f"step{s}", _expected(runs["adamw"], "adamw", {i - 1: 1.0, i: 1.0}))


def test_save_indices_are_said_and_step_weightings_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["sgd"]  # SGD keeps no step count and nothing else records one
    doc = _list(run)
    assert [c["step"] for c in doc["checkpoints"]] == [0, 1, 2, 3] and doc["steps_are_save_indices"] is True
    text = CliRunner().invoke(cli, ["list", str(run)]).output
    assert "note: steps are save indices, not training steps" in text
    for flags in (["--method", "ema", "--half-life", "4"], ["--method", "power-ema", "--sigma-rel", "0.2"]):
        r = CliRunner().invoke(cli, ["merge", str(run), *flags, "-o", str(tmp_path / "x")])
        assert r.exit_code == 2 and "is a save index" in r.output and "--steps-per-save" in r.output
        r = CliRunner().invoke(cli, ["series", str(run), *flags, "-o", str(tmp_path / "y")])
        assert r.exit_code == 2 and "is a save index" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # weighing by checkpoint needs no steps
    out = tmp_path / "lawa3"
    assert CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(out), "-q"]).exit_code == 0
    _assert_output(out, _expected(run, "sgd", {1: 1.0, 2: 1.0, 3: 1.0}))


def test_steps_per_save_gives_the_real_steps(runs: dict[str, Path], tmp_path: Path,
                                             make_run) -> None:  # type: ignore[no-untyped-def]
    run, h = runs["sgd"], 4.0
    doc = _list(run, "--steps-per-save", str(EVERY))
    assert [c["step"] for c in doc["checkpoints"]] == STEPS and doc["steps_are_save_indices"] is False
    out = tmp_path / "ema"
    r = CliRunner().invoke(cli, ["merge", str(run), "--steps-per-save", str(EVERY), "--method", "ema", "--half-life",
                                 str(h), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    _assert_output(out, _expected(run, "sgd", {i: 0.5 ** ((MAX_STEPS - s) / h) for i, s in enumerate(STEPS)}))
    other, _ = make_run("safetensors", steps=(1, 2))  # step1/, step2/: their names are steps
    r = CliRunner().invoke(cli, ["list", str(other), "--steps-per-save", "3"])
    assert r.exit_code == 2 and "--steps-per-save applies to accelerate save_state runs" in r.output


class _Planted:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("open(__import__('os').environ['CKPTAVG_PLANTED'], 'w').close()",))


def test_random_states_pickles_are_never_opened(runs: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    run = tmp_path / "checkpoints"
    shutil.copytree(runs["adamw"], run)
    flag = tmp_path / "ran"
    monkeypatch.setenv("CKPTAVG_PLANTED", str(flag))
    for p in run.glob("checkpoint_*/random_states_0.pkl"):
        p.write_bytes(pickle.dumps(_Planted()))
    out = tmp_path / "out"
    for args in (["list", str(run)], ["merge", str(run), "--window", "2", "-o", str(out), "-q"]):
        assert CliRunner().invoke(cli, args).exit_code == 0
    assert not flag.exists()
