"""The summaries written next to a sweep's table after every job: ``results.csv`` (the current rows,
flat) and ``results.md`` (a step × variant table per task metric, with "beats raw at n of m steps").

They are product files, regenerated from the table (the only source of truth) and replaced
atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .table import HELD_OUT, TABLE, current_rows, variant_order

CSV = "results.csv"
MARKDOWN = "results.md"
CSV_COLUMNS = ("trajectory", "step", "variant", "task", "metric", "value", "stderr", "samples",
               "higher_is_better", "status", "error")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # one writer: the table is locked
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The CSV summary.

    Args:
        rows: the current rows of a table.

    Returns:
        ``rows`` as CSV with :data:`CSV_COLUMNS` (provenance left out: it is in the table).
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def _metric_section(traj: str, task: str, metric: str, cell: Sequence[Mapping[str, Any]]) -> list[str]:
    """One task metric of one trajectory: step × variant, the best of each step in bold, then how
    often each average beats the raw checkpoint."""
    variants = sorted({r["variant"] for r in cell}, key=variant_order)
    value = {(r["step"], r["variant"]): r["value"] for r in cell}
    steps = sorted({r["step"] for r in cell})
    better = cell[0].get("higher_is_better")
    arrow = " (higher is better)" if better is True else " (lower is better)" if better is False else ""
    lines = [f"## {task} · {metric}{arrow}", "", f"`{traj}`", "",
             "| step | " + " | ".join(variants) + " |", "| ---: |" + " ---: |" * len(variants)]
    for s in steps:
        vals = [value.get((s, v)) for v in variants]
        present = [x for x in vals if x is not None]
        best = (max(present) if better else min(present)) if present and better is not None else None
        shown = [f"**{_fmt(x)}**" if x is not None and x == best and len(present) > 1 else _fmt(x) for x in vals]
        lines.append(f"| {s} | " + " | ".join(shown) + " |")
    if "raw" in variants and better is not None:
        lines.append("")
        for v in variants[1:]:
            pairs = [(value[(s, v)], value[(s, "raw")]) for s in steps if (s, v) in value and (s, "raw") in value]
            if pairs:
                wins = sum((a > b) if better else (a < b) for a, b in pairs)
                diff = math.fsum(a - b for a, b in pairs) / len(pairs)
                lines.append(f"- {v} beats raw at {wins} of {len(pairs)} steps; mean difference {diff:+.4f}")
    lines.append("")
    return lines


def markdown_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown summary: a step × variant table per trajectory and task metric, then failed jobs.

    Args:
        rows: the current rows of a table.

    Returns:
        The markdown text.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    jobs = {(r["trajectory"], r["step"], r["variant"]) for r in rows}
    lines = ["# Sweep results", "",
             f"{len(jobs)} jobs ({len(jobs) - len(failed)} ok, {len(failed)} failed), {len(ok)} metric rows; "
             f"regenerated from `{TABLE}` after every job.", ""]
    for traj in sorted({r["trajectory"] for r in ok}):
        mine = [r for r in ok if r["trajectory"] == traj]
        for task, metric in sorted({(r["task"], r["metric"]) for r in mine}, key=lambda t: (t[0] == HELD_OUT, t)):
            lines += _metric_section(traj, task, metric, [r for r in mine if (r["task"], r["metric"]) == (task, metric)])
    if failed:
        lines += ["## Failed jobs (re-run the sweep to retry them)", "", "| trajectory | step | variant | error |",
                  "| --- | ---: | --- | --- |"]
        for r in failed:
            err = str(r["error"]).replace("|", "\\|")
            lines.append(f"| `{r['trajectory']}` | {r['step']} | {r['variant']} | {err} |")
        lines.append("")
    return "\n".join(lines)


def write_summaries(table: Path, rows: Iterable[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Regenerate ``results.csv`` and ``results.md`` beside ``table`` from all of its rows.

    Args:
        table: the table's path.
        rows: every row of the table (only each job's latest complete attempt is summarised).

    Returns:
        The paths of the CSV and the markdown file.
    """
    current = current_rows(rows)
    csv_path, md_path = table.with_name(CSV), table.with_name(MARKDOWN)
    _atomic_write(csv_path, csv_text(current))
    _atomic_write(md_path, markdown_text(current))
    return csv_path, md_path


__all__ = ["CSV", "CSV_COLUMNS", "MARKDOWN", "csv_text", "markdown_text", "write_summaries"]
