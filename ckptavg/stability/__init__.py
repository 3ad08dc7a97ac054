"""``ckptavg inspect``: weight norms, update sizes and anomalies along a run, in one streaming pass.

For each selected checkpoint t (in step order) and each floating tensor, in fp64:

- weight norm ‖θ_t‖₂;
- update norm ‖θ_t − θ_{t−1}‖₂ from the previous selected checkpoint;
- relative update per step: update norm / ‖θ_{t−1}‖₂ / (step_t − step_{t−1}) (None where the
  previous weights are all zero, e.g. a zero-initialised bias at step 0);

and the same for the whole model and for each layer group (:func:`layer_group`: ``qkv``,
``attn_out``, ``mlp_in``, ``mlp_out``, ``embed``, ``norm``, ``other``), from the summed squares.

Anomalies (:func:`detect`; ``tensor`` None is the whole model):

- ``update_spike``, for the whole model and each tensor: the relative update per step x_t against the previous ``window`` values of
  the same series (those that exist): robust z = (x_t − median) / max(1.4826·MAD, 0.05·median);
  flagged when z > ``threshold``. Only upward jumps count, and a series is judged only once it
  has ``window`` earlier values. The 5 % floor keeps a perfectly steady history (MAD = 0) from
  turning the tiniest wobble into a spike: a jump must then exceed the median by 0.3 × at z = 6.
- ``non_finite``: the tensor holds NaN/Inf at that step (score: how many elements); its norms
  are then None, and it is left out of the model's and its group's figures.
- ``norm_growth``, for the whole model and each layer group (``tensor`` ``"group:mlp_in"`` …;
  single tensors such as a zero-initialised bias grow for long in a healthy run): the weight norm
  rose at each of the last ``window`` checkpoints and by at least ``growth`` × over them (score:
  that ratio); reported once, where the rise first qualifies, and judged from the
  ``2·window``-th checkpoint on (growth from initialisation is expected).

``--exclude-anomalies`` (:func:`anomalous_steps`, :meth:`Report.flagged`) leaves out of averages
the checkpoints holding NaN/Inf and those where the *whole model* spiked; a spike of one tensor
alone, and norm growth (a trend, not a checkpoint), are reported but not excluded.

Reading: two checkpoints are open at a time; each chunk of each tensor is read from both and
reduced to three numbers by a pool of workers (:func:`ckptavg.pipeline.prefetch`), at most
``2 × threads`` chunks in flight, so memory does not grow with the model or the run. Partial sums
are added in file order by one thread: the figures are identical for any ``threads``.

A caveat of the per-step normalisation: between checkpoints many steps apart the updates partly
cancel (a random walk grows as √steps), so a run whose checkpoints get *closer* together (Pythia's
1, 2, 4 … then every 1000 is the other way round) looks like a rise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SelectionError, UsageError
from ..selection import Selection
from ..trajectory import Checkpoint, Trajectory, check_compatible
from .report import (
    GROUP_NAMES,
    GROUPS,
    GROWTH,
    THRESHOLD,
    WINDOW,
    Anomaly,
    CheckpointStats,
    Norms,
    Report,
    check_rule,
    detect,
    layer_group,
    robust_z,
)

if TYPE_CHECKING:
    from ..io.readers import CheckpointReader
    from ..io.safetensors import TensorInfo

CHUNK = 1 << 18  # elements per task: 2 MiB of fp64 per input chunk

# Reading ------------------------------------------------------------------------------------------
Sums = tuple[float, float, int]  # Σx², Σ(x − x_prev)², NaN/Inf count


def _chunk_sums(cur: CheckpointReader, prev: CheckpointReader | None, info: TensorInfo, start: int,
                n: int) -> tuple[TensorInfo, int, Sums]:
    """Σx², Σ(x − prev)² (0 without ``prev``) and the NaN/Inf count of one chunk, in fp64."""
    import numpy as np

    from ..io.dtypes import to_accumulator

    a = to_accumulator(cur.read(info.name, start, n), info.dtype, np.empty(n, np.float64))  # (n,) fp64
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.einsum("i,i->", a, a))  # Σx² in one pass, no temporary (measured 1.8× np.square().sum())
        bad = 0 if math.isfinite(sq) else int(n - np.isfinite(a).sum())
        if prev is None:
            return info, n, (sq, 0.0, bad)
        b = to_accumulator(prev.read(info.name, start, n), info.dtype, np.empty(n, np.float64))
        np.subtract(a, b, out=b)
        return info, n, (sq, float(np.einsum("i,i->", b, b)), bad)


def _measure(cur: CheckpointReader, prev: CheckpointReader | None, plan: Sequence[TensorInfo], threads: int,
             on_bytes: Callable[[int], object] | None) -> dict[str, Sums]:
    """Per floating tensor of ``plan``: (Σx², Σ(x − x_prev)², NaN/Inf count), added in file order."""
    from ..pipeline import prefetch, spans

    tasks = (partial(_chunk_sums, cur, prev, info, start, n) for info in plan for start, n in spans(info.numel, CHUNK))
    out: dict[str, list[float]] = {info.name: [0.0, 0.0, 0] for info in plan}
    with ThreadPoolExecutor(threads, thread_name_prefix="ckptavg-inspect") as pool:
        for info, n, (sq, dsq, bad) in prefetch(tasks, pool, 2 * threads):
            acc = out[info.name]
            acc[0] += sq
            acc[1] += dsq
            acc[2] += bad
            if on_bytes:
                on_bytes(n * info.dtype.itemsize * (1 if prev is None else 2))
    return {k: (v[0], v[1], int(v[2])) for k, v in out.items()}


def _norms(sq: float, dsq: float | None, prev_sq: float | None, gap: int) -> Norms:
    w = math.sqrt(sq) if math.isfinite(sq) else None
    if dsq is None or prev_sq is None or not math.isfinite(dsq):
        return Norms(w)
    u = math.sqrt(dsq)
    rel = u / math.sqrt(prev_sq) / gap if prev_sq > 0 and math.isfinite(prev_sq) else None
    return Norms(w, u, rel)


def _stats(step: int, sums: Mapping[str, Sums], prev: Mapping[str, Sums] | None, gap: int) -> CheckpointStats:
    """Per tensor, per group and whole-model figures from the summed squares (tensors holding
    NaN/Inf, here or at the previous checkpoint, are left out of the aggregates)."""
    tensors = {n: _norms(sq, dsq if prev else None, prev[n][0] if prev else None, gap) for n, (sq, dsq, _) in sums.items()}
    totals: dict[str, list[float]] = {}
    for n, (sq, dsq, bad) in sums.items():
        if bad or not math.isfinite(sq) or (prev is not None and not math.isfinite(prev[n][0])):
            continue
        for key in (layer_group(n), ""):
            t = totals.setdefault(key, [0.0, 0.0, 0.0])
            t[0] += sq
            t[1] += dsq
            t[2] += prev[n][0] if prev else 0.0
    groups = {g: _norms(t[0], t[1] if prev else None, t[2] if prev else None, gap)
              for g, t in sorted(totals.items(), key=lambda kv: GROUP_NAMES.index(kv[0]) if kv[0] else -1) if g}
    model = totals.get("")
    whole = _norms(model[0], model[1] if prev else None, model[2] if prev else None, gap) if model else Norms(None)
    return CheckpointStats(step, whole, tensors, groups, {n: s[2] for n, s in sums.items() if s[2]})


def _checkpoints(run: str | os.PathLike[str] | Trajectory | Sequence[Checkpoint], selection: Selection | None,
                 key: str | None, step_pattern: str | None) -> tuple[list[Checkpoint], str]:
    if isinstance(run, (str, os.PathLike)):
        from ..sources import discover

        run = discover(run, step_pattern=step_pattern, key=key)
    root = str(getattr(run, "root", ""))
    traj = run if isinstance(run, Trajectory) else Trajectory("selection", tuple(run), root)
    if selection is not None and not selection.is_empty:
        traj = selection.apply(traj)
    return list(traj), root


def inspect(
    run: str | os.PathLike[str] | Trajectory | Sequence[Checkpoint],
    selection: Selection | None = None,
    *,
    threads: int | None = None,
    window: int = WINDOW,
    threshold: float = THRESHOLD,
    growth: float = GROWTH,
    key: str | None = None,
    step_pattern: str | None = None,
    allow_duplicates: bool = False,
    progress: bool = True,
) -> Report:
    """Weight norms, update sizes and anomalies of the selected checkpoints of ``run``, streamed.

    Args:
        run: a run folder, ``hf://org/name`` (revisions downloaded into the HF cache as ``merge``
            does), a Trajectory, or checkpoints oldest first.
        selection: which checkpoints (default: all); updates are measured between consecutive
            selected checkpoints.
        threads: workers reducing chunks (default: the CPUs this process may use); the figures do
            not depend on it.
        window, threshold, growth: the anomaly rule (see the module docstring).
        key, step_pattern, allow_duplicates: as for :func:`ckptavg.discover` and :func:`ckptavg.average`.
        progress: a tqdm bar (bytes read) on stderr.

    Returns:
        A :class:`Report`; ``report.to_dict()`` is what ``ckptavg inspect --json`` prints.

    Raises:
        UsageError: ``window``/``threshold``/``growth``/``threads`` out of range.
        SelectionError: nothing selected. IncompatibleError: checkpoints of different architectures.
        CheckpointError: an unreadable input, naming it.

    Example:
        >>> report = inspect("runs/pythia-tiny", Selection(start=1000))          # doctest: +SKIP
        >>> [(a.step, a.tensor, a.kind) for a in report.anomalies]               # doctest: +SKIP
        [(5000, None, 'update_spike'), (5000, 'gpt_neox.layers.3.attention.dense.weight', 'update_spike')]
    """
    from ..pipeline import available_cpus

    check_rule(window, threshold, growth)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    threads = threads or available_cpus()
    ckpts, root = _checkpoints(run, selection, key, step_pattern)
    if not ckpts:
        raise SelectionError("nothing selected: the selection has no checkpoints")
    stats: list[CheckpointStats] = []
    prev: dict[str, Sums] | None = None
    with _bar(ckpts, progress) as bar:
        for cur, sums in _walk(ckpts, threads, allow_duplicates, progress, bar.update):
            stats.append(_stats(cur.step, sums, prev, cur.step - stats[-1].step if stats else 1))
            prev = sums
    result = tuple(stats)
    return Report(root, result, tuple(detect(result, window, threshold, growth)), window, threshold, growth)


def _bar(ckpts: Sequence[Checkpoint], progress: bool) -> Any:
    from tqdm import tqdm

    total = sum(c.size for c in ckpts) * 2 or None
    return tqdm(total=total, unit="B", unit_scale=True, desc="inspecting", disable=not progress, leave=False)


def _walk(ckpts: Sequence[Checkpoint], threads: int, allow_duplicates: bool, progress: bool,
          on_bytes: Callable[[int], object]) -> Iterator[tuple[Checkpoint, dict[str, Sums]]]:
    """Each checkpoint with its per-tensor sums against the one before; two readers open at a time."""
    from .. import sources
    from ..io.readers import CheckpointReader

    prev_reader: CheckpointReader | None = None
    prev_ckpt: Checkpoint | None = None
    try:
        for c in ckpts:
            [c] = sources.materialise([c], allow_duplicates=allow_duplicates, progress=progress)
            reader = CheckpointReader(c.files, c.format, str(c), key=c.key)
            c = replace(c, tensors=reader.tensors)
            if prev_ckpt is not None:
                try:
                    check_compatible([prev_ckpt, c])
                except BaseException:
                    reader.close()
                    raise
            plan = [t for t in reader.tensors.values() if t.dtype.floating]
            try:
                sums = _measure(reader, prev_reader, plan, threads, on_bytes)
            finally:
                if prev_reader is not None:
                    prev_reader.close()
                prev_reader = reader
            prev_ckpt = c
            yield c, sums
    finally:
        if prev_reader is not None:
            prev_reader.close()




# Spike-aware averaging ------------------------------------------------------------------------------
def anomalous_steps(
    run: Trajectory | Sequence[Checkpoint],
    steps: Sequence[int],
    anomalies: str | os.PathLike[str] | Report | None = None,
    *,
    threads: int | None = None,
    allow_duplicates: bool = False,
    progress: bool = True,
) -> tuple[dict[int, str], dict[str, Any]]:
    """Which of ``steps`` to leave out of an average, and the record ``ckptavg.json`` keeps of it.

    A step is left out when the inspection flags NaN/Inf in any tensor or an update spike of the
    whole model (:meth:`Report.flagged`). ``anomalies`` None inspects ``run``
    from :data:`WINDOW` + 1 checkpoints before the first of ``steps`` (the history the rule needs)
    to the last, with the default rule; a report (or the path of ``ckptavg inspect --json``'s
    output) is used as it is, and must cover every one of ``steps``.

    Returns:
        ``({step: why}, {"excluded": [{"step", "reason"}], "exclusion": {"source", "window",
        "threshold", "rule"}})``.

    Raises:
        SelectionError: a step the given report did not inspect.
        UsageError: a file that is not such a report.
    """
    wanted = sorted(set(steps))
    if anomalies is None:
        ckpts = list(run)
        index = {c.step: i for i, c in enumerate(ckpts)}
        lo = max(0, min(index[s] for s in wanted) - WINDOW - 1) if wanted else 0
        hi = max(index[s] for s in wanted) if wanted else -1
        report = inspect(ckpts[lo: hi + 1], threads=threads, allow_duplicates=allow_duplicates, progress=progress)
        source = "ckptavg inspect (default rule)"
    elif isinstance(anomalies, Report):
        report, source = anomalies, "a report"
    else:
        from ..io.files import load_json

        report = Report.from_dict(load_json(Path(anomalies), "anomaly report"), str(anomalies))
        source = str(anomalies)
    missing = sorted(set(wanted) - set(report.steps))
    if missing:
        span = f"steps {report.steps[0]}..{report.steps[-1]}" if report.steps else "no steps"
        raise SelectionError(f"{source}: step {missing[0]} was not inspected (the report covers {span}); "
                             "inspect the steps being averaged, e.g. ckptavg inspect RUN --json > FILE")
    flagged = {s: why for s, why in report.flagged().items() if s in set(wanted)}
    record = {"excluded": [{"step": s, "reason": why} for s, why in flagged.items()],
              "exclusion": {"source": source, "window": report.window, "threshold": report.threshold,
                            "rule": "non_finite in any tensor, update_spike of the whole model"}}
    return flagged, record


def plot(report: Report, out: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Draw ``report``: weight norm per layer group (top) and relative update per step per group
    (bottom, log scale) against the step, anomalous steps marked (red: a spike or NaN/Inf, orange:
    norm growth). See :func:`ckptavg.stability.plot.plot_report`."""
    from .plot import plot_report

    return plot_report(report, out, dpi=dpi)


def without_anomalies(
    run: Trajectory | Sequence[Checkpoint],
    selected: Sequence[Checkpoint],
    anomalies: str | os.PathLike[str] | Report | None = None,
    **kwargs: Any,
) -> tuple[list[Checkpoint], dict[str, Any]]:
    """``selected`` without the checkpoints :func:`anomalous_steps` flags (``run``: the trajectory
    they come from, for the history the rule needs), and the record for ``ckptavg.json``.

    Raises:
        SelectionError: every selected checkpoint was flagged.
    """
    flagged, record = anomalous_steps(run, [c.step for c in selected], anomalies, **kwargs)
    kept = [c for c in selected if c.step not in flagged]
    if not kept:
        steps = ", ".join(str(s) for s in flagged)
        raise SelectionError(f"every selected checkpoint is flagged as anomalous (steps {steps}); widen the "
                             "selection or drop --exclude-anomalies")
    return kept, record


__all__ = ["GROUPS", "GROUP_NAMES", "GROWTH", "THRESHOLD", "WINDOW", "Anomaly", "CheckpointStats",
           "Norms", "Report", "anomalous_steps", "detect", "inspect", "layer_group", "plot", "robust_z",
           "without_anomalies"]
