"""``ckptavg plot``: metric vs step, one line per variant (the LAWA paper's figure), from a sweep's table.

matplotlib is the optional ``plot`` extra and is imported inside :func:`plot_results`, through its
object-oriented API with the Agg canvas: no pyplot, no global backend switched under a notebook.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import CkptavgError
from . import HELD_OUT, _table_path, _variant_order, load_results

PNG_NAME = "results.png"


def plot_results(
    results: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    tasks: list[str] | tuple[str, ...] | None = None,
    metrics: list[str] | tuple[str, ...] | None = None,
    dpi: int = 120,
) -> Path:
    """Draw every (task, metric) of a sweep's table against the step, one line per variant.

    Args:
        results: a sweep's output folder or its ``results.jsonl``.
        out: the PNG to write [default: ``results.png`` beside the table].
        tasks: only these tasks (``held_out`` for the held-out loss) [default: all].
        metrics: only these metrics, e.g. ``acc`` [default: all].
        dpi: resolution.

    Returns:
        The PNG's path.

    Raises:
        CkptavgError: no table, matplotlib missing (names the extra), nothing left to draw.

    Example:
        >>> plot_results("sweeps/pythia-160m-deduped-lawa", tasks=["piqa"], metrics=["acc"])  # doctest: +SKIP
    """
    table = _table_path(results)
    rows = [r for r in load_results(table) if r["status"] == "ok" and r["value"] is not None
            and (not tasks or r["task"] in tasks) and (not metrics or r["metric"] in metrics)]
    if not rows:
        wanted = f" for tasks {list(tasks)}" if tasks else ""
        wanted += f" for metrics {list(metrics)}" if metrics else ""
        raise CkptavgError(f"{table}: no finished rows to plot{wanted}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CkptavgError("plotting needs matplotlib: pip install 'ckptavg[plot]'") from None

    several = len({r["trajectory"] for r in rows}) > 1
    panels = sorted({(r["trajectory"], r["task"], r["metric"]) for r in rows},
                    key=lambda p: (p[0], p[1] == HELD_OUT, p[1], p[2]))
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (traj, task, metric) in zip(axes.flat, panels):
        cell = [r for r in rows if (r["trajectory"], r["task"], r["metric"]) == (traj, task, metric)]
        for variant in sorted({r["variant"] for r in cell}, key=_variant_order):
            pts = sorted((r["step"], r["value"]) for r in cell if r["variant"] == variant)
            style: dict[str, Any] = {"color": "0.45", "linestyle": "--", "linewidth": 1.2} if variant == "raw" else {"linewidth": 1.6}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) <= 40 else None,
                    markersize=3, label=variant, **style)
        better = cell[0].get("higher_is_better")
        arrow = " ↑" if better is True else " ↓" if better is False else ""
        name = "held-out loss" if (task, metric) == (HELD_OUT, "loss") else f"{task} · {metric}"
        ax.set_title(name + (f"\n{Path(traj).name}" if several else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(metric + arrow)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    target = Path(out) if out is not None else table.with_name(PNG_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png")
    return target


__all__ = ["plot_results"]
