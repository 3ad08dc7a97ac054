"""``torch.distributed.checkpoint`` (DCP) folders: ``.metadata`` + ``__R_S.distcp`` shards.

Written by torchtitan (``step-N/``), OLMo-core (``stepN/model_and_optim/``) and accelerate's FSDP
(``pytorch_model_fsdp_0/``). The metadata says every entry's global shape, dtype and chunks, and where
each chunk is: a ``torch.save`` blob (a zip archive) at (file, offset, length) in a ``.distcp``
file. Chunks of a tensor are read like ``.bin`` files: the blob's pickle is loaded onto the meta
device (no data), its storage record located in the blob, and elements are ``pread`` from there;
a read of elements [start, start+count) of the full tensor gathers them from every shard that
covers them (a shard is a box of the full tensor: split along dim 0 by FSDP/torchtitan, along
others by tensor parallelism), so peak memory is a few chunks per input, flat in the number of
inputs. A tensor whose chunks cannot be read that way (a transform such as compression, a
non-contiguous or byte-swapped blob, overlapping shards) is read through torch's own DCP reader
(``FileSystemReader`` + a partial ``load`` of that one preallocated tensor): correct, but one
whole tensor per input while it is read. Never ``dcp_to_torch_save``.

Which entries are the model: DCP flattens nested state dicts (``{"model": sd, "optim": …}``) and
records each entry's path in ``planner_data``. With ``key`` (``--key``), the entries under that
path; else those under the first of :data:`MODEL_KEYS` present (OLMo-core, accelerate: names
inside it, without the prefix); else the top-level tensors (torchtitan keeps the model's keys at the
top and the optimizer, scheduler, data loader and train state under their own names). Everything
else is skipped, and :attr:`DcpFile.skipped` says what.

``.metadata`` is a plain pickle, which ``FileSystemReader.read_metadata`` unpickles with no
restriction; here it is unpickled with :data:`METADATA_GLOBALS` only (DCP's own metadata records,
``torch.Size``, dtypes, layouts, paths): anything else is refused, naming the global.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import threading
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .dtypes import from_torch
from .files import LazyFd, read_regular
from .safetensors import TensorInfo, pread_into
from .torchfile import member_offsets

MODEL_KEYS = ("model", "module", "state_dict", "model_state_dict")
_METADATA_LIMIT = 1_000_000_000  # a million-tensor model's metadata is ~100s of MB
_DCP_META = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = frozenset({
    (_DCP_META, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                             "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    # Megatron-LM's torch_dist format keeps the save plans in the metadata (DCP's own plan records)
    ("torch.distributed.checkpoint.planner", "SavePlan"), ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"), ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
})


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))
        ):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refused to load: the DCP metadata asks for the global {module}.{name}, "
                              "code that ckptavg never runs")


def read_metadata(path: Path) -> Any:
    """The ``Metadata`` of a DCP folder's ``.metadata`` file, unpickled with an allow-list."""
    data = read_regular(path, _METADATA_LIMIT, "DCP metadata")
    try:
        md = _MetadataUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 — garbage bytes raise anything: all mean "not DCP metadata"
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: not a readable DCP metadata file: "
                              f"{(text[0] if text else e.__class__.__name__)[:200]}") from None
    if not isinstance(getattr(md, "state_dict_metadata", None), Mapping):
        raise CheckpointError(f"{path}: not a readable DCP metadata file: no state_dict_metadata")
    return md


def _paths(md: Any) -> dict[str, tuple[str, ...]]:
    """Entry name → its path in the saved (nested) state dict."""
    planner = md.planner_data if isinstance(getattr(md, "planner_data", None), Mapping) else {}
    out = {}
    for fqn in md.state_dict_metadata:
        p = planner.get(fqn)
        out[fqn] = tuple(str(x) for x in p) if isinstance(p, (tuple, list)) and p else (fqn,)
    return out


def _why(e: BaseException) -> str:
    """One line for a failed DCP load: the first rank's own exception (DCP wraps it with its traceback)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, Mapping) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = str(e).strip().splitlines()
    detail = text[-1][:200] if text else ""
    return f"{e.__class__.__name__}: {detail}" if detail else f"{e.__class__.__name__} (a truncated or corrupt shard?)"


def _quiet_single_process() -> None:
    """Silence DCP's "torch.distributed is … uninitialized, assuming … a single process" warning: one
    process is exactly the intent here, and a ``catch_warnings`` around each load would race with the
    engine's reader thread. (An identical filter replaces itself: the list does not grow.)"""
    warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to load",
                            category=UserWarning)


