"""DeepSpeed ZeRO 1, 2 and 3: runs trained by DeepSpeed itself (CPU, gloo, 2 data-parallel ranks).

Each stage's run saves 4 checkpoints (``global_step2`` … ``global_step8``). ckptavg reads the fp32
master weights from the optimizer states; the oracle is DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` per checkpoint, averaged in fp64. The output is loaded
the way a DeepSpeed user loads consolidated weights: ``load_state_dict`` of the model class.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg import average, discover
from ckptavg.cli import cli
from ckptavg.errors import CheckpointError

pytestmark = pytest.mark.slow
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (make install installs it; it needs a C++ compiler: "
                "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8)", allow_module_level=True)

STEPS = [2, 4, 6, 8]
# stage → bf16: ZeRO-1 in fp32, ZeRO-2 and ZeRO-3 in bf16 (their model files then hold a bf16 copy or
# placeholders, and the fp32 master weights are only in the optimizer states)
STAGES = {1: False, 2: True, 3: True}

TRAIN = '''
import os, sys
import torch
import torch.multiprocessing as mp


class Tiny(torch.nn.Module):
    # 13 x 37 = 481 and 3 x 7 = 21 elements do not split evenly over 2 ranks (ZeRO-3 padding)
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(13, 37)
        self.skip = torch.nn.Linear(13, 37, bias=False)
        self.skip.weight = self.inp.weight  # tied: DeepSpeed records it in shared_params
        self.out = torch.nn.Linear(37, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.frozen = torch.nn.Parameter(torch.linspace(-1, 1, 21).reshape(3, 7), requires_grad=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 37))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = torch.nn.functional.gelu(self.inp(x)) * self.scale.to(x.dtype) + 0.1 * self.skip(x)
        return self.norm(self.out(h)) + self.frozen.sum(0)


def run(rank, world, out, stage, bf16, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Tiny()
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 9):
        x = torch.randn(4, 13, generator=g).to(torch.bfloat16 if bf16 else torch.float32)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        if step % 2 == 0:
            engine.save_checkpoint(out, tag=f"global_step{step}")
    # A clean shutdown: exiting with gloo's threads still up aborted a rank (SIGABRT, "terminate
    # called without an active exception") once in CI, after every checkpoint had been saved.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    out, stage, bf16, port = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    mp.spawn(run, args=(2, out, stage, bf16, port), nprocs=2)
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("deepspeed")
    script = root / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = {}
    for stage, bf16 in STAGES.items():
        run = root / f"zero{stage}"
        proc = subprocess.run([sys.executable, str(script), str(run), str(stage), "1" if bf16 else "0",
                               str(_free_port())], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(p.name for p in run.glob("global_step*")) == [f"global_step{s}" for s in STEPS]
        out[stage] = run
    return out


def _deepspeed_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of one checkpoint, plus what it leaves out: ZeRO-1 records no
    frozen parameters, which its model-states file holds as saved."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(run), tag=f"global_step{step}")
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    model_states = run / f"global_step{step}" / "mp_rank_00_model_states.pt"
    if model_states.exists():  # our own test file, written by DeepSpeed just now
        module = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
        sd.update({k: v for k, v in module.items() if k not in sd})
    return sd


def _expected(run: Path, weights: dict[int, float]) -> dict[str, torch.Tensor]:
    """fp64 weighted average of DeepSpeed's consolidated checkpoints; integer tensors from the newest."""
    sds = {s: _deepspeed_state(run, s) for s in weights}
    total = sum(weights.values())
    newest = sds[max(weights)]
    out = {}
    for name, t in newest.items():
        if t.is_floating_point():
            out[name] = sum(w * sds[s][name].double() for s, w in weights.items()) / total
        else:
            out[name] = t
    return out


