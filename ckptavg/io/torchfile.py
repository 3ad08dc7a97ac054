"""``.bin`` / ``.pt`` / ``.pth`` reading through ``torch.load(weights_only=True)`` only.

A pickle from the internet must never run code, so ``weights_only=False`` appears nowhere in this
package. Zip-format files (everything ``torch.save`` wrote since 1.6) are opened with ``mmap=True``
to learn names, dtypes and shapes without touching tensor data; each tensor's bytes are then
located in the archive (a stored, uncompressed zip member) and the mapping is dropped. Chunks are
read with ``pread`` like safetensors, so a merge of k ``.bin`` files holds a few chunks, not k
mapped models, in its resident set. Tensors that are not a contiguous run of bytes (views into a
larger storage) and legacy pre-zip files fall back to torch's own loading.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .dtypes import from_torch
from .safetensors import TensorInfo, pread_into

# Where training code nests the state dict: nanoGPT/LAWA {'model': sd}, Lightning {'state_dict': sd},
# DeepSpeed {'module': sd}.
STATE_DICT_KEYS = ("model", "state_dict", "module", "model_state_dict", "ema")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else e.__class__.__name__)[:200]


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")


def _unpickler_detail(e: BaseException) -> str:
    """The informative line of torch's weights_only error (the rest is boilerplate)."""
    for line in str(e).splitlines():
        line = line.strip()
        if line and not line.startswith(_BOILERPLATE):
            return line[:200]
    return _first_line(e)


def _load(path: Path, mmap: bool) -> Any:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch words it "Unsupported global: GLOBAL eval was not …" or "unsupported GLOBAL posix.system";
        # its advice to retry with weights_only=False is exactly what must not be done with such a file
        named = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        if named:
            raise CheckpointError(
                f"{path}: refused to load: the pickle asks for the global {named.group(1)}, code that ckptavg "
                "never runs (only tensors and plain containers are read, weights_only=True)"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {_unpickler_detail(e)}") from None
    except Exception as e:  # noqa: BLE001 — garbage bytes raise IndexError, KeyError, EOFError …: all mean "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {_first_line(e)}") from None


def _find_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    import torch

    def is_sd(o: Any) -> bool:
        return isinstance(o, Mapping) and len(o) > 0 and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in o.items()
        )

    if is_sd(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and is_sd(obj[key]):
                return obj[key]
        # A state dict with a few non-tensor entries (e.g. '_extra_state'): keep the tensors.
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path}: no state dict found (expected a dict of tensors, or one under one of the keys "
        f"{', '.join(STATE_DICT_KEYS)})"
    )


def _member_offsets(path: Path) -> dict[int, int]:
    """File offset of each stored storage record (``*/data/<key>``) → its size in bytes."""
    out: dict[int, int] = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for m in z.infolist():
            parts = m.filename.split("/")
            if len(parts) < 2 or parts[-2] != "data" or m.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(m.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: corrupt zip member {m.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[m.header_offset + 30 + name_len + extra_len] = m.file_size
    return out


def _locate(sd: Mapping[str, Any], members: dict[int, int]) -> dict[str, int]:
    """Tensor name → absolute file offset of its first byte, for contiguous tensors.

    With ``mmap=True`` every storage is a slice of one mapping of the whole file, so
    ``storage.data_ptr() - base`` is the storage's record offset; ``base`` is the one shift
    that maps every storage onto a record of the right size.
    """
    storages = {}
    for t in sd.values():
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    if not storages or not members:
        return {}
    lo = min(storages)
    base = None
    for off in members:
        cand = lo - off
        if all(members.get(p - cand) == n for p, n in storages.items()):
            base = cand
            break
    if base is None:
        return {}
    where = {}
    for name, t in sd.items():
        if t.is_contiguous() and t.numel() > 0:
            where[name] = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()
    return where


class TorchFile:
    """One torch checkpoint file: metadata from the pickle, chunks read with ``pread``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.zipped = zipfile.is_zipfile(self.path)
        sd = _find_state_dict(_load(self.path, mmap=self.zipped), self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in sd.items():
            try:
                dtype = from_torch(t.dtype)
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {t.dtype}") from None
            self.tensors[name] = TensorInfo(name, dtype, tuple(t.shape))
        self._where = _locate(sd, _member_offsets(self.path)) if self.zipped else {}
        # Keep torch's objects only for what pread cannot serve (legacy files, strided views).
        self._sd: Mapping[str, Any] | None = (
            {n: t for n, t in sd.items() if n not in self._where} if len(self._where) < len(sd) else None
        )
        self._fd: int | None = None

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        if count is None:
            count = info.numel - start
        out = np.empty(count, info.dtype.storage)
        if count == 0:
            return out
        pos = self._where.get(info.name)
        if pos is not None:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            pread_into(self._fd, out, pos + start * info.dtype.itemsize, self.path, info.name)
            return out
        import torch

        assert self._sd is not None
        t = self._sd[info.name].reshape(-1)[start : start + count]
        if info.dtype.name == "BF16":
            t = t.view(torch.int16)
        elif info.dtype.name == "BOOL" or info.dtype.name.startswith("F8"):
            t = t.view(torch.uint8)
        out[...] = t.numpy().view(info.dtype.storage)
        return out

    def close(self) -> None:
        self._sd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
