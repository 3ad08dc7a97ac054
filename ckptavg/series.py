"""The averaged model at every point of a run (LAWA / EMA curves), reading each input once.

``series`` is tensor-major over the whole trajectory: for each tensor chunk it walks the
checkpoints in step order once, keeps the last k chunks in a ring and a running window sum (or an
EMA numerator/denominator) in fp64, and writes each target's chunk at its offset in that target's
pre-sized output file. Memory is O(k × chunk); bytes read are one pass over the inputs whatever k.
The running sum is recomputed exactly from the ring every 2k updates, so it cannot drift.

``iter_series`` yields in-memory state dicts one target at a time for evaluation pipelines that
never touch disk. It walks checkpoint-major with a model-sized fp64 running sum; a checkpoint
leaving the window is read again to subtract it (uniform windows read inputs twice, EMA once).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import engine
from .discovery import check_compatible, read_index
from .errors import CkptavgError
from .io import CheckpointReader
from .io.dtypes import DType, from_accumulator, parse_dtype, to_accumulator, to_torch
from .io.safetensors import TensorInfo, read_header
from .io.sinks import SafetensorsDirSink, begin_directory, commit_directory
from .manifest import MANIFEST_NAME
from .trajectory import Checkpoint, Trajectory

if TYPE_CHECKING:
    import torch

METHODS = ("uniform", "ema")


@dataclass(frozen=True)
class Target:
    """One averaged model of the series: at ``step``, from ``inputs`` (trajectory indices) with
    ``weights``."""

    index: int
    step: int
    inputs: tuple[int, ...]
    weights: tuple[float, ...]


def plan(
    traj: Trajectory,
    *,
    window: int | None = None,
    method: str = "uniform",
    decay: float | None = None,
    half_life: float | None = None,
    stride: int = 1,
    start: int | None = None,
    stop: int | None = None,
    steps: Sequence[int] | None = None,
    partial: bool = False,
    non_overlapping: bool = False,
) -> list[Target]:
    """Which averaged models a series produces, and from what.

    Uniform (LAWA): the target at checkpoint i averages checkpoints i-k+1 … i. Targets are the
    checkpoints from the first full window on (``partial=True``: from the first checkpoint,
    averaging what exists), every ``stride``-th, within ``start``..``stop`` (steps, inclusive) or
    exactly ``steps``. ``non_overlapping`` sets the stride to k: disjoint blocks, as the LAWA
    authors' script averages. EMA: the target at checkpoint i is the EMA of checkpoints 0 … i
    (weights as in :func:`ckptavg.methods.ema`); ``window`` does not apply.
    """
    from . import methods

    if method not in METHODS:
        raise CkptavgError(f"series supports methods {', '.join(METHODS)}, not {method!r}")
    n = len(traj)
    if n == 0:
        raise CkptavgError(f"{traj.name}: the trajectory is empty")
    if method == "uniform":
        if not window or window < 1:
            raise CkptavgError("series --method uniform needs --window k (k ≥ 1)")
        if decay is not None or half_life is not None:
            raise CkptavgError("--decay/--half-life apply to --method ema only")
        if non_overlapping:
            stride = window
        first = 0 if partial else window - 1
    else:
        if window is not None:
            raise CkptavgError("series --method ema runs over the whole trajectory; drop --window")
        methods.weights("ema", [0, 1], decay=decay, half_life=half_life)  # validates the parameters
        first = 0
    if stride < 1:
        raise CkptavgError(f"--stride must be at least 1, got {stride}")
    candidates = list(range(first, n, stride))
    if steps is not None:
        wanted = set(steps)
        for s in wanted:
            traj.at(s)
        candidates = [i for i in range(n) if traj[i].step in wanted]
        too_early = [traj[i].step for i in candidates if i < first]
        if too_early:
            raise CkptavgError(f"step {too_early[0]}: fewer than {window} checkpoints up to it (use --partial)")
    candidates = [i for i in candidates if (start is None or traj[i].step >= start)
                  and (stop is None or traj[i].step <= stop)]
    if not candidates:
        raise CkptavgError(f"{traj.name}: no target step selected (steps {traj.steps[0]}..{traj.steps[-1]})")
    all_steps = traj.steps
    targets = []
    for i in candidates:
        if method == "uniform":
            ins = tuple(range(max(0, i - window + 1), i + 1))  # type: ignore[operator]
            w = tuple(methods.weights("uniform", [all_steps[j] for j in ins]))
        else:
            ins = tuple(range(i + 1))
            w = tuple(methods.weights("ema", [all_steps[j] for j in ins], decay=decay, half_life=half_life))
        targets.append(Target(i, all_steps[i], ins, w))
    return targets


@dataclass(frozen=True)
class SeriesOutput:
    step: int
    path: Path
    written: bool  # False: a complete output from an earlier run was kept


def _ema_factor(steps: Sequence[int], j: int, decay: float | None, half_life: float | None) -> float:
    """How much the EMA state shrinks between checkpoint j-1 and j."""
    if decay is not None:
        return decay
    assert half_life is not None
    return 0.5 ** ((steps[j] - steps[j - 1]) / half_life)


def _is_complete(out: Path, target: Target, traj: Trajectory, method: str, params: dict[str, Any]) -> bool:
    """An output from an earlier run with the same inputs (steps and locations), weights and
    method, whose weight files all parse and agree with its index."""
    try:
        man = json.loads((out / MANIFEST_NAME).read_text())
        m = {k: v for k, v in man["method"].items() if k != "name"}
        if man["method"]["name"] != method or m != {k: v for k, v in params.items() if v is not None}:
            return False
        if [(i["step"], i["location"]) for i in man["inputs"]] != [(traj[j].step, traj[j].location) for j in target.inputs]:
            return False
        if not np.allclose([i["weight"] for i in man["inputs"]], target.weights, rtol=1e-12, atol=0):
            return False
        shards = [f for f in man["files"] if f.endswith(".safetensors")]
        if not shards:
            return False
        names: dict[str, str] = {}
        for f in shards:
            names.update({n: f for n in read_header(out / f)[0]})
        if len(shards) > 1:
            return names == read_index(out / "model.safetensors.index.json")
        return True
    except (OSError, ValueError, KeyError, TypeError, CkptavgError):
        return False


def _prepare(traj: Trajectory, indices: Sequence[int], progress: bool) -> dict[int, Checkpoint]:
    """The checkpoints at ``indices`` with local files (Hub revisions downloaded) and headers read;
    every one gets a config folder (a Hub download has config files for the newest only)."""
    from . import hub

    ckpts = engine._ensure_tensors(hub.materialise([traj[j] for j in indices], progress=progress))
    check_compatible(ckpts)
    def has_config(c: Checkpoint) -> bool:
        return c.config_dir is not None and (c.config_dir / "config.json").is_file()

    fallback = next((c.config_dir for c in reversed(ckpts) if has_config(c)), None)
    return {j: (c if has_config(c) or fallback is None else replace(c, config_dir=fallback)) for j, c in zip(indices, ckpts)}


def series(
    trajectory: Trajectory,
    out: str | os.PathLike[str],
    *,
    window: int | None = None,
    method: str = "uniform",
    decay: float | None = None,
    half_life: float | None = None,
    stride: int = 1,
    start: int | None = None,
    stop: int | None = None,
    steps: Sequence[int] | None = None,
    partial: bool = False,
    non_overlapping: bool = False,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> list[SeriesOutput]:
    """Write the averaged model at every target step, ``out/step{S}/``, in one pass over the inputs.

    Args:
        trajectory: the run, from :func:`ckptavg.discover`.
        out: folder for the outputs; each ``step{S}/`` is HF-loadable with its own ``ckptavg.json``
            and appears atomically. Re-running skips targets whose output is complete and valid.
        window, method, decay, half_life, stride, start, stop, steps, partial, non_overlapping:
            which targets and how each is averaged; see :func:`plan`.
        dtype, max_shard_size, allow_nonfinite, progress: as for :func:`ckptavg.average`.

    Returns:
        One SeriesOutput per target, in step order; ``written`` is False for targets kept from an
        earlier run.

    Example:
        >>> series(discover("runs/tiny"), "tiny-lawa5", window=5)   # doctest: +SKIP
    """
    traj = trajectory
    targets = plan(traj, window=window, method=method, decay=decay, half_life=half_life, stride=stride,
                   start=start, stop=stop, steps=steps, partial=partial, non_overlapping=non_overlapping)
    params: dict[str, Any] = {"decay": decay, "half_life": half_life}
    if method == "uniform":
        params = {"window": window}
    try:
        out_dtype = parse_dtype(dtype) if dtype else None
        shard_bytes = engine.parse_size(max_shard_size) if max_shard_size else None
    except ValueError as e:
        raise CkptavgError(str(e)) from None
    out = Path(os.path.abspath(out))
    for src in [Path(c.location) for c in traj] + ([Path(traj.root)] if traj.root else []):
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise CkptavgError(f"{out}: output would be written inside the input {src}; choose another -o")
    dirs = {t.step: out / f"step{t.step}" for t in targets}
    pending = [t for t in targets if not _is_complete(dirs[t.step], t, traj, method, params)]
    done = {t.step for t in targets} - {t.step for t in pending}
    result = [SeriesOutput(t.step, dirs[t.step], t.step not in done) for t in targets]
    if not pending:
        return result
    needed = sorted({j for t in pending for j in t.inputs})
    ckpts = _prepare(traj, needed, progress)
    for t in pending:
        if dirs[t.step].exists():
            shutil.rmtree(dirs[t.step])  # incomplete or made with other arguments: redo it

    ref = ckpts[pending[-1].index]
    assert ref.tensors is not None
    tensors = list(ref.tensors.values())
    out_dtypes = {t.name: (out_dtype if out_dtype and t.dtype.floating else t.dtype) for t in tensors}
    entries = [TensorInfo(t.name, out_dtypes[t.name], t.shape) for t in tensors]

    out.mkdir(parents=True, exist_ok=True)
    tmps: dict[int, Path] = {}
    sinks: dict[int, SafetensorsDirSink] = {}
    readers: dict[int, CheckpointReader] = {}
    from tqdm import tqdm

    total = sum(t.nbytes for t in tensors) * len(needed)
    try:
        for t in pending:
            tmps[t.step] = begin_directory(dirs[t.step])
            sinks[t.step] = SafetensorsDirSink(tmps[t.step], entries, shard_bytes)
        readers = {j: CheckpointReader(ckpts[j]) for j in needed}
        with tqdm(total=total, unit="B", unit_scale=True, desc="series", disable=not progress, leave=False) as bar:
            _stream_series(traj, readers, pending, needed, tensors, out_dtypes, sinks, method, decay, half_life,
                           allow_nonfinite, bar.update)
        for t in pending:
            sinks[t.step].close()
            ins = [ckpts[j] for j in t.inputs]
            engine.finish_directory(tmps[t.step], ins, t.weights, method, params, out_dtype,
                                    "float64", str(traj.root))
            commit_directory(tmps[t.step], dirs[t.step])
            del tmps[t.step]
    finally:
        for r in readers.values():
            r.close()
        for s in sinks.values():
            s.close()
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _stream_series(
    traj: Trajectory,
    readers: dict[int, CheckpointReader],
    pending: list[Target],
    needed: list[int],
    tensors: list[TensorInfo],
    out_dtypes: dict[str, DType],
    sinks: dict[int, SafetensorsDirSink],
    method: str,
    decay: float | None,
    half_life: float | None,
    allow_nonfinite: bool,
    on_bytes: Any,
) -> None:
    chunk = engine.CHUNK_ELEMS
    steps = traj.steps
    by_index = {t.index: t for t in pending}
    # Inputs that targets after each one still need: a ring entry outside this set can go.
    later: dict[int, set[int]] = {}
    acc: set[int] = set()
    for t in reversed(pending):
        later[t.index] = set(acc)
        acc |= set(t.inputs)

    def jobs() -> Iterator[Any]:
        for info in tensors:
            for s0 in range(0, info.numel, chunk):
                n = min(chunk, info.numel - s0)
                for j in needed:
                    yield lambda r=readers[j], name=info.name, s=s0, n=n: r.read(name, s, n)

    free: list[np.ndarray] = []  # recycled fp64 chunk buffers: no fresh pages per read

    def buffer(n: int) -> np.ndarray:
        return (free.pop() if free else np.empty(chunk, np.float64))[:n]

    with ThreadPoolExecutor(1, thread_name_prefix="ckptavg-read") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="ckptavg-write") as wpool:
        reads = engine._prefetch(jobs(), pool, engine.PREFETCH)
        writers = {step: engine.WriteBehind(sink, wpool, engine.WRITE_DEPTH) for step, sink in sinks.items()}
        avg = np.empty(chunk, np.float64)
        for info in tensors:
            for s0 in range(0, info.numel, chunk):
                n = min(chunk, info.numel - s0)
                ring: dict[int, np.ndarray] = {}  # chunk of checkpoint j in fp64 (exact for every input dtype)
                run = np.zeros(n, np.float64)  # sum over ``cur`` (uniform) or EMA numerator
                den = 0.0  # EMA denominator
                cur: set[int] = set()
                ops = 0
                for j in needed:
                    raw = next(reads)
                    on_bytes(raw.nbytes)
                    t = by_index.get(j)
                    if not info.dtype.floating:
                        if t is not None:
                            writers[t.step].write(info.name, s0, raw)
                        continue
                    if method == "ema":
                        x = to_accumulator(raw, info.dtype, buffer(n))
                        f = _ema_factor(steps, j, decay, half_life) if j > 0 else 0.0
                        run *= f
                        run += x
                        free.append(x.base if x.base is not None else x)
                        den = den * f + 1.0
                        if t is not None:
                            _emit(np.divide(run, den, out=avg[:n]), info, s0, t, out_dtypes, writers, allow_nonfinite, traj)
                        continue
                    ring[j] = to_accumulator(raw, info.dtype, buffer(n))
                    if t is None:
                        continue
                    w = set(t.inputs)
                    for m in w - cur:
                        run += ring[m]
                        ops += 1
                    cur = w
                    if ops > 2 * len(w):  # exact recompute from the ring, so the running sum cannot drift
                        run[...] = 0.0
                        for m in sorted(w):
                            run += ring[m]
                        ops = 0
                    _emit(np.divide(run, len(w), out=avg[:n]), info, s0, t, out_dtypes, writers, allow_nonfinite, traj)
                    for m in [m for m in ring if m not in later[j]]:
                        if m in cur:
                            run -= ring[m]
                            cur.discard(m)
                            ops += 1
                        x = ring.pop(m)
                        free.append(x.base if x.base is not None else x)
        for wb in writers.values():
            wb.flush()


def _emit(avg: np.ndarray, info: TensorInfo, s0: int, t: Target, out_dtypes: dict[str, DType],
          sinks: dict[int, engine.WriteBehind], allow_nonfinite: bool, traj: Trajectory) -> None:
    if not allow_nonfinite and not np.isfinite(avg.sum()) and not np.isfinite(avg).all():
        raise CkptavgError(
            f"step {t.step}: tensor {info.name!r} averages to NaN/Inf (an input in steps "
            f"{traj[t.inputs[0]].step}..{t.step} holds NaN/Inf); pass --allow-nonfinite to write it anyway"
        )
    out_dt = out_dtypes[info.name]
    sinks[t.step].write(info.name, s0, from_accumulator(avg, out_dt))


def iter_series(
    trajectory: Trajectory,
    *,
    window: int | None = None,
    method: str = "uniform",
    decay: float | None = None,
    half_life: float | None = None,
    stride: int = 1,
    start: int | None = None,
    stop: int | None = None,
    steps: Sequence[int] | None = None,
    partial: bool = False,
    non_overlapping: bool = False,
    dtype: str | None = None,
) -> Iterator[tuple[Target, dict[str, torch.Tensor]]]:
    """Yield ``(target, state_dict)`` for every target of the series, in step order, in memory.

    Holds one fp64 running sum of the model plus the state dict being yielded. Example:

    >>> for target, sd in iter_series(discover("runs/tiny"), window=5):   # doctest: +SKIP
    ...     model.load_state_dict(sd); score(model, target.step)
    """
    traj = trajectory
    targets = plan(traj, window=window, method=method, decay=decay, half_life=half_life, stride=stride,
                   start=start, stop=stop, steps=steps, partial=partial, non_overlapping=non_overlapping)
    try:
        out_dtype = parse_dtype(dtype) if dtype else None
    except ValueError as e:
        raise CkptavgError(str(e)) from None
    ckpts = _prepare(traj, sorted({j for t in targets for j in t.inputs}), progress=False)
    steps_ = traj.steps
    ref = ckpts[targets[-1].index].tensors or {}
    floats = [t for t in ref.values() if t.dtype.floating]
    run = {t.name: np.zeros(t.numel, np.float64) for t in floats}
    den = 0.0
    cur: set[int] = set()
    last = -1  # ema: index of the newest checkpoint folded in

    def fold(j: int, sign: float, scale: float = 1.0) -> None:
        with CheckpointReader(ckpts[j]) as r:
            for t in floats:
                acc = run[t.name]
                for s0 in range(0, t.numel, engine.CHUNK_ELEMS):
                    n = min(engine.CHUNK_ELEMS, t.numel - s0)
                    x = to_accumulator(r.read(t.name, s0, n), t.dtype, np.empty(n, np.float64))
                    if scale != 1.0:
                        acc[s0 : s0 + n] *= scale
                    acc[s0 : s0 + n] += sign * x

    for t in targets:
        if method == "ema":
            for j in range(last + 1, t.index + 1):
                f = _ema_factor(steps_, j, decay, half_life) if j > 0 else 0.0
                fold(j, 1.0, f)
                den = den * f + 1.0
            last = t.index
            scale = 1.0 / den
        else:
            w = set(t.inputs)
            for j in sorted(cur - w):
                fold(j, -1.0)
            for j in sorted(w - cur):
                fold(j, 1.0)
            cur = w
            scale = 1.0 / len(w)
        sd: dict[str, torch.Tensor] = {}
        with CheckpointReader(ckpts[t.index]) as r:
            for info in ref.values():
                if info.dtype.floating:
                    dt = out_dtype or info.dtype
                    vals = from_accumulator(run[info.name] * scale, dt)
                else:
                    dt, vals = info.dtype, r.read(info.name)
                sd[info.name] = to_torch(vals, dt, info.shape)
        yield t, sd


__all__ = ["SeriesOutput", "Target", "iter_series", "plan", "series"]
