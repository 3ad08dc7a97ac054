"""Batch sweeps: for each target step of a run, score the raw checkpoint and its LAWA/EMA averages.

A *recipe* (YAML, or a :class:`Recipe` built in Python) names the trajectory, the target steps (a
:class:`~ckptavg.selection.Selection`), the variants and the eval spec. The sweep is a list of
*jobs*, one per (step, variant); a job fetches its checkpoints, averages them in memory and scores
the result with :func:`ckptavg.eval.score` (lm-eval tasks and/or a held-out loss). Jobs run one
after the other in this process (``executor="local"``) or as Ray tasks (``executor="ray"``), each
with its own resources.

Results go to ``OUT/results.jsonl``, an append-only table with one row per (trajectory, step,
variant, task, metric) and the job's provenance, written only by this process (the driver):

- a job's rows are appended in one write, then flushed and fsynced, and each row says how many
  rows its attempt has, so a job counts as finished only when all of them are there;
- a torn last line (a crash mid-write) is cut off on the next run;
- re-running resumes: finished jobs are skipped, failed ones (one row, ``status: failed``, with
  the error) are retried, a crash loses at most the jobs in flight.

``OUT/results.csv`` and ``OUT/results.md`` are regenerated from the table after every job.

Modules: :mod:`.recipe` (the dataclasses and YAML), :mod:`.plan` (jobs), :mod:`.table` (the JSONL
table), :mod:`.report` (CSV and markdown), :mod:`.executors` (local and Ray), :mod:`.plot` (PNG).

    >>> report = run_sweep("recipes/demo.yaml")                          # doctest: +SKIP
    >>> rows = load_results(report.table)                                # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .executors import EXECUTORS, ray_options, run_local, run_ray
from .plan import Job, evict_consumed, plan, resolve_eval
from .recipe import EvalSpec, RayOptions, Recipe, Variant, Variants, load_recipe
from .report import CSV, MARKDOWN, write_summaries
from .table import HELD_OUT, TABLE, ResultsTable, latest_attempts, load_results


@dataclass(frozen=True)
class SweepReport:
    """What a sweep did. ``failed``: (step, variant, error) of the jobs that failed in this run."""

    table: Path
    csv: Path
    markdown: Path
    jobs: int
    skipped: int
    ran: int
    failed: tuple[tuple[int, str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able values (paths as strings), as ``ckptavg sweep --json`` prints it.

        Returns:
            ``{"table", "csv", "markdown", "jobs", "skipped", "ran", "failed": [{"step", "variant", "error"}]}``.
        """
        return {"table": str(self.table), "csv": str(self.csv), "markdown": str(self.markdown), "jobs": self.jobs,
                "skipped": self.skipped, "ran": self.ran,
                "failed": [{"step": s, "variant": v, "error": e} for s, v, e in self.failed]}


def run_sweep(
    recipe: Recipe | str | os.PathLike[str] | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    executor: str = "local",
    address: str | None = None,
    progress: bool = True,
) -> SweepReport:
    """Run (or resume) a sweep: every (target step, variant) job not finished in the table.

    Args:
        recipe: a :class:`Recipe`, a YAML recipe file, or its content as a mapping.
        out: write the table here instead of the recipe's ``output`` folder.
        executor: ``local`` (one job after the other, here) or ``ray`` (a Ray task per job).
        address: ``ray`` only: the cluster to join (``auto``: the one this machine belongs to);
            default: reuse a Ray session already initialised in this process, else start a local one.
        progress: a progress bar over jobs on stderr.

    Returns:
        A :class:`SweepReport`: paths of the table and its summaries, job counts, failures.

    Raises:
        UsageError: a bad recipe or executor; SelectionError: target steps that do not exist;
            also a table scored under another eval spec.
        MissingDependencyError: ``executor="ray"`` without Ray installed.
        CkptavgError: a trajectory that cannot be discovered, a table being written by another
            sweep. A failing *job* does not raise: it is recorded as failed and the sweep goes on.

    Example:
        >>> r = run_sweep("recipes/demo.yaml")                  # doctest: +SKIP
        >>> r.ran, r.failed                                      # doctest: +SKIP
    """
    from ..sources import canonical, discover

    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise UsageError("--address applies to --executor ray only")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if out is not None:
        rec = replace(rec, output=str(out))
    spec = resolve_eval(rec.eval)
    traj = discover(canonical(rec.trajectory), step_pattern=rec.step_pattern)
    jobs = plan(rec, traj)
    if any(j.variant.exclude_anomalies for j in jobs):  # their inputs: the window without flagged steps
        from ..stability import anomalous_steps

        flagged = anomalous_steps(traj, sorted({c.step for j in jobs for c in j.inputs}), progress=progress)[0]
        jobs = [replace(j, inputs=j.inputs.where(lambda c: c.step not in flagged)) if j.variant.exclude_anomalies
                else j for j in jobs]
    table = ResultsTable(Path(rec.output).resolve() / TABLE)
    try:
        table.check_protocol(spec)
        latest = latest_attempts(table.rows)
        todo = [j for j in jobs if (latest.get(j.key) or [{}])[0].get("status") != "ok"]
        failed: list[tuple[int, str, str]] = []
        unfinished = {j.key: j for j in todo}
        evicted: set[int] = set()

        def on_result(job: Job, rows: list[dict[str, Any]]) -> None:
            table.append(rows)
            if rows[0]["status"] != "ok":
                failed.append((job.step, job.variant.name, rows[0]["error"]))
            unfinished.pop(job.key, None)
            write_summaries(table.path, table.rows)
            if rec.evict:
                evict_consumed(job, unfinished.values(), evicted)

        if todo:
            if executor == "ray":
                run_ray(todo, spec, on_result, progress, ray_options(rec), address)
            else:
                run_local(todo, spec, on_result, progress)
        csv_path, md_path = write_summaries(table.path, table.rows)
    finally:
        table.close()
    return SweepReport(table.path, csv_path, md_path, len(jobs), len(jobs) - len(todo), len(todo), tuple(failed))


__all__ = ["CSV", "EXECUTORS", "HELD_OUT", "MARKDOWN", "TABLE", "EvalSpec", "Job", "RayOptions", "Recipe",
           "SweepReport", "Variant", "Variants", "load_recipe", "load_results", "plan", "ray_options", "run_sweep"]
