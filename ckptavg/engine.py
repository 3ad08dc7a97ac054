"""The chunk loop and the running-average state every averaging path uses.

:class:`RunningAverage` is the one piece of arithmetic: a weighted sum Σ wⱼ·xⱼ and its
normaliser Σ wⱼ over a changing set of inputs, for a span of elements (a 256K-element chunk, or a
whole tensor). It adds and removes inputs (raw stored values of any dtype, converted as they
arrive), shrinks by an EMA factor, knows when its add/remove history may have drifted and must be
recomputed exactly, refuses NaN/Inf, and emits the average in the output dtype. ``merge``
(:func:`stream`), ``series`` (:func:`stream_series`) and :func:`ckptavg.iter_series` all use it.

:func:`stream` and :func:`stream_series` walk tensors in file order, chunk by chunk: a reader
thread fetches the next chunks of every input while this thread adds, and a writer thread
writes behind, so reading, arithmetic and writing overlap. Peak memory is a few chunks per input,
independent of the model's size. Non-floating tensors (int/bool buffers such as GPT-NeoX's
``attention.bias`` masks) are copied from the newest input, not averaged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import numpy as np

from .errors import NonFiniteError
from .io.dtypes import DType, to_accumulator
from .io.kernels import NUMPY, Kernels, choose
from .io.readers import CheckpointReader, Extent
from .io.safetensors import TensorInfo, pread_into
from .io.sinks import Sink
from .pipeline import WriteBehind, available_cpus, each, prefetch, spans

CHUNK_ELEMS = 1 << 18  # 256K elements (1 MiB fp32, 2 MiB fp64): the k chunks of a series ring stay in cache; measured faster than 64K or 1M for series
ROW_GROUP = 4  # inputs converted and summed per reduction (more inputs: more groups): 5 converted blocks at most
MERGE_CHUNK = 1 << 20  # a merge's chunk: 1M elements. Python's cost per chunk (~0.7 ms) falls 4 x against 256K; on 5 x 1B bf16, 2 threads: 5.9 s vs 7.9 s (2M 6.8 s, 4M 7.0 s: out of cache)
PREFETCH = 4  # chunks read ahead by the reader thread
WRITE_DEPTH = 2  # chunks a writer thread may still be writing while the next ones are computed
ACCUMULATORS = {"float32": np.float32, "float64": np.float64}

T = TypeVar("T")


class RunningAverage:
    """Σ wⱼ·xⱼ / Σ wⱼ over a changing set of inputs, for ``size`` elements, in ``dtype`` (fp32/fp64).

    Inputs arrive as raw stored values (bf16 bit patterns, fp16, fp32 …) with their
    :class:`~ckptavg.io.dtypes.DType`, whole (:meth:`add`, for a chunk) or in parts at offsets
    (:meth:`input`, for a model-sized sum filled chunk by chunk). Adding and removing in floating
    point accumulates rounding: :attr:`drifted` turns True after more than twice as many updates as
    current members, and the caller then recomputes the sum exactly from the members it holds.

    Memory: ``size`` elements of ``dtype`` for the sum, plus one chunk of scratch.

    Example:
        >>> st = RunningAverage(3)
        >>> st.add(np.array([1, 2, 3], np.float32), F32); st.add(np.array([3, 4, 5], np.float32), F32)  # doctest: +SKIP
        >>> st.emit(F32)                                                                                   # doctest: +SKIP
        array([2., 3., 4.], dtype=float32)
    """

    def __init__(self, size: int, dtype: Any = np.float32, *, allow_nonfinite: bool = False,
                 kernels: Kernels = NUMPY) -> None:
        self.sum = np.zeros(size, dtype)  # (size,) the weighted sum
        self._scratch = np.empty(min(size, CHUNK_ELEMS), dtype)  # one converted chunk
        self.allow_nonfinite = allow_nonfinite
        self.kernels = kernels  # who converts: numpy or torch (same bits, see ckptavg.io.kernels)
        self.n = size  # elements in use: a tensor's last chunk is shorter
        self.norm = 0.0  # Σ wⱼ
        self.members: set[Any] = set()  # keys of the inputs in the sum
        self._updates = 0  # adds and removes since the last exact (re)computation

    def reset(self, n: int | None = None) -> None:
        """Forget every input; use the first ``n`` elements from now on."""
        self.n = self.sum.shape[0] if n is None else n
        self.norm, self._updates = 0.0, 0
        self.members = set()

    def _put(self, raw: np.ndarray, dtype: DType, weight: float, sign: int, fresh: bool, at: int,
             scratch: np.ndarray | None = None) -> None:
        acc = self.sum[at : at + len(raw)]
        scratch = self._scratch if scratch is None else scratch
        if fresh:  # the first input is converted straight into the sum: no zeroing pass
            self.kernels.to_acc(raw, dtype, acc)
            if weight != 1.0:
                acc *= weight
            return
        if weight == 1.0 and raw.dtype == acc.dtype:  # no conversion: one pass
            if sign > 0:
                np.add(acc, raw, out=acc)
            else:
                with np.errstate(invalid="ignore"):  # inf - inf: the NaN guard at emit names the input
                    np.subtract(acc, raw, out=acc)
            return
        for s in range(0, len(raw), len(scratch)):
            part = raw[s : s + len(scratch)]
            x = self.kernels.to_acc(part, dtype, scratch[: len(part)])
            if weight != 1.0:
                x *= weight
            if sign > 0:
                acc[s : s + len(part)] += x
            else:
                with np.errstate(invalid="ignore"):  # inf - inf: the NaN guard at emit names the input
                    acc[s : s + len(part)] -= x

    def _note(self, key: Any, weight: float, sign: int) -> None:
        if sign > 0:
            self.members.add(key if key is not None else ("input", len(self.members)))
        else:
            self.members.discard(key)
        self.norm += sign * weight
        self._updates += 1
        if not self.members:  # the next input starts the sum afresh: no rounding residue survives
            self.norm, self._updates = 0.0, 0

    def add(self, raw: np.ndarray, dtype: DType, weight: float = 1.0, key: Any = None) -> None:
        """Fold in one input's values (``len(raw) == n``) with ``weight``; ``key`` names it."""
        self._put(raw, dtype, weight, 1, not self.members, 0)
        self._note(key, weight, 1)

    def add_rows(self, raws: np.ndarray, dtype: DType, weights: Sequence[float], scratch: np.ndarray) -> None:
        """Start an empty sum from several inputs at once: row j of ``raws`` (k × n raw values, C
        order) with ``weights[j]``. The rows are converted in one call into ``scratch`` (a flat
        accumulator-dtype buffer of at least 2 × n) and summed by one reduction over the first axis
        per group of rows it holds, which numpy performs row after row from ``initial=-0.0`` (the
        additive identity that keeps a -0.0): the same bits as :meth:`add` one by one, with 3
        numpy calls per group instead of 3 per input (tests/test_engine.py)."""
        k, n = raws.shape
        group = scratch.size // n
        acc = self.sum[:n]
        done = 0
        while done < k:
            lead = 0 if done == 0 else 1  # after the first group, the sum so far is its first row
            take = min(k - done, group - lead)
            rows = scratch[: (lead + take) * n].reshape(lead + take, n)
            if lead:
                np.copyto(rows[0], acc)
            self.kernels.to_acc(raws[done : done + take], dtype, rows[lead:])
            part = weights[done : done + take]
            for row, w in zip(rows[lead:], part):
                if w != 1.0:  # as add does (acc *= w): numpy's own promotion rules for w, whatever its type
                    row *= w
            np.add.reduce(rows, axis=0, out=acc, initial=-0.0)
            for w in part:
                self._note(None, w, 1)
            done += take

    def add_pair(self, a: np.ndarray, b: np.ndarray) -> None:
        """Start an empty sum as ``a + b`` (weight 1, the sum's dtype): :meth:`add` twice in one pass."""
        np.add(a, b, out=self.sum[: len(a)])
        for _ in (a, b):
            self._note(None, 1.0, 1)

    def remove(self, raw: np.ndarray, dtype: DType, weight: float = 1.0, key: Any = None) -> None:
        """Take out input ``key``, added before with the same ``weight``."""
        self._put(raw, dtype, weight, -1, False, 0)
        self._note(key, weight, -1)

    @contextmanager
    def input(self, key: Any, weight: float = 1.0, sign: int = 1) -> Iterator[Callable[..., None]]:
        """Add (``sign=1``) or remove (``-1``) one input given in parts: ``put(raw, dtype, offset)``
        for each part; the input counts as a member once the block ends. Every element of the sum
        must be covered by the parts of an input that starts an empty sum. Threads may put parts at
        once, each with its own ``scratch`` (a chunk of the sum's dtype): ``put(raw, dtype, offset,
        scratch)``; per-element arithmetic, so the bits do not depend on the cut."""
        fresh = sign > 0 and not self.members
        yield lambda raw, dtype, at, scratch=None: self._put(raw, dtype, weight, sign, fresh, at, scratch)
        self._note(key, weight, sign)

    def decay(self, factor: float, threads: int = 1) -> None:
        """EMA: every input so far counts ``factor`` times less (sum and normaliser), on ``threads``."""
        if self.members:
            each((partial(np.multiply, self.sum[a : a + m], factor, out=self.sum[a : a + m])
                  for a, m in spans(self.n, MERGE_CHUNK)), threads)
            self.norm *= factor

    @property
    def drifted(self) -> bool:
        """More add/remove updates than twice the members since the sum was last exact."""
        return self._updates > 2 * max(1, len(self.members))

    def recompute(self, inputs: Iterable[tuple[Any, np.ndarray, DType, float]]) -> None:
        """The sum again from scratch, from (key, raw values, dtype, weight) of the current members."""
        self.reset(self.n)
        for key, raw, dtype, weight in inputs:
            self.add(raw, dtype, weight, key)
        self._updates = 0

    def finite(self, at: int = 0, n: int | None = None) -> bool:
        """No NaN/Inf in elements [at, at+n) of the sum (one cheap pass; the full check only if that fails)."""
        return self.kernels.finite(self.sum[at : at + (self.n - at if n is None else n)])

    def emit(self, dtype: DType, into: np.ndarray | None = None, where: Callable[[], str] | None = None,
             at: int = 0, n: int | None = None, *, narrowing: str = "", checked: bool = False,
             dest: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
        """The average of elements [at, at+n) (default: all in use) as raw values of ``dtype``.

        Args:
            dtype: the output dtype.
            into: an accumulator-dtype buffer of at least ``n`` for the average; None divides in
                place (the sum is spent: for a one-shot merge whose inputs are not needed again).
            where: builds the NaN/Inf message (called only when there are any).
            narrowing: the tensor's name when ``dtype`` has a smaller range than the inputs'
                (fp32 → fp16, fp32 → bf16): the cast is then checked for overflow.
            checked: the caller has just seen :meth:`finite` hold (skips a second pass).
            dest: where the cast values go (``n`` raw values of ``dtype``); default a new array.
                Unused when no cast is needed: the average itself is returned.
            scratch: a buffer of at least ``n`` elements of the sum's dtype the cast may use
                (default this average's own chunk of scratch: one thread at a time).

        Raises:
            NonFiniteError: the span holds NaN/Inf and ``allow_nonfinite`` is off, or a finite
                average does not fit ``dtype``.
        """
        n = self.n - at if n is None else n
        acc = self.sum[at : at + n]
        if not self.allow_nonfinite and not checked and not self.finite(at, n):
            raise NonFiniteError(where() if where else "the average holds NaN/Inf; pass --allow-nonfinite to write it anyway")
        out = acc if into is None else into[:n]
        if self.norm != 1.0:
            np.divide(acc, self.norm, out=out)
        elif into is not None:
            np.copyto(out, acc)
        if dtype.storage == out.dtype:
            return out
        work = self._scratch if scratch is None else scratch
        with np.errstate(over="ignore"):  # the scratch chunk is free now: the bf16 rounding's work space
            cast = self.kernels.from_acc(out, dtype, dest, finite=not self.allow_nonfinite,
                                         scratch=work[:n].view(np.uint32) if n <= work.size else None)
        if narrowing and not self.allow_nonfinite and not _fits(cast, dtype):
            peak = float(np.abs(out).max())
            raise NonFiniteError(f"tensor {narrowing!r}: the average reaches {peak:.4g}, beyond {dtype.torch_name}'s "
                                 "range; write it as float32 or bfloat16 (--dtype)")
        return cast


def _fits(cast: np.ndarray, dtype: DType) -> bool:
    """No element of a finite average became Inf in the cast to ``dtype``."""
    if dtype.name == "BF16":  # bit patterns: an all-ones exponent is Inf (NaN cannot come from finite values)
        return not bool(np.any(np.bitwise_and(cast, 0x7F80) == 0x7F80))
    return bool(np.isfinite(cast).all())


def narrows(src: DType, dst: DType) -> bool:
    """Whether an average of ``src`` values may overflow ``dst``: fp16 holds less than bf16, fp32
    and fp64; bf16 a little less than fp32 (3.39e38 against 3.40e38) and fp64."""
    wider = {"F16": ("BF16", "F32", "F64"), "BF16": ("F32", "F64")}
    return src.name in wider.get(dst.name, ())


def _first_nonfinite(readers: Sequence[CheckpointReader], name: str, start: int, n: int) -> CheckpointReader | None:
    for r in readers:
        vals = to_accumulator(r.read(name, start, n), r.tensors[name].dtype, np.empty(n, np.float32))
        if not np.isfinite(vals).all():
            return r
    return None


def stream(
    readers: Sequence[CheckpointReader],
    weights: Sequence[float],
    plan: Sequence[TensorInfo],
    out_dtypes: Mapping[str, DType],
    sink: Sink,
    *,
    accumulate: str = "float32",
    allow_nonfinite: bool = False,
    on_bytes: Callable[[int], object] | None = None,
    chunk: int | None = None,
    threads: int | None = None,
    kernels: str = "auto",
) -> None:
    """Average ``readers`` with ``weights`` tensor by tensor into ``sink`` (one model's worth).

    ``plan`` lists the tensors (name, input dtype, shape) in the order to process them; the last
    reader is the newest checkpoint, the source of non-floating tensors. Uniform weights are
    summed with weight 1 and divided once, as ``torch.stack(xs).mean(0)`` does.

    ``threads`` > 1 (default: the CPUs this process may use): that many workers, each owning whole
    ``MERGE_CHUNK`` chunks end to end, block by ``CHUNK_ELEMS`` block (read every input's block,
    add, check, cast), then one ``pwrite``; each worker holds a block of every input, its sum and
    scratch, and a chunk of output (:func:`ckptavg.preflight.memory_bound`), independent of the
    model. One thread: 256K chunks, with a reader and a writer thread beside this one. Every chunk
    is computed the same way whoever computes it: the output is bit-identical for any thread count.

    ``kernels``: who converts bf16/fp16 ↔ fp32, ``numpy``, ``torch`` or ``auto`` (torch for fp16
    jobs from 1 GiB read, for bf16 ones from 16 GiB per thread; see :mod:`ckptavg.io.kernels`).
    Same bits either way.
    """
    threads = available_cpus() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    chunk = chunk or (MERGE_CHUNK if threads > 1 else CHUNK_ELEMS)
    active = [i for i, w in enumerate(weights) if w != 0.0]
    kern = choose(sum(t.nbytes for t in plan if t.dtype.floating) * len(active),
                  {t.dtype.name for t in plan} | {d.name for d in out_dtypes.values()}, kernels, threads)
    with pinned(kern):
        if threads > 1:
            return _stream_parallel(readers, weights, plan, out_dtypes, sink, accumulate=accumulate,
                                    allow_nonfinite=allow_nonfinite, on_bytes=on_bytes, chunk=chunk,
                                    threads=threads, kern=kern)
        return _stream_serial(readers, weights, plan, out_dtypes, sink, accumulate=accumulate,
                              allow_nonfinite=allow_nonfinite, on_bytes=on_bytes, chunk=chunk, kern=kern)


@contextmanager
def pinned(kern: Kernels) -> Iterator[None]:
    """Torch kernels on one thread in the calling thread (restored after): parallelism is ours,
    one chunk per worker; torch's own intra-op threads would oversubscribe the cores."""
    previous = kern.pin()
    try:
        yield
    finally:
        kern.unpin(previous)


def _stream_serial(
    readers: Sequence[CheckpointReader], weights: Sequence[float], plan: Sequence[TensorInfo],
    out_dtypes: Mapping[str, DType], sink: Sink, *, accumulate: str, allow_nonfinite: bool,
    on_bytes: Callable[[int], object] | None, chunk: int, kern: Kernels,
) -> None:
    """:func:`stream` on the calling thread, with a reader and a writer thread beside it."""
    active = [i for i, w in enumerate(weights) if w != 0.0]
    uniform = len({weights[i] for i in active}) == 1
    newest = len(readers) - 1
    # rotated: the writer may still hold the last WRITE_DEPTH emitted chunks; one set per accumulator dtype
    pools: dict[Any, list[RunningAverage]] = {}

    def state(info: TensorInfo, i: int) -> RunningAverage:
        acc = np.float64 if accumulate == "float64" or info.dtype.name == "F64" else ACCUMULATORS[accumulate]
        if acc not in pools:  # not setdefault: its default would allocate WRITE_DEPTH + 2 chunks per tensor
            pools[acc] = [RunningAverage(chunk, acc, allow_nonfinite=allow_nonfinite, kernels=kern)
                          for _ in range(WRITE_DEPTH + 2)]
        pool = pools[acc]
        return pool[i % len(pool)]

    def jobs() -> Iterator[Callable[[], np.ndarray]]:
        for info in plan:
            srcs = active if info.dtype.floating else [newest]
            for start, n in spans(info.numel, chunk):
                for i in srcs:
                    yield partial(readers[i].read, info.name, start, n)

    def exact(info: TensorInfo, start: int, n: int, cast: str) -> np.ndarray:
        return _exact(readers, active, weights, uniform, info, start, n, out_dtypes[info.name], cast)

    produced = 0
    # Overflow and inf - inf are expected on the way to the NaN/Inf checks, which report them.
    with ThreadPoolExecutor(1, thread_name_prefix="ckptavg-read") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="ckptavg-write") as wpool, np.errstate(over="ignore", invalid="ignore"):
        reads = prefetch(jobs(), pool, PREFETCH)
        out = WriteBehind(sink, wpool, WRITE_DEPTH)
        for info in plan:
            out_dt = out_dtypes[info.name]
            cast = info.name if narrows(info.dtype, out_dt) else ""
            for start, n in spans(info.numel, chunk):
                if not info.dtype.floating:
                    raw = next(reads)
                    out.write(info.name, start, raw)
                    if on_bytes:
                        on_bytes(raw.nbytes)
                    continue
                st = state(info, produced)
                produced += 1
                raws = (next(reads) for _ in active)
                values = average_chunk(st, raws, [1.0 if uniform else weights[i] for i in active], info, n, out_dt,
                                        cast, allow_nonfinite, on_bytes, partial(exact, info, start, n, cast))
                out.write(info.name, start, values)
        out.flush()


