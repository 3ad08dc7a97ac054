"""The parallel merge: workers owning whole chunks give the same bytes as one thread, for every
input layout and dtype, with chunk boundaries inside tensors; errors still stop it cleanly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
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
    # 3000-element chunks of 1000-element blocks: the tiny model's matrices span many chunks, so
    # chunks of one tensor are computed by different workers and written out of order.
    monkeypatch.setattr(engine, "CHUNK_ELEMS", 1000)
    monkeypatch.setattr(engine, "MERGE_CHUNK", 3000)


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


# --- kernels: torch's conversions give numpy's bits -------------------------------------------

def _floats() -> np.ndarray:
    """Every finite bf16 value, exact fp16/bf16 ties, subnormals, values near both formats' limits, randoms."""
    bf16 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    rng = np.random.default_rng(0)
    edges = np.array([6.5504e4, 6.5519e4, 6.552e4, 7e4, 3.3895e38, 3.4e38, 5.96e-8, 2.98e-8, 1e-40, -0.0,
                      1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11], np.float32)
    scale = (10.0 ** rng.integers(-9, 9, 1 << 20)).astype(np.float32)
    x = np.concatenate([bf16, edges, -edges, rng.standard_normal(1 << 20).astype(np.float32) * scale])
    return x[np.isfinite(x)]


@pytest.mark.parametrize("name", ["BF16", "F16"])
def test_torch_kernels_convert_exactly_like_numpy(name):
    from ckptavg.io.dtypes import DTYPES
    from ckptavg.io.kernels import NUMPY, TorchKernels

    dt, torch_k = DTYPES[name], TorchKernels()
    x = _floats()
    with np.errstate(over="ignore", invalid="ignore"):
        want = NUMPY.from_acc(x, dt)
    got = torch_k.from_acc(x, dt)
    assert got.dtype == want.dtype and np.array_equal(got, want)  # fp32 → half: round to nearest even, overflow → Inf
    assert np.array_equal(torch_k.to_acc(want, dt, np.empty(x.size, np.float32)),
                          NUMPY.to_acc(want, dt, np.empty(x.size, np.float32)))  # half → fp32, Inf included
    for k in (torch_k, NUMPY):
        assert k.finite(x) and k.finite(np.array([], np.float32))
        for bad in (np.inf, -np.inf, np.nan):
            assert not k.finite(np.array([1.0, bad, 2.0], np.float32)), (k.name, bad)
        assert k.finite(np.array([3e38, 3e38], np.float32))  # a sum that overflows is no NaN/Inf in the values
    # fp32 → bf16 with the NaN pass skipped (the caller has checked) gives the same bits for finite values
    finite = x[np.isfinite(x)]
    assert np.array_equal(NUMPY.from_acc(finite, dt, np.empty(finite.size, dt.storage), finite=True),
                          NUMPY.from_acc(finite, dt))


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                             (torch.float32, "bfloat16"), (torch.bfloat16, "float16")])
def test_torch_and_numpy_kernels_write_the_same_bytes(make_run, tmp_path, monkeypatch, dtype, out_dtype):
    from ckptavg.io import kernels

    root, _ = make_run("safetensors", steps=(1, 2, 3, 4), dtype=dtype, values="random")
    sel = ckptavg.discover(root).window(3)
    digests = {}
    casts = []  # torch's from_acc runs when torch is picked
    real = kernels.TorchKernels.from_acc
    monkeypatch.setattr(kernels.TorchKernels, "from_acc", lambda self, *a, **k: casts.append(1) or real(self, *a, **k))
    for name, threshold in (("numpy", 1 << 62), ("torch", 0)):
        monkeypatch.setattr(kernels, "TORCH_FROM_BYTES", threshold)
        monkeypatch.setattr(kernels, "TORCH_BF16_PER_THREAD", threshold)
        for method in ("uniform", "ema"):
            for n in (1, 3):
                params = {"half_life": 1.5} if method == "ema" else {}
                out = ckptavg.average(sel, tmp_path / f"{name}-{method}-{n}", threads=n, method=method, dtype=out_dtype,
                                      progress=False, **params)
                digests[name, method, n] = _digest(out)
        assert bool(casts) == (name == "torch")
    for method in ("uniform", "ema"):
        assert len({digests[k, method, n] for k in ("numpy", "torch") for n in (1, 3)}) == 1


def test_auto_kernels_take_torch_only_for_big_half_precision_jobs():
    from ckptavg.io.kernels import TORCH_BF16_PER_THREAD, TORCH_FROM_BYTES, choose

    assert choose(TORCH_FROM_BYTES, {"F16"}).name == "torch"
    assert choose(TORCH_FROM_BYTES - 1, {"F16", "F32"}).name == "numpy"  # small: import torch would cost more than it saves
    # bf16: numpy is nearly as fast; torch only when its gain per thread exceeds the import
    assert choose(TORCH_FROM_BYTES * 8, {"BF16"}).name == "numpy"
    assert choose(TORCH_BF16_PER_THREAD * 2, {"BF16"}, threads=2).name == "torch"
    assert choose(TORCH_BF16_PER_THREAD * 2 - 1, {"BF16"}, threads=2).name == "numpy"
    assert choose(TORCH_FROM_BYTES * 8, {"F32"}).name == "numpy"  # nothing to convert
    assert choose(0, {"F32"}, "torch").name == "torch" and choose(1 << 40, {"F16"}, "numpy").name == "numpy"
    with pytest.raises(ValueError, match="kernels must be"):
        choose(0, set(), "cuda")


@pytest.mark.parametrize("how", [{"method": "uniform"}, {"method": "ema", "half_life": 1.5},
                                 {"method": "wsm", "schedule": "1-sqrt"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_series_any_thread_count_writes_the_same_bytes_as_one(make_run, tmp_path, how, dtype):
    root, _ = make_run("safetensors", steps=(1, 2, 3, 4, 5), dtype=dtype, values="random")
    from ckptavg.series import series

    traj = ckptavg.discover(root)
    digests = {}
    for n in (1, 2, 4):
        sel = ckptavg.Selection() if how["method"] == "ema" else ckptavg.Selection(window=3)
        outs = series(traj, tmp_path / f"t{n}", sel, threads=n, progress=False, **how)
        digests[n] = [(o.step, _digest(o.path)) for o in outs]
    assert len(digests[1]) >= 3 and digests[1] == digests[2] == digests[4]
