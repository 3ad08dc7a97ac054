"""Batch sweeps: for each target step of a run, score the raw checkpoint and its LAWA/EMA averages.

A *recipe* (YAML, or a :class:`Recipe` built in Python) names the trajectory, the target steps,
the variants and the eval spec. The sweep is a list of *jobs*, one per (step, variant); a job
fetches its checkpoints, averages them in memory and scores the result with
:func:`ckptavg.score` (lm-eval tasks and/or a held-out loss). Jobs run one after the other in this
process (``executor="local"``) or as Ray tasks (``executor="ray"``), each with its own resources.

Results go to ``OUT/results.jsonl``, an append-only table with one row per (trajectory, step,
variant, task, metric) and the job's provenance, written only by this process (the driver):

- a job's rows are appended in one write, then flushed and fsynced, and each row says how many
  rows its attempt has, so a job counts as finished only when all of them are there;
- a torn last line (a crash mid-write) is cut off on the next run;
- re-running resumes: finished jobs are skipped, failed ones (one row, ``status: failed``, with
  the error) are retried, a crash loses at most the jobs in flight.

``OUT/results.csv`` and ``OUT/results.md`` are regenerated from the table after every job.

    >>> report = run_sweep("recipes/demo.yaml")                          # doctest: +SKIP
    >>> rows = load_results(report.table)                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import hashlib
import io
import json
import math
import os
import socket
import time
import traceback
import types
import typing
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import CkptavgError
from ..selection import Selection

if TYPE_CHECKING:
    from ..trajectory import Trajectory

TABLE = "results.jsonl"
CSV = "results.csv"
MARKDOWN = "results.md"
EXECUTORS = ("local", "ray")
HELD_OUT = "held_out"  # the task name of the held-out loss rows


# The recipe ----------------------------------------------------------------------------------
# One frozen value per section; every default lives here. Checks that need no file run in
# __post_init__, so a Recipe built in Python is validated exactly like one read from YAML.
@dataclass(frozen=True)
class Steps:
    """Target steps: the checkpoints with ``start <= step <= stop`` whose distance from ``start``
    (from 0 when ``start`` is not set) is a multiple of ``spacing`` (training steps, not
    checkpoints); or ``exact`` steps, each of which must exist. Default: every checkpoint."""

    start: int | None = None
    stop: int | None = None
    spacing: int | None = None
    exact: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.spacing is not None and self.spacing < 1:
            raise CkptavgError(f"steps.spacing must be at least 1, got {self.spacing}")
        if self.exact is not None and any(x is not None for x in (self.start, self.stop, self.spacing)):
            raise CkptavgError("give target steps either as a list or as start/stop/spacing, not both")
        if self.exact is not None and not self.exact:
            raise CkptavgError("the list of target steps is empty")


@dataclass(frozen=True)
class Variants:
    """What to score at each target: the raw checkpoint, LAWA windows (uniform average of the
    latest k checkpoints), EMAs with these half-lives in training steps over the latest
    ``ema_window`` checkpoints (``None``: every checkpoint up to the target)."""

    raw: bool = True
    uniform: tuple[int, ...] = ()
    ema_half_life: tuple[float, ...] = ()
    ema_window: int | None = None

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.uniform):
            raise CkptavgError(f"variants.uniform: windows must be at least 1, got {list(self.uniform)}")
        if any(not h > 0 for h in self.ema_half_life):
            raise CkptavgError(f"variants.ema_half_life: half-lives must be positive, got {list(self.ema_half_life)}")
        if self.ema_window is not None and self.ema_window < 1:
            raise CkptavgError(f"variants.ema_window must be at least 1, got {self.ema_window}")
        if not (self.raw or self.uniform or self.ema_half_life):
            raise CkptavgError("no variants to score: set raw: true, uniform: [k, …] or ema_half_life: [h, …]")

    def expand(self) -> list[Variant]:
        """The variants in table order: raw, uniform by k, EMA by half-life."""
        out = [Variant("raw")] if self.raw else []
        out += [Variant(f"uniform{k}", "uniform", k) for k in sorted(set(self.uniform))]
        w = self.ema_window
        out += [Variant(f"ema-h{h:g}" + (f"-w{w}" if w else ""), "ema", w, h) for h in sorted(set(self.ema_half_life))]
        return out


@dataclass(frozen=True)
class EvalSpec:
    """How every job is scored; the arguments of :func:`ckptavg.score` of the same names."""

    tasks: tuple[str, ...] = ()
    include_path: tuple[str, ...] = ()
    text: str | None = None
    seq_len: int | None = None
    limit: float | None = None
    batch_size: int | str = 1
    device: str = "cpu"
    dtype: str = "auto"
    offline: bool = False

    def __post_init__(self) -> None:
        if not self.tasks and self.text is None:
            raise CkptavgError("nothing to score: set eval.tasks (e.g. [ckptavg_basics]) and/or eval.text")
        if self.limit is not None and not self.limit > 0:
            raise CkptavgError(f"eval.limit must be positive, got {self.limit}")
        if isinstance(self.batch_size, str) and self.batch_size != "auto" and not self.batch_size.isdigit():
            raise CkptavgError(f"eval.batch_size must be an integer or 'auto', got {self.batch_size!r}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise CkptavgError(f"eval.batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class RayOptions:
    """Resources of each job as a Ray task. ``num_gpus`` defaults to 1 when ``eval.device`` is
    CUDA, else 0; ``memory_gb`` (RAM reserved per job) is unset by default."""

    num_cpus: float = 1
    num_gpus: float | None = None
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus", "memory_gb"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise CkptavgError(f"ray.{name} must not be negative, got {v}")


@dataclass(frozen=True)
class Recipe:
    """A sweep: trajectory × target steps × variants, scored with one eval spec, into ``output``.

    Relative paths (a local trajectory, ``output``, ``eval.text``, ``eval.include_path``) are
    relative to the working directory, like every path on the command line.

    Example:
        >>> Recipe("runs/tiny", "sweeps/tiny", EvalSpec(tasks=("ckptavg_basics",), limit=50),
        ...        variants=Variants(uniform=(5,))).variants.expand()[1].name
        'uniform5'
    """

    trajectory: str
    output: str
    eval: EvalSpec
    steps: Steps = field(default_factory=Steps)
    variants: Variants = field(default_factory=Variants)
    ray: RayOptions = field(default_factory=RayOptions)
    step_pattern: str | None = None
    evict: bool = False

    def __post_init__(self) -> None:
        if not str(self.trajectory).strip():
            raise CkptavgError("trajectory must name a run folder or an hf://org/name repo")
        if not str(self.output).strip():
            raise CkptavgError("output must name a folder for the results table")


@dataclass(frozen=True)
class Variant:
    """One thing scored at each target: ``method`` over the latest ``window`` checkpoints up to
    the target (``None``: all of them). ``raw`` is the window of one."""

    name: str
    method: str = "uniform"
    window: int | None = 1
    half_life: float | None = None


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return f"a list of {_type_name(args[0]).split(' ', 1)[-1]}s"
    if tp is Steps:
        return "a mapping (start, stop, spacing) or a list of steps"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys to values"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed YAML) as type ``tp``; CkptavgError naming ``where`` when it is not one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            with contextlib.suppress(CkptavgError):
                return _coerce(a, value, where)
    elif origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    elif dataclasses.is_dataclass(tp):
        if tp is Steps and isinstance(value, list):
            return Steps(exact=_coerce(tuple[int, ...], value, where))
        if isinstance(value, Mapping):
            return _build(tp, value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise CkptavgError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, where: str = "") -> Any:
    label = where or "the recipe"
    if not isinstance(data, Mapping):
        raise CkptavgError(f"{label} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise CkptavgError(f"unknown key {path!r}; {hint}(known in {label}: {', '.join(known)})")
        kwargs[key] = _coerce(hints[key], value, path)
    required = [f.name for f in fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in kwargs:
            raise CkptavgError(f"missing key {(f'{where}.' if where else '') + name!r}")
    return cls(**kwargs)


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> Recipe:
    """Read a sweep recipe.

    Args:
        source: a YAML file, or the same content as a mapping.

    Returns:
        The frozen :class:`Recipe` (defaults filled in from the dataclasses).

    Raises:
        CkptavgError: unreadable file or YAML, an unknown key (with "did you mean …?"), a value of
            the wrong type, a missing ``trajectory``/``output``, values out of range — one line
            naming the file and the key.

    Example:
        >>> load_recipe({"trajectory": "runs/tiny", "output": "sweeps/tiny", "eval": {"tasks": ["piqa"]},
        ...              "variants": {"uniform": [5]}}).variants.uniform
        (5,)
    """
    if isinstance(source, Mapping):
        data, name = source, "recipe"
    else:
        import yaml

        path = Path(source)
        name = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CkptavgError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            raise CkptavgError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    try:
        return _build(Recipe, data if data is not None else {})
    except CkptavgError as e:
        raise CkptavgError(f"{name}: {e}") from None


# Jobs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Eval:
    """The eval spec with paths made absolute (Ray workers have their own working directory)
    and the fingerprint of what decides the scores."""

    tasks: tuple[str, ...]
    include_path: tuple[str, ...]
    text: str | None
    seq_len: int | None
    limit: int | float | None
    batch_size: int | str
    device: str
    dtype: str
    offline: bool
    protocol: Mapping[str, Any]  # tasks, limit, seq_len, dtype, the held-out text's sha256
    protocol_id: str


def _resolve_eval(spec: EvalSpec) -> _Eval:
    text = str(Path(spec.text).resolve()) if spec.text is not None else None
    text_sha = None
    if text is not None:
        try:
            text_sha = hashlib.sha256(Path(text).read_bytes()).hexdigest()
        except OSError as e:
            raise CkptavgError(f"{spec.text}: cannot read eval.text ({e.strerror or e})") from None
    for p in spec.include_path:
        if not Path(p).is_dir():
            raise CkptavgError(f"{p}: eval.include_path must be a folder of task YAMLs")
    limit: int | float | None = spec.limit
    if isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)
    batch: int | str = int(spec.batch_size) if isinstance(spec.batch_size, str) and spec.batch_size.isdigit() else spec.batch_size
    protocol = {"tasks": list(spec.tasks), "limit": limit, "seq_len": spec.seq_len, "dtype": spec.dtype,
                "text_sha256": text_sha}
    pid = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    return _Eval(tuple(spec.tasks), tuple(str(Path(p).resolve()) for p in spec.include_path), text, spec.seq_len,
                 limit, batch, spec.device, spec.dtype, spec.offline, protocol, pid)


@dataclass(frozen=True)
class Job:
    """Score ``variant`` at ``step``: ``inputs`` are the checkpoints it may draw on (the latest
    ``window`` up to the step, or fewer when the run has fewer: the job then fails, saying so)."""

    trajectory: str  # the table's key: hf://org/name, or the run folder's absolute path
    step: int
    variant: Variant
    inputs: Trajectory

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.trajectory, self.step, self.variant.name)


def _targets(traj: Trajectory, steps: Steps) -> list[int]:
    if steps.exact is not None:
        for s in steps.exact:
            traj.at(s)
        return sorted(set(steps.exact))
    origin = steps.start if steps.start is not None else 0
    out = [s for s in traj.steps
           if (steps.start is None or s >= steps.start) and (steps.stop is None or s <= steps.stop)
           and (steps.spacing is None or (s - origin) % steps.spacing == 0)]
    if not out:
        raise CkptavgError(f"{traj.root or traj.name}: no checkpoint matches the target steps "
                           f"(the run has steps {traj.steps[0]}..{traj.steps[-1]})")
    return out


def plan(recipe: Recipe, traj: Trajectory) -> list[Job]:
    """The sweep's jobs in step order (then variant order), each with the checkpoints it needs."""
    key = traj.root if str(traj.root).startswith("hf://") else str(Path(traj.root).resolve())
    jobs = []
    for s in _targets(traj, recipe.steps):
        upto = traj.between(None, s)
        for v in recipe.variants.expand():
            inputs = upto[-v.window:] if v.window and len(upto) >= v.window else upto
            jobs.append(Job(key, s, v, inputs))
    return jobs


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _metric_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per task metric (stderr and lm-eval's bookkeeping keys dropped), plus held-out loss
    and perplexity."""
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


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _rows(job: Job, spec: _Eval, executor: str, metrics: list[dict[str, Any]], error: BaseException | None,
          extra: Mapping[str, Any], seconds: float) -> list[dict[str, Any]]:
    attempt = uuid.uuid4().hex[:16]
    provenance = {"ckptavg": __version__, "executor": executor, "host": socket.gethostname(),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 3),
                  "method": job.variant.method, "window": job.variant.window, "half_life": job.variant.half_life,
                  "eval": dict(spec.protocol) | {"device": spec.device, "batch_size": spec.batch_size,
                                                  "text": spec.text, "include_path": list(spec.include_path)},
                  **extra}
    base = {"trajectory": job.trajectory, "step": job.step, "variant": job.variant.name}
    if error is not None:
        provenance["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        return [base | {"task": None, "metric": None, "value": None, "stderr": None, "samples": None,
                        "higher_is_better": None, "status": "failed", "error": _one_line(error),
                        "attempt": attempt, "job_rows": 1, "protocol": spec.protocol_id, "provenance": provenance}]
    return [base | m | {"status": "ok", "error": None, "attempt": attempt, "job_rows": len(metrics),
                        "protocol": spec.protocol_id, "provenance": provenance} for m in metrics]


def _run_job(job: Job, spec: _Eval, executor: str = "local") -> list[dict[str, Any]]:
    """Fetch → average in memory → score one job; its table rows. Never raises for a failing job:
    the error becomes one ``status: failed`` row (KeyboardInterrupt still stops the caller)."""
    from .. import eval as evaluate

    t0 = time.perf_counter()
    v = job.variant
    try:
        result = evaluate.score(
            job.inputs, list(spec.tasks) or None, include_path=list(spec.include_path), limit=spec.limit,
            batch_size=spec.batch_size, device=spec.device, dtype=spec.dtype, selection=Selection(window=v.window),
            method=v.method, half_life=v.half_life, text=spec.text, seq_len=spec.seq_len, offline=spec.offline,
            progress=False,
        )
        metrics = _metric_rows(result)
        if not metrics:
            raise CkptavgError("scoring returned no metrics")
        prov = result.get("ckptavg") or {}
        record = prov.get("weights") or {}
        extra = {"inputs": [{k: i[k] for k in ("step", "weight", "commit", "location") if k in i}
                            for i in record.get("inputs", [])],
                 "model": prov.get("model"), "timings": prov.get("seconds")}
        return _rows(job, spec, executor, metrics, None, extra, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 — any failure of one job is recorded, and the sweep goes on
        return _rows(job, spec, executor, [], e, {}, time.perf_counter() - t0)


# The table -----------------------------------------------------------------------------------
def _table_path(results: str | os.PathLike[str]) -> Path:
    p = Path(results)
    return p / TABLE if p.is_dir() else p


def _read_table(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of every complete line, and the byte length of the complete lines (a last line
    without its newline is torn: a crash mid-write)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    rows = []
    good = data.rfind(b"\n") + 1
    for lineno, line in enumerate(data[:good].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CkptavgError(f"{path}:{lineno}: not a JSON row (the table is append-only; only a torn last "
                               "line is expected after a crash)") from None
        if not isinstance(row, dict) or "attempt" not in row or "job_rows" not in row:
            raise CkptavgError(f"{path}:{lineno}: not a ckptavg sweep row")
        rows.append(row)
    return rows, good


def _latest(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    """Job key → the rows of its latest complete attempt (all ``job_rows`` rows present)."""
    by_attempt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_attempt.setdefault(r["attempt"], []).append(dict(r))
    latest: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for group in by_attempt.values():  # dicts keep insertion order: later attempts come later
        if len(group) == group[0]["job_rows"]:
            r = group[0]
            latest[(r["trajectory"], r["step"], r["variant"])] = group
    return latest


def load_results(results: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The current rows of a sweep's table: for each (trajectory, step, variant), the rows of its
    latest complete attempt (``status`` ``ok``: one per task metric; ``failed``: one, with
    ``error``). Incomplete attempts and a torn last line are ignored.

    Args:
        results: a sweep's output folder or its ``results.jsonl``.

    Example:
        >>> import pandas as pd                                            # doctest: +SKIP
        >>> df = pd.DataFrame(load_results("sweeps/tiny"))                 # doctest: +SKIP
    """
    path = _table_path(results)
    if not path.is_file():
        raise CkptavgError(f"{path}: no results table here (a sweep writes {TABLE} into its output folder)")
    return _flatten(_latest(_read_table(path)[0]))


def _variant_order(name: str) -> tuple[int, float, str]:
    if name == "raw":
        return (0, 0.0, name)
    for rank, prefix in ((1, "uniform"), (2, "ema-h")):
        if name.startswith(prefix):
            num = name[len(prefix):].split("-")[0]
            with contextlib.suppress(ValueError):
                return (rank, float(num), name)
    return (3, 0.0, name)


def _flatten(latest: Mapping[tuple[str, int, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    keys = sorted(latest, key=lambda k: (k[0], k[1], _variant_order(k[2])))
    return [r for k in keys for r in latest[k]]


class _Table:
    """The append-only JSONL table, locked for this process while a sweep writes it."""

    def __init__(self, path: Path) -> None:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CkptavgError(f"{path}: another sweep is writing this table; wait for it or use another output folder") from None
        try:
            self.rows, good = _read_table(path)
            size = os.fstat(self.fd).st_size
            if good < size:
                warnings.warn(f"{path}: dropped a torn last line ({size - good} bytes) left by an interrupted run",
                              stacklevel=3)
                os.ftruncate(self.fd, good)
                os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        self.rows.extend(dict(r) for r in rows)

    def close(self) -> None:
        os.close(self.fd)


# Summaries -----------------------------------------------------------------------------------
_CSV_COLUMNS = ("trajectory", "step", "variant", "task", "metric", "value", "stderr", "samples",
                "higher_is_better", "status", "error")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # one writer: the table is locked
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, _CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def _markdown_text(rows: Sequence[Mapping[str, Any]]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    jobs = {(r["trajectory"], r["step"], r["variant"]) for r in rows}
    lines = ["# Sweep results", "",
             f"{len(jobs)} jobs ({len(jobs) - len(failed)} ok, {len(failed)} failed), {len(ok)} metric rows; "
             f"regenerated from `{TABLE}` after every job.", ""]
    for traj in sorted({r["trajectory"] for r in ok}):
        mine = [r for r in ok if r["trajectory"] == traj]
        for task, metric in sorted({(r["task"], r["metric"]) for r in mine}, key=lambda t: (t[0] == HELD_OUT, t)):
            cell = [r for r in mine if (r["task"], r["metric"]) == (task, metric)]
            variants = sorted({r["variant"] for r in cell}, key=_variant_order)
            value = {(r["step"], r["variant"]): r["value"] for r in cell}
            better = cell[0].get("higher_is_better")
            arrow = " (higher is better)" if better is True else " (lower is better)" if better is False else ""
            lines += [f"## {task} · {metric}{arrow}", "", f"`{traj}`", "",
                      "| step | " + " | ".join(variants) + " |", "| ---: |" + " ---: |" * len(variants)]
            for s in sorted({r["step"] for r in cell}):
                vals = [value.get((s, v)) for v in variants]
                present = [x for x in vals if x is not None]
                best = (max(present) if better else min(present)) if present and better is not None else None
                shown = [f"**{_fmt(x)}**" if x is not None and x == best and len(present) > 1 else _fmt(x) for x in vals]
                lines.append(f"| {s} | " + " | ".join(shown) + " |")
            if "raw" in variants and better is not None:
                lines.append("")
                for v in variants[1:]:
                    pairs = [(value[(s, v)], value[(s, "raw")]) for s in sorted({r["step"] for r in cell})
                             if (s, v) in value and (s, "raw") in value]
                    if pairs:
                        wins = sum((a > b) if better else (a < b) for a, b in pairs)
                        diff = math.fsum(a - b for a, b in pairs) / len(pairs)
                        lines.append(f"- {v} beats raw at {wins} of {len(pairs)} steps; mean difference {diff:+.4f}")
            lines.append("")
    if failed:
        lines += ["## Failed jobs (re-run the sweep to retry them)", "", "| trajectory | step | variant | error |",
                  "| --- | ---: | --- | --- |"]
        for r in failed:
            err = str(r["error"]).replace("|", "\\|")
            lines.append(f"| `{r['trajectory']}` | {r['step']} | {r['variant']} | {err} |")
        lines.append("")
    return "\n".join(lines)


def _write_summaries(table: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    current = _flatten(_latest(rows))
    csv_path, md_path = table.with_name(CSV), table.with_name(MARKDOWN)
    _atomic_write(csv_path, _csv_text(current))
    _atomic_write(md_path, _markdown_text(current))
    return csv_path, md_path


# Executors -----------------------------------------------------------------------------------
ResultFn = Callable[[Job, list[dict[str, Any]]], None]


def _run_local(jobs: Sequence[Job], spec: _Eval, on_result: ResultFn, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc="sweep", unit="job", disable=not progress) as bar:
        for job in jobs:
            bar.set_postfix_str(f"step {job.step} {job.variant.name}")
            on_result(job, _run_job(job, spec, "local"))
            bar.update()


def ray_options(recipe: Recipe) -> dict[str, Any]:
    """Each job's Ray resources: ``num_gpus`` 1 when the eval device is CUDA (unless set)."""
    r = recipe.ray
    gpus = r.num_gpus if r.num_gpus is not None else (1 if recipe.eval.device.startswith("cuda") else 0)
    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": gpus}
    if r.memory_gb:
        opts["memory"] = int(r.memory_gb * 2**30)
    return opts


def _run_ray(jobs: Sequence[Job], spec: _Eval, on_result: ResultFn, progress: bool, options: Mapping[str, Any],
             address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise CkptavgError("--executor ray needs Ray: pip install 'ckptavg[ray]'") from None
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address)
        except ConnectionError as e:
            raise CkptavgError(f"cannot reach a Ray cluster at {address!r}: {_one_line(e)}") from None
    try:
        remote = ray.remote(_run_job).options(**options)
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
                            rows = _rows(job, spec, "ray", [], e, {}, 0.0)
                        on_result(job, rows)
                        bar.update()
        finally:
            for ref in pending:  # interrupted: the cluster should not go on computing unrecorded jobs
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


# The one call --------------------------------------------------------------------------------
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
        CkptavgError: a bad recipe, a trajectory that cannot be discovered, target steps that do
            not exist, a table scored under another eval spec or being written by another sweep.
            A failing *job* does not raise: it is recorded as failed and the sweep goes on.

    Example:
        >>> r = run_sweep("recipes/demo.yaml")                  # doctest: +SKIP
        >>> r.ran, r.failed                                      # doctest: +SKIP
    """
    from ..sources import discover

    if executor not in EXECUTORS:
        raise CkptavgError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise CkptavgError("--address applies to --executor ray only")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if out is not None:
        rec = replace(rec, output=str(out))
    spec = _resolve_eval(rec.eval)
    traj_path = rec.trajectory if rec.trajectory.startswith("hf://") else str(Path(rec.trajectory).resolve())
    traj = discover(traj_path, step_pattern=rec.step_pattern)
    jobs = plan(rec, traj)
    table = _Table(Path(rec.output).resolve() / TABLE)
    try:
        _check_protocol(table, spec)
        latest = _latest(table.rows)
        todo = [j for j in jobs if (latest.get(j.key) or [{}])[0].get("status") != "ok"]
        failed: list[tuple[int, str, str]] = []
        unfinished = {j.key: j for j in todo}
        evicted: set[int] = set()

        def on_result(job: Job, rows: list[dict[str, Any]]) -> None:
            table.append(rows)
            if rows[0]["status"] != "ok":
                failed.append((job.step, job.variant.name, rows[0]["error"]))
            unfinished.pop(job.key, None)
            _write_summaries(table.path, table.rows)
            if rec.evict:
                _evict_consumed(job, unfinished.values(), evicted)

        if todo:
            if executor == "ray":
                _run_ray(todo, spec, on_result, progress, ray_options(rec), address)
            else:
                _run_local(todo, spec, on_result, progress)
        csv_path, md_path = _write_summaries(table.path, table.rows)
    finally:
        table.close()
    return SweepReport(table.path, csv_path, md_path, len(jobs), len(jobs) - len(todo), len(todo), tuple(failed))


def _check_protocol(table: _Table, spec: _Eval) -> None:
    """One table, one eval protocol: rows scored otherwise would not be comparable."""
    for rows in _latest(table.rows).values():
        r = rows[0]
        if r["status"] == "ok" and r.get("protocol") != spec.protocol_id:
            old = (r.get("provenance") or {}).get("eval") or {}
            diff = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in spec.protocol.items() if old.get(k) != v]
            raise CkptavgError(
                f"{table.path}: its rows were scored with another eval spec ({'; '.join(diff) or 'unknown'}); "
                "write to another output folder (--out), or delete the table to start over"
            )


def _evict_consumed(job: Job, unfinished: Iterable[Job], evicted: set[int]) -> None:
    """Delete from the HF cache the Hub revisions no unfinished job needs any more."""
    from ..sources import evict

    needed = {c.step for j in unfinished for c in j.inputs}
    spent = [c for c in job.inputs if c.source is not None and c.step not in needed and c.step not in evicted]
    if spent:
        evict(spent)
        evicted.update(c.step for c in spent)


__all__ = ["EvalSpec", "Job", "RayOptions", "Recipe", "Steps", "SweepReport", "Variant", "Variants",
           "load_recipe", "load_results", "plan", "ray_options", "run_sweep"]
