"""``.bin`` / ``.pt`` / ``.pth`` reading through ``torch.load(weights_only=True)`` only.

A pickle from the internet must never run code, so ``weights_only=False`` appears nowhere in this
package. Zip-format files (everything ``torch.save`` wrote since 1.6) are opened with ``mmap=True``
to learn names, dtypes and shapes without touching tensor data; each tensor's bytes are then
located in the archive (a stored, uncompressed zip member) and the mapping is dropped. Chunks are
read with ``pread`` like safetensors, so a merge of k ``.bin`` files holds a few chunks, not k
mapped models, in its resident set — and a file truncated by another process while it is read
gives a one-line error, not the SIGBUS a mapping would (views into a larger storage are read with
``pread`` too and strided in numpy). Legacy pre-zip files are loaded into memory by torch.

Besides tensors and plain containers, the pickle may hold only the records in
:data:`SAFE_GLOBALS` (``argparse.Namespace``, Lightning's ``AttributeDict``, DeepSpeed's stage
enum, loss-scaler settings and fragment addresses, Megatron's enums in ``args``, numpy's random
state, ``io.BytesIO``; each rebuilt as plain data, no trainer imported), allowed through
torch's own safe-globals mechanism; any other global is refused, naming it.

Which part of the pickle is the model (:func:`find_state_dict`): a plain dict of tensors; else the
first of :data:`STATE_DICT_KEYS` that holds one; else top-level tensors, but only several of them
and only when no nested container holds more bytes — otherwise ``{"weights": {…}, "rng_state": t}``
would be averaged as a one-tensor model. Anything else is refused with the top-level keys listed,
and ``key="model.ema"`` (``--key``) says where the state dict is. Meta, sparse and quantized
tensors are refused by name, and so are DeepSpeed ZeRO-3 placeholders (empty tensors whose real
shape the file's ``param_shapes`` gives).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import CheckpointError
from .dtypes import from_torch
from .files import LazyFd, open_regular
from .safetensors import TensorInfo, pread_into

# Where training code nests the state dict: nanoGPT/LAWA {'model': sd}, Lightning {'state_dict': sd},
# DeepSpeed {'module': sd}.
STATE_DICT_KEYS = ("model", "state_dict", "module", "model_state_dict", "ema")
TOP_LEVEL = (".", "")  # key= for "the top level of the file is the state dict"


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


# numpy's array rebuilder: numpy.core in numpy 1.x, numpy._core in 2.x (the name a file holds is its writer's)
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
_NUMERIC_DTYPES = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdFD"]  # bool, ints, floats, complex: never object

# The only globals allowed beyond torch's own weights_only list: plain records that trainers pickle
# beside the weights (Lightning's hyper_parameters, Megatron's args), rebuilt as inert data.
# Lightning's AttributeDict (a dict with attribute access) is rebuilt as a plain dict: no Lightning
# code is imported or run.
SAFE_GLOBALS: dict[str, Any] = {
    "argparse.Namespace": argparse.Namespace,
    "lightning.fabric.utilities.data.AttributeDict": dict,
    "lightning_fabric.utilities.data.AttributeDict": dict,
    "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    # DeepSpeed's optimizer-state files (ZeRO 1/2/3): the stage, an int enum, rebuilt as the int; the
    # loss scaler's settings (cur_scale, dynamic …) and the bf16 optimizer's fragment addresses
    # (numel, start) as attribute records. No DeepSpeed code is imported or run.
    "deepspeed.runtime.zero.config.ZeroStageEnum": int,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": argparse.Namespace,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": argparse.Namespace,
    "deepspeed.utils.tensor_fragment.fragment_address": argparse.Namespace,
    # Megatron-LM's legacy model_optim_rng.pt: args.model_type and args.attention_backend are int enums
    # (rebuilt as the int), rng_state holds numpy's random state (a uint32 array: numpy's own array
    # rebuilding, as torch documents for weights_only), Transformer Engine's _extra_state is a BytesIO
    "megatron.core.enums.ModelType": int,
    "megatron.core.transformer.enums.AttnBackend": int,
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "_io.BytesIO": io.BytesIO,
    # numeric dtypes only (never object arrays): a pickled dtype is rebuilt as one of these
    **{f"{d.__module__}.{d.__name__}": d for d in _NUMERIC_DTYPES},
}


def _allowed() -> contextlib.AbstractContextManager[object]:
    import torch

    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older: refused as any global
    return allow([(cls, name) for name, cls in SAFE_GLOBALS.items()]) if allow else contextlib.nullcontext()


def _load(path: Path, mmap: bool) -> Any:
    import pickle

    import torch

    try:
        with warnings.catch_warnings(), _allowed():  # torch warns about odd pickle protocols of files it then refuses
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


def load_pickle(path: Path) -> Any:
    """The whole object in a torch checkpoint file, loaded with ``weights_only=True`` and the
    :data:`SAFE_GLOBALS` allow-list (tensors memory-mapped for zip files): what ``--format`` keeps
    beside the averaged weights when it writes a file back in the input's own shape.

    Raises:
        CheckpointError: an unreadable file, or a pickle asking for any other global.
    """
    return _load(path, mmap=zipfile.is_zipfile(path))


def load_mapped(path: Path) -> tuple[Any, int | None]:
    """A zip torch file's object, memory-mapped (``weights_only=True``, :data:`SAFE_GLOBALS`), and the
    address that file offset 0 has in the mapping, or None when its records cannot be accounted for.
    With it, :func:`file_offset` says where a tensor's bytes are; drop the object (and every tensor
    of it) to release the mapping, then ``pread`` them.

    Raises:
        CheckpointError: not a zip torch file, unreadable, or a pickle asking for another global.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip-format torch file (saved by torch < 1.6?); ckptavg reads this "
                              "kind of checkpoint from zip files only")
    obj = _load(path, mmap=True)
    return obj, _locate(obj, _member_offsets(path))


