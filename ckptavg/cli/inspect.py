"""``ckptavg inspect``: norms, update sizes and anomalies along a run (:mod:`ckptavg.stability`),
and the table people read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from .options import friendly_errors, output_options, selection_from, selection_options, trajectory_options

if TYPE_CHECKING:
    from ..stability import Report
    from ..trajectory import Trajectory

SHOWN_ANOMALIES = 40  # the human table lists this many; --json has them all


def _num(x: float | None, fmt: str) -> str:
    return format("-", f">{fmt.split('.')[0]}") if x is None else format(x, fmt)


def inspect_report(report: Report, *, groups: bool = False) -> str:
    """The human table: one row per checkpoint (whole-model figures and its flags), optionally the
    relative update of each layer group, then the anomalies."""
    counts: dict[int, dict[str, int]] = {}
    for a in report.anomalies:
        counts.setdefault(a.step, {}).setdefault(a.kind, 0)
        counts[a.step][a.kind] += 1
    excluded = report.flagged()
    names = [g for g in ("qkv", "attn_out", "mlp_in", "mlp_out", "embed", "norm", "other")
             if groups and any(g in c.groups for c in report.checkpoints)]
    head = f"{'step':>10}  {'weight norm':>12}  {'update norm':>12}  {'rel. upd/step':>13}"
    head += "".join(f"  {g:>9}" for g in names) + "  flags"
    lines = [f"{report.trajectory or 'run'}: {len(report.checkpoints)} checkpoints; anomaly rule: robust z over the "
             f"previous {report.window}, z > {report.threshold:g}; norm growth ≥ {report.growth:g}×", head]
    for c in report.checkpoints:
        m = c.model
        row = f"{c.step:>10}  {_num(m.weight_norm, '12.4f')}  {_num(m.update_norm, '12.4g')}  {_num(m.relative_update, '13.3e')}"
        row += "".join(f"  {_num(c.groups[g].relative_update if g in c.groups else None, '9.2e')}" for g in names)
        flags = ", ".join(f"{kind} ×{n}" for kind, n in sorted(counts.get(c.step, {}).items()))
        lines.append(row + (f"  {flags}" if flags else "") + ("  [excluded by --exclude-anomalies]"
                                                             if c.step in excluded else ""))
    if not report.anomalies:
        lines.append("no anomalies")
        return "\n".join(lines)
    lines.append(f"{len(report.anomalies)} anomalies:")
    for a in report.anomalies[:SHOWN_ANOMALIES]:
        what = "(whole model)" if a.tensor is None else f"(layer group {a.tensor[6:]})" if a.tensor.startswith(
            "group:") and a.kind == "norm_growth" else a.tensor
        score = f"{a.score:.0f} NaN/Inf" if a.kind == "non_finite" else (
            f"×{a.score:.2f}" if a.kind == "norm_growth" else f"z = {a.score:.1f}")
        lines.append(f"  step {a.step:>10}  {a.kind:<12}  {score:<12}  {what}")
    if len(report.anomalies) > SHOWN_ANOMALIES:
        lines.append(f"  … and {len(report.anomalies) - SHOWN_ANOMALIES} more (--json lists them all)")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("path")
@selection_options
@trajectory_options
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Workers reading chunks [default: the CPUs this process may use]; same figures for any number.")
@click.option("--anomaly-window", "anomaly_window", type=click.IntRange(min=2), default=8, show_default=True,
              help="Checkpoints of history each update is judged against (median and MAD).")
@click.option("--threshold", type=click.FloatRange(min=0, min_open=True), default=6.0, show_default=True,
              help="Robust z above which an update is a spike.")
@click.option("--groups", is_flag=True, help="Also show the relative update of each layer group.")
@click.option("--plot", "png", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw norms and update sizes per layer group to this PNG, anomalies marked.")
@output_options
@friendly_errors
def inspect_cmd(path: str, step_pattern: str | None, key: str | None, allow_duplicates: bool, threads: int | None,
                anomaly_window: int, threshold: float, groups: bool, png: Path | None, quiet: bool, as_json: bool,
                **kw: Any) -> None:
    """Training-stability diagnostics of the run at PATH (a folder or hf://org/name), in one
    streaming pass: per checkpoint and tensor the weight norm, the update norm from the previous
    checkpoint and the relative update per step, per layer group and for the whole model; then
    anomalies: update spikes (robust z against the previous --anomaly-window checkpoints), NaN/Inf,
    sustained norm growth. merge/series --exclude-anomalies leave out the checkpoints where the
    whole model spiked or a tensor holds NaN/Inf.

    \b
    Examples:
      ckptavg inspect runs/pythia-tiny
      ckptavg inspect runs/pythia-tiny --from 1000 --json > anomalies.json
      ckptavg inspect runs/pythia-tiny --plot stability.png --groups
    """
    from ..sources import discover
    from ..stability import inspect, plot

    selection = selection_from(kw)
    traj = discover(path, step_pattern=step_pattern, key=key)
    report = inspect(traj, selection, threads=threads, window=anomaly_window, threshold=threshold,
                     allow_duplicates=allow_duplicates, progress=not quiet and not as_json)
    if png is not None:
        plot(report, png)
    if as_json:
        click.echo(json.dumps(report.to_dict() | ({"png": str(png)} if png else {}), indent=2))
        return
    click.echo(inspect_report(report, groups=groups))
    if png is not None:
        click.echo(f"wrote {png}")


def merge_exclusions(traj: Trajectory, sel: Trajectory, kw: dict[str, Any], dry_run: bool,
                     progress: bool) -> tuple[Trajectory, dict[str, Any]]:
    """merge --exclude-anomalies/--anomalies (popped from ``kw``): the selection ``sel`` of ``traj``
    without the flagged steps, and the record ``ckptavg.json`` keeps of them ({} when not asked)."""
    drop, report = kw.pop("exclude_anomalies"), kw.pop("anomalies")
    if not drop and report is None:
        return sel, {}
    if dry_run and report is None:
        raise UsageError("--dry-run reads no tensor data, but --exclude-anomalies inspects the checkpoints; "
                         "pass a saved report instead (--anomalies FILE from ckptavg inspect --json)")
    from ..stability import without_anomalies

    kept, record = without_anomalies(traj, list(sel), report, threads=kw["threads"], progress=progress,
                                     allow_duplicates=kw["allow_duplicates"])
    steps = {c.step for c in kept}
    return sel.where(lambda c: c.step in steps), record


__all__ = ["inspect_cmd", "inspect_report", "merge_exclusions"]
