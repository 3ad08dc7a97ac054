"""A run written by a real ``transformers.Trainer``: ``checkpoint-N/`` children (with optimizer,
scheduler, RNG and trainer state beside the weights) and the final ``trainer.save_model()`` weights
at the top of ``output_dir``. The top-level weights are not a step; averages are checked against an
fp64 average of what ``from_pretrained`` loads from each ``checkpoint-N``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg import discover
from ckptavg.cli import cli
from conftest import tiny_config

pytestmark = pytest.mark.slow

SAVE_STEPS = 2  # a checkpoint every 2 optimizer steps …
MAX_STEPS = 10  # … gives checkpoint-2 … checkpoint-10: 5 steps, enough for a window of 3


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="session")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPTNeoXForCausalLM, Trainer, TrainingArguments

    run = tmp_path_factory.mktemp("hf-trainer") / "run"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(tiny_config())
    args = TrainingArguments(
        output_dir=str(run), max_steps=MAX_STEPS, save_steps=SAVE_STEPS, per_device_train_batch_size=4,
        learning_rate=1e-2,  # large, so consecutive checkpoints differ clearly
        report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0,  # logs the LR at every step
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(64))
    trainer.train()
    trainer.save_model(str(run))  # the final weights on top, beside checkpoint-N/
    assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
    return run


def _loaded(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import GPTNeoXForCausalLM

    return {k: v.detach().clone() for k, v in GPTNeoXForCausalLM.from_pretrained(folder).state_dict().items()}


def _expected(run: Path, weights: dict[int, float]) -> dict[str, torch.Tensor]:
    """fp64 weighted average of what from_pretrained loads from each checkpoint-N (integer tensors:
    the newest step's)."""
    sds = {s: _loaded(run / f"checkpoint-{s}") for s in weights}
    total = sum(weights.values())
    newest = sds[max(sds)]
    out = {}
    for name, t in newest.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        acc = sum(sds[s][name].double() * (w / total) for s, w in weights.items())
        out[name] = acc.to(t.dtype)
    return out


def _assert_model(out: Path, want: dict[str, torch.Tensor]) -> None:
    got = _loaded(out)
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7, msg=name)


def test_discover_reads_the_children_and_ignores_the_final_weights(trainer_run: Path) -> None:
    traj = discover(trainer_run)
    assert traj.steps == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert all(Path(c.files[0]).name == "model.safetensors" for c in traj)
    assert [n.split(":")[0] for n in traj.ignored] == [str(trainer_run / "model.safetensors")]

    result = CliRunner().invoke(cli, ["list", str(trainer_run)])
    assert result.exit_code == 0, result.output
    assert "5 checkpoints" in result.output
    assert f"ignored: {trainer_run / 'model.safetensors'}" in result.output
    doc = json.loads(CliRunner().invoke(cli, ["list", str(trainer_run), "--json"]).stdout)
    assert [c["step"] for c in doc["checkpoints"]] == traj.steps and len(doc["ignored"]) == 1


def test_the_final_weights_alone_are_still_one_checkpoint(trainer_run: Path) -> None:
    traj = discover(trainer_run / "model.safetensors")
    assert len(traj) == 1 and not traj.ignored


def test_merge_window(trainer_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(trainer_run), "--window", "3", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_model(out, _expected(trainer_run, {6: 1.0, 8: 1.0, 10: 1.0}))
    inputs = json.loads((out / "ckptavg.json").read_text())["inputs"]
    assert [i["step"] for i in inputs] == [6, 8, 10]


def test_merge_ema_half_life(trainer_run: Path, tmp_path: Path) -> None:
    out, h = tmp_path / "ema", 4.0
    result = CliRunner().invoke(cli, ["merge", str(trainer_run), "--method", "ema", "--half-life", str(h),
                                      "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    steps = range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)
    _assert_model(out, _expected(trainer_run, {s: 0.5 ** ((MAX_STEPS - s) / h) for s in steps}))


def test_series_window(trainer_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "series"
    result = CliRunner().invoke(cli, ["series", str(trainer_run), "--window", "2", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    targets = sorted(int(p.name.removeprefix("step")) for p in out.iterdir() if p.name.startswith("step"))
    assert targets == [4, 6, 8, 10]
    for s in targets:
        _assert_model(out / f"step{s}", _expected(trainer_run, {s - SAVE_STEPS: 1.0, s: 1.0}))


def test_learning_rate_recorded_by_the_trainer_is_listed_and_kept_in_the_manifest(trainer_run: Path, tmp_path: Path) -> None:
    # Trainer's default schedule: linear from 1e-2 to 0 over MAX_STEPS; step s logs the rate of its own update.
    want = {s: 1e-2 * (MAX_STEPS - s + 1) / MAX_STEPS for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)}
    r = CliRunner().invoke(cli, ["list", str(trainer_run), "--json"])
    assert r.exit_code == 0, r.output
    got = {c["step"]: c["learning_rate"] for c in json.loads(r.output)["checkpoints"]}
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    listed = CliRunner().invoke(cli, ["list", str(trainer_run)]).output
    assert " lr " in listed.splitlines()[1] and f"{want[SAVE_STEPS]:.3g}" in listed
    out = tmp_path / "lawa3"
    assert CliRunner().invoke(cli, ["merge", str(trainer_run), "--window", "3", "-o", str(out), "-q"]).exit_code == 0
    inputs = json.loads((out / "ckptavg.json").read_text())["inputs"]
    assert [i["learning_rate"] for i in inputs] == pytest.approx([want[i["step"]] for i in inputs], rel=1e-6, abs=1e-12)
