"""A sweep's results table, ``OUT/results.jsonl``: append-only JSONL, written only by the driver.

One row per (trajectory, step, variant, task, metric), each carrying its job's ``attempt`` id and
``job_rows`` (how many rows that attempt has): a job counts as finished only when all of them are
there, so a crash mid-write loses that job and nothing else. A torn last line (no newline) is cut
off by the next sweep that opens the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CkptavgError, UsageError
from .plan import ResolvedEval

TABLE = "results.jsonl"
HELD_OUT = "held_out"  # the task name of the held-out loss rows

JobKey = tuple[str, int, str]  # (trajectory, step, variant)


def table_path(results: str | os.PathLike[str]) -> Path:
    """Where a sweep's table is.

    Args:
        results: a sweep's output folder or its table.

    Returns:
        The table's path (``results/results.jsonl`` for a folder).
    """
    p = Path(results)
    return p / TABLE if p.is_dir() else p


def read_table(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every complete row, and the byte length of the complete lines.

    Args:
        path: the table (a missing file reads as empty).

    Returns:
        ``(rows, length)``; bytes past ``length`` are a torn last line (a crash mid-write).

    Raises:
        CkptavgError: a complete line that is not a ckptavg sweep row, naming its line.
    """
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


def latest_attempts(rows: Iterable[Mapping[str, Any]]) -> dict[JobKey, list[dict[str, Any]]]:
    """Each job's latest complete attempt.

    Args:
        rows: a table's rows in file order (later attempts come later).

    Returns:
        Job key (trajectory, step, variant) → the rows of its latest attempt with all of its
        ``job_rows`` rows present.
    """
    by_attempt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_attempt.setdefault(r["attempt"], []).append(dict(r))
    latest: dict[JobKey, list[dict[str, Any]]] = {}
    for group in by_attempt.values():  # dicts keep insertion order: later attempts come later
        if len(group) == group[0]["job_rows"]:
            r = group[0]
            latest[(r["trajectory"], r["step"], r["variant"])] = group
    return latest


def variant_order(name: str) -> tuple[int, float, str]:
    """Sort key of variant names, for tables and plots.

    Args:
        name: a variant name.

    Returns:
        A key sorting ``raw`` first, then ``uniform{k}`` by k, then ``ema-h{h}`` by h, then the rest.
    """
    if name == "raw":
        return (0, 0.0, name)
    for rank, prefix in ((1, "uniform"), (2, "ema-h")):
        if name.startswith(prefix):
            num = name[len(prefix):].split("-")[0]
            with contextlib.suppress(ValueError):
                return (rank, float(num), name)
    return (3, 0.0, name)


def current_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows that count now.

    Args:
        rows: a table's rows in file order.

    Returns:
        The rows of each job's latest complete attempt, by trajectory, step and variant order.
    """
    latest = latest_attempts(rows)
    keys = sorted(latest, key=lambda k: (k[0], k[1], variant_order(k[2])))
    return [r for k in keys for r in latest[k]]


def load_results(results: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The current rows of a sweep's table: for each (trajectory, step, variant), the rows of its
    latest complete attempt (``status`` ``ok``: one per task metric; ``failed``: one, with
    ``error``). Incomplete attempts and a torn last line are ignored.

    Args:
        results: a sweep's output folder or its ``results.jsonl``.

    Returns:
        The rows as dicts, by trajectory, step and variant.

    Raises:
        CkptavgError: no table there, or a line that is not a sweep row.

    Example:
        >>> import pandas as pd                                            # doctest: +SKIP
        >>> df = pd.DataFrame(load_results("sweeps/tiny"))                 # doctest: +SKIP
    """
    path = table_path(results)
    if not path.is_file():
        raise CkptavgError(f"{path}: no results table here (a sweep writes {TABLE} into its output folder)")
    return current_rows(read_table(path)[0])


class ResultsTable:
    """The table open for appending, locked (``flock``) for this process while a sweep writes it.

    Opening cuts a torn last line (with a warning). ``rows`` holds every row, read and appended.

    Raises:
        CkptavgError: another process holds the lock, or the table has a bad line.
    """

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
            self.rows, good = read_table(path)
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
        """Append one job's rows in one write, then fsync: the job is on disk when this returns.

        Args:
            rows: every row of one attempt at a job.
        """
        data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        self.rows.extend(dict(r) for r in rows)

    def check_protocol(self, spec: ResolvedEval) -> None:
        """One table, one eval protocol: rows scored otherwise would not be comparable.

        Args:
            spec: the eval spec this sweep scores with.

        Raises:
            UsageError: a finished row was scored under another protocol, naming what differs.
        """
        for rows in latest_attempts(self.rows).values():
            r = rows[0]
            if r["status"] == "ok" and r.get("protocol") != spec.protocol_id:
                old = (r.get("provenance") or {}).get("eval") or {}
                diff = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in spec.protocol.items() if old.get(k) != v]
                raise UsageError(
                    f"{self.path}: its rows were scored with another eval spec ({'; '.join(diff) or 'unknown'}); "
                    "write to another output folder (--out), or delete the table to start over"
                )

    def close(self) -> None:
        """Release the lock."""
        os.close(self.fd)


__all__ = ["HELD_OUT", "TABLE", "ResultsTable", "current_rows", "latest_attempts", "load_results", "read_table",
           "table_path", "variant_order"]