def file_offset(t: Any, base: int) -> int:
    """Where tensor ``t``'s first element is in the file :func:`load_mapped` gave ``base`` for."""
    return int(t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size())


def _tensors(obj: Any) -> Any:
    """Every tensor inside ``obj`` (dicts, lists, tuples, any depth), each object once."""
    import torch

    seen, stack = set(), [obj]
    while stack:  # iterative: a pickle may nest deeper than Python's recursion limit
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, Mapping):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)


def _nbytes(obj: Any) -> int:
    """Bytes of all tensors inside ``obj``."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _what(v: Any) -> str:
    """``tensor float32[4, 4]``, ``dict of 12 entries, 4.1 KB of tensors``, ``int`` … for messages."""
    import torch

    if isinstance(v, torch.Tensor):
        return f"tensor {str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    if isinstance(v, (Mapping, list, tuple)):
        kind = "dict" if isinstance(v, Mapping) else type(v).__name__
        n = _nbytes(v)
        return f"{kind} of {len(v)} entries, {_human(n)} of tensors" if n else f"{kind} of {len(v)} entries, no tensors"
    return type(v).__name__


def _listing(node: Mapping[Any, Any], most: int = 8) -> str:
    items = [f"{k if isinstance(k, str) else repr(k)} ({_what(v)})" for k, v in list(node.items())[:most]]
    more = f", … {len(node) - most} more" if len(node) > most else ""
    return ", ".join(items) + more if items else "none"


def _model_tensors(node: Any) -> dict[str, Any] | None:
    """The tensors of ``node`` when they look like a model's state dict, else None.

    A dict of tensors only (even one) is a state dict. Tensors beside other entries are one when
    there are several of them and no nested container holds more bytes than they do: the rng
    state beside a dict of weights is not a one-tensor model.
    """
    import torch

    if not isinstance(node, Mapping):
        return None
    tensors = {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) == len(node):
        return tensors or None
    nested = max((_nbytes(v) for v in node.values() if isinstance(v, (Mapping, list, tuple))), default=0)
    if len(tensors) >= 2 and sum(t.numel() * t.element_size() for t in tensors.values()) >= nested:
        return tensors
    return None


def _at_key(obj: Any, key: str, path: Path) -> Any:
    """The object at dotted ``key`` (a key that itself holds dots is matched whole first)."""
    if key in TOP_LEVEL:
        return obj
    parts, i, node, walked = key.split("."), 0, obj, "the top level"
    while i < len(parts):
        if not isinstance(node, Mapping):
            raise CheckpointError(f"{path}: --key {key}: {walked} is {_what(node)}, not a dict")
        for j in range(len(parts), i, -1):
            name = ".".join(parts[i:j])
            if name in node:
                node, walked, i = node[name], ".".join(parts[:j]), j
                break
        else:
            raise CheckpointError(f"{path}: --key {key}: no key {parts[i]!r} in {walked}, whose keys are: "
                                  f"{_listing(node)}")
    return node


def find_state_dict(obj: Any, path: Path, key: str | None = None) -> dict[str, Any]:
    """The model's tensors in a loaded checkpoint (see the module docstring for the rule).

    Raises:
        CheckpointError: no part looks like a model, or ``key`` does not lead to one: one line
            listing the keys there, with what each holds.
    """
    if key is not None:
        node = _at_key(obj, key, path)
        found = _model_tensors(node)
        if found is None:
            where = "the top level" if key in TOP_LEVEL else f"--key {key}"
            holds = f"keys: {_listing(node)}" if isinstance(node, Mapping) else _what(node)
            raise CheckpointError(f"{path}: {where} holds no model state dict ({holds})")
        return found
    found = _model_tensors(obj)
    if found is not None and len(found) == len(obj):
        return found
    if isinstance(obj, Mapping):
        for k in STATE_DICT_KEYS:
            inner = _model_tensors(obj.get(k))
            if inner is not None:
                return inner
    if found is not None:
        return found
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: no state dict found: the file holds {_what(obj)}, not a dict of tensors")
    raise CheckpointError(
        f"{path}: no state dict found (none under {', '.join(STATE_DICT_KEYS)}); top-level keys: {_listing(obj)}; "
        "pass --key NAME (dotted for nesting, e.g. --key model.ema) to say which holds the model"
    )


def _check_tensor(name: str, t: Any, path: Path) -> None:
    """Refuse what has no dense bytes to average: meta, sparse and quantized tensors."""
    import torch

    if t.device.type == "meta":
        raise CheckpointError(f"{path}: tensor {name!r} is on device meta (saved without data, e.g. before the "
                              "weights were loaded); save the materialised model")
    if t.layout != torch.strided:
        raise CheckpointError(f"{path}: tensor {name!r} has layout {t.layout}; ckptavg averages dense tensors only "
                              "(save it with .to_dense())")
    if t.is_quantized:
        raise CheckpointError(f"{path}: tensor {name!r} is quantized ({str(t.dtype).removeprefix('torch.')}); "
                              "ckptavg averages unquantized tensors only (save it with .dequantize())")


def _param_shapes(obj: Any) -> dict[str, tuple[int, ...]]:
    """DeepSpeed's record of every parameter's real shape (``param_shapes``: one dict per param group)."""
    if not isinstance(obj, Mapping):
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for field in ("param_shapes", "frozen_param_shapes"):
        groups = obj.get(field)
        for g in groups if isinstance(groups, (list, tuple)) else [groups]:
            if isinstance(g, Mapping):
                out.update({k: tuple(v) for k, v in g.items() if isinstance(k, str) and isinstance(v, (tuple, list))})
    return out


def _check_placeholders(obj: Any, sd: Mapping[str, Any], path: Path) -> None:
    shapes = _param_shapes(obj)
    for name, t in sd.items():
        want = shapes.get(name)
        if t.numel() == 0 and want and all(isinstance(d, int) for d in want) and math.prod(want) > 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} is empty but the file's param_shapes give {list(want)}: this looks like a "
                "DeepSpeed ZeRO-3 placeholder (the weights are partitioned across the optimizer state files, which "
                "are not beside it): put every rank's *_optim_states.pt next to it (ckptavg reads them), or "
                "consolidate with the zero_to_fp32.py script DeepSpeed saves beside the checkpoint"
            )


def member_offsets(f: BinaryIO, path: Path | str) -> dict[int, int]:
    """Offset (from the start of ``f``, a seekable zip archive written by ``torch.save``) of each
    stored storage record (``*/data/<key>``) → its size in bytes; ``path`` names ``f`` in errors.
    A zip member's data starts after its local header, whose name and extra field lengths can
    differ from the central directory's: read from the local header itself."""
    out: dict[int, int] = {}
    with zipfile.ZipFile(f) as z:
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


