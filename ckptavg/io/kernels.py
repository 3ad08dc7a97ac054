"""The per-element conversions of the hot loop, by numpy or by torch's vectorised kernels.

Both give the same bits: bf16/fp16 → fp32 is exact, fp32 → bf16/fp16 rounds to nearest even in
both (tests/test_parallel.py compares them over every bf16 and fp16 pattern and random floats).
They differ in cost. Per 256K-element chunk on one core of our 2-core box (idle, ms;
one chunk converted 300 times, two runs agreeing within 5%):

    bf16 → fp32    numpy 0.092   torch 0.078
    fp32 → bf16    numpy 0.31    torch 0.11     (numpy: five in-place integer passes)
    fp16 → fp32    numpy 0.75    torch 0.054
    fp32 → fp16    numpy 1.5     torch 0.044
    finite         numpy 0.042   torch 0.043   (numpy: max and min; a sum took 0.096)

``import torch`` costs ~1.3–1.9 s on one core (other threads wait: it holds the GIL) and ~195 MB
of RSS. So fp16 jobs take torch from :data:`TORCH_FROM_BYTES` read; bf16 jobs, whose numpy path
costs only ~0.25 ns more per element read (5-input merge), take torch only when that exceeds the
import per thread: :data:`TORCH_BF16_PER_THREAD` read per worker. On 5 × 1B bf16 with 2 threads,
numpy: 5.4–6.6 s at 68 MB peak, torch: 7.3–8.2 s at 260 MB (same bits).

NaN: torch writes every NaN as the canonical 0x7FC0 in bf16, numpy keeps sign and payload; only
outputs written with ``--allow-nonfinite`` can hold NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dtypes import DType, from_accumulator, to_accumulator

TORCH_FROM_BYTES = 1 << 30  # fp16, 1 GiB read: ~1-2 s of numpy conversions saved, more than torch's import costs
TORCH_BF16_PER_THREAD = 16 << 30  # bf16: 8G elements × ~0.25 ns = ~2 s of extra numpy work per thread, one import
_HALF = ("BF16", "F16")


class Kernels:
    """numpy: raw stored values ↔ the accumulator dtype, and a finiteness test."""

    name = "numpy"

    def to_acc(self, raw: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
        """Raw stored values → ``out`` (fp32/fp64, same length)."""
        return to_accumulator(raw, dtype, out)

    def from_acc(self, acc: np.ndarray, dtype: DType, out: np.ndarray | None = None, *,
                 finite: bool = False, scratch: np.ndarray | None = None) -> np.ndarray:
        """Accumulator values → raw stored values of ``dtype``, into ``out`` (else a new array);
        ``finite``: ``acc`` is known to hold no NaN/Inf; ``scratch``: a uint32 buffer of at least
        ``acc.size`` it may use."""
        return from_accumulator(acc, dtype, out, finite=finite, scratch=scratch)

    def pin(self) -> int:
        """Run this thread's conversions on one core; returns what :meth:`unpin` restores."""
        return 1

    def unpin(self, previous: int) -> None:
        """Undo :meth:`pin`."""

    def finite(self, acc: np.ndarray) -> bool:
        """No NaN/Inf in ``acc``: its max and min are finite (NaN propagates through both; 2.3× faster
        than a pairwise sum, and no overflow to rule out)."""
        return acc.size == 0 or bool(np.isfinite(acc.max()) and np.isfinite(acc.min()))


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

    def from_acc(self, acc: np.ndarray, dtype: DType, out: np.ndarray | None = None, *,
                 finite: bool = False, scratch: np.ndarray | None = None) -> np.ndarray:
        if dtype.name == "BF16" and acc.dtype == np.float64:  # numpy's way too: fp64 → fp32, then rounded to bf16
            acc = acc.astype(np.float32)
        if dtype.name in _HALF and acc.dtype == np.float32:  # (fp64 → fp16 is one rounding in numpy: left to it)
            res = np.empty(acc.shape, dtype.storage) if out is None else out
            self._view(res, dtype).copy_(self._torch.from_numpy(np.ascontiguousarray(acc)))
            return res
        return from_accumulator(acc, dtype, out, finite=finite)

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


def worth_torch(read_bytes: int, dtypes: set[str], threads: int = 1) -> bool:
    """Whether ``auto`` picks torch for a job reading ``read_bytes`` with ``dtypes`` on ``threads``
    workers (if torch is installed): fp16 from TORCH_FROM_BYTES, bf16 from TORCH_BF16_PER_THREAD
    per thread, never for other dtypes."""
    if "F16" in dtypes:
        return read_bytes >= TORCH_FROM_BYTES
    return "BF16" in dtypes and read_bytes >= TORCH_BF16_PER_THREAD * max(1, threads)


def choose(read_bytes: int, dtypes: set[str], kernels: str = "auto", threads: int = 1) -> Kernels:
    """The kernels for a job reading ``read_bytes`` of tensors with ``dtypes`` (safetensors names,
    inputs' and outputs') on ``threads`` workers: ``numpy``, ``torch``, or ``auto`` (see
    :func:`worth_torch`; numpy when torch is not installed)."""
    if kernels == "numpy":
        return NUMPY
    if kernels == "torch":
        return TorchKernels()
    if kernels != "auto":
        raise ValueError(f"kernels must be auto, numpy or torch, not {kernels!r}")
    if not worth_torch(read_bytes, dtypes, threads):
        return NUMPY
    try:
        return TorchKernels()
    except ImportError:
        return NUMPY


__all__ = ["NUMPY", "TORCH_BF16_PER_THREAD", "TORCH_FROM_BYTES", "Kernels", "TorchKernels", "choose", "worth_torch"]