def _assert_model(out: Path, expected: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name, want in expected.items():
        if want.is_floating_point():
            torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(got[name], want), name
    # as a DeepSpeed user loads consolidated weights: into the model class, strictly
    ns: dict[str, object] = {}
    exec(compile(TRAIN.split("def run(")[0], "train", "exec"), ns)
    model = ns["Tiny"]()  # type: ignore[operator]
    model.load_state_dict(got, strict=True)
    torch.testing.assert_close(model.inp.weight.double(), expected["inp.weight"], rtol=1e-6, atol=1e-7)
    assert model.skip.weight is model.inp.weight or torch.equal(model.skip.weight, model.inp.weight)


@pytest.mark.parametrize("stage", list(STAGES), ids=[f"zero{s}" for s in STAGES])
def test_list_says_fp32_master_weights(runs: dict[int, Path], stage: int) -> None:
    result = CliRunner().invoke(cli, ["list", str(runs[stage]), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [c["step"] for c in doc["checkpoints"]] == STEPS
    assert {c["format"] for c in doc["checkpoints"]} == {"zero"}
    assert any(f"ZeRO-{stage} over 2 data-parallel ranks" in n and "fp32 master weights" in n for n in doc["ignored"])


@pytest.mark.parametrize("stage", list(STAGES), ids=[f"zero{s}" for s in STAGES])
def test_merge_window(runs: dict[int, Path], stage: int, tmp_path: Path) -> None:
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(runs[stage]), "--window", "3", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_model(out, _expected(runs[stage], dict.fromkeys(STEPS[-3:], 1.0)))
    record = json.loads((out / "ckptavg.json").read_text())
    assert [i["weights_from"] for i in record["inputs"]] == ["fp32 master weights from the DeepSpeed ZeRO "
                                                             "optimizer states"] * 3


@pytest.mark.parametrize("stage", list(STAGES), ids=[f"zero{s}" for s in STAGES])
def test_merge_ema_half_life(runs: dict[int, Path], stage: int, tmp_path: Path) -> None:
    out, h = tmp_path / "ema", 3.0
    result = CliRunner().invoke(cli, ["merge", str(runs[stage]), "--method", "ema", "--half-life", str(h),
                                      "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_model(out, _expected(runs[stage], {s: 0.5 ** ((STEPS[-1] - s) / h) for s in STEPS}))


@pytest.mark.parametrize("stage", list(STAGES), ids=[f"zero{s}" for s in STAGES])
def test_series_window(runs: dict[int, Path], stage: int, tmp_path: Path) -> None:
    out = tmp_path / "series"
    result = CliRunner().invoke(cli, ["series", str(runs[stage]), "--window", "2", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"step{s}" for s in STEPS[1:]]
    for s in STEPS[1:]:
        _assert_model(out / f"step{s}", _expected(runs[stage], {s - 2: 1.0, s: 1.0}))


def test_api_average_in_memory(runs: dict[int, Path]) -> None:
    sd = average(discover(runs[3]).last(2))
    want = _expected(runs[3], {6: 1.0, 8: 1.0})
    assert set(sd) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(sd[name].double(), t.double(), rtol=1e-6, atol=1e-7, msg=name)


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("zero_to_*.py"))
    return dest


def test_a_missing_rank_is_refused(runs: dict[int, Path], tmp_path: Path) -> None:
    run = _copy_run(runs[2], tmp_path / "run")
    (run / "global_step8" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "global_step8" in result.output and "2 data-parallel ranks but 1 optimizer-state files" in result.output
    assert not (tmp_path / "out").exists()


def test_a_leftover_rank_of_another_run_is_refused(runs: dict[int, Path], tmp_path: Path) -> None:
    run = _copy_run(runs[3], tmp_path / "run")
    step = run / "global_step6"
    shutil.copy(step / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", step / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")
    result = CliRunner().invoke(cli, ["list", str(run)])
    assert result.exit_code == 1
    assert "global_step6" in result.output and "3 optimizer-state files" in result.output


def test_zero3_model_states_without_optimizer_states_are_refused(runs: dict[int, Path], tmp_path: Path) -> None:
    run = _copy_run(runs[3], tmp_path / "run")
    for f in run.glob("global_step*/*_optim_states.pt"):
        f.unlink()
    for f in run.glob("global_step*/zero_pp_rank_1_*"):
        f.unlink()
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "placeholder" in result.output and "zero_to_fp32.py" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_model_states\.pt: tensor '(inp|skip|out|norm|frozen)"):
        discover(run)


def test_loading_never_imports_deepspeed(runs: dict[int, Path]) -> None:
    code = ("import sys, ckptavg; from ckptavg.io.readers import CheckpointReader; t = ckptavg.discover(sys.argv[1]); "
            "r = CheckpointReader(t[-1].files, t[-1].format); r.read('inp.weight'); "
            "assert not [m for m in sys.modules if m.startswith('deepspeed')]")
    subprocess.run([sys.executable, "-c", code, str(runs[3])], check=True, timeout=120)