def _is_tensor(entry: Any) -> bool:
    return hasattr(entry, "chunks") and hasattr(entry, "properties")


class _Slice(io.RawIOBase):
    """Bytes [offset, offset+length) of an open file as a seekable file of their own (``pread``: no
    shared position, so threads may read the same descriptor)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos) if n else b""
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


class _Shard:
    """One chunk of a tensor: a box (``offsets``, ``sizes``) of the full tensor of ``shape``, stored
    contiguous (row-major) at ``pos`` in ``file``. In order, its elements form runs of ``run``
    elements that are contiguous in the full tensor too (a single run when only dim 0 is cut);
    ``starts[m]`` is where run m begins in the full tensor, increasing with m."""

    def __init__(self, file: LazyFd, pos: int, offsets: tuple[int, ...], sizes: tuple[int, ...],
                 shape: tuple[int, ...]) -> None:
        self.file, self.pos = file, pos
        self.numel = math.prod(sizes)
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]  # of the full tensor, in elements
        split = max((i for i in range(len(shape)) if sizes[i] != shape[i]), default=-1)  # the last cut dim
        self.run = self.numel if split < 0 else sizes[split] * strides[split]
        if split <= 0:
            first = sum(o * g for o, g in zip(offsets, strides))
            self.starts = np.array([first], np.int64)
        else:  # one run per index of the dims before the last cut one: (prod(sizes[:split]),)
            grid = np.indices(sizes[:split], np.int64).reshape(split, -1)
            lead = np.asarray(offsets[:split], np.int64)[:, None] + grid
            self.starts = (lead * np.asarray(strides[:split], np.int64)[:, None]).sum(0) + offsets[split] * strides[split]

    def local(self, where: int) -> int:
        """How many of this shard's elements lie before element ``where`` of the full tensor."""
        m = int(np.searchsorted(self.starts, where, side="right")) - 1
        if m < 0:
            return 0
        return m * self.run + min(where - int(self.starts[m]), self.run)

    def read_into(self, out: np.ndarray, start: int, path: Path, name: str) -> None:
        """Fill the elements of ``out`` (the full tensor's [start, start+len(out))) that this shard holds."""
        a, b = self.local(start), self.local(start + len(out))
        if a >= b:
            return
        size = out.dtype.itemsize
        m0, m1 = a // self.run, (b - 1) // self.run
        if m0 == m1:  # one contiguous stretch of the full tensor: straight into out
            at = int(self.starts[m0]) + a - m0 * self.run - start
            with self.file.use() as fd:
                pread_into(fd, out[at : at + b - a], self.pos + a * size, path, name)
            return
        tmp = np.empty(b - a, out.dtype)
        with self.file.use() as fd:
            pread_into(fd, tmp, self.pos + a * size, path, name)
        # the first and last runs may be partial; whole runs between are placed in groups evenly spaced in out
        m = m0
        while m <= m1:
            lo = a if m == m0 else m * self.run
            if m in (m0, m1) or m + 1 >= m1:
                hi = min(b, (m + 1) * self.run)
                at = int(self.starts[m]) + lo - m * self.run - start
                out[at : at + hi - lo] = tmp[lo - a : hi - a]
                m += 1
                continue
            gaps = np.diff(self.starts[m:m1])  # whole runs m … m1-1: the longest evenly spaced group from m
            step = int(gaps[0])
            uneven = np.flatnonzero(gaps != step)
            n = int(uneven[0]) + 1 if len(uneven) else m1 - m
            at = int(self.starts[m]) - start
            dst = np.lib.stride_tricks.as_strided(out[at:], (n, self.run), (step * size, size))
            dst[...] = tmp[lo - a : lo - a + n * self.run].reshape(n, self.run)
            m += n


