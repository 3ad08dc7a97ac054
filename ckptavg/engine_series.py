"""The chunk loop of ``series``: every target of a trajectory, reading each input chunk once.

Tensor-major over the run: for each chunk of each tensor, the inputs are read in step order and
converted once into a ring that keeps the chunks later targets still need. A target of up to
:data:`AFRESH_MAX` inputs, or with its own weights (WSM, WMA, power-EMA), is summed afresh from
the ring in fp32 exactly as ``merge`` sums its inputs, so it is bit-identical to ``merge`` of the
same checkpoints; wider uniform windows keep an fp64 :class:`~ckptavg.engine.RunningAverage`
(add the newest, subtract the oldest, recomputed exactly when it may have drifted), and EMA one
fp64 recursion over the whole run. Each target's chunk goes to its own sink at its offset.
With ``threads`` > 1, workers own whole chunks (all inputs, all targets of that span), as in
:func:`ckptavg.engine.stream`; every chunk is computed the same way whoever computes it, so the
outputs are bit-identical for any thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from . import engine
from .engine import PREFETCH, WRITE_DEPTH, RunningAverage, average_chunk, narrows, pinned
from .io.dtypes import DTYPES, DType
from .io.kernels import Kernels, choose
from .io.readers import CheckpointReader
from .io.safetensors import TensorInfo
from .io.sinks import Sink
from .pipeline import WriteBehind, available_cpus, each, prefetch, spans


@dataclass(frozen=True)
class Target:
    """One averaged model of a series: at ``step`` (trajectory index ``index``), from ``inputs``
    (trajectory indices, oldest first) with ``weights``."""

    index: int
    step: int
    inputs: tuple[int, ...]
    weights: tuple[float, ...]


F32, F64 = DTYPES["F32"], DTYPES["F64"]
AFRESH_MAX = 8  # inputs: up to here W fp32 adds per target cost less than an fp64 add and subtract on a ring twice as big


def afresh(target: Target, ema: bool) -> bool:
    """Whether ``target`` is summed afresh in fp32 (merge's arithmetic) rather than kept as a running fp64 sum."""
    return not ema and (len(set(target.weights)) > 1 or len(target.inputs) <= AFRESH_MAX)


def accumulator(target: Target, ema: bool) -> str:
    """The accumulator dtype ``ckptavg.json`` records for ``target``."""
    return "float32" if afresh(target, ema) else "float64"
Write = Callable[[int, str, int, np.ndarray], None]  # (target step, tensor, offset, raw values)


class _Series:
    """What every chunk of one series needs: the targets, who needs which input, the EMA factors."""

    def __init__(self, targets: Sequence[Target], out_dtypes: Mapping[str, DType], ema_factors: Sequence[float] | None,
                 steps: Sequence[int] | None) -> None:
        self.needed = sorted({j for t in targets for j in t.inputs})
        self.by_index = {t.index: t for t in targets}
        self.later: dict[int, set[int]] = {}  # inputs that targets after index i still need
        acc: set[int] = set()
        for t in reversed(targets):
            self.later[t.index] = set(acc)
            acc |= set(t.inputs)
        self.out_dtypes, self.ema_factors, self.steps = out_dtypes, ema_factors, steps
        self.afresh = {t.index: afresh(t, ema_factors is not None) for t in targets}
        # the ring in fp32 when every target is summed afresh (half the bytes), else fp64 for the running sums
        self.ring_dtype = F32 if all(self.afresh.values()) else F64

    def message(self, info: TensorInfo, t: Target) -> Callable[[], str]:
        span = f"steps {self.steps[t.inputs[0]]}..{t.step}" if self.steps else "its window"
        return lambda: (f"step {t.step}: tensor {info.name!r} averages to NaN/Inf (an input in {span} holds "
                        "NaN/Inf); pass --allow-nonfinite to write it anyway")

    def chunk(self, info: TensorInfo, s0: int, n: int, raws: Iterator[np.ndarray], st: RunningAverage,
              avg: np.ndarray, write: Write, on_bytes: Callable[[int], object] | None, spare: list[np.ndarray],
              st32: RunningAverage, dest: np.ndarray | None = None) -> None:
        """Elements [s0, s0+n) of ``info`` for every target; ``raws`` yields the needed inputs' chunks in order.
        ``st``: the fp64 running sum, ``st32``: the fp32 one for targets summed afresh. ``spare``: this
        thread's chunk buffers for the ring, reused from chunk to chunk (a fresh 2 MiB array per
        input per chunk costs the kernel a page fault per 4 KiB). ``dest``: a byte buffer for
        afresh targets' cast values, when ``write`` is done with them on return (else new arrays)."""
        out_dt = self.out_dtypes[info.name]
        cast = info.name if narrows(info.dtype, out_dt) else ""

        def emit(t: Target) -> None:
            out = st.emit(out_dt, avg, self.message(info, t), narrowing=cast)
            write(t.step, info.name, s0, out.copy() if np.shares_memory(out, avg) else out)

        ring: dict[int, np.ndarray] = {}  # input j's chunk in fp64
        held: dict[int, np.ndarray] = {}  # the spare buffer behind ring[j]
        st.reset(n)
        for j in self.needed:
            raw = next(raws)
            if on_bytes:
                on_bytes(raw.nbytes)
            target = self.by_index.get(j)
            if not info.dtype.floating:
                if target is not None:
                    write(target.step, info.name, s0, raw)
                continue
            if self.ema_factors is not None:
                st.decay(self.ema_factors[j])
                st.add(raw, info.dtype, key=j)
                if target is not None:
                    emit(target)
                continue
            # Converted once (exactly): every sum below is then plain arithmetic on the ring.
            held[j] = spare.pop() if spare else np.empty(len(avg), self.ring_dtype.storage)
            ring[j] = st.kernels.to_acc(raw, info.dtype, held[j][:n])
            if target is None:
                continue
            if self.afresh[j]:
                self._afresh(info, s0, n, target, ring, st32, write, dest)
            else:
                for m in sorted(set(target.inputs) - st.members):
                    st.add(ring[m], self.ring_dtype, key=m)
                if st.drifted:  # exact again from the ring, so the running sum cannot drift
                    st.recompute((m, ring[m], self.ring_dtype, 1.0) for m in sorted(st.members))
                emit(target)
            for m in [m for m in ring if m not in self.later[j]]:
                if m in st.members and self.later[j]:  # after the last target the sum is not needed again
                    st.remove(ring[m], self.ring_dtype, key=m)
                del ring[m]
                spare.append(held.pop(m))
        spare.extend(held.values())


    def _afresh(self, info: TensorInfo, s0: int, n: int, t: Target, ring: Mapping[int, np.ndarray],
                st: RunningAverage, write: Write, dest: np.ndarray | None) -> None:
        """Target ``t``'s chunk summed afresh from the ring in fp32, as merge sums it (uniform
        weights as 1, divided once); an fp32 sum of finite inputs that overflows is redone in fp64.
        ``dest``: a byte buffer the cast values may go to (written before it is reused), else a new array."""
        out_dt = self.out_dtypes[info.name]
        cast = info.name if narrows(info.dtype, out_dt) else ""
        uniform = len(set(t.weights)) == 1
        weights = [1.0 if uniform else w for w in t.weights]

        def exact() -> np.ndarray:  # NaN/Inf in an input is named; finite inputs whose fp32 sum overflowed: fp64
            ex = RunningAverage(n, np.float64)
            ex.recompute((m, ring[m], self.ring_dtype, w) for m, w in zip(t.inputs, weights))
            return ex.emit(out_dt, where=self.message(info, t), narrowing=cast)

        ring_info = TensorInfo(info.name, self.ring_dtype, info.shape)  # the ring holds converted values
        rows = [ring[m] for m in t.inputs]
        # the first two in one pass when they need no conversion (merge's -0.0 + a + b: the same bits)
        pair = rows[:2] if uniform and len(rows) > 1 and self.ring_dtype.storage == st.sum.dtype else []
        out = average_chunk(st, rows[len(pair):], weights[len(pair):], ring_info, n, out_dt, cast, st.allow_nonfinite,
                            None, exact, dest=None if dest is None else dest[: n * out_dt.itemsize].view(out_dt.storage),
                            pair=pair)
        write(t.step, info.name, s0, out.copy() if np.shares_memory(out, st.sum) else out)


def stream_series(
    readers: Mapping[int, CheckpointReader],
    targets: Sequence[Target],
    tensors: Sequence[TensorInfo],
    out_dtypes: Mapping[str, DType],
    sinks: Mapping[int, Sink],
    *,
    ema_factors: Sequence[float] | None = None,
    allow_nonfinite: bool = False,
    on_bytes: Callable[[int], object] | None = None,
    steps: Sequence[int] | None = None,
    threads: int | None = None,
    kernels: str = "auto",
) -> None:
    """Every target of a series, reading each input chunk once (tensor-major over the run).

    ``ema_factors[j]``: how much the EMA shrinks before input j (None: uniform windows, or each
    target's own weights). Each target's chunk goes to ``sinks[target.step]``. ``steps[j]`` is
    input j's step (for messages). ``threads`` (default: the CPUs this process may use) workers
    own whole chunks; memory is about ``2 × threads × (window + 3)`` chunks, independent of the
    model and of the run's length. ``kernels`` as in :func:`ckptavg.engine.stream`.
    """
    chunk = engine.CHUNK_ELEMS
    threads = available_cpus() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    plan = _Series(targets, out_dtypes, ema_factors, steps)
    kern = choose(sum(t.nbytes for t in tensors if t.dtype.floating) * len(plan.needed),
                  {t.dtype.name for t in tensors} | {d.name for d in out_dtypes.values()}, kernels, threads)
    # Overflow and inf - inf are expected on the way to the NaN/Inf checks, which report them.
    with pinned(kern), np.errstate(over="ignore", invalid="ignore"):
        if threads > 1:
            _parallel(plan, readers, tensors, sinks, chunk, threads, kern, allow_nonfinite, on_bytes)
        else:
            _serial(plan, readers, tensors, sinks, chunk, kern, allow_nonfinite, on_bytes)


def _serial(plan: _Series, readers: Mapping[int, CheckpointReader], tensors: Sequence[TensorInfo],
            sinks: Mapping[int, Sink], chunk: int, kern: Kernels, allow_nonfinite: bool,
            on_bytes: Callable[[int], object] | None) -> None:
    """On the calling thread, a reader thread reading ahead and a writer thread writing behind."""
    def jobs() -> Iterator[Callable[[], np.ndarray]]:
        for info in tensors:
            for s0, n in spans(info.numel, chunk):
                for j in plan.needed:
                    yield partial(readers[j].read, info.name, s0, n)

    st = RunningAverage(chunk, np.float64, allow_nonfinite=allow_nonfinite, kernels=kern)
    st32 = RunningAverage(chunk, np.float32, allow_nonfinite=allow_nonfinite, kernels=kern)
    avg = np.empty(chunk, np.float64)  # emitted values are cast to a new array before the writer sees them
    spare: list[np.ndarray] = []
    with ThreadPoolExecutor(1, thread_name_prefix="ckptavg-read") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="ckptavg-write") as wpool:
        reads = prefetch(jobs(), pool, PREFETCH)
        writers = {step: WriteBehind(sink, wpool, WRITE_DEPTH) for step, sink in sinks.items()}
        for info in tensors:
            for s0, n in spans(info.numel, chunk):
                plan.chunk(info, s0, n, (next(reads) for _ in plan.needed), st, avg,
                           lambda step, name, at, v: writers[step].write(name, at, v), on_bytes, spare, st32)
        for wb in writers.values():
            wb.flush()


