"""The averaged model at every point of a run (LAWA / EMA curves), reading each input once.

A :class:`~ckptavg.selection.Selection` picks the *targets* (``start``/``stop``/``every``/
``spacing``/``steps``) and ``window`` says how many checkpoints each uniform target averages; EMA
targets average every checkpoint up to them.

``series`` is tensor-major over the whole trajectory (:func:`ckptavg.engine_series.stream_series`): for
each tensor chunk it walks the checkpoints in step order once, keeps the raw chunks later targets
need in a ring and one fp64 :class:`~ckptavg.engine.RunningAverage`, and writes each target's chunk
at its offset in that target's pre-sized output file. Memory is O(k × chunk); bytes read are one
pass over the inputs whatever k.

``iter_series`` yields in-memory state dicts one target at a time, checkpoint-major, with one
model-sized fp32 :class:`~ckptavg.engine.RunningAverage` (see its docstring for the memory bound),
workers taking spans of each checkpoint folded in and of each output.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import manifest as _manifest
from . import sources
from .averaging import ensure_tensors, finish_directory, input_paths
from .engine import CHUNK_ELEMS, MERGE_CHUNK, RunningAverage, narrows, pinned
from .engine_series import Target, accumulator, stream_series
from .errors import NonFiniteError, OutputError, OutputExistsError, UsageError
from .io.dtypes import DType, parse_dtype, to_torch
from .io.kernels import TorchKernels
from .io.layout import is_complete_output, weights_stem
from .io.lock import output_lock
from .io.readers import CheckpointReader
from .io.safetensors import TensorInfo, parse_size
from .io.sinks import SafetensorsDirSink, begin_directory, check_inputs, commit_directory, public_error, remove_entry
from .keys import strip_plan
from .pipeline import available_cpus, each, spans
from .selection import Selection, with_legacy
from .targets import WEIGHTED, ema_factors, plan, series_params
from .trajectory import Checkpoint, Trajectory, check_compatible

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class SeriesOutput:
    step: int
    path: Path
    written: bool  # False: a complete output from an earlier run was kept


@dataclass(frozen=True)
class _Recipe:
    """What makes a series output: it is kept by a re-run only if its ``ckptavg.json`` says the same."""

    method: str
    params: dict[str, Any]
    dtype: str  # as ckptavg.json writes it
    max_shard_size: int | None
    fingerprint: Callable[[int], dict[str, Any]]  # input index → manifest.fingerprint, cached
    exclusion: Mapping[str, Any] | None = None  # --exclude-anomalies: stability.anomalous_steps' record

    @property
    def excluded(self) -> set[int]:
        return {x["step"] for x in (self.exclusion or {}).get("excluded", [])}

    def note(self, target: Target, traj: Trajectory) -> dict[str, Any] | None:
        """``ckptavg.json``'s record of the steps left out of this target's window (or EMA)."""
        if self.exclusion is None:
            return None
        window = self.params.get("window")
        lo = traj[max(0, target.index - window + 1)].step if window else traj[0].step
        return {"excluded": [x for x in self.exclusion["excluded"] if lo <= x["step"] <= target.step],
                "exclusion": self.exclusion["exclusion"]}

    def made(self, out: Path, target: Target, traj: Trajectory) -> bool:
        """``out`` was written by these arguments from these inputs (steps, locations, weights, and
        bytes by fingerprint), and its weight files all parse and agree with its index."""
        if out.is_symlink():
            return False
        try:
            man = _manifest.read(out)
            ins = man["inputs"]
            if (man.get("tool") != "ckptavg" or man["method"] != {"name": self.method, **self.params}
                    or man["dtype"] != self.dtype or man["accumulate"] != accumulator(target, self.method == "ema")
                    or man.get("max_shard_size") != self.max_shard_size):
                return False
            if [(i["step"], i["location"]) for i in ins] != [(traj[j].step, traj[j].location) for j in target.inputs]:
                return False
            if not np.allclose([i["weight"] for i in ins], target.weights, rtol=1e-12, atol=0):
                return False
            if [i.get("fingerprint") for i in ins] != [self.fingerprint(j) for j in target.inputs]:
                return False
            return is_complete_output(out, man["files"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def state(self, out: Path, target: Target, traj: Trajectory) -> str:
        """``new`` (nothing there), ``keep`` (made by this recipe), ``redo`` (ckptavg's own output of
        other arguments or inputs, or an empty folder) or ``foreign`` (anything else: never ours to delete)."""
        if not os.path.lexists(out):
            return "new"
        if self.made(out, target, traj):
            return "keep"
        empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        return "redo" if empty or _manifest.owns(out) else "foreign"


def _prepare(traj: Trajectory, indices: Sequence[int], progress: bool, allow_duplicates: bool) -> dict[int, Checkpoint]:
    """The checkpoints at ``indices`` with local files (Hub revisions downloaded) and headers read;
    every one gets a config folder (a Hub download has config files for the newest only)."""
    ckpts = ensure_tensors(sources.materialise([traj[j] for j in indices], allow_duplicates=allow_duplicates,
                                               progress=progress))
    check_compatible(ckpts)

    def has_config(c: Checkpoint) -> bool:
        return c.config_dir is not None and (c.config_dir / "config.json").is_file()

    fallback = next((c.config_dir for c in reversed(ckpts) if has_config(c)), None)
    return {j: (c if has_config(c) or fallback is None else replace(c, config_dir=fallback)) for j, c in zip(indices, ckpts)}


def _out_dtype(dtype: str | None) -> DType | None:
    try:
        return parse_dtype(dtype) if dtype else None
    except ValueError as e:
        raise UsageError(str(e)) from None


def series(
    trajectory: Trajectory,
    out: str | os.PathLike[str],
    selection: Selection | None = None,
    *,
    method: str = "uniform",
    decay: float | None = None,
    half_life: float | None = None,
    half_life_tokens: float | None = None,
    tokens_per_step: float | None = None,
    schedule: str | None = None,
    sigma_rel: float | None = None,
    partial: bool = False,
    non_overlapping: bool = False,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    allow_nonfinite: bool = False,
    allow_duplicates: bool = False,
    force: bool = False,
    fsync: bool = True,
    progress: bool = True,
    threads: int | None = None,
    exclude_anomalies: bool = False,
    anomalies: str | os.PathLike[str] | None = None,
    **legacy: Any,
) -> list[SeriesOutput]:
    """Write the averaged model at every target step, ``out/step{S}/``, in one pass over the inputs.

    Args:
        trajectory: the run, from :func:`ckptavg.discover`.
        out: folder for the outputs; each ``step{S}/`` is HF-loadable with its own ``ckptavg.json``
            and appears atomically, locked while it is written. Re-running keeps an output only if
            it is complete and was made by the same arguments from the same input bytes
            (fingerprints in ``ckptavg.json``); ckptavg's own other outputs are redone.
        force: also replace ``step{S}`` entries ckptavg did not write (a link is replaced, never
            followed); inputs are never replaced.
        selection: the targets, and ``window`` = k for uniform (LAWA); see :func:`plan`.
        method, decay, half_life, half_life_tokens, tokens_per_step, schedule, sigma_rel, partial,
            non_overlapping: how each target is averaged; see :func:`plan`.
        dtype, max_shard_size, allow_nonfinite, allow_duplicates, fsync, progress, threads: as for
            :func:`ckptavg.average` (``threads`` workers each own whole chunks: every input's chunk, every target's output).
        exclude_anomalies, anomalies: leave the steps :mod:`ckptavg.stability` flags out of every
            window and EMA, and write no target at them (see :func:`ckptavg.average`).

    Returns:
        One SeriesOutput per target, in step order; ``written`` is False for targets kept from an
        earlier run.

    Raises:
        OutputExistsError: a ``step{S}`` entry that ckptavg did not write, without ``force``.
        OutputLockedError: another run is writing one of the outputs.
        OutputError: ``out`` is inside an input or contains one; a write failed (disk full: one
            line naming the file, nothing left in place).

    Example:
        >>> series(discover("runs/tiny"), "tiny-lawa5", Selection(window=5))   # doctest: +SKIP
    """
    traj = trajectory
    sel = with_legacy(selection, "series", **legacy)
    how: dict[str, Any] = dict(half_life_tokens=half_life_tokens, tokens_per_step=tokens_per_step, schedule=schedule,
                               sigma_rel=sigma_rel)
    targets = plan(traj, sel, method=method, decay=decay, half_life=half_life, **how, partial=partial,
                   non_overlapping=non_overlapping)
    params = {k: v for k, v in series_params(method, sel.window, decay, half_life, **how).items() if v is not None}
    record: dict[str, Any] | None = None
    if exclude_anomalies or anomalies is not None:  # the same plan without the steps ckptavg inspect flags
        from .stability import anomalous_steps

        steps = sorted({traj[j].step for t in targets for j in (*t.inputs, t.index)})
        flagged, record = anomalous_steps(traj, steps, anomalies, progress=progress, allow_duplicates=allow_duplicates)
        targets = plan(traj, sel, method=method, decay=decay, half_life=half_life, **how, partial=partial,
                       non_overlapping=non_overlapping, exclude=flagged)
        params["exclude_anomalies"] = str(anomalies) if anomalies is not None else True
    out_dtype = _out_dtype(dtype)
    try:
        shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(os.path.abspath(out))
    check_inputs(out, input_paths(list(traj), str(traj.root)), replaces=False)  # both ways, links resolved
    recipe = _Recipe(method, params, out_dtype.torch_name if out_dtype else "same as inputs", shard_bytes,
                     functools.cache(lambda j: _manifest.fingerprint(traj[j])), record)
    dirs = {t.step: out / f"step{t.step}" for t in targets}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create output: {e.strerror or e}") from None
    with ExitStack() as held:
        for t in targets:  # in step order, all or none: two runs on one folder cannot deadlock
            held.enter_context(output_lock(dirs[t.step]))
        states = {t.step: recipe.state(dirs[t.step], t, traj) for t in targets}
        foreign = [s for s, v in states.items() if v == "foreign"]
        if foreign and not force:
            more = f" (and {len(foreign) - 1} more step folders)" if len(foreign) > 1 else ""
            raise OutputExistsError(f"{dirs[foreign[0]]}: exists and was not written by ckptavg{more}; "
                                    "use --force to replace it, or another -o")
        pending = [t for t in targets if states[t.step] != "keep"]
        if pending:
            _write(traj, out, pending, dirs, recipe, out_dtype, allow_nonfinite, allow_duplicates, fsync, progress, threads)
    return [SeriesOutput(t.step, dirs[t.step], states[t.step] != "keep") for t in targets]


def _write(traj: Trajectory, out: Path, pending: list[Target], dirs: dict[int, Path], recipe: _Recipe,
           out_dtype: DType | None, allow_nonfinite: bool, allow_duplicates: bool, fsync: bool, progress: bool,
           threads: int | None) -> None:
    """Write the pending targets, each in its temporary, committed (replacing what was there) once whole."""
    needed = sorted({j for t in pending for j in t.inputs})
    ckpts = _prepare(traj, needed, progress, allow_duplicates)
    check_inputs(out, input_paths(list(ckpts.values())), replaces=False)  # again: downloads add files
    ref = ckpts[pending[-1].index]
    assert ref.tensors is not None
    tensors = list(ref.tensors.values())
    out_dtypes = {t.name: (out_dtype if out_dtype and t.dtype.floating else t.dtype) for t in tensors}
    entries = [TensorInfo(t.name, out_dtypes[t.name], t.shape) for t in tensors]
    prints = {j: recipe.fingerprint(j) for j in needed}  # recorded as they were before reading
    tmps: dict[int, Path] = {}
    sinks: dict[int, SafetensorsDirSink] = {}
    readers: dict[int, CheckpointReader] = {}
    from tqdm import tqdm

    total = sum(t.nbytes for t in tensors) * len(needed)
    factors = ema_factors(traj, recipe.params, recipe.excluded) if recipe.method == "ema" else None
    strip = strip_plan([t.name for t in tensors], ref.config_dir)  # wrapper prefixes: HF names (ckptavg.keys)
    try:
        for t in pending:
            tmps[t.step] = begin_directory(dirs[t.step], force=True)  # what is there was judged replaceable
            sinks[t.step] = SafetensorsDirSink(tmps[t.step], entries, recipe.max_shard_size, label=dirs[t.step],
                                               stem=weights_stem(ref.files), strip=strip[0] if strip else "")
        readers = {j: CheckpointReader(ckpts[j].files, ckpts[j].format, str(ckpts[j]), key=ckpts[j].key)
                   for j in needed}
        with tqdm(total=total, unit="B", unit_scale=True, desc="series", disable=not progress, leave=False) as bar:
            stream_series(readers, pending, tensors, out_dtypes, sinks, ema_factors=factors,
                          allow_nonfinite=allow_nonfinite, on_bytes=bar.update, steps=traj.steps, threads=threads)
        for t in pending:
            sinks[t.step].close()
            try:
                finish_directory(tmps[t.step], [ckpts[j] for j in t.inputs], t.weights, recipe.method, recipe.params,
                                 out_dtype, accumulator(t, factors is not None), str(traj.root),
                                 fingerprints=[prints[j] for j in t.inputs],
                                 max_shard_size=recipe.max_shard_size,
                                 note=({"keys": strip[1]} if strip else {}) | (recipe.note(t, traj) or {}))
                commit_directory(tmps[t.step], dirs[t.step], fsync)
            except OSError as e:
                err = public_error(e, tmps[t.step], dirs[t.step])
                if err is None:
                    raise
                raise err from None
            del tmps[t.step]
    finally:
        for r in readers.values():
            r.close()
        for sink in sinks.values():
            sink.abort()
        for tmp in tmps.values():
            remove_entry(tmp)


def iter_series(
    trajectory: Trajectory,
    selection: Selection | None = None,
    *,
    method: str = "uniform",
    decay: float | None = None,
    half_life: float | None = None,
    half_life_tokens: float | None = None,
    tokens_per_step: float | None = None,
    schedule: str | None = None,
    sigma_rel: float | None = None,
    partial: bool = False,
    non_overlapping: bool = False,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
    allow_duplicates: bool = False,
    threads: int | None = None,
    **legacy: Any,
) -> Iterator[tuple[Target, dict[str, torch.Tensor]]]:
    """Yield ``(target, state_dict)`` for every target of the series, in step order, in memory.

    Memory: one fp32 running sum of the model's floating tensors (4 bytes per parameter) plus the
    state dict being yielded (the model in the output dtype); reading is chunked, so nothing else
    grows with the model. Drop each state dict before taking the next to stay at that bound.
    ``threads`` workers (default: the CPUs this process may use) each take 1M-element spans of
    every input added or removed and of every output; the arithmetic is per element, so the state
    dicts are bit-identical for any thread count.
    Uniform windows read each input twice (in, then out of the window; more often only when the
    running sum is recomputed exactly after 2k updates), EMA once.

    Example:
        >>> for target, sd in iter_series(discover("runs/tiny"), Selection(window=5)):   # doctest: +SKIP
        ...     model.load_state_dict(sd); score(model, target.step)
    """
    traj = trajectory
    sel = with_legacy(selection, "iter_series", **legacy)
    threads = available_cpus() if threads is None else threads
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    how: dict[str, Any] = dict(half_life_tokens=half_life_tokens, tokens_per_step=tokens_per_step, schedule=schedule,
                               sigma_rel=sigma_rel)
    targets = plan(traj, sel, method=method, decay=decay, half_life=half_life, **how, partial=partial,
                   non_overlapping=non_overlapping)
    out_dtype = _out_dtype(dtype)
    ckpts = _prepare(traj, sorted({j for t in targets for j in t.inputs}), False, allow_duplicates)
    ref = ckpts[targets[-1].index].tensors or {}
    floats = [t for t in ref.values() if t.dtype.floating]
    offsets: dict[str, int] = {}
    size = 0
    for info in floats:
        offsets[info.name], size = size, size + info.numel
    # torch is imported anyway (the state dicts are torch tensors): its conversions, same bits as numpy's
    kern = TorchKernels()
    st = RunningAverage(size, np.float32, allow_nonfinite=allow_nonfinite, kernels=kern)  # the whole model, flat
    factors = ema_factors(traj, {"decay": decay, "half_life": half_life, **how}) if method == "ema" else None
    local = threading.local()  # a worker's buffers: a raw chunk, a converted one, an average
    itemsize = max((t.dtype.itemsize for t in floats), default=1)

    def mine() -> Any:
        if not hasattr(local, "raw"):
            kern.pin()  # the worker's torch ops on one core: parallelism is ours
            local.raw = np.empty(CHUNK_ELEMS * itemsize, np.uint8)
            local.scratch, local.avg = np.empty(CHUNK_ELEMS, np.float32), np.empty(CHUNK_ELEMS, np.float32)
        return local

    def fold(j: int, sign: int = 1, weight: float = 1.0) -> None:
        """Add (+1) or remove (-1) checkpoint j with ``weight``, workers taking 1M-element spans."""
        with CheckpointReader(ckpts[j].files, ckpts[j].format, str(ckpts[j]), key=ckpts[j].key) as r, \
                st.input(j, weight, sign) as put:
            def part(info: TensorInfo, s0: int, n: int) -> None:
                b = mine()
                with np.errstate(over="ignore", invalid="ignore"):  # per thread: emit's NaN/Inf check reports them
                    for s, m in spans(n, CHUNK_ELEMS):
                        put(r.read_into(b.raw, info.name, s0 + s, m), info.dtype, offsets[info.name] + s0 + s,
                            b.scratch)
            each((functools.partial(part, info, s0, n) for info in floats for s0, n in spans(info.numel, MERGE_CHUNK)),
                 threads)

    def emit(t: Target, info: TensorInfo, vals: np.ndarray, s0: int, n: int) -> None:
        """Elements [s0, s0+n) of target ``t``'s ``info`` into ``vals``."""
        b = mine()
        dt = out_dtype or info.dtype
        where = functools.partial(_nonfinite, info.name, traj[t.inputs[0]].step, t.step)
        cast = info.name if narrows(info.dtype, dt) else ""
        for s, m in spans(n, CHUNK_ELEMS):
            dest = vals[s0 + s : s0 + s + m]
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    res = st.emit(dt, b.avg, where, at=offsets[info.name] + s0 + s, n=m, narrowing=cast, dest=dest,
                                  scratch=b.scratch)
            except NonFiniteError:  # finite inputs whose fp32 sum overflowed, or a NaN/Inf input
                res = _exact_chunk(ckpts, t, info, s0 + s, m, dt, cast)
            if res is not dest:
                dest[...] = res

    last = -1  # ema: index of the newest checkpoint folded in
    for t in targets:
        # Overflow and inf - inf are reported by emit's NaN/Inf check, naming the tensor. The state is
        # left before each yield: the caller's numpy settings are not ours to change.
        with np.errstate(over="ignore", invalid="ignore"), pinned(kern):
            if factors is not None:
                for j in range(last + 1, t.index + 1):
                    st.decay(factors[j], threads)
                    fold(j)
                last = t.index
            elif method in WEIGHTED:  # weights differ per target: the window afresh, weighted
                st.reset()
                for j, w in zip(t.inputs, t.weights):
                    fold(j, weight=w)
            else:
                for j in sorted(st.members - set(t.inputs)):
                    fold(j, -1)
                for j in sorted(set(t.inputs) - st.members):
                    fold(j)
                if st.drifted:  # exact again: the window from scratch
                    st.reset()
                    for j in t.inputs:
                        fold(j)
            sd: dict[str, torch.Tensor] = {}
            vals = {info.name: np.empty(info.numel, (out_dtype or info.dtype).storage) for info in floats}
            each((functools.partial(emit, t, info, vals[info.name], s0, n) for info in floats
                  for s0, n in spans(info.numel, MERGE_CHUNK)), threads)
            with CheckpointReader(ckpts[t.index].files, ckpts[t.index].format, str(ckpts[t.index]),
                                  key=ckpts[t.index].key) as r:
                for info in ref.values():
                    if info.dtype.floating:
                        sd[info.name] = to_torch(vals[info.name], out_dtype or info.dtype, info.shape)
                    else:
                        sd[info.name] = to_torch(r.read(info.name), info.dtype, info.shape)
            del vals
        yield t, sd


