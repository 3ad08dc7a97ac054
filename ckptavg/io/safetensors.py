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

import hashlib
import json
import math
import os
import re
import struct
import sys
import weakref
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]  # json's C string scanner
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .dtypes import DTYPES, DType
from .files import LazyFd, json_problem, open_regular

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_U64 = 2**64  # shapes and offsets are u64 in the format: larger integers are not a size


@dataclass(frozen=True, slots=True)  # slots: a million-tensor header is a million of these, per checkpoint
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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _pread_exact(fd: int, n: int, pos: int, path: Path) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, pos + got)
        if not b:
            raise _fail(path, f"file ended at byte {pos + got} while reading the header (truncated while being read?)")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


class _Tensors(dict[str, TensorInfo]):
    """A parsed header's tensors, in file order (a dict that can be weakly referenced)."""

    __slots__ = ("__weakref__", "metadata", "digest")
    metadata: dict[str, str]
    digest: bytes  # BLAKE2b of the header bytes it was parsed from


# (device, inode, size) of a file → the header parsed from it, for as long as something (a
# Checkpoint found by discovery) holds it: the readers of the merge then reuse it instead of
# parsing a million-tensor header again and holding a second copy. The header bytes are still
# read every time and must hash the same, so a rewritten file is parsed afresh.
_PARSED: weakref.WeakValueDictionary[tuple[int, ...], _Tensors] = weakref.WeakValueDictionary()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns (tensors in file order, metadata).

    The result is shared with earlier calls on the unchanged file: treat it as read-only.

    Raises:
        CheckpointError: not a regular file (a FIFO is refused, not waited on), a header too long,
            not UTF-8 JSON, nested too deeply, or describing tensors the file does not hold.
    """
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size < 8:
            raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path))
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise _fail(path, f"header length {n} runs past the end of the {size}-byte file")
        raw = _pread_exact(fd, n, 8, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    ident, digest = (st.st_dev, st.st_ino, size), hashlib.blake2b(raw, digest_size=16).digest()
    known = _PARSED.get(ident)
    if known is not None and known.digest == digest:
        return known, known.metadata
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not UTF-8 JSON ({json_problem(e)})") from None
    del raw
    tensors, meta = _parse_entries(text, path, 8 + n, size)
    tensors.metadata, tensors.digest = meta, digest
    _PARSED[ident] = tensors
    return tensors, meta


_WS, _WS_CHARS = re.compile(r"[ \t\n\r]*"), frozenset(" \t\n\r")


def _skip(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i``."""
    if text[i : i + 1] not in _WS_CHARS:  # compact JSON, as every writer emits it: no regex
        return i
    m = _WS.match(text, i)
    return m.end() if m else i


