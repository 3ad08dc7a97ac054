"""The tensor-at-a-time loop: read k chunks, accumulate in fp32, cast, hand to a sink.

For each tensor of the newest checkpoint, in file order, and for each chunk of ``CHUNK_ELEMS``
elements of it: read that chunk from every selected input, add it with its weight into an fp32
(or fp64) accumulator, cast to the output dtype and give it to the sink. A reader thread fetches
the next chunks while this thread adds, so reading and arithmetic overlap on two cores.

Peak memory is a few chunks (accumulator, scratch, prefetched reads), independent of k, of the
tensor sizes and of the model size. Non-floating tensors (int/bool buffers such as GPT-NeoX's
``attention.bias`` masks) are copied from the newest checkpoint, not averaged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import numpy as np

from . import hub as _hub
from . import manifest as _manifest
from . import methods
from .discovery import CONFIG_FILES, check_compatible, read_tensors
from .errors import CkptavgError
from .io import CheckpointReader
from .io.dtypes import DType, from_accumulator, parse_dtype, to_accumulator
from .io.safetensors import TensorInfo, parse_size
from .io.sinks import SafetensorsDirSink, Sink, StateDictSink, atomic_directory, check_output
from .trajectory import Checkpoint, Trajectory

if TYPE_CHECKING:
    import torch

CHUNK_ELEMS = 1 << 18  # 256K elements (1 MiB fp32, 2 MiB fp64): the k chunks of a series ring stay in cache; measured faster than 64K or 1M for merge and series
PREFETCH = 4  # chunks read ahead by the reader thread
WRITE_DEPTH = 2  # chunks a writer thread may still be writing while the next ones are computed
ACCUMULATORS = {"float32": np.float32, "float64": np.float64}

T = TypeVar("T")


def _prefetch(tasks: Iterable[Callable[[], T]], pool: ThreadPoolExecutor, depth: int) -> Iterator[T]:
    queue: deque[Any] = deque()
    it = iter(tasks)
    for task in it:
        queue.append(pool.submit(task))
        if len(queue) >= depth:
            break
    while queue:
        fut = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append(pool.submit(nxt))
        yield fut.result()


class WriteBehind:
    """Hands ``sink.write`` calls to a thread so writing (``pwrite`` into the page cache, as
    costly as the arithmetic) overlaps the next chunk's reads and adds. At most ``depth`` writes
    are in flight; a caller may reuse a buffer once ``depth + 1`` later writes were submitted."""

    def __init__(self, sink: Sink, pool: ThreadPoolExecutor, depth: int = 2) -> None:
        self.sink, self.pool, self.depth = sink, pool, depth
        self._queue: deque[Any] = deque()

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        self._queue.append(self.pool.submit(self.sink.write, name, start, values))
        while len(self._queue) > self.depth:
            self._queue.popleft().result()

    def flush(self) -> None:
        while self._queue:
            self._queue.popleft().result()


def _chunks(numel: int, chunk: int) -> range:
    return range(0, numel, chunk)


def _find_nonfinite(readers: Sequence[CheckpointReader], name: str, start: int, n: int) -> CheckpointReader | None:
    for r in readers:
        raw = r.read(name, start, n)
        info = r.tensors[name]
        vals = to_accumulator(raw, info.dtype, np.empty(n, np.float32))
        if not np.isfinite(vals).all():
            return r
    return None


def stream(
    readers: Sequence[CheckpointReader],
    weights: Sequence[float],
    plan: Sequence[TensorInfo],
    out_dtypes: dict[str, DType],
    sink: Sink,
    *,
    accumulate: str = "float32",
    allow_nonfinite: bool = False,
    on_bytes: Callable[[int], object] | None = None,
    chunk: int | None = None,
) -> None:
    """Average ``readers`` with ``weights`` tensor by tensor into ``sink``.

    ``plan`` lists the tensors (name, input dtype, shape) in the order to process them; the last
    reader is the newest checkpoint, the source of non-floating tensors.
    """
    chunk = chunk or CHUNK_ELEMS
    acc_dtype = ACCUMULATORS[accumulate]
    active = [i for i, w in enumerate(weights) if w != 0.0]
    uniform = len({weights[i] for i in active}) == 1
    newest = len(readers) - 1
    acc_bufs = [np.empty(chunk, acc_dtype) for _ in range(WRITE_DEPTH + 2)]  # rotated: writes may be in flight
    tmp_buf = np.empty(chunk, acc_dtype)
    produced = 0

    def jobs() -> Iterator[Callable[[], np.ndarray]]:
        for info in plan:
            srcs = active if info.dtype.floating else [newest]
            for start in _chunks(info.numel, chunk):
                n = min(chunk, info.numel - start)
                for i in srcs:
                    yield lambda r=readers[i], name=info.name, s=start, n=n: r.read(name, s, n)

    with ThreadPoolExecutor(1, thread_name_prefix="ckptavg-read") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="ckptavg-write") as wpool:
        reads = _prefetch(jobs(), pool, PREFETCH)
        out = WriteBehind(sink, wpool, WRITE_DEPTH)
        for info in plan:
            for start in _chunks(info.numel, chunk):
                n = min(chunk, info.numel - start)
                if not info.dtype.floating:
                    raw = next(reads)
                    out.write(info.name, start, raw)
                    if on_bytes:
                        on_bytes(raw.nbytes)
                    continue
                acc = acc_bufs[produced % len(acc_bufs)][:n]
                produced += 1
                for j, i in enumerate(active):
                    raw = next(reads)
                    if on_bytes:
                        on_bytes(raw.nbytes)
                    if j == 0:
                        to_accumulator(raw, info.dtype, acc)
                        if not uniform:
                            acc *= weights[i]
                    elif uniform and info.dtype.name != "BF16":
                        np.add(acc, raw, out=acc)
                    else:
                        tmp = to_accumulator(raw, info.dtype, tmp_buf[:n])
                        if not uniform:
                            tmp *= weights[i]
                        acc += tmp
                if uniform:
                    acc /= len(active)
                if not allow_nonfinite and not np.isfinite(acc.sum()):
                    bad = _find_nonfinite([readers[i] for i in active], info.name, start, n)
                    if bad is not None:
                        c = bad.checkpoint
                        raise CkptavgError(
                            f"step {c.step} ({c.location}): tensor {info.name!r} has NaN/Inf values; "
                            "refusing to average (pass --allow-nonfinite to average anyway)"
                        )
                out_dt = out_dtypes[info.name]
                out.write(info.name, start, acc if out_dt.storage == acc.dtype else from_accumulator(acc, out_dt))
        out.flush()


def _ensure_tensors(ckpts: list[Checkpoint]) -> list[Checkpoint]:
    from dataclasses import replace

    out = []
    for c in ckpts:
        if c.tensors is None:
            c = replace(c, tensors=read_tensors(c.format, list(c.files), c.index))
        out.append(c)
    return out


def _copy_configs(src: Path | None, dst: Path, dtype: DType | None) -> list[str]:
    copied = []
    if src is None:
        return copied
    for name in CONFIG_FILES:
        p = src / name
        if p.is_file():
            shutil.copyfile(p, dst / name)
            copied.append(name)
    if dtype is not None and "config.json" in copied:
        # The config's dtype tells from_pretrained(dtype="auto") what the weights are.
        cfg_path = dst / "config.json"
        cfg = json.loads(cfg_path.read_text())
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]  # 4.x and 5.x both read torch_dtype
        for key in keys:
            cfg[key] = dtype.torch_name
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return copied


def finish_directory(
    tmp: Path, ckpts: Sequence[Checkpoint], weights: Sequence[float], method: str, params: dict[str, Any],
    out_dtype: DType | None, accumulate: str, root: str, hashes: dict[Path, str] | None = None,
) -> None:
    """Config/tokenizer files of the newest input and ``ckptavg.json`` next to the weights."""
    _copy_configs(ckpts[-1].config_dir, tmp, out_dtype)
    files = sorted([p.name for p in tmp.iterdir()] + [_manifest.MANIFEST_NAME])
    _manifest.write(tmp, _manifest.build(
        ckpts, weights, method, params,
        dtype=out_dtype.torch_name if out_dtype else "same as inputs",
        accumulate=accumulate, trajectory=root, hashes=hashes, files=files,
    ))


@overload
def average(checkpoints: Trajectory | Sequence[Checkpoint], out: None = None, **kwargs: Any) -> dict[str, torch.Tensor]: ...
@overload
def average(checkpoints: Trajectory | Sequence[Checkpoint], out: str | os.PathLike[str], **kwargs: Any) -> Path: ...
def average(
    checkpoints: Trajectory | Sequence[Checkpoint],
    out: str | os.PathLike[str] | None = None,
    *,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    decay: float | None = None,
    half_life: float | None = None,
    dtype: str | None = None,
    accumulate: Literal["float32", "float64"] = "float32",
    max_shard_size: int | str | None = None,
    force: bool = False,
    hash_inputs: bool = False,
    allow_nonfinite: bool = False,
    allow_duplicates: bool = False,
    progress: bool = True,
) -> Path | dict[str, torch.Tensor]:
    """Average checkpoints, streaming one tensor chunk at a time.

    Args:
        checkpoints: the selection to average (a Trajectory or a list of Checkpoints), oldest first.
        out: output directory (HF-loadable: safetensors + config/tokenizer files of the newest
            checkpoint + ``ckptavg.json``), written atomically. ``None``: return a state dict.
        method: ``uniform``, ``weighted`` (with ``weights``) or ``ema`` (with ``decay`` or
            ``half_life`` in steps); see :mod:`ckptavg.methods`.
        dtype: output dtype of floating tensors (default: the inputs' dtype).
        accumulate: ``float32`` (default) or ``float64`` accumulator.
        max_shard_size: shard the output (``"5GB"``), with an HF index file.
        force: replace an existing non-empty ``out``.
        hash_inputs: record each input file's sha256 in the manifest (one extra read).
        allow_nonfinite: average tensors holding NaN/Inf instead of refusing.
        allow_duplicates: average Hub revisions whose weights are byte-identical to another step
            branch's instead of refusing (see :func:`ckptavg.hub.materialise`).
        progress: show a tqdm bar (bytes read) on stderr.

    Returns:
        The output directory, or ``{name: torch.Tensor}`` when ``out`` is None.

    Raises:
        CkptavgError: incompatible checkpoints, bad weights, unusable output path, NaN/Inf.

    Example:
        >>> traj = discover("runs/tiny")                              # doctest: +SKIP
        >>> average(traj.window(5, at=5000), "tiny-lawa5-step5000")   # doctest: +SKIP
    """
    ckpts = list(checkpoints)
    if not ckpts:
        raise CkptavgError("nothing selected: the selection has no checkpoints")
    if accumulate not in ACCUMULATORS:
        raise CkptavgError(f"accumulate must be float32 or float64, got {accumulate!r}")
    params: dict[str, Any] = {"weights": list(weights) if weights is not None else None,
                              "decay": decay, "half_life": half_life}
    w = methods.weights(method, [c.step for c in ckpts], **params)
    try:
        out_dtype = parse_dtype(dtype) if dtype else None
        shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    except ValueError as e:
        raise CkptavgError(str(e)) from None
    root = getattr(checkpoints, "root", "")
    if out is not None:
        check_output(Path(out), force, [Path(c.location) for c in ckpts] + ([Path(root)] if root else []))
    ckpts = _hub.materialise(ckpts, allow_duplicates=allow_duplicates, progress=progress)  # hf:// → HF cache files
    ckpts = _ensure_tensors(ckpts)
    check_compatible(ckpts)
    newest = ckpts[-1]
    assert newest.tensors is not None
    plan = list(newest.tensors.values())
    out_dtypes = {t.name: (out_dtype if out_dtype and t.dtype.floating else t.dtype) for t in plan}
    entries = [TensorInfo(t.name, out_dtypes[t.name], t.shape) for t in plan]
    hashes = {f: _manifest.sha256_file(f) for c in ckpts for f in c.files} if hash_inputs else None

    active = [c for c, x in zip(ckpts, w) if x != 0.0]
    total = sum(t.nbytes * (len(active) if t.dtype.floating else 1) for t in plan)
    from tqdm import tqdm

    readers: list[CheckpointReader] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="averaging", disable=not progress, leave=False) as bar:
        try:
            readers = [CheckpointReader(c) for c in ckpts]
            kw = dict(accumulate=accumulate, allow_nonfinite=allow_nonfinite, on_bytes=bar.update)
            if out is None:
                sd_sink = StateDictSink(entries)
                stream(readers, w, plan, out_dtypes, sd_sink, **kw)  # type: ignore[arg-type]
                return sd_sink.state_dict()
            with atomic_directory(Path(out), force=force) as tmp:
                dir_sink = SafetensorsDirSink(tmp, entries, shard_bytes)
                try:
                    stream(readers, w, plan, out_dtypes, dir_sink, **kw)  # type: ignore[arg-type]
                finally:
                    dir_sink.close()
                finish_directory(tmp, ckpts, w, method, params, out_dtype, accumulate, str(root), hashes)
            return Path(os.path.abspath(out))
        finally:
            for r in readers:
                r.close()
