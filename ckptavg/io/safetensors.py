"""safetensors reading and streaming writing, without mmap and without torch.

Why not ``safetensors.safe_open``: it maps the whole file, and every page a merge touches stays in
the process's resident set while the file is open, so averaging k inputs shows k × model in peak
RSS. Reading each chunk with ``pread`` into a reused buffer keeps peak memory at a few chunks,
whatever k and the model size. The header is validated here as strictly as safetensors does
(contiguous offsets, sizes that match dtype × shape), and tests read our output back with
safetensors itself.

safetensors has no streaming writer; ``SafetensorsWriter`` computes the header up front, pre-sizes
the file and writes each tensor's bytes at its offset as they are produced.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .dtypes import DTYPES, DType

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are. ``offset`` is absolute in the file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file: {what}")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns (tensors in file order, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise _fail(path, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not UTF-8 JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(path, f"tensor {name!r}: entry is not an object")
        dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise _fail(path, f"tensor {name!r}: unknown dtype {entry.get('dtype')!r}")
        shape, offs = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _fail(path, f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise _fail(path, f"tensor {name!r}: data_offsets {offs} outside the {data_len}-byte data section (truncated file?)")
        info = TensorInfo(name, dtype, tuple(shape), data_start + begin)
        if end - begin != info.nbytes:
            raise _fail(path, f"tensor {name!r}: {end - begin} bytes for {dtype.name}{list(shape)} which needs {info.nbytes}")
        spans.append((begin, end, name))
        tensors[name] = info
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise _fail(path, f"tensor {name!r}: {what}")
        pos = end
    if pos != data_len:
        raise _fail(path, f"data section is {data_len} bytes but tensors cover {pos} (truncated or padded file)")
    ordered = {name: tensors[name] for _, _, name in spans}
    return ordered, meta


def pread_into(fd: int, out: np.ndarray, pos: int, path: Path, name: str) -> None:
    """Fill ``out`` with the file's bytes at ``pos``; the GIL is released while the kernel copies."""
    view = memoryview(out).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], pos + got)
        if n == 0:
            raise CheckpointError(f"{path}: file ended while reading tensor {name!r} (truncated?)")
        got += n


class SafetensorsFile:
    """Reads chunks of tensors from one safetensors file with ``pread``; no mapping."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._fd: int | None = None

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [start, start+count) of the flattened tensor, as raw storage values."""
        if count is None:
            count = info.numel - start
        out = np.empty(count, info.dtype.storage)
        if count == 0:
            return out
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        pread_into(self._fd, out, info.offset + start * info.dtype.itemsize, self.path, info.name)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _header_bytes(entries: Sequence[TensorInfo], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for t in entries:
        header[t.name] = {"dtype": t.dtype.name, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes one safetensors file whose layout is fixed before any tensor is produced.

    ``write(name, start, values)`` puts raw values at element ``start`` of tensor ``name``; the
    pieces may arrive in any order. The file is pre-sized, so a missing piece reads as zeros —
    the engine guarantees every byte is written before the directory is renamed into place.
    """

    def __init__(self, path: Path, entries: Sequence[TensorInfo], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header = _header_bytes(entries, {"format": "pt", **(metadata or {})})
        self.offsets: dict[str, TensorInfo] = {}
        pos = len(header)
        for t in entries:
            self.offsets[t.name] = TensorInfo(t.name, t.dtype, t.shape, pos)
            pos += t.nbytes
        self.size = pos
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(self._fd, header, 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        info = self.offsets[name]
        view = memoryview(np.ascontiguousarray(values)).cast("B")  # type: ignore[arg-type]
        pos = info.offset + start * info.dtype.itemsize
        assert self._fd is not None, f"{self.path}: written after close"
        while view:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n

    def close(self, fsync: bool = False) -> None:
        if self._fd is not None:
            try:
                if fsync:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


def plan_shards(entries: Sequence[TensorInfo], max_shard_size: int | None) -> list[list[TensorInfo]]:
    """Split tensors into shards of at most ``max_shard_size`` bytes, in order (HF's greedy rule:
    a tensor larger than the limit gets a shard of its own)."""
    if not max_shard_size:
        return [list(entries)]
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in entries:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MiB"`` / ``1000`` -> bytes (HF's units: GB = 10**9)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or not math.isfinite(value) or value <= 0 or value * _SIZE_UNITS[unit] >= 2**63:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB or 500MiB")
    return int(value * _SIZE_UNITS[unit])