def _exact_chunk(ckpts: Mapping[int, Checkpoint], t: Target, info: TensorInfo, start: int, n: int, dt: DType,
                 cast: str) -> np.ndarray:
    """One chunk of target ``t`` again from its inputs, in fp64: a finite mean of finite inputs stays
    finite (two 3e38 values); an input holding NaN/Inf is named."""
    exact = RunningAverage(n, np.float64)
    for j, w in zip(t.inputs, t.weights):
        c = ckpts[j]
        with CheckpointReader(c.files, c.format, str(c), key=c.key) as r:
            raw = r.read(info.name, start, n)
        probe = RunningAverage(n, np.float64, allow_nonfinite=True)
        probe.add(raw, info.dtype)
        if not probe.finite():
            raise NonFiniteError(f"step {c.step}: tensor {info.name!r} holds NaN/Inf; refusing to average it into "
                                 f"step {t.step} (pass allow_nonfinite=True to yield it anyway)")
        if w:
            exact.add(raw, info.dtype, w, key=j)
    return exact.emit(dt, narrowing=cast)


def _nonfinite(name: str, first: int, step: int) -> str:
    return (f"step {step}: tensor {name!r} averages to NaN/Inf (an input in steps {first}..{step} holds NaN/Inf); "
            "pass allow_nonfinite=True to yield it anyway")


__all__ = ["SeriesOutput", "Target", "iter_series", "plan", "series"]
