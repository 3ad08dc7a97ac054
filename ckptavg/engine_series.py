"""The chunk loop of ``series``: every target of a trajectory, reading each input chunk once.

Tensor-major over the run: for each chunk of each tensor, the inputs are read in step order; a
ring keeps the raw chunks later targets still need, and one :class:`~ckptavg.engine.RunningAverage`
(fp64) follows the window (uniform) or the whole run (EMA). Each target's chunk goes to its own
sink at its offset. With ``threads`` > 1, workers own whole chunks (all inputs, all targets of
that span), as in :func:`ckptavg.engine.stream`; every chunk is computed the same way whoever
computes it, so the outputs are bit-identical for any thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from . import engine
from .engine import PREFETCH, WRITE_DEPTH, RunningAverage, narrows, pinned
from .io.dtypes import DTYPES, DType
from .io.kernels import Kernels, choose
from .io.readers import CheckpointReader
from .io.safetensors import TensorInfo
from .io.sinks import Sink
from .pipeline import WriteBehind, available_cpus, prefetch, spans


@dataclass(frozen=True)
class Target:
    """One averaged model of a series: at ``step`` (trajectory index ``index``), from ``inputs``
    (trajectory indices, oldest first) with ``weights``."""

    index: int
    step: int
    inputs: tuple[int, ...]
    weights: tuple[float, ...]


F64 = DTYPES["F64"]
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

    def message(self, info: TensorInfo, t: Target) -> Callable[[], str]:
        span = f"steps {self.steps[t.inputs[0]]}..{t.step}" if self.steps else "its window"
        return lambda: (f"step {t.step}: tensor {info.name!r} averages to NaN/Inf (an input in {span} holds "
                        "NaN/Inf); pass --allow-nonfinite to write it anyway")

    def chunk(self, info: TensorInfo, s0: int, n: int, raws: Iterator[np.ndarray], st: RunningAverage,
              avg: np.ndarray, write: Write, on_bytes: Callable[[int], object] | None, spare: list[np.ndarray]) -> None:
        """Elements [s0, s0+n) of ``info`` for every target; ``raws`` yields the needed inputs' chunks in order.
        ``spare``: this thread's fp64 chunk buffers for the ring, reused from chunk to chunk (a fresh
        2 MiB array per input per chunk costs the kernel a page fault per 4 KiB)."""
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
            # Converted once: every add, remove and recompute below is then plain fp64 arithmetic.
            held[j] = spare.pop() if spare else np.empty(len(avg), np.float64)
            ring[j] = st.kernels.to_acc(raw, info.dtype, held[j][:n])
            if target is None:
                continue
            if len(set(target.weights)) > 1:  # wsm, wma, power-ema: this target's weights, from the ring
                st.recompute((m, ring[m], F64, w) for m, w in zip(target.inputs, target.weights))
                emit(target)
                st.reset(n)
            else:
                for m in sorted(set(target.inputs) - st.members):
                    st.add(ring[m], F64, key=m)
                if st.drifted:  # exact again from the ring, so the running sum cannot drift
                    st.recompute((m, ring[m], F64, 1.0) for m in sorted(st.members))
                emit(target)
            for m in [m for m in ring if m not in self.later[j]]:
                if m in st.members and self.later[j]:  # after the last target the sum is not needed again
                    st.remove(ring[m], F64, key=m)
                del ring[m]
                spare.append(held.pop(m))
        spare.extend(held.values())


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
    avg = np.empty(chunk, np.float64)  # emitted values are cast to a new array before the writer sees them
    spare: list[np.ndarray] = []
    with ThreadPoolExecutor(1, thread_name_prefix="ckptavg-read") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="ckptavg-write") as wpool:
        reads = prefetch(jobs(), pool, PREFETCH)
        writers = {step: WriteBehind(sink, wpool, WRITE_DEPTH) for step, sink in sinks.items()}
        for info in tensors:
            for s0, n in spans(info.numel, chunk):
                plan.chunk(info, s0, n, (next(reads) for _ in plan.needed), st, avg,
                           lambda step, name, at, v: writers[step].write(name, at, v), on_bytes, spare)
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
            local.avg = np.empty(chunk, np.float64)
            local.spare = []
        with np.errstate(over="ignore", invalid="ignore"):
            plan.chunk(info, s0, n, (readers[j].read(info.name, s0, n) for j in plan.needed), local.st, local.avg,
                       lambda step, name, at, v: sinks[step].write(name, at, v), on_bytes, local.spare)

    tasks = (partial(work, info, s0, n) for info in tensors for s0, n in spans(info.numel, chunk))
    with ThreadPoolExecutor(threads, thread_name_prefix="ckptavg-work") as pool:
        for _ in prefetch(tasks, pool, 2 * threads):
            pass


__all__ = ["Target", "stream_series"]