def _member_offsets(path: Path) -> dict[int, int]:
    with open(path, "rb") as f:
        return member_offsets(f, path)


def _locate(obj: Any, members: dict[int, int]) -> int | None:
    """The address that file offset 0 has in the mapping torch loaded ``obj`` from, or None.

    With ``mmap=True`` every storage is a slice of one mapping of the whole file, so a storage's
    ``data_ptr() - base`` is its record's offset. Every record belongs to exactly one storage of the
    whole pickle, so when the non-empty storages of *everything* in it (not only the state dict:
    an EMA copy or Adam moments can have exactly the model's sizes, and a shift that maps the
    model onto them would fit) pair up with the non-empty records, the lowest address belongs to
    the lowest record. Anything that cannot be accounted for gives None (load into memory instead).
    """
    import torch

    storages: dict[int, int] = {}
    for t in _tensors(obj):
        if t.layout != torch.strided or t.device.type == "meta":
            return None
        s = t.untyped_storage()
        if s.nbytes():  # an empty storage has no record bytes (and may have no address)
            storages[s.data_ptr()] = s.nbytes()
    records = {off: n for off, n in members.items() if n}
    if len(storages) != len(records):
        return None
    if not storages:
        return 0
    base = min(storages) - min(records)
    return base if all(records.get(p - base) == n for p, n in storages.items()) else None


