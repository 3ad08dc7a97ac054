"""Where averaged tensors go: a sharded safetensors directory, or a state dict in memory."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import OutputError, OutputExistsError
from .dtypes import to_torch
from .layout import SAFETENSORS_INDEX, shard_names, write_index
from .safetensors import SafetensorsWriter, TensorInfo, plan_shards


class Sink(Protocol):
    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Raw values for elements [start, start + len(values)) of flattened tensor ``name``."""


class SafetensorsDirSink:
    """Writes ``model.safetensors`` (or HF-named shards plus ``model.safetensors.index.json``)."""

    def __init__(self, directory: Path, entries: Sequence[TensorInfo], max_shard_size: int | None = None) -> None:
        self.directory = directory
        shards = plan_shards(entries, max_shard_size)
        names = shard_names(len(shards))
        self.files = [directory / n for n in names]
        self._writers: list[SafetensorsWriter] = []
        self._route: dict[str, SafetensorsWriter] = {}
        try:
            for path, shard in zip(self.files, shards):
                w = SafetensorsWriter(path, shard)
                self._writers.append(w)
                for t in shard:
                    self._route[t.name] = w
        except BaseException:
            self.close()
            raise
        if len(shards) > 1:
            write_index(directory / SAFETENSORS_INDEX, zip(names, shards))

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        self._route[name].write(name, start, values)

    def close(self, fsync: bool = False) -> None:
        for w in self._writers:
            w.close(fsync)


class StateDictSink:
    """Collects the averaged tensors in memory; ``state_dict()`` returns torch tensors."""

    def __init__(self, entries: Sequence[TensorInfo]) -> None:
        self.entries = list(entries)
        self.arrays = {t.name: np.empty(t.numel, t.dtype.storage) for t in entries}

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        self.arrays[name][start : start + len(values)] = values

    def state_dict(self) -> dict[str, Any]:
        return {t.name: to_torch(self.arrays.pop(t.name), t.dtype, t.shape) for t in self.entries}


_TMP_TAG = ".ckptavg-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove temporaries that crashed runs left beside ``out`` (their process is gone)."""
    removed: list[Path] = []
    prefix = f".{out.name}{_TMP_TAG}"
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def check_output(out: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that would overwrite work or land inside an input, before any work."""
    target = out.resolve()
    for p in inputs:
        src = Path(p).resolve()
        if target == src or src in target.parents:
            raise OutputError(f"{out}: output would be written inside the input {p}; choose another -o")
        if target in src.parents and force:
            raise OutputError(f"{out}: output contains the input {p}; --force would delete it")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise OutputExistsError(f"{out}: already exists and is not empty; use --force to replace it")


def begin_directory(out: Path, force: bool = False) -> Path:
    """Check ``out`` and create the hidden temporary sibling the output is built in."""
    out = Path(os.path.abspath(out))
    check_output(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{out}: cannot create output: {e.strerror or e}") from None
    return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_directory(tmp: Path, out: Path, fsync: bool = True) -> None:
    """Move a finished temporary into place (replacing an old ``out`` only once the new one is whole).

    With ``fsync`` every file and the folder reach the disk before the rename, and the rename
    before this returns: after a power loss ``out`` is either absent or whole, never a folder of
    empty files.
    """
    out = Path(os.path.abspath(out))
    if fsync:
        for p in sorted(tmp.iterdir()):
            if p.is_file() and not p.is_symlink():
                _fsync(p)
        _fsync(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.ckptavg-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    if fsync:
        _fsync(out.parent)


@contextmanager
def atomic_directory(out: Path, force: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it is renamed to ``out``, on any error
    (or a kill) nothing appears at ``out``. A leftover temporary is hidden (dot name) and is
    removed by the next run once its process is gone."""
    tmp = begin_directory(out, force)
    try:
        yield tmp
        commit_directory(tmp, out, fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
