"""A sweep's jobs: one per (target step, variant), each with the checkpoints it draws on, and the
eval spec resolved once for all of them (absolute paths, the fingerprint of its protocol)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .recipe import EvalSpec, Recipe, Variant

if TYPE_CHECKING:
    from ..trajectory import Trajectory


@dataclass(frozen=True)
class ResolvedEval:
    """The eval spec with paths made absolute (Ray workers have their own working directory)
    and the fingerprint of what decides the scores: ``protocol`` (tasks, limit, seq_len, dtype,
    the held-out text's sha256) and its hash ``protocol_id``, stored in every row."""

    tasks: tuple[str, ...]
    include_path: tuple[str, ...]
    text: str | None
    seq_len: int | None
    limit: int | float | None
    batch_size: int | str
    device: str
    dtype: str
    offline: bool
    protocol: Mapping[str, Any]
    protocol_id: str


def resolve_eval(spec: EvalSpec) -> ResolvedEval:
    """Resolve ``spec`` against the working directory and fingerprint its protocol.

    Args:
        spec: the recipe's eval section.

    Returns:
        The :class:`ResolvedEval` every job of the sweep is scored with.

    Raises:
        UsageError: ``eval.text`` cannot be read, an ``eval.include_path`` is not a folder.
    """
    text = str(Path(spec.text).resolve()) if spec.text is not None else None
    text_sha = None
    if text is not None:
        try:
            text_sha = hashlib.sha256(Path(text).read_bytes()).hexdigest()
        except OSError as e:
            raise UsageError(f"{spec.text}: cannot read eval.text ({e.strerror or e})") from None
    for p in spec.include_path:
        if not Path(p).is_dir():
            raise UsageError(f"{p}: eval.include_path must be a folder of task YAMLs")
    limit: int | float | None = spec.limit
    if isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)  # lm-eval reads an integral float as a fraction-or-count: make it a count
    batch: int | str = int(spec.batch_size) if isinstance(spec.batch_size, str) and spec.batch_size.isdigit() else spec.batch_size
    protocol = {"tasks": list(spec.tasks), "limit": limit, "seq_len": spec.seq_len, "dtype": spec.dtype,
                "text_sha256": text_sha}
    pid = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    return ResolvedEval(tuple(spec.tasks), tuple(str(Path(p).resolve()) for p in spec.include_path), text,
                        spec.seq_len, limit, batch, spec.device, spec.dtype, spec.offline, protocol, pid)


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
        """``(trajectory, step, variant name)``: the job's identity in the table."""
        return (self.trajectory, self.step, self.variant.name)


def trajectory_key(traj: Trajectory) -> str:
    """How the table names a trajectory.

    Args:
        traj: a discovered trajectory.

    Returns:
        ``hf://org/name``, or the run folder's absolute path.
    """
    from ..sources import canonical

    return canonical(str(traj.root))


def plan(recipe: Recipe, traj: Trajectory) -> list[Job]:
    """The sweep's jobs in step order (then variant order), each with the checkpoints it needs.

    Args:
        recipe: the sweep; ``recipe.steps`` picks the targets (:meth:`Selection.targets`).
        traj: the discovered trajectory.

    Returns:
        One :class:`Job` per (target step, variant).

    Raises:
        SelectionError: a listed step that does not exist, or no checkpoint matching ``steps``.
    """
    key = trajectory_key(traj)
    jobs = []
    for s in recipe.steps.targets(traj).steps:
        upto = traj.between(None, s)
        for v in recipe.variants.expand():
            inputs = upto[-v.window:] if v.window and len(upto) >= v.window else upto
            jobs.append(Job(key, s, v, inputs))
    return jobs


def evict_consumed(job: Job, unfinished: Iterable[Job], evicted: set[int]) -> None:
    """Delete from the HF cache the Hub revisions of ``job`` that no unfinished job needs any more.

    Args:
        job: the job just finished.
        unfinished: the jobs still to run (or running).
        evicted: steps already evicted; updated in place.
    """
    from ..sources import evict

    needed = {c.step for j in unfinished for c in j.inputs}
    spent = [c for c in job.inputs if c.source is not None and c.step not in needed and c.step not in evicted]
    if spent:
        evict(spent)
        evicted.update(c.step for c in spent)


__all__ = ["Job", "ResolvedEval", "evict_consumed", "plan", "resolve_eval", "trajectory_key"]
