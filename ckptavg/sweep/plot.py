"""``ckptavg plot``: metric vs step, one line per variant (the LAWA paper's figure), from a sweep's table.

Optionally under each panel a *gain* panel (how much each average beats the raw checkpoint, > 0
where it wins), and marked steps or spans (a loss spike, a cool-down). ``ckptavg demo`` draws its
figure with these options.

matplotlib is the optional ``plot`` extra and is imported inside :func:`plot_results`, through its
object-oriented API with the Agg canvas: no pyplot, no global backend switched under a notebook.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CkptavgError, MissingDependencyError
from .table import HELD_OUT, load_results, table_path, variant_order

PNG_NAME = "results.png"
PANEL_SIZE = (5.2, 3.8)  # inches per panel; a gain panel adds GAIN_HEIGHT
GAIN_HEIGHT = 2.2


@dataclass(frozen=True)
class Mark:
    """Something to point out on every panel: one step (a dotted line) or, with ``stop``, the
    steps from ``start`` to ``stop`` (shaded), labelled at the top of the metric panels."""

    start: int
    stop: int | None = None
    label: str = ""
    color: str = "C3"


Panel = tuple[str, str, str]  # (trajectory, task, metric)


def _select(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str] | None, metrics: Sequence[str] | None,
            variants: Sequence[str] | None, start: int | None, stop: int | None) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and r["value"] is not None
            and (not tasks or r["task"] in tasks) and (not metrics or r["metric"] in metrics)
            and (not variants or r["variant"] in variants)
            and (start is None or r["step"] >= start) and (stop is None or r["step"] <= stop)]


def _gains(cell: Sequence[Mapping[str, Any]], variant: str, better: bool) -> list[tuple[int, float]]:
    """(step, how much ``variant`` beats raw there): raw − variant when lower is better."""
    raw = {r["step"]: r["value"] for r in cell if r["variant"] == "raw"}
    mine = sorted((r["step"], r["value"]) for r in cell if r["variant"] == variant and r["step"] in raw)
    return [(s, (v - raw[s]) if better else (raw[s] - v)) for s, v in mine]


def _off_scale(pts: Sequence[tuple[int, float]], clip: float) -> list[tuple[int, float]]:
    """The most extreme point of each run of consecutive points beyond ±clip on one side."""
    out: list[tuple[int, float]] = []
    run: list[tuple[int, float]] = []
    for p in [*pts, (0, 0.0)]:  # a sentinel inside the scale ends the last run
        if run and (abs(p[1]) <= clip or (p[1] > 0) != (run[0][1] > 0)):
            out.append(max(run, key=lambda q: abs(q[1])))
            run = []
        if abs(p[1]) > clip:
            run.append(p)
    return out


def _draw_gain(ax: Any, cell: Sequence[Mapping[str, Any]], lines: Mapping[str, Any], better: bool,
               clip: float | None) -> None:
    averages = [v for v in lines if v != "raw"]
    for i, variant in enumerate(averages):
        line = lines[variant]
        pts = _gains(cell, variant, better)
        if not pts:
            continue
        shown = [max(-clip, min(clip, g)) if clip else g for _, g in pts]
        ax.plot([s for s, _ in pts], shown, color=line.get_color(), linestyle=line.get_linestyle(),
                linewidth=line.get_linewidth(), marker=line.get_marker(), markersize=line.get_markersize())
        if not clip:
            continue
        # Off the scale (a spike): say how far at the edge, once per excursion, variants one above the other.
        for s, g in _off_scale(pts, clip):
            ax.annotate(f"{g:+.2f}", (s, math.copysign(clip, g)), fontsize=7, color=line.get_color(),
                        xytext=(4, -8 - 8 * i if g > 0 else 2 + 8 * i), textcoords="offset points")
    ax.axhline(0, color="0.2", linewidth=0.8)
    if clip:
        ax.set_ylim(-clip * 1.05, clip * 1.05)
    ax.set_ylabel(("variant − raw" if better else "raw − variant") + "\n(> 0: the average wins)", fontsize=9)


def _draw_marks(ax: Any, marks: Sequence[Mark], labelled: bool) -> None:
    for m in marks:
        if m.stop is None:
            ax.axvline(m.start, color=m.color, linewidth=0.8, linestyle=":")
        else:
            ax.axvspan(m.start, m.stop, color=m.color, alpha=0.08, linewidth=0)
        if labelled and m.label:
            ax.annotate(m.label, (m.start, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", va="top", fontsize=8, color=m.color)


def plot_results(
    results: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    tasks: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    start: int | None = None,
    stop: int | None = None,
    labels: Mapping[str, str] | None = None,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    ylim: tuple[float | None, float | None] | None = None,
    gain: bool = False,
    gain_clip: float | None = None,
    marks: Sequence[Mark] = (),
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 120,
) -> Path:
    """Draw every (task, metric) of a sweep's table against the step, one line per variant.

    Args:
        results: a sweep's output folder or its ``results.jsonl``.
        out: the PNG to write [default: ``results.png`` beside the table].
        tasks: only these tasks (``held_out`` for the held-out loss) [default: all].
        metrics: only these metrics, e.g. ``acc`` [default: all].
        variants: only these variants, e.g. ``raw``, ``uniform5`` [default: all].
        start: only steps from this one on (inclusive).
        stop: only steps up to this one (inclusive).
        labels: legend text by variant name [default: the names].
        styles: matplotlib line properties by variant name (``color``, ``linestyle``, ``marker`` …),
            over the defaults (raw grey and dashed, markers up to 40 points).
        ylim: the metric panels' y range, ``(low, high)`` (either None: automatic), e.g. to keep a
            steep start from flattening the rest.
        gain: under each panel, how much each variant beats ``raw`` at each step (raw − variant
            where lower is better, variant − raw where higher is better: > 0 where averaging wins);
            needs ``raw`` rows and a metric with a direction.
        gain_clip: the gain panels' range, ±this; larger gains are drawn at the edge, annotated.
        marks: steps and spans to point out on every panel (:class:`Mark`).
        title: a title over the whole figure.
        figsize: the figure's size in inches [default: 5.2 × 3.8 per panel, more with gain].
        dpi: resolution.

    Returns:
        The PNG's path.

    Raises:
        CkptavgError: no table, nothing left to draw.
        MissingDependencyError: matplotlib is missing (names the ``plot`` extra).

    Example:
        >>> plot_results("sweeps/pythia-160m-deduped-lawa", tasks=["piqa"], metrics=["acc"])  # doctest: +SKIP
    """
    table = table_path(results)
    rows = _select(load_results(table), tasks, metrics, variants, start, stop)
    if not rows:
        wanted = f" for tasks {list(tasks)}" if tasks else ""
        wanted += f" for metrics {list(metrics)}" if metrics else ""
        wanted += f" for variants {list(variants)}" if variants else ""
        raise CkptavgError(f"{table}: no finished rows to plot{wanted}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plotting needs matplotlib: pip install 'ckptavg[plot]'") from None

    several = len({r["trajectory"] for r in rows}) > 1
    panels: list[Panel] = sorted({(r["trajectory"], r["task"], r["metric"]) for r in rows},
                                 key=lambda p: (p[0], p[1] == HELD_OUT, p[1], p[2]))
    cells = {p: [r for r in rows if (r["trajectory"], r["task"], r["metric"]) == p] for p in panels}
    # A gain needs the raw checkpoint, something else to compare with it, and which way is better.
    gains = {p for p, cell in cells.items()
             if {r["variant"] for r in cell} > {"raw"} and isinstance(cell[0].get("higher_is_better"), bool)} if gain else set()
    gain = bool(gains)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    per = (PANEL_SIZE[0], PANEL_SIZE[1] + (GAIN_HEIGHT if gain else 0))
    fig = Figure(figsize=figsize or (per[0] * cols, per[1] * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows * (2 if gain else 1), cols, height_ratios=[3, 2] * nrows if gain else None)
    for i, (traj, task, metric) in enumerate(panels):
        r0, c = divmod(i, cols)
        ax = fig.add_subplot(grid[r0 * 2 if gain else r0, c])
        cell = cells[(traj, task, metric)]
        lines = {}
        for variant in sorted({r["variant"] for r in cell}, key=variant_order):
            pts = sorted((r["step"], r["value"]) for r in cell if r["variant"] == variant)
            style: dict[str, Any] = {"color": "0.45", "linestyle": "--", "linewidth": 1.2} if variant == "raw" else {"linewidth": 1.6}
            style |= {"marker": "o" if len(pts) <= 40 else None, "markersize": 3} | dict((styles or {}).get(variant, {}))
            [lines[variant]] = ax.plot([p[0] for p in pts], [p[1] for p in pts],
                                       label=(labels or {}).get(variant, variant), **style)
        better = cell[0].get("higher_is_better")
        arrow = " ↑" if better is True else " ↓" if better is False else ""
        name = "held-out loss" if (task, metric) == (HELD_OUT, "loss") else f"{task} · {metric}"
        ax.set_title(name + (f"\n{Path(traj).name}" if several else ""), fontsize=10)
        ax.set_ylabel(metric + arrow)
        ax.grid(alpha=0.3)
        if ylim is not None:
            ax.set_ylim(*ylim)
        _draw_marks(ax, marks, labelled=True)
        ax.legend(fontsize=8)
        below = None
        if (traj, task, metric) in gains:
            below = fig.add_subplot(grid[r0 * 2 + 1, c], sharex=ax)
            _draw_gain(below, cell, lines, better is True, gain_clip)
            _draw_marks(below, marks, labelled=False)
            below.grid(alpha=0.3)
            ax.tick_params(labelbottom=False)
        (below or ax).set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    target = Path(out) if out is not None else table.with_name(PNG_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png")
    return target


__all__ = ["PNG_NAME", "Mark", "plot_results"]