def _stream_parallel(
    readers: Sequence[CheckpointReader], weights: Sequence[float], plan: Sequence[TensorInfo],
    out_dtypes: Mapping[str, DType], sink: Sink, *, accumulate: str, allow_nonfinite: bool,
    on_bytes: Callable[[int], object] | None, chunk: int, threads: int, kern: Kernels,
) -> None:
    """:func:`stream` with ``threads`` workers, each owning whole chunks (see there)."""
    active = [i for i, w in enumerate(weights) if w != 0.0]
    uniform = len({weights[i] for i in active}) == 1
    newest = readers[-1]
    local = threading.local()  # a worker's own running sums, one per accumulator dtype

    def state(acc: Any) -> RunningAverage:
        sums = local.__dict__.setdefault("sums", {})
        if acc not in sums:  # a worker's first chunk: its torch ops on one thread too (pool threads end with us)
            kern.pin()
            sums[acc] = RunningAverage(min(chunk, CHUNK_ELEMS), acc, allow_nonfinite=allow_nonfinite, kernels=kern)
        st: RunningAverage = sums[acc]
        return st

    def buffers(block: int, acc: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not hasattr(local, "rows"):  # a worker's reused buffers: a block of every input, a chunk of output
            local.rows = np.empty(len(active) * block * max(t.dtype.itemsize for t in plan), np.uint8)
            local.out = np.empty(chunk * max(d.itemsize for d in out_dtypes.values()), np.uint8)
            local.conv = {}
        if acc not in local.conv:  # converted rows: up to ROW_GROUP inputs and the sum so far
            local.conv[acc] = np.empty((min(len(active), ROW_GROUP) + 1) * block, acc)
        return local.rows, local.out, local.conv[acc]

    def work(info: TensorInfo, start: int, n: int, where: list[Extent] | None) -> None:
        if not info.dtype.floating:
            raw = newest.read(info.name, start, n)
            sink.write(info.name, start, raw)
            if on_bytes:
                on_bytes(raw.nbytes)
            return
        acc = np.float64 if accumulate == "float64" or info.dtype.name == "F64" else ACCUMULATORS[accumulate]
        out_dt = out_dtypes[info.name]
        cast = info.name if narrows(info.dtype, out_dt) else ""
        st = state(acc)
        rows, out_bytes, conv = buffers(st.sum.shape[0], acc)
        out = out_bytes[: n * out_dt.itemsize].view(out_dt.storage)
        w = [1.0 if uniform else weights[i] for i in active]
        with np.errstate(over="ignore", invalid="ignore"):
            # Block by block (a 1M-element chunk's fp32 sums would not fit in L2): every input's
            # block read, then converted and summed in a few numpy calls while it is in cache.
            for s, m in spans(n, st.sum.shape[0]):
                blocks: Iterable[np.ndarray]
                if where is not None:  # one pread per input, no reader layers between
                    blocks = _read_rows(rows, where, info, start + s, m)
                else:  # through the readers, one input at a time (DCP, ZeRO … return fresh arrays)
                    blocks = (readers[i].read_into(rows, info.name, start + s, m) for i in active)
                dest = out[s : s + m]
                values = average_chunk(st, blocks, w, info, m, out_dt, cast, allow_nonfinite,
                                        on_bytes, partial(_exact, readers, active, weights, uniform, info, start + s, m,
                                                          out_dt, cast), dest=dest, scratch=conv)
                if values is not dest:  # no cast (the average itself), or an fp64 redo
                    dest[...] = values
        sink.write(info.name, start, out)

    each((partial(work, info, start, n, where) for info in plan
          for where in [_extents(readers, active, info)] for start, n in spans(info.numel, chunk)), threads)


def _extents(readers: Sequence[CheckpointReader], active: Sequence[int], info: TensorInfo) -> list[Extent] | None:
    """Where a floating tensor lies in every active input, when all store it as plain bytes of the
    plan's dtype (anything else goes through the readers)."""
    if not info.dtype.floating or any(readers[i].tensors[info.name].dtype != info.dtype for i in active):
        return None
    where = [readers[i].extent(info.name) for i in active]
    found = [w for w in where if w is not None]
    return found if len(found) == len(where) else None


def _read_rows(rows: np.ndarray, where: Sequence[Extent], info: TensorInfo, start: int, n: int) -> np.ndarray:
    """Elements [start, start+n) of a tensor from each input (``where``) into the flat byte
    buffer ``rows``: a (k, n) C-ordered array of raw values, one row per input."""
    size = n * info.dtype.itemsize
    for j, (file, offset) in enumerate(where):
        fd = file.acquire()
        try:
            pread_into(fd, rows[j * size : (j + 1) * size], offset + start * info.dtype.itemsize, file.path, info.name)
        finally:
            file.done()
    return rows[: len(where) * size].view(info.dtype.storage).reshape(len(where), n)


def average_chunk(st: RunningAverage, raws: Iterable[np.ndarray], weights: Sequence[float], info: TensorInfo,
                   n: int, out_dt: DType, cast: str, allow_nonfinite: bool,
                   on_bytes: Callable[[int], object] | None, exact: Callable[[], np.ndarray],
                   dest: np.ndarray | None = None, scratch: np.ndarray | None = None,
                   pair: Sequence[np.ndarray] = ()) -> np.ndarray:
    """One chunk: every input's raw values (``raws``, in ``weights``' order: an iterable, or a
    (k, n) array whose rows are summed at once into ``scratch``) added into ``st``, then the
    average in ``out_dt``; ``exact()`` redoes it in fp64 when the sum is not finite. ``pair``: two
    inputs of weight 1 already in the accumulator's dtype that come before ``raws``, summed in one pass."""
    st.reset(n)
    if pair:
        st.add_pair(*pair)
    if isinstance(raws, np.ndarray) and scratch is not None:
        if on_bytes:
            on_bytes(raws.nbytes)
        st.add_rows(raws, info.dtype, weights, scratch)
    else:
        for raw, w in zip(raws, weights):
            if on_bytes:
                on_bytes(raw.nbytes)
            st.add(raw, info.dtype, w)
    if allow_nonfinite or st.finite():
        return st.emit(out_dt, narrowing=cast, checked=True, dest=dest)
    return exact()


def _exact(readers: Sequence[CheckpointReader], active: Sequence[int], weights: Sequence[float], uniform: bool,
           info: TensorInfo, start: int, n: int, out_dt: DType, cast: str) -> np.ndarray:
    """A chunk again in fp64: finite inputs whose fp32 sum overflowed, or a NaN/Inf input to name."""
    bad = _first_nonfinite([readers[i] for i in active], info.name, start, n)
    if bad is not None:
        raise NonFiniteError(f"{bad.label}: tensor {info.name!r} has NaN/Inf values; "
                             "refusing to average (pass --allow-nonfinite to average anyway)")
    st = RunningAverage(n, np.float64)
    for i in active:
        st.add(readers[i].read(info.name, start, n), info.dtype, 1.0 if uniform else weights[i])
    return st.emit(out_dt, narrowing=cast)


__all__ = ["ACCUMULATORS", "CHUNK_ELEMS", "MERGE_CHUNK", "RunningAverage", "available_cpus", "average_chunk", "pinned",
           "stream"]