def _overlap(x: tuple[tuple[int, ...], tuple[int, ...]], y: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    return all(ox < oy + zy and oy < ox + zx for ox, zx, oy, zy in zip(x[0], x[1], y[0], y[1]))


class DcpFile:
    """One DCP checkpoint folder as one weight "file": ``tensors`` from the metadata, ``read`` with
    ``pread`` from the ``.distcp`` files (through torch's reader where that cannot be done).

    Args:
        path: the folder's ``.metadata`` file.
        key: the path (dotted) of the model in the saved state dict, e.g. ``model``; default: see
            the module docstring.
    """

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = Path(path)
        self.folder = self.path.parent
        self._md = read_metadata(self.path)
        paths = _paths(self._md)
        entries = self._md.state_dict_metadata
        prefix = tuple(key.split(".")) if key is not None and key not in (".", "") else None
        if prefix is None and key is None:
            prefix = next(((k,) for k in MODEL_KEYS if any(len(p) > 1 and p[0] == k for p in paths.values())), None)
        if prefix:
            chosen = {f: ".".join(p[len(prefix):]) for f, p in paths.items()
                      if len(p) > len(prefix) and p[: len(prefix)] == prefix and _is_tensor(entries[f])}
        else:
            chosen = {f: p[0] for f, p in paths.items() if len(p) == 1 and _is_tensor(entries[f])}
        if not chosen:
            tops = sorted({p[0] for p in paths.values()})
            where = f"under {key!r}" if key else "at the top level or under " + ", ".join(MODEL_KEYS)
            raise CheckpointError(f"{self.folder}: no model tensors {where} in this DCP checkpoint; its top-level "
                                  f"entries are: {', '.join(tops[:12])}; pass --key NAME to say which holds the model")
        self.prefix: tuple[str, ...] = prefix or ()  # where the model sits in the saved (nested) state dict
        self._fqn: dict[str, str] = {}  # our name → DCP entry name
        self.tensors: dict[str, TensorInfo] = {}
        for fqn, name in chosen.items():
            props = entries[fqn].properties
            try:
                dtype = from_torch(props.dtype)
            except ValueError:
                raise CheckpointError(f"{self.folder}: tensor {fqn!r} has unsupported dtype {props.dtype}") from None
            if name in self.tensors:
                raise CheckpointError(f"{self.folder}: two entries are named {name!r} inside the model")
            self.tensors[name] = TensorInfo(name, dtype, tuple(int(d) for d in entries[fqn].size))
            self._fqn[name] = fqn
        skipped: dict[str, int] = {}
        for fqn, p in paths.items():
            if fqn not in chosen:
                skipped[p[0]] = skipped.get(p[0], 0) + 1
        self.skipped: dict[str, int] = skipped  # top-level entry (optimizer, train state …) → entries not averaged
        # tensor → [its elements, elements not yet read]: loaded once, dropped when every element has
        # been read, so the merge's workers, each on its own chunk of whichever tensor, share one load
        self._loaded: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        # (DCP entry name, chunk offsets) → where the chunk is stored (DCP's _StorageInfo)
        self._storage: dict[tuple[str, tuple[int, ...]], Any] = {}
        storage = getattr(self._md, "storage_data", None)
        for index, where in (storage.items() if isinstance(storage, Mapping) else ()):
            offsets = getattr(index, "offset", None)
            if isinstance(getattr(index, "fqn", None), str) and offsets is not None:
                self._storage[(index.fqn, tuple(int(o) for o in offsets))] = where
        self._files: dict[str, LazyFd] = {}  # .distcp file name → its descriptor
        self._shards: dict[str, list[_Shard] | None] = {}  # tensor → its chunks; None: torch's reader

    def _file(self, name: str) -> LazyFd:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not parts or parts[0] == "/" or ".." in parts:
            raise CheckpointError(f"{self.path}: a chunk is stored in {name!r}, outside this folder; ckptavg "
                                  "reads DCP data from the checkpoint's own folder only")
        if name not in self._files:
            self._files[name] = LazyFd(self.folder / name)
        return self._files[name]

    def _blob(self, fqn: str, chunk: Any, props: Any) -> tuple[LazyFd, int] | None:
        """Where one chunk's elements are, read from its blob's zip records and meta-loaded pickle;
        None where they cannot be ``pread`` (transformed, not a plain contiguous torch.save blob)."""
        import torch

        offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(z) for z in chunk.sizes)
        where = self._storage.get((fqn, offsets))
        if where is None or getattr(where, "transform_descriptors", None):
            return None  # a transform (compression …) has no element at a fixed byte: torch's reader
        file = self._file(str(where.relative_path))
        with file.use() as fd:
            blob = _Slice(fd, int(where.offset), int(where.length))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = torch.load(blob, map_location="meta", weights_only=True)  # type: ignore[arg-type]  # no data read
                records = member_offsets(blob, self.folder / where.relative_path)  # type: ignore[arg-type]
                blob.seek(0)
                with zipfile.ZipFile(blob) as z:
                    order = [z.read(n) for n in z.namelist() if n.endswith("/byteorder")]
            except Exception:  # noqa: BLE001 — not a torch.save blob (raw bytes, a truncated file): torch's reader decides
                return None
        if (not isinstance(t, torch.Tensor) or t.dtype != props.dtype or tuple(t.shape) != sizes
                or not t.is_contiguous() or order not in ([], [b"little"]) or len(records) > 1):
            return None
        nbytes = t.untyped_storage().nbytes()
        start = int(t.storage_offset()) * t.element_size()
        if not records:
            return None
        (pos, length), = records.items()
        if length != nbytes or start + t.numel() * t.element_size() > nbytes:
            return None
        return file, int(where.offset) + pos + start  # the chunk's first element in its .distcp file

    def _plan(self, info: TensorInfo) -> list[_Shard] | None:
        """The chunks of ``info`` to ``pread``, or None: read it whole through torch's reader."""
        fqn = self._fqn[info.name]
        entry = self._md.state_dict_metadata[fqn]
        boxes = [(tuple(int(o) for o in c.offsets), tuple(int(z) for z in c.sizes)) for c in entry.chunks]
        shape = info.shape
        inside = all(len(o) == len(shape) == len(z) and all(a >= 0 and a + n <= d for a, n, d in zip(o, z, shape))
                     for o, z in boxes)
        # the chunks must tile the tensor: inside it, no two overlapping, as many elements as it has
        # (pairs checked one by one: past 256 chunks of one tensor, torch's reader is quicker than that)
        if not inside or sum(math.prod(z) for _, z in boxes) != info.numel or len(boxes) > 256 or any(
                _overlap(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))):
            return None
        shards = []
        for chunk, (offsets, sizes) in zip(entry.chunks, boxes):
            if math.prod(sizes) == 0:
                continue
            found = self._blob(fqn, chunk, entry.properties)
            if found is None:
                return None
            shards.append(_Shard(*found, offsets, sizes, shape))
        return shards

    def _load(self, info: TensorInfo) -> np.ndarray:
        import torch
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        md = self._md

        class _Reader(FileSystemReader):  # the metadata already read, with the allow-list
            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                return md

        fqn = self._fqn[info.name]
        t = torch.empty(info.shape, dtype=getattr(torch, info.dtype.torch_name))
        _quiet_single_process()
        try:
            load({fqn: t}, storage_reader=_Reader(os.fspath(self.folder)),
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 — a bad shard fails in many ways
            raise CheckpointError(f"{self.folder}: tensor {fqn!r} cannot be read: {_why(e)}") from None
        flat = t.reshape(-1)
        if info.dtype.name == "BF16":
            flat = flat.view(torch.int16)
        elif info.dtype.name == "BOOL" or info.dtype.name.startswith("F8"):
            flat = flat.view(torch.uint8)
        return flat.numpy().view(info.dtype.storage)

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [start, start+count) of flattened ``info`` as raw storage values, gathered from
        the chunks that hold them; where torch's reader is needed instead (see the module
        docstring), the whole tensor is loaded once and dropped when all its elements have been
        read (or at close)."""
        if count is None:
            count = info.numel - start
        if info.name not in self._shards:
            with self._lock:
                if info.name not in self._shards:
                    self._shards[info.name] = self._plan(info)
        shards = self._shards[info.name]
        if shards is not None:
            out = np.empty(count, info.dtype.storage)
            for shard in shards:
                shard.read_into(out, start, shard.file.path, self._fqn[info.name])
            return out
        with self._lock:  # loads of one input one at a time; other inputs load in parallel
            entry = self._loaded.get(info.name)
            if entry is None:
                entry = self._loaded[info.name] = [self._load(info), info.numel]
            out = entry[0][start : start + count].copy()
            entry[1] -= count
            if entry[1] <= 0:
                del self._loaded[info.name]
        return out

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()
        for file in self._files.values():
            file.close()


__all__ = ["METADATA_GLOBALS", "MODEL_KEYS", "DcpFile", "read_metadata"]
