"""The parallel merge: workers owning whole chunks give the same bytes as one thread, for every
input layout and dtype, with chunk boundaries inside tensors; errors still stop it cleanly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ckptavg
from ckptavg import engine
from ckptavg.cli import cli
from ckptavg.pipeline import available_cpus
from conftest import FORMATS


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 1000 elements: the tiny model's matrices span many chunks, so chunks of one tensor are
    # computed by different workers and written out of order.
    monkeypatch.setattr(engine, "CHUNK_ELEMS", 1000)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_thread_count_writes_the_same_bytes_as_one(make_run, tmp_path, fmt, dtype):
    root, states = make_run(fmt, steps=(1, 2, 3, 4), dtype=dtype, values="random")
    sel = ckptavg.discover(root).window(3)
    outs = {n: ckptavg.average(sel, tmp_path / f"t{n}", threads=n, method="ema", half_life=1.5, progress=False)
            for n in (1, 2, 5)}
    assert _digest(outs[1]) == _digest(outs[2]) == _digest(outs[5])
    got = load_file(outs[5] / "model.safetensors")
    w = ckptavg.methods.weights("ema", [2, 3, 4], half_life=1.5)
    for name, t in got.items():
        if not t.is_floating_point():
            assert torch.equal(t, states[4][name])
            continue
        want = sum(wi * states[s][name].double() for wi, s in zip(w, (2, 3, 4)))
        torch.testing.assert_close(t.double(), want.to(dtype).double(), rtol=0, atol=float(want.abs().max()) * 2e-2 + 1e-6)


def test_in_memory_average_is_the_same_for_any_thread_count(make_run):
    root, _ = make_run("safetensors", steps=(1, 2, 3), values="random")
    one = ckptavg.average(ckptavg.discover(root), threads=1, progress=False)
    many = ckptavg.average(ckptavg.discover(root), threads=4, progress=False)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_a_nan_found_by_a_worker_stops_the_merge_and_leaves_nothing(make_run, tmp_path):
    def poisoned(i: int) -> torch.Tensor:
        t = torch.ones(3000)
        if i == 1:
            t[2500] = float("nan")  # in the third chunk
        return t

    root, _ = make_run("safetensors", steps=(1, 2, 3), extra={"zz.nan": poisoned})
    with pytest.raises(ckptavg.NonFiniteError, match=r"step 2.*tensor 'zz.nan' has NaN/Inf"):
        ckptavg.average(ckptavg.discover(root), tmp_path / "o", threads=3, progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_threads_flag(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2))
    r = CliRunner().invoke(cli, ["merge", str(root), "--window", "2", "-o", str(tmp_path / "o"), "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.output
    r = CliRunner().invoke(cli, ["merge", str(root), "--window", "2", "-o", str(tmp_path / "o"), "--threads", "3", "-q"])
    assert r.exit_code == 0, r.output
    with pytest.raises(ckptavg.UsageError, match="--threads must be at least 1"):
        ckptavg.average(ckptavg.discover(root), threads=0, progress=False)
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)