class TorchFile:
    """One torch checkpoint file: metadata from the pickle, chunks read with ``pread``.

    Args:
        path: the ``.bin``/``.pt`` file.
        key: where the state dict sits (dotted, e.g. ``model.ema``; ``"."`` for the top level);
            default: found as :func:`find_state_dict` says.
    """

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = Path(path)
        os.close(open_regular(self.path))  # a FIFO named pytorch_model.bin is refused, not waited on
        self.zipped = zipfile.is_zipfile(self.path)
        obj = _load(self.path, mmap=self.zipped)
        sd = find_state_dict(obj, self.path, key)
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in sd.items():
            _check_tensor(name, t, self.path)
            try:
                dtype = from_torch(t.dtype)
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {t.dtype}") from None
            self.tensors[name] = TensorInfo(name, dtype, tuple(t.shape))
        _check_placeholders(obj, sd, self.path)
        # Tensor name → (file offset of its first element, strides in elements, or None if contiguous)
        self._where: dict[str, tuple[int, tuple[int, ...] | None]] = {}
        base = _locate(obj, _member_offsets(self.path)) if self.zipped else None
        if base is not None:
            for name, t in sd.items():
                if t.numel() > 0:
                    pos = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()
                    self._where[name] = (pos, None if t.is_contiguous() else tuple(t.stride()))
            self._sd: Mapping[str, Any] | None = None
        else:  # legacy format (or records not found): torch's own copy in memory, never a mapping
            self._sd = sd if not self.zipped else find_state_dict(_load(self.path, mmap=False), self.path, key)
        del obj, sd
        self._file = LazyFd(self.path)
        self._dense: tuple[str, np.ndarray] | None = None  # the last strided tensor, gathered

    def _strided(self, info: TensorInfo, pos: int, strides: tuple[int, ...]) -> np.ndarray:
        """A view's elements in row-major order: its storage span read with pread, strided in numpy."""
        dense = self._dense  # one local reference: the reader thread and the caller may both be here
        if dense is None or dense[0] != info.name:
            self._dense = None
            span = sum((n - 1) * s for n, s in zip(info.shape, strides)) + 1
            raw = np.empty(span, info.dtype.storage)
            with self._file.use() as fd:
                pread_into(fd, raw, pos, self.path, info.name)
            size = info.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(raw, info.shape, tuple(s * size for s in strides), writeable=False)
            dense = self._dense = (info.name, np.ascontiguousarray(view).reshape(-1))
        return dense[1]

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        if count is None:
            count = info.numel - start
        out = np.empty(count, info.dtype.storage)
        if count == 0:
            return out
        where = self._where.get(info.name)
        if where is not None:
            pos, strides = where
            if strides is None:
                fd = self._file.acquire()
                try:
                    pread_into(fd, out, pos + start * info.dtype.itemsize, self.path, info.name)
                finally:
                    self._file.done()
            else:
                out[...] = self._strided(info, pos, strides)[start : start + count]
            return out
        import torch

        if self._sd is None:
            raise CheckpointError(f"{self.path}: tensor {info.name!r} cannot be read after close")
        t = self._sd[info.name].reshape(-1)[start : start + count]
        if info.dtype.name == "BF16":
            t = t.view(torch.int16)
        elif info.dtype.name == "BOOL" or info.dtype.name.startswith("F8"):
            t = t.view(torch.uint8)
        out[...] = t.numpy().view(info.dtype.storage)
        return out

    def extent(self, info: TensorInfo) -> tuple[LazyFd, int] | None:
        """The file and the byte offset of a contiguous tensor's first element; None if strided or legacy."""
        where = self._where.get(info.name)
        return (self._file, where[0]) if where is not None and where[1] is None else None

    def close(self) -> None:
        self._sd = None
        self._dense = None
        self._file.close()