def _members(text: str, path: Path) -> Iterator[tuple[str, object]]:
    """The (key, value) pairs of the JSON object ``text``, one at a time.

    ``json.loads`` would first build a dict of a million small dicts (~600 MB for a million
    tensors) before any is checked; here each value is parsed by json's own C scanner and dropped
    once turned into a TensorInfo.
    """
    scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner: (text, i) -> (value, end)
    i = _skip(text, 0)
    if text[i : i + 1] != "{":
        try:
            json.loads(text)  # the decoder's own words for what is wrong, if anything is
        except (ValueError, RecursionError) as e:
            raise _fail(path, f"header is not UTF-8 JSON ({json_problem(e)})") from None
        raise _fail(path, "header is not a JSON object")
    i = _skip(text, i + 1)
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
            key, i = scanstring(text, i + 1)
            i = _skip(text, i)
            if text[i : i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            try:
                value, i = scan(text, _skip(text, i + 1))
            except StopIteration as e:
                raise json.JSONDecodeError("Expecting value", text, e.value) from None
            yield key, value
            i = _skip(text, i)
            if text[i : i + 1] == ",":
                i = _skip(text, i + 1)
                continue
            if text[i : i + 1] != "}":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
            i += 1
            break
    if _skip(text, i) != len(text):
        raise json.JSONDecodeError("Extra data", text, i)


def _parse_entries(text: str, path: Path, data_start: int, size: int) -> tuple[_Tensors, dict[str, str]]:
    try:
        return _check_entries(_members(text, path), path, data_start, size)
    except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit integer, [[[[… 100k deep
        raise _fail(path, f"header is not UTF-8 JSON ({json_problem(e)})") from None


def _check_entries(
    members: Iterator[tuple[str, object]], path: Path, data_start: int, size: int
) -> tuple[_Tensors, dict[str, str]]:
    meta: object = {}
    data_len = size - data_start
    names: list[str] = []
    begins, ends = array("q"), array("q")  # 8 bytes a tensor, not a tuple of int objects
    tensors = _Tensors()
    # (shape, numel) per distinct shape: a million tensors share a few dozen shapes, and one tuple each
    shapes: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
    for name, entry in members:
        if name == "__metadata__":
            meta = entry or {}
            continue
        if type(entry) is not dict:
            raise _fail(path, f"tensor {name!r}: entry is not an object")
        if name in tensors:
            raise _fail(path, f"tensor {name!r} is listed twice")
        dt = entry.get("dtype")
        dtype = DTYPES.get(dt) if type(dt) is str else None
        if dtype is None:
            raise _fail(path, f"tensor {name!r}: unknown dtype {_short(dt)}")
        shape, offs = entry.get("shape"), entry.get("data_offsets")
        if not (type(shape) is list and all(type(d) is int and 0 <= d < _U64 for d in shape)):
            raise _fail(path, f"tensor {name!r}: bad shape {_short(shape)}")
        if not (type(offs) is list and len(offs) == 2 and type(offs[0]) is int and type(offs[1]) is int):
            raise _fail(path, f"tensor {name!r}: bad data_offsets {_short(offs)}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise _fail(path, f"tensor {name!r}: data_offsets {_short(offs)} outside the {data_len}-byte data section "
                              "(truncated file?)")
        key = tuple(shape)
        known = shapes.get(key)
        if known is None:
            known = shapes[key] = (key, math.prod(key))
        nbytes = known[1] * dtype.itemsize
        if end - begin != nbytes:
            raise _fail(path, f"tensor {name!r}: {end - begin} bytes for {dtype.name}{_short(shape)} which needs "
                              f"{_short(nbytes)}")
        name = sys.intern(name)  # one string per tensor name, however many checkpoints and copies hold it
        names.append(name)
        begins.append(begin)
        ends.append(end)
        tensors[name] = TensorInfo(name, dtype, known[0], data_start + begin)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    return _in_file_order(tensors, names, begins, ends, data_len, path), meta


def _in_file_order(tensors: _Tensors, names: list[str], begins: array[int], ends: array[int],
                   data_len: int, path: Path) -> _Tensors:
    """``tensors`` ordered by offset, after checking they tile the data section: no gap, no overlap."""
    b, e = np.frombuffer(begins, np.int64), np.frombuffer(ends, np.int64)
    order = np.lexsort((e, b))  # by begin, then end; stable, so empty tensors at one offset keep header order
    b, e = b[order], e[order]
    prev = np.concatenate(([0], e[:-1]))  # where each tensor must begin: where the one before it ends
    bad = np.flatnonzero(b != prev)
    if bad.size:
        k = int(bad[0])
        what = "overlaps the previous tensor" if b[k] < prev[k] else f"leaves a gap at byte {int(prev[k])}"
        raise _fail(path, f"tensor {names[int(order[k])]!r}: {what}")
    pos = int(e[-1]) if e.size else 0
    if pos != data_len:
        raise _fail(path, f"data section is {data_len} bytes but tensors cover {pos} (truncated or padded file)")
    if np.array_equal(order, np.arange(order.size)):
        return tensors
    return _Tensors((names[i], tensors[names[i]]) for i in order.tolist())


def pread_into(fd: int, out: np.ndarray, pos: int, path: Path, name: str) -> None:
    """Fill ``out`` with the file's bytes at ``pos``; the GIL is released while the kernel copies."""
    view = memoryview(out).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], pos + got)
        if n == 0:
            raise CheckpointError(f"{path}: file ended while reading tensor {name!r} (truncated while being read?)")
        got += n


class SafetensorsFile:
    """Reads chunks of tensors from one safetensors file with ``pread``; no mapping. The file is
    opened when first read and may be closed between reads (see :class:`~ckptavg.io.files.LazyFd`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._file = LazyFd(self.path)

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None,
             buffer: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, start+count) of the flattened tensor, as raw storage values; into
        ``buffer`` (bytes, uint8, at least count × itemsize; the result is a view of it) if given."""
        if count is None:
            count = info.numel - start
        if buffer is not None:
            out = buffer[: count * info.dtype.itemsize].view(info.dtype.storage)
        else:
            out = np.empty(count, info.dtype.storage)
        if count == 0:
            return out
        fd = self._file.acquire()
        try:
            pread_into(fd, out, info.offset + start * info.dtype.itemsize, self.path, info.name)
        finally:
            self._file.done()
        return out

    def extent(self, info: TensorInfo) -> tuple[LazyFd, int]:
        """The file, and the byte offset of the tensor's first element (see CheckpointReader.extent)."""
        return self._file, info.offset

    def close(self) -> None:
        self._file.close()


_HEADER_BATCH = 4096  # entries per write: a million-tensor header never sits whole in memory as str pieces


def _write_header(fd: int, entries: Sequence[TensorInfo], metadata: dict[str, str]) -> int:
    """Write the header ``json.dumps`` would (same bytes) at offset 8, padded so data starts
    8-byte aligned as safetensors writes it, and its length at offset 0; returns 8 + its length."""
    parts = ['{"__metadata__":' + json.dumps(metadata, separators=(",", ":"))] if metadata else ["{"]
    pos, at, sep = 0, 8, "," if metadata else ""
    for t in entries:
        shape = ",".join(map(str, t.shape))
        parts.append(f'{sep}{json.dumps(t.name)}:{{"dtype":"{t.dtype.name}","shape":[{shape}],'
                     f'"data_offsets":[{pos},{pos + t.nbytes}]}}')
        pos, sep = pos + t.nbytes, ","
        if len(parts) >= _HEADER_BATCH:
            at += _pwrite_all(fd, "".join(parts).encode(), at)
            parts = []
    parts.append("}")
    at += _pwrite_all(fd, "".join(parts).encode(), at)
    at += _pwrite_all(fd, b" " * (-(at - 8) % 8), at)
    _pwrite_all(fd, struct.pack("<Q", at - 8), 0)
    return at


def _pwrite_all(fd: int, data: bytes, pos: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n
    return len(data)


class SafetensorsWriter:
    """Writes one safetensors file whose layout is fixed before any tensor is produced.

    ``write(name, start, values)`` puts raw values at element ``start`` of tensor ``name``; the
    pieces may arrive in any order. The file is pre-sized, so a missing piece reads as zeros —
    the engine guarantees every byte is written before the directory is renamed into place.
    """

    def __init__(self, path: Path, entries: Sequence[TensorInfo], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pos = _write_header(fd, entries, {"format": "pt", **(metadata or {})})
            self.offsets: dict[str, tuple[int, int]] = {}  # name → (file offset, itemsize)
            for t in entries:
                self.offsets[t.name] = (pos, t.dtype.itemsize)
                pos += t.nbytes
            self.size = pos
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)  # reopened on demand: a series writing 600 outputs holds a bounded number open
        self._file: LazyFd | None = LazyFd(self.path, os.O_WRONLY)

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        offset, itemsize = self.offsets[name]
        view = memoryview(np.ascontiguousarray(values)).cast("B")  # type: ignore[arg-type]
        pos = offset + start * itemsize
        assert self._file is not None, f"{self.path}: written after close"
        fd = self._file.acquire()
        try:
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        finally:
            self._file.done()

    def close(self, fsync: bool = False) -> None:
        if self._file is not None:
            try:
                if fsync:
                    with self._file.use() as fd:
                        os.fsync(fd)
            finally:
                self._file.close()
                self._file = None


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
