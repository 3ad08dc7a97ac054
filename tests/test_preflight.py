"""merge --dry-run as a preflight: what it says it will read and write is what a real merge reads
and writes; the memory bound does not grow with the model."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

import ckptavg
from ckptavg.cli import cli
from ckptavg.engine import CHUNK_ELEMS, ROW_GROUP
from ckptavg.preflight import memory_bound, preflight


def _tensor_bytes(folder) -> int:
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


def test_dry_run_figures_are_what_the_merge_reads_and_writes(make_run, tmp_path):
    root, _ = make_run("bin-sharded", steps=(1, 2, 3, 4))
    sel = ckptavg.discover(root).window(3)
    r = CliRunner().invoke(cli, ["merge", str(root), "--window", "3", "--dtype", "bf16", "-o", str(tmp_path / "o"),
                                 "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    pf = json.loads(r.stdout)["preflight"]
    assert not (tmp_path / "o").exists()
    assert pf["read_bytes"] == sum(os.path.getsize(f) for c in sel for f in c.files)
    out = ckptavg.average(sel, tmp_path / "o", dtype="bf16", progress=False)
    assert pf["write_bytes"] == _tensor_bytes(out)
    assert pf["inputs"] == 3 and pf["fits"] is True
    assert abs(pf["free_bytes"] - shutil.disk_usage(tmp_path).free) < 2**26


def test_memory_bound_grows_with_inputs_not_with_the_model(make_run):
    root, _ = make_run("safetensors", steps=(1, 2, 3, 4, 5))
    traj = ckptavg.discover(root)
    small = preflight(list(traj.window(2)), "o", threads=1).memory_bytes
    big = preflight(list(traj.window(5)), "o", threads=1).memory_bytes
    assert big - small == memory_bound(5, 4, 4, 4) - memory_bound(2, 4, 4, 4) == 3 * 5 * CHUNK_ELEMS * 4
    # Workers: each holds one block of every input, and converts up to ROW_GROUP of them at once,
    # so three more inputs cost 3 raw blocks and 2 converted ones (4 → capped at ROW_GROUP) per worker.
    small = preflight(list(traj.window(2)), "o", threads=4).memory_bytes
    big = preflight(list(traj.window(5)), "o", threads=4).memory_bytes
    assert ROW_GROUP == 4 and big - small == 4 * (3 + 2) * CHUNK_ELEMS * 4 and preflight(list(traj.window(5)), "o", threads=4).threads == 4
    # The bound is the same for a model 1000x larger: it depends on chunks, not tensors.
    assert memory_bound(5, 2, 2) < 64 * 2**20


def test_an_output_that_cannot_fit_is_flagged(make_run, tmp_path, monkeypatch):
    root, _ = make_run("safetensors", steps=(1, 2))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 10, 10))
    r = CliRunner().invoke(cli, ["merge", str(root), "--window", "2", "-o", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "free at the output: 10 B — NOT ENOUGH for the output" in r.output
    assert "reads " in r.output and "holds at most" in r.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise are Linux's")
def test_preflight_says_how_much_of_the_inputs_is_in_the_page_cache(make_run, tmp_path):
    """Evicted inputs (fsync, then fadvise DONTNEED) count as not cached; once read, as cached.
    Asking reads no data: the dry run leaves an evicted file evicted."""
    from ckptavg.io.residency import resident_bytes

    root, _ = make_run("safetensors", steps=(1, 2))
    files = [f for c in ckptavg.discover(root) for f in c.files]
    total = sum(os.path.getsize(f) for f in files)

    def evict() -> None:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    def dry() -> dict:
        r = CliRunner().invoke(cli, ["merge", str(root), "--window", "2", "-o", str(tmp_path / "o"), "--dry-run", "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["preflight"]

    for f in files:
        Path(f).read_bytes()
    pf = dry()
    assert pf["cached_bytes"] == total == pf["read_bytes"]  # whole pages, capped at each file's size
    evict()
    if not all(resident_bytes(f) < os.path.getsize(f) // 2 for f in files):
        pytest.skip("this filesystem keeps the pages (tmpfs?): nothing to tell apart")
    assert dry()["cached_bytes"] < total // 2
    assert all(resident_bytes(f) < os.path.getsize(f) // 2 for f in files)  # the dry run read nothing
    r = CliRunner().invoke(cli, ["merge", str(root), "--window", "2", "-o", str(tmp_path / "o"), "--dry-run"])
    assert "of it in the page cache: the rest comes from the disk" in r.output
