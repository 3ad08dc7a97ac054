"""``torch.distributed.checkpoint`` (DCP) folders: ``.metadata`` + ``__R_S.distcp`` shards.

Written by torchtitan (``step-N/``), OLMo-core (``stepN/model_and_optim/``) and accelerate's FSDP
(``pytorch_model_fsdp_0/``). The metadata says every entry's global shape, dtype and chunks; tensor
data is read through torch's own DCP reader (``FileSystemReader`` + a partial ``load`` of one
preallocated tensor at a time), so every sharding torch can write is reassembled by torch. Peak
memory is one tensor per input, never a model: never ``dcp_to_torch_save``.

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
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .dtypes import from_torch
from .files import read_regular
from .safetensors import TensorInfo

MODEL_KEYS = ("model", "module", "state_dict", "model_state_dict")
_METADATA_LIMIT = 1_000_000_000  # a million-tensor model's metadata is ~100s of MB
_DCP_META = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = frozenset({
    (_DCP_META, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                             "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
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


class DcpFile:
    """One DCP checkpoint folder as one weight "file": ``tensors`` from the metadata, ``read`` through
    torch's reader.

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
        self._dense: tuple[str, np.ndarray] | None = None

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
        """Elements [start, start+count) of flattened ``info`` as raw storage values; the whole tensor
        is loaded once and kept until another tensor is read."""
        if count is None:
            count = info.numel - start
        dense = self._dense  # one local reference: the reader thread and the caller may both be here
        if dense is None or dense[0] != info.name:
            self._dense = None
            dense = self._dense = (info.name, self._load(info))
        return dense[1][start : start + count].copy()

    def close(self) -> None:
        self._dense = None


__all__ = ["METADATA_GLOBALS", "MODEL_KEYS", "DcpFile", "read_metadata"]
