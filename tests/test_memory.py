"""Peak RSS does not grow with the number of inputs (measured by the OS, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peak_rss_flat_from_2_to_10_inputs(big_runs, tmp_path, fmt):
    rss = {}
    for k in (K_SMALL, K_LARGE):
        rss[k] = peak_rss_mb([sys.executable, "-m", "ckptavg", "merge", str(big_runs[fmt]), "--window", str(k),
                              "-o", str(tmp_path / f"out{k}"), "-q"])
    assert rss[K_LARGE] - rss[K_SMALL] < MARGIN_MB, rss
