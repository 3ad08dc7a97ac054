"""``ckptavg inspect --plot``: weight norms and update sizes per layer group along the steps.

Drawn like :mod:`ckptavg.sweep.plot`: matplotlib (the ``plot`` extra) imported inside the function,
its object-oriented API on the Agg canvas, no pyplot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CkptavgError, MissingDependencyError
from .report import GROUP_NAMES, Report

PANEL_SIZE = (7.5, 3.2)  # inches per panel


def _series(report: Report, group: str | None, field: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for c in report.checkpoints:
        norms = c.model if group is None else c.groups.get(group)
        value = getattr(norms, field) if norms is not None else None
        if value is not None and value > 0:
            xs.append(c.step)
            ys.append(value)
    return xs, ys


def plot_report(report: Report, out: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Two panels against the step: the weight norm of each layer group, and its relative update per
    step (log scale; the whole model in black), with a red dotted line at each step flagged
    ``update_spike``/``non_finite`` and an orange one where ``norm_growth`` starts.

    Args:
        report: what :func:`ckptavg.stability.inspect` returned.
        out: the PNG to write.
        dpi: resolution.

    Returns:
        The PNG's path.

    Raises:
        CkptavgError: fewer than two checkpoints (nothing to draw).
        MissingDependencyError: matplotlib is missing (names the ``plot`` extra).
    """
    if len(report.checkpoints) < 2:
        raise CkptavgError("inspect --plot needs at least two checkpoints")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plotting needs matplotlib: pip install 'ckptavg[plot]'") from None

    fig = Figure(figsize=(PANEL_SIZE[0], 2 * PANEL_SIZE[1]), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    groups = [g for g in GROUP_NAMES if any(g in c.groups for c in report.checkpoints)]
    for i, g in enumerate(groups):
        style: dict[str, Any] = {"color": f"C{i}", "linewidth": 1.4, "marker": "o", "markersize": 2.5, "label": g}
        top.plot(*_series(report, g, "weight_norm"), **style)
        bottom.plot(*_series(report, g, "relative_update"), **style)
    [whole] = bottom.plot(*_series(report, None, "relative_update"), color="black", linewidth=1.8, label="whole model")
    bottom.legend(handles=[whole], fontsize=8)
    top.set_ylabel("weight norm ‖θ‖₂")
    bottom.set_ylabel("‖θ_t − θ_t−1‖ / ‖θ_t−1‖\nper step")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    spikes = sorted(report.flagged())
    growth = sorted({a.step for a in report.anomalies if a.kind == "norm_growth"})
    for ax in (top, bottom):
        for s in spikes:
            ax.axvline(s, color="C3", linewidth=0.9, linestyle=":")
        for s in growth:
            ax.axvline(s, color="orange", linewidth=0.9, linestyle=":")
        ax.grid(alpha=0.3)
    for s in spikes:
        top.annotate(f"{s}", (s, 1), xycoords=("data", "axes fraction"), xytext=(3, -3), textcoords="offset points",
                     va="top", fontsize=8, color="C3")
    top.legend(fontsize=8, ncol=4)
    top.set_title(f"{Path(report.trajectory).name or 'run'}: {len(report.anomalies)} anomalies "
                  f"(window {report.window}, z > {report.threshold:g})", fontsize=10)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png")
    return target


__all__ = ["plot_report"]