def _parallel(plan: _Series, readers: Mapping[int, CheckpointReader], tensors: Sequence[TensorInfo],
              sinks: Mapping[int, Sink], chunk: int, threads: int, kern: Kernels, allow_nonfinite: bool,
              on_bytes: Callable[[int], object] | None) -> None:
    """``threads`` workers, each reading, averaging and writing whole chunks."""
    local = threading.local()  # a worker's own running sum and output buffer

    def work(info: TensorInfo, s0: int, n: int) -> None:
        if not hasattr(local, "st"):  # a worker's first chunk: its torch ops on one thread too
            kern.pin()
            local.st = RunningAverage(chunk, np.float64, allow_nonfinite=allow_nonfinite, kernels=kern)
            local.st32 = RunningAverage(chunk, np.float32, allow_nonfinite=allow_nonfinite, kernels=kern)
            local.avg = np.empty(chunk, np.float64)
            local.spare = []
            # each input's chunk is converted into the ring (or written) before the next is read: one buffer
            local.buffer = np.empty(chunk * max(t.dtype.itemsize for t in tensors), np.uint8)
            local.out = np.empty(chunk * max(d.itemsize for d in plan.out_dtypes.values()), np.uint8)  # written at once
        with np.errstate(over="ignore", invalid="ignore"):
            raws = (readers[j].read_into(local.buffer, info.name, s0, n) for j in plan.needed)
            plan.chunk(info, s0, n, raws, local.st, local.avg,
                       lambda step, name, at, v: sinks[step].write(name, at, v), on_bytes, local.spare, local.st32,
                       local.out)

    each((partial(work, info, s0, n) for info in tensors for s0, n in spans(info.numel, chunk)), threads)


__all__ = ["AFRESH_MAX", "Target", "accumulator", "afresh", "stream_series"]
