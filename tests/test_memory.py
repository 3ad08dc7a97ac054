"""Peak RSS does not grow with the number of inputs (measured by the OS, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each test measures whole subprocesses

BIG = 4 * 2**20  # elements: a 16 MiB fp32 tensor per checkpoint, so k inputs mapped would cost k × 16 MiB
K_SMALL, K_LARGE = 2, 10
MARGIN_MB = 24  # well under (K_LARGE - K_SMALL) × 16 MiB = 128 MiB, what holding every input would add

_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)"
)


def peak_rss_mb(args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True)
    kb = int(out.stdout.strip().splitlines()[-1])
    assert kb > 0, out.stderr
    return kb / 1024


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("mem")
    runs = {}
    for fmt in ("safetensors", "bin"):
        root = base / fmt
        for i in range(K_LARGE):
            d = root / f"step{i + 1}"
            d.mkdir(parents=True)
            sd = {"big": torch.full((BIG,), float(i)), "small": torch.arange(10.0) + i}
            if fmt == "safetensors":
                save_file(sd, d / "model.safetensors")
            else:
                torch.save(sd, d / "pytorch_model.bin")
        runs[fmt] = root
    return runs


def _bound_growth_mb() -> float:
    """What the engine may add from K_SMALL to K_LARGE fp32 inputs on the default thread count:
    a block of each extra input per worker (a few MiB; holding whole inputs would add 128 MiB)."""
    from ckptavg.pipeline import available_cpus
    from ckptavg.preflight import memory_bound

    n = available_cpus()
    return (memory_bound(K_LARGE, 4, 4, 4, n) - memory_bound(K_SMALL, 4, 4, 4, n)) / 2**20


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peak_rss_flat_from_2_to_10_inputs(big_runs, tmp_path, fmt):
    rss = {}
    for k in (K_SMALL, K_LARGE):
        rss[k] = peak_rss_mb([sys.executable, "-m", "ckptavg", "merge", str(big_runs[fmt]), "--window", str(k),
                              "-o", str(tmp_path / f"out{k}"), "-q"])
    assert rss[K_LARGE] - rss[K_SMALL] < _bound_growth_mb() + MARGIN_MB, rss


_ITER = """
import sys, ckptavg, torch
from ckptavg.selection import Selection
from ckptavg.series import iter_series
traj = ckptavg.discover(sys.argv[1])
if sys.argv[2] != "none":
    kw = {"method": "ema", "half_life": 2.0} if sys.argv[2] == "ema" else {}
    sel = Selection(window=3) if sys.argv[2] == "uniform" else None
    for target, sd in iter_series(traj, sel, **kw):
        del sd
"""
MODEL_MB = BIG * 4 / 2**20  # the fp32 model of big_runs: 16 MiB


@pytest.mark.parametrize("method", ["uniform", "ema"])
def test_iter_series_holds_one_fp32_sum_and_one_output_model(big_runs, method):
    """Documented bound: one fp32 running sum of the model plus the state dict being yielded.
    A model-sized fp64 sum (the old design) would add another MODEL_MB and fail this."""
    base = peak_rss_mb([sys.executable, "-c", _ITER, str(big_runs["safetensors"]), "none"])
    peak = peak_rss_mb([sys.executable, "-c", _ITER, str(big_runs["safetensors"]), method])
    assert peak - base < 2.75 * MODEL_MB, (base, peak)  # measured 36 MB for fp32 (bound 32 + overhead), 53 for fp64


@pytest.mark.parametrize("threads", [1, 4])
def test_merge_holds_no_more_than_the_preflight_memory_bound(big_runs, tmp_path, threads):
    """The engine's buffers (the merge's peak minus a dry run's: same discovery, no tensor data)
    stay within what ``--dry-run`` promises, for one thread and for workers."""
    import json

    from ckptavg.preflight import memory_bound

    root = str(big_runs["safetensors"])
    args = ["merge", root, "--window", str(K_LARGE), "--threads", str(threads), "-q"]
    dry = peak_rss_mb([sys.executable, "-m", "ckptavg", *args, "-o", str(tmp_path / "dry"), "--dry-run"])
    peak = peak_rss_mb([sys.executable, "-m", "ckptavg", *args, "-o", str(tmp_path / "out")])
    promised = json.loads(subprocess.run([sys.executable, "-m", "ckptavg", *args, "-o", str(tmp_path / "dry"),
                                          "--dry-run", "--json"], capture_output=True, text=True, check=True).stdout)
    bound_mb = promised["preflight"]["memory_bytes"] / 2**20
    assert promised["preflight"]["memory_bytes"] == memory_bound(K_LARGE, 4, 4, 4, threads)
    assert peak - dry <= bound_mb + MARGIN_MB, (peak, dry, bound_mb)


@pytest.fixture(scope="module")
def dcp_big_run(tmp_path_factory) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("mem-dcp") / "run"
    with warnings.catch_warnings():  # "torch.distributed is disabled … single process": intended
        warnings.simplefilter("ignore")
        for i in range(K_LARGE):
            dcp.save({"big": torch.full((BIG,), float(i)), "small": torch.arange(10.0) + i},
                     checkpoint_id=root / f"step-{i + 1}", no_dist=True)
    return root


def test_dcp_peak_rss_flat_from_2_to_10_inputs(dcp_big_run, tmp_path):
    """DCP chunks are pread from the .distcp files: no whole tensor per input (torch's reader would
    hold one 16 MiB tensor per input, 128 MiB more at k = 10)."""
    rss = {}
    for k in (K_SMALL, K_LARGE):
        rss[k] = peak_rss_mb([sys.executable, "-m", "ckptavg", "merge", str(dcp_big_run), "--window", str(k),
                              "-o", str(tmp_path / f"out{k}"), "-q"])
    assert rss[K_LARGE] - rss[K_SMALL] < MARGIN_MB, rss
