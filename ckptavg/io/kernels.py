"""The per-element conversions of the hot loop, by numpy or by torch's vectorised kernels.

Both give the same bits: bf16/fp16 → fp32 is exact, fp32 → bf16/fp16 rounds to nearest even in
both (tests/test_parallel.py compares them over every bf16 and fp16 pattern and random floats).
They differ in cost. Per 256K-element chunk on one core of our 2-core box (loaded, ms):

    fp32 → bf16    numpy by hand 8.5   torch 0.37
    fp16 → fp32    numpy         2.7   torch 0.23
    fp32 → fp16    numpy         4.0   torch 0.21
    bf16 → fp32    numpy         0.60  torch 0.35
    finite(sum)    numpy         0.47  torch 0.09

so a bf16 merge spends ~3.4× less CPU with torch; but ``import torch`` costs ~1.25 s and ~225 MB
of RSS, more than a small merge takes. :func:`choose` therefore picks torch only for jobs that
convert half-precision values and read at least :data:`TORCH_FROM_BYTES`.

NaN: torch writes every NaN as the canonical 0x7FC0 in bf16, numpy keeps sign and payload; only
outputs written with ``--allow-nonfinite`` can hold NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dtypes import DType, from_accumulator, to_accumulator

TORCH_FROM_BYTES = 1 << 30  # 1 GiB read: ~1-2 s of numpy conversions saved, more than torch's import costs
_HALF = ("BF16", "F16")


class Kernels:
    """numpy: raw stored values ↔ the accumulator dtype, and a finiteness test."""

    name = "numpy"

    def to_acc(self, raw: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
        """Raw stored values → ``out`` (fp32/fp64, same length)."""
        return to_accumulator(raw, dtype, out)

    def from_acc(self, acc: np.ndarray, dtype: DType) -> np.ndarray:
        """Accumulator values → raw stored values of ``dtype`` (a new array)."""
        return from_accumulator(acc, dtype)

    def pin(self) -> int:
        """Run this thread's conversions on one core; returns what :meth:`unpin` restores."""
        return 1

    def unpin(self, previous: int) -> None:
        """Undo :meth:`pin`."""

    def finite(self, acc: np.ndarray) -> bool:
        """No NaN/Inf in ``acc``: one cheap sum; the element test only if the sum is not finite (overflow)."""
        return bool(np.isfinite(acc.sum()) or np.isfinite(acc).all())


class TorchKernels(Kernels):
    """The same conversions through torch, for fp32 accumulators and bf16/fp16 values; the rest as numpy."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._types = {"BF16": (torch.bfloat16, torch.int16), "F16": (torch.float16, torch.float16)}

    def _view(self, raw: np.ndarray, dtype: DType) -> Any:
        half, carrier = self._types[dtype.name]
        t = self._torch.from_numpy(raw.view(np.int16) if carrier is self._torch.int16 else raw)
        return t.view(half)

    def to_acc(self, raw: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
        if dtype.name in _HALF and raw.flags.c_contiguous:  # exact into fp32 and fp64 alike
            self._torch.from_numpy(out).copy_(self._view(raw, dtype))
            return out
        return to_accumulator(raw, dtype, out)

    def from_acc(self, acc: np.ndarray, dtype: DType) -> np.ndarray:
        if dtype.name == "BF16" and acc.dtype == np.float64:  # numpy's way too: fp64 → fp32, then rounded to bf16
            acc = acc.astype(np.float32)
        if dtype.name in _HALF and acc.dtype == np.float32:  # (fp64 → fp16 is one rounding in numpy: left to it)
            res = np.empty(acc.shape, dtype.storage)
            self._view(res, dtype).copy_(self._torch.from_numpy(np.ascontiguousarray(acc)))
            return res
        return from_accumulator(acc, dtype)

    def pin(self) -> int:
        """This thread's torch ops on one core (torch's thread count is per thread); returns the old count."""
        previous = int(self._torch.get_num_threads())
        if previous != 1:
            self._torch.set_num_threads(1)
        return previous

    def unpin(self, previous: int) -> None:
        if previous != 1:
            self._torch.set_num_threads(previous)

    def finite(self, acc: np.ndarray) -> bool:
        t = self._torch.from_numpy(acc)
        return bool(self._torch.isfinite(t.sum()).item() or self._torch.isfinite(t).all().item())


NUMPY = Kernels()


def worth_torch(read_bytes: int, dtypes: set[str]) -> bool:
    """Whether ``auto`` picks torch for a job reading ``read_bytes`` with ``dtypes`` (if installed):
    it converts bf16/fp16 and reads at least TORCH_FROM_BYTES."""
    return read_bytes >= TORCH_FROM_BYTES and bool(dtypes & set(_HALF))


def choose(read_bytes: int, dtypes: set[str], kernels: str = "auto") -> Kernels:
    """The kernels for a job reading ``read_bytes`` of tensors with ``dtypes`` (safetensors names,
    inputs' and outputs'): ``numpy``, ``torch``, or ``auto`` (torch when the job converts bf16/fp16
    and reads at least TORCH_FROM_BYTES, and torch is installed)."""
    if kernels == "numpy":
        return NUMPY
    if kernels == "torch":
        return TorchKernels()
    if kernels != "auto":
        raise ValueError(f"kernels must be auto, numpy or torch, not {kernels!r}")
    if not worth_torch(read_bytes, dtypes):
        return NUMPY
    try:
        return TorchKernels()
    except ImportError:
        return NUMPY


__all__ = ["NUMPY", "TORCH_FROM_BYTES", "Kernels", "TorchKernels", "choose", "worth_torch"]
