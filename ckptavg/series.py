"""The averaged model at every point of a run (LAWA / EMA curves), reading each input once.

A :class:`~ckptavg.selection.Selection` picks the *targets* (``start``/``stop``/``every``/
``spacing``/``steps``) and ``window`` says how many checkpoints each uniform target averages; EMA
targets average every checkpoint up to them.

``series`` is tensor-major over the whole trajectory (:func:`ckptavg.engine.stream_series`): for
each tensor chunk it walks the checkpoints in step order once, keeps the raw chunks later targets
need in a ring and one fp64 :class:`~ckptavg.engine.RunningAverage`, and writes each target's chunk
at its offset in that target's pre-sized output file. Memory is O(k × chunk); bytes read are one
pass over the inputs whatever k.

``iter_series`` yields in-memory state dicts one target at a time, checkpoint-major, with one
model-sized fp32 :class:`~ckptavg.engine.RunningAverage` (see its docstring for the memory bound).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import manifest as _manifest
from . import methods, sources
from .averaging import ensure_tensors, finish_directory, input_paths
from .engine import CHUNK_ELEMS, RunningAverage, Target, narrows, stream_series
from .errors import MethodError, NonFiniteError, OutputError, OutputExistsError, SelectionError, UsageError
from .io.dtypes import DType, parse_dtype, to_torch
from .io.layout import is_complete_output
from .io.lock import output_lock
from .io.readers import CheckpointReader
from .io.safetensors import TensorInfo, parse_size
from .io.sinks import SafetensorsDirSink, begin_directory, check_inputs, commit_directory, public_error, remove_entry
from .selection import Selection, with_legacy
from .tokens import tokens_seen
from .trajectory import Checkpoint, Trajectory, check_compatible

if TYPE_CHECKING:
    import torch

WEIGHTED = ("wsm", "wma", "power-ema")  # per-target weights over each target's window
METHODS = ("uniform", "ema", *WEIGHTED)


def plan(
    traj: Trajectory,
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
    **legacy: Any,
) -> list[Target]:
    """Which averaged models a series produces, and from what.

    Uniform (LAWA, ``selection.window`` = k): the target at checkpoint i averages checkpoints
    i-k+1 … i. Targets are the checkpoints ``selection`` picks from the first full window on
    (``partial=True``: from the first checkpoint, averaging what exists). ``non_overlapping``:
    disjoint blocks of k from the first checkpoint, as the LAWA authors' script averages. EMA: the
    target at checkpoint i is the EMA of checkpoints 0 … i (weights as in
    :func:`ckptavg.methods.ema`, ``half_life_tokens`` in :func:`ckptavg.tokens.tokens_seen`'s tokens);
    ``window`` does not apply. ``wsm``, ``wma`` and ``power-ema`` weigh each target's window as a merge
    of it would (power-ema without ``window``: all up to the target). Greedy soups are merge-only.

    Raises:
        SelectionError: no target, a requested target before its first full window.
        MethodError: a method other than uniform/ema/wsm/wma/power-ema, or parameters it does not take.
    """
    sel = with_legacy(selection, "plan", **legacy)
    if method not in METHODS:
        raise MethodError(f"series supports methods {', '.join(METHODS)}, not {method!r}")
    extra = {"schedule": schedule, "sigma_rel": sigma_rel}
    n = len(traj)
    if n == 0:
        raise SelectionError(f"{traj.name}: the trajectory is empty")
    window = sel.window
    if method == "uniform":
        if not window:
            raise UsageError("series --method uniform needs --window k (k ≥ 1)")
        if any(x is not None for x in (decay, half_life, half_life_tokens, schedule, sigma_rel)):
            raise MethodError("--decay/--half-life/--schedule/--sigma-rel do not apply to --method uniform")
        first = 0 if partial else window - 1
    elif method in WEIGHTED:
        if not window and method != "power-ema":
            raise UsageError(f"series --method {method} needs --window k (k ≥ 2), each target's window")
        methods.weights(method, [1, 2], decay=decay, half_life=half_life, half_life_tokens=half_life_tokens,
                        tokens_per_step=tokens_per_step, **extra)  # validates the parameters
        first = 0 if partial or not window else window - 1
    else:
        if window is not None:
            raise UsageError("series --method ema runs over the whole trajectory; drop --window")
        methods.weights("ema", [0, 1], decay=decay, half_life=half_life, half_life_tokens=half_life_tokens,
                        tokens_per_step=tokens_per_step if half_life_tokens is None else 1.0, **extra)
        first = 0
    index = {c.step: i for i, c in enumerate(traj)}
    picked = [index[c.step] for c in sel.targets(traj)]
    if sel.steps:
        too_early = [traj[i].step for i in picked if i < first]
        if too_early:
            raise SelectionError(f"step {too_early[0]}: fewer than {window} checkpoints up to it (use --partial)")
    candidates = [i for i in picked if i >= first]
    if non_overlapping:
        assert window is not None
        candidates = [i for i in candidates if (i - first) % window == 0]
    if not candidates:
        raise SelectionError(f"{traj.name}: no target step selected (steps {traj.steps[0]}..{traj.steps[-1]})")
    all_steps = traj.steps
    tokens = tokens_seen(list(traj), tokens_per_step, traj.root)[0] if half_life_tokens is not None else None
    targets = []
    for i in candidates:
        if method == "uniform":
            assert window is not None
            ins = tuple(range(max(0, i - window + 1), i + 1))
            w = tuple(methods.weights("uniform", [all_steps[j] for j in ins]))
        elif method in WEIGHTED:
            ins = tuple(range(max(0, i - window + 1) if window else 0, i + 1))
            w = tuple(methods.weights(method, [all_steps[j] for j in ins], **extra))
        elif tokens is not None:
            ins = tuple(range(i + 1))
            w = tuple(methods.weights("ema", [all_steps[j] for j in ins], half_life_tokens=half_life_tokens,
                                      tokens=tokens[: i + 1]))
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


def _ema_factors(steps: Sequence[float], decay: float | None, half_life: float | None) -> list[float]:
    """How much the EMA state shrinks before checkpoint j is added (0 before the first); ``steps``
    are tokens when ``half_life`` is in tokens."""
    if decay is not None:
        return [0.0] + [decay] * (len(steps) - 1)
    assert half_life is not None
    return [0.0] + [0.5 ** ((steps[j] - steps[j - 1]) / half_life) for j in range(1, len(steps))]


def _params(method: str, window: int | None, decay: float | None, half_life: float | None,
            **extra: Any) -> dict[str, Any]:
    if method == "uniform":
        return {"window": window}
    return {"window": window, **extra} if method in WEIGHTED else {"decay": decay, "half_life": half_life, **extra}


def _factors(traj: Trajectory, params: Mapping[str, Any]) -> list[float]:
    """The EMA factors of a series, in steps or in tokens."""
    if params.get("half_life_tokens") is not None:
        tokens = tokens_seen(list(traj), params.get("tokens_per_step"), traj.root)[0]
        return _ema_factors(tokens, None, params["half_life_tokens"])
    return _ema_factors(traj.steps, params.get("decay"), params.get("half_life"))


@dataclass(frozen=True)
class _Recipe:
    """What makes a series output: it is kept by a re-run only if its ``ckptavg.json`` says the same."""

    method: str
    params: dict[str, Any]
    dtype: str  # as ckptavg.json writes it
    max_shard_size: int | None
    fingerprint: Callable[[int], dict[str, Any]]  # input index → manifest.fingerprint, cached

    def made(self, out: Path, target: Target, traj: Trajectory) -> bool:
        """``out`` was written by these arguments from these inputs (steps, locations, weights, and
        bytes by fingerprint), and its weight files all parse and agree with its index."""
        if out.is_symlink():
            return False
        try:
            man = _manifest.read(out)
            ins = man["inputs"]
            if (man.get("tool") != "ckptavg" or man["method"] != {"name": self.method, **self.params}
                    or man["dtype"] != self.dtype or man["accumulate"] != "float64"
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
        dtype, max_shard_size, allow_nonfinite, allow_duplicates, fsync, progress: as for :func:`ckptavg.average`.

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
    params = {k: v for k, v in _params(method, sel.window, decay, half_life, **how).items() if v is not None}
    out_dtype = _out_dtype(dtype)
    try:
        shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(os.path.abspath(out))
    check_inputs(out, input_paths(list(traj), str(traj.root)), replaces=False)  # both ways, links resolved
    recipe = _Recipe(method, params, out_dtype.torch_name if out_dtype else "same as inputs", shard_bytes,
                     functools.cache(lambda j: _manifest.fingerprint(traj[j])))
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
            _write(traj, out, pending, dirs, recipe, out_dtype, allow_nonfinite, allow_duplicates, fsync, progress)
    return [SeriesOutput(t.step, dirs[t.step], states[t.step] != "keep") for t in targets]


def _write(traj: Trajectory, out: Path, pending: list[Target], dirs: dict[int, Path], recipe: _Recipe,
           out_dtype: DType | None, allow_nonfinite: bool, allow_duplicates: bool, fsync: bool, progress: bool) -> None:
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
    factors = _factors(traj, recipe.params) if recipe.method == "ema" else None
    try:
        for t in pending:
            tmps[t.step] = begin_directory(dirs[t.step], force=True)  # what is there was judged replaceable
            sinks[t.step] = SafetensorsDirSink(tmps[t.step], entries, recipe.max_shard_size, label=dirs[t.step])
        readers = {j: CheckpointReader(ckpts[j].files, ckpts[j].format, str(ckpts[j]), key=ckpts[j].key)
                   for j in needed}
        with tqdm(total=total, unit="B", unit_scale=True, desc="series", disable=not progress, leave=False) as bar:
            stream_series(readers, pending, tensors, out_dtypes, sinks, ema_factors=factors,
                          allow_nonfinite=allow_nonfinite, on_bytes=bar.update, steps=traj.steps)
        for t in pending:
            sinks[t.step].close()
            try:
                finish_directory(tmps[t.step], [ckpts[j] for j in t.inputs], t.weights, recipe.method, recipe.params,
                                 out_dtype, "float64", str(traj.root), fingerprints=[prints[j] for j in t.inputs],
                                 max_shard_size=recipe.max_shard_size)
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
    **legacy: Any,
) -> Iterator[tuple[Target, dict[str, torch.Tensor]]]:
    """Yield ``(target, state_dict)`` for every target of the series, in step order, in memory.

    Memory: one fp32 running sum of the model's floating tensors (4 bytes per parameter) plus the
    state dict being yielded (the model in the output dtype); reading is chunked, so nothing else
    grows with the model. Drop each state dict before taking the next to stay at that bound.
    Uniform windows read each input twice (in, then out of the window; more often only when the
    running sum is recomputed exactly after 2k updates), EMA once.

    Example:
        >>> for target, sd in iter_series(discover("runs/tiny"), Selection(window=5)):   # doctest: +SKIP
        ...     model.load_state_dict(sd); score(model, target.step)
    """
    traj = trajectory
    sel = with_legacy(selection, "iter_series", **legacy)
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
    st = RunningAverage(size, np.float32, allow_nonfinite=allow_nonfinite)  # the whole model, flat: 4 B/parameter
    factors = _factors(traj, {"decay": decay, "half_life": half_life, **how}) if method == "ema" else None

    def fold(j: int, sign: int = 1, weight: float = 1.0) -> None:
        """Add (+1) or remove (-1) checkpoint j with ``weight``, tensor by tensor, chunk by chunk."""
        with CheckpointReader(ckpts[j].files, ckpts[j].format, str(ckpts[j]), key=ckpts[j].key) as r, \
                st.input(j, weight, sign) as put:
            for info in floats:
                for s0 in range(0, info.numel, CHUNK_ELEMS):
                    put(r.read(info.name, s0, min(CHUNK_ELEMS, info.numel - s0)), info.dtype, offsets[info.name] + s0)

    buf = np.empty(CHUNK_ELEMS, np.float32)
    last = -1  # ema: index of the newest checkpoint folded in
    for t in targets:
        # Overflow and inf - inf are reported by emit's NaN/Inf check, naming the tensor. The state is
        # left before each yield: the caller's numpy settings are not ours to change.
        with np.errstate(over="ignore", invalid="ignore"):
            if factors is not None:
                for j in range(last + 1, t.index + 1):
                    st.decay(factors[j])
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
            with CheckpointReader(ckpts[t.index].files, ckpts[t.index].format, str(ckpts[t.index]),
                                  key=ckpts[t.index].key) as r:
                for info in ref.values():
                    if not info.dtype.floating:
                        sd[info.name] = to_torch(r.read(info.name), info.dtype, info.shape)
                        continue
                    dt = out_dtype or info.dtype
                    where = functools.partial(_nonfinite, info.name, traj[t.inputs[0]].step, t.step)
                    cast = info.name if narrows(info.dtype, dt) else ""
                    vals = np.empty(info.numel, dt.storage)
                    for s0 in range(0, info.numel, CHUNK_ELEMS):
                        n = min(CHUNK_ELEMS, info.numel - s0)
                        try:
                            vals[s0 : s0 + n] = st.emit(dt, buf, where, at=offsets[info.name] + s0, n=n,
                                                        narrowing=cast)
                        except NonFiniteError:  # finite inputs whose fp32 sum overflowed, or a NaN/Inf input
                            vals[s0 : s0 + n] = _exact_chunk(ckpts, t, info, s0, n, dt, cast)
                    sd[info.name] = to_torch(vals, dt, info.shape)
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
