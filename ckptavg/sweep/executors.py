"""Running a sweep's jobs: one job (fetch → average in memory → score → table rows), and the two
executors that run many — here one after the other (``local``), or as Ray tasks (``ray``).

A job never raises for its own failure: the error becomes one ``status: failed`` row and the sweep
goes on. What a job writes to Python's stderr (lm-eval's and transformers' progress bars and log
lines, repeated at every job) is captured so the sweep's own bar stays readable; a failed job's
row keeps the tail of it in ``provenance.log``.
"""

from __future__ import annotations

import contextlib
import io
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._version import __version__
from ..errors import CkptavgError, MissingDependencyError
from ..selection import Selection
from .plan import Job, ResolvedEval
from .recipe import Recipe
from .table import HELD_OUT

EXECUTORS = ("local", "ray")
LOG_TAIL = 4000  # characters of a failed job's stderr (and traceback) kept in its row

ResultFn = Callable[[Job, list[dict[str, Any]]], None]


# A job's rows --------------------------------------------------------------------------------
def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def metric_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per task metric of a :func:`ckptavg.eval.score` result (stderr and lm-eval's
    bookkeeping keys dropped), plus the held-out loss and perplexity.

    Args:
        result: what ``score`` returned.

    Returns:
        Rows with ``task``, ``metric``, ``value``, ``stderr``, ``samples``, ``higher_is_better``.
    """
    rows = []
    hib = result.get("higher_is_better") or {}
    for task, metrics in (result.get("results") or {}).items():
        samples = ((result.get("n-samples") or {}).get(task) or {}).get("effective")
        for k, value in metrics.items():
            metric, _, flt = k.partition(",")
            if not flt or metric.endswith("_stderr") or _number(value) is None:
                continue
            name = metric if flt == "none" else f"{metric},{flt}"
            better = (hib.get(task) or {}).get(metric)
            rows.append({"task": task, "metric": name, "value": float(value),
                         "stderr": _number(metrics.get(f"{metric}_stderr,{flt}")), "samples": samples,
                         "higher_is_better": better if isinstance(better, bool) else None})
    if held := result.get("held_out"):
        for metric in ("loss", "perplexity"):
            rows.append({"task": HELD_OUT, "metric": metric, "value": float(held[metric]), "stderr": None,
                         "samples": held["predicted_tokens"], "higher_is_better": False})
    return rows


def one_line(e: BaseException) -> str:
    """What the table's ``error`` column and the CLI show of an exception.

    Args:
        e: the exception.

    Returns:
        ``Type: first line of its message`` (``Type`` alone when it has none).
    """
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def job_rows(job: Job, spec: ResolvedEval, executor: str, metrics: list[dict[str, Any]],
             error: BaseException | None, extra: Mapping[str, Any], seconds: float) -> list[dict[str, Any]]:
    """The table rows of one attempt at ``job``: one per metric, or one ``failed`` row.

    Args:
        job: the job.
        spec: the eval spec it was scored with.
        executor: ``local`` or ``ray`` (provenance).
        metrics: :func:`metric_rows` of the result (empty when it failed).
        error: why it failed, or None.
        extra: more provenance (inputs, model, timings; ``log`` of a failed job).
        seconds: the job's wall time.

    Returns:
        Rows sharing one ``attempt`` id, each saying how many rows the attempt has.
    """
    attempt = uuid.uuid4().hex[:16]
    provenance = {"ckptavg": __version__, "executor": executor, "host": socket.gethostname(),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 3),
                  "method": job.variant.method, "window": job.variant.window, "half_life": job.variant.half_life,
                  **({"schedule": job.variant.schedule} if job.variant.schedule else {}),
                  "eval": dict(spec.protocol) | {"device": spec.device, "batch_size": spec.batch_size,
                                                  "text": spec.text, "include_path": list(spec.include_path)},
                  **extra}
    base = {"trajectory": job.trajectory, "step": job.step, "variant": job.variant.name}
    if error is not None:
        provenance["traceback"] = "".join(traceback.format_exception(error))[-LOG_TAIL:]
        return [base | {"task": None, "metric": None, "value": None, "stderr": None, "samples": None,
                        "higher_is_better": None, "status": "failed", "error": one_line(error),
                        "attempt": attempt, "job_rows": 1, "protocol": spec.protocol_id, "provenance": provenance}]
    return [base | m | {"status": "ok", "error": None, "attempt": attempt, "job_rows": len(metrics),
                        "protocol": spec.protocol_id, "provenance": provenance} for m in metrics]


def run_job(job: Job, spec: ResolvedEval, executor: str = "local") -> list[dict[str, Any]]:
    """Fetch → average in memory → score one job with :func:`ckptavg.eval.score`.

    Args:
        job: what to score.
        spec: how.
        executor: recorded in the rows' provenance.

    Returns:
        The job's table rows. A failing job does not raise: its error becomes one ``failed`` row
        (KeyboardInterrupt still stops the caller).
    """
    from .. import eval as evaluate  # the module, not the function: tests and users may patch score

    t0 = time.perf_counter()
    v = job.variant
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            result = evaluate.score(
                job.inputs, list(spec.tasks) or None, include_path=list(spec.include_path), limit=spec.limit,
                batch_size=spec.batch_size, device=spec.device, dtype=spec.dtype,
                selection=Selection(window=None if v.exclude_anomalies else v.window), method=v.method, half_life=v.half_life, schedule=v.schedule,
                text=spec.text,
                seq_len=spec.seq_len, offline=spec.offline, progress=False,
            )
        metrics = metric_rows(result)
        if not metrics:
            raise CkptavgError("scoring returned no metrics")
        prov = result.get("ckptavg") or {}
        record = prov.get("weights") or {}
        extra = {"inputs": [{k: i[k] for k in ("step", "weight", "commit", "location") if k in i}
                            for i in record.get("inputs", [])],
                 "model": prov.get("model"), "timings": prov.get("seconds")}
        return job_rows(job, spec, executor, metrics, None, extra, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 — any failure of one job is recorded, and the sweep goes on
        tail = log.getvalue()[-LOG_TAIL:]
        return job_rows(job, spec, executor, [], e, {"log": tail} if tail else {}, time.perf_counter() - t0)


# Executors -----------------------------------------------------------------------------------
def run_local(jobs: Sequence[Job], spec: ResolvedEval, on_result: ResultFn, progress: bool) -> None:
    """Run ``jobs`` one after the other in this process, handing each one's rows to ``on_result``.

    Args:
        jobs: the jobs to run.
        spec: their eval spec.
        on_result: called with (job, rows) as each finishes (the driver writes the table).
        progress: a bar over jobs on stderr.
    """
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc="sweep", unit="job", disable=not progress) as bar:
        for job in jobs:
            bar.set_postfix_str(f"step {job.step} {job.variant.name}")
            on_result(job, run_job(job, spec, "local"))
            bar.update()


def ray_options(recipe: Recipe) -> dict[str, Any]:
    """Each job's Ray resources.

    Args:
        recipe: the sweep.

    Returns:
        ``ray.remote`` options: ``num_cpus``, ``num_gpus`` (1 when the eval device is CUDA,
        unless set) and ``memory`` in bytes when ``ray.memory_gb`` is set.
    """
    r = recipe.ray
    gpus = r.num_gpus if r.num_gpus is not None else (1 if recipe.eval.device.startswith("cuda") else 0)
    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": gpus}
    if r.memory_gb:
        opts["memory"] = int(r.memory_gb * 2**30)
    return opts


def run_ray(jobs: Sequence[Job], spec: ResolvedEval, on_result: ResultFn, progress: bool,
            options: Mapping[str, Any], address: str | None) -> None:
    """Run ``jobs`` as Ray tasks, handing each one's rows to ``on_result`` as it finishes.

    Args:
        jobs: the jobs to run.
        spec: their eval spec.
        on_result: called with (job, rows) here, in the driver, as each finishes.
        progress: a bar over jobs on stderr.
        options: each task's resources (:func:`ray_options`).
        address: the cluster to join; None: reuse this process's Ray session, else start a local one.

    Raises:
        MissingDependencyError: Ray is not installed (names the ``ray`` extra).
        CkptavgError: the cluster at ``address`` cannot be reached.
    """
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("--executor ray needs Ray: pip install 'ckptavg[ray]'") from None
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address)
        except ConnectionError as e:
            raise CkptavgError(f"cannot reach a Ray cluster at {address!r}: {one_line(e)}") from None
    try:
        remote = ray.remote(run_job).options(**options)
        pending = {remote.remote(job, spec, "ray"): job for job in jobs}
        try:
            with tqdm(total=len(jobs), desc="sweep (ray)", unit="job", disable=not progress) as bar:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        job = pending.pop(ref)
                        try:
                            rows = ray.get(ref)
                        except Exception as e:  # noqa: BLE001 — the worker died, or Ray could not run the task
                            rows = job_rows(job, spec, "ray", [], e, {}, 0.0)
                        on_result(job, rows)
                        bar.update()
        finally:
            for ref in pending:  # interrupted: the cluster should not go on computing unrecorded jobs
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


__all__ = ["EXECUTORS", "job_rows", "metric_rows", "one_line", "ray_options", "run_job", "run_local", "run_ray"]
