"""``.bin`` / ``.pt`` / ``.pth`` reading through ``torch.load(weights_only=True)`` only.

A pickle from the internet must never run code, so ``weights_only=False`` appears nowhere in this
package. Zip-format files (everything ``torch.save`` wrote since 1.6) are loaded with ``mmap=True``:
tensors are views of the file, and only what is read is paged in. Pages stay resident while the
mapping lives, so the reader drops and re-opens the mapping after every ``remap_bytes`` it has
read: peak RSS stays near k × ``remap_bytes`` instead of k × model. Legacy (pre-zip) files cannot
be mapped and are loaded whole.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CkptavgError
from .dtypes import from_torch
from .safetensors import TensorInfo

# Where training code nests the state dict: nanoGPT/LAWA {'model': sd}, Lightning {'state_dict': sd},
# DeepSpeed {'module': sd}.
STATE_DICT_KEYS = ("model", "state_dict", "module", "model_state_dict", "ema")
REMAP_BYTES = 256 * 2**20


def _load(path: Path) -> Any:
    import pickle

    import torch

    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise CkptavgError(
            f"{path}: refused to load: not a plain tensor checkpoint under weights_only=True "
            f"(it may contain code); {first[:200]}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CkptavgError(f"{path}: not a readable torch checkpoint: {msg[:200]}") from None


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
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and isinstance(next(iter(obj)), str):
            return tensors
    raise CkptavgError(
        f"{path}: no state dict found (expected a dict of tensors, or one under one of the keys "
        f"{', '.join(STATE_DICT_KEYS)})"
    )


class TorchFile:
    """One torch checkpoint file; ``tensors`` from the pickle, chunks read as numpy."""

    def __init__(self, path: Path, remap_bytes: int = REMAP_BYTES) -> None:
        self.path = Path(path)
        self.remap_bytes = remap_bytes
        self._sd: Mapping[str, Any] | None = _find_state_dict(_load(self.path), self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in self._sd.items():
            try:
                dtype = from_torch(t.dtype)
            except ValueError:
                raise CkptavgError(f"{self.path}: tensor {name!r} has unsupported dtype {t.dtype}") from None
            self.tensors[name] = TensorInfo(name, dtype, tuple(t.shape))
        self._read_since_map = 0
        self.mapped = zipfile.is_zipfile(self.path)

    def _state_dict(self) -> Mapping[str, Any]:
        if self._sd is None:
            self._sd = _find_state_dict(_load(self.path), self.path)
        return self._sd

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        import torch

        if count is None:
            count = info.numel - start
        t = self._state_dict()[info.name].reshape(-1)[start : start + count]
        if info.dtype.name == "BF16":
            t = t.view(torch.int16)
        elif not info.dtype.floating and info.dtype.name.startswith("F8"):
            t = t.view(torch.uint8)
        out = np.empty(count, info.dtype.storage)
        out[...] = t.numpy().view(info.dtype.storage)
        if self.mapped:
            self._read_since_map += out.nbytes
            if self._read_since_map >= self.remap_bytes:
                # Drop every view of the mapping so its touched pages leave our resident set.
                del t
                self._sd = None
                self._read_since_map = 0
        return out

    def close(self) -> None:
        self._sd = None

