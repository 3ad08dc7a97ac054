"""Checkpoint, Trajectory and where a Hub checkpoint's files are: pure data, no I/O.

A Trajectory is the ordered list of checkpoints of one run, and every selection on it (last k,
the window ending at a step, a step range, every n-th, explicit steps) returns another Trajectory,
so selections compose: ``traj.between(0, 5000).every(2).last(5)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, overload

from .errors import IncompatibleError, MethodError, SelectionError

if TYPE_CHECKING:
    from .io.safetensors import TensorInfo

HUB_PREFIX = "hf://"


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub revision as the Hub lists it."""

    name: str
    size: int
    sha256: str | None = None  # LFS oid; None for a small file stored in git
    git_oid: str | None = None  # git blob id (of the LFS pointer, for an LFS file)

    @property
    def content_id(self) -> str:
        """What identifies the bytes: the LFS sha256, else the git blob id."""
        return self.sha256 or self.git_oid or self.name


@dataclass(frozen=True)
class HubSource:
    """Where a Hub checkpoint's files are: repo, branch, the commit it pointed to, and its files."""

    repo_id: str
    revision: str  # the branch, e.g. "step1000"
    commit: str  # the commit the branch pointed to at discovery; downloads are pinned to it
    weights: tuple[HubFile, ...]  # in shard order
    index: HubFile | None = None
    configs: tuple[HubFile, ...] = ()  # config and tokenizer files present at this revision
    same_as: tuple[str, ...] = ()  # other step branches holding byte-identical weight files

    @property
    def uri(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class Checkpoint:
    """One saved model of a run.

    ``files`` are the weight files (several for a sharded checkpoint, in shard order); ``tensors``
    are names → dtype/shape read from headers (None until known, e.g. for a Hub revision not yet
    downloaded); ``config_dir`` is where config and tokenizer files sit next to the weights.
    ``source`` is set for a Hub revision (repo, branch, commit, files with their sha256): its
    ``files`` stay empty until :func:`ckptavg.sources.materialise` downloads them. ``key`` is where
    the state dict sits in a ``.bin``/``.pt`` file (``--key``; None: found by the usual rule).
    """

    step: int
    location: str
    format: str  # "safetensors" or "torch"
    files: tuple[Path, ...] = ()
    index: Path | None = None
    config_dir: Path | None = None
    tensors: Mapping[str, TensorInfo] | None = field(default=None, compare=False, repr=False)
    size: int = 0  # bytes of weight files
    source: HubSource | None = field(default=None, compare=False, repr=False)
    key: str | None = None
    # Where ``step`` came from when not the name: "optimizer.bin", "custom_checkpoint_0.pkl" (accelerate
    # save_state), "save index" (accelerate's checkpoint_N counts saves: no step recorded anywhere)
    step_from: str | None = field(default=None, compare=False)

    @property
    def counts_saves(self) -> bool:
        """``step`` is a save counter, not a training step (step-based weightings would be wrong)."""
        return self.step_from == "save index"

    def __str__(self) -> str:
        return f"step {self.step} ({self.location})"


@dataclass(frozen=True)
class Trajectory(Sequence[Checkpoint]):
    """Checkpoints of one run, sorted by step; steps are unique."""

    name: str
    checkpoints: tuple[Checkpoint, ...]
    root: str = ""
    # What was found but is not averaged, each with why: the final ``trainer.save_model()`` weights
    # beside ``checkpoint-N/`` children, Lightning's last.ckpt, a DCP checkpoint's optimizer state
    ignored: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        steps = [c.step for c in self.checkpoints]
        if steps != sorted(steps):
            object.__setattr__(self, "checkpoints", tuple(sorted(self.checkpoints, key=lambda c: c.step)))
        seen: dict[int, Checkpoint] = {}
        for c in self.checkpoints:
            if c.step in seen:
                raise SelectionError(f"duplicate step {c.step}: {seen[c.step].location} and {c.location}")
            seen[c.step] = c

    # Sequence protocol ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.checkpoints)

    @overload
    def __getitem__(self, i: int) -> Checkpoint: ...
    @overload
    def __getitem__(self, i: slice) -> Trajectory: ...
    def __getitem__(self, i: int | slice) -> Checkpoint | Trajectory:
        if isinstance(i, slice):
            return self._with(self.checkpoints[i])
        return self.checkpoints[i]

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def _with(self, checkpoints: Iterable[Checkpoint]) -> Trajectory:
        return replace(self, checkpoints=tuple(checkpoints))

    # Selections ----------------------------------------------------------------------------
    def at(self, step: int) -> Checkpoint:
        """The checkpoint saved at exactly ``step``."""
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise SelectionError(f"{self.name}: no checkpoint at step {step}; {self._near(step)}")

    def _near(self, step: int) -> str:
        steps = self.steps
        if not steps:
            return "the trajectory is empty"
        i = bisect.bisect_left(steps, step)
        near = sorted({steps[j] for j in (i - 1, i) if 0 <= j < len(steps)})
        return "nearest: " + ", ".join(map(str, near))

    def last(self, k: int) -> Trajectory:
        """The latest ``k`` checkpoints (LAWA's window)."""
        if k < 1:
            raise SelectionError(f"window must be at least 1, got {k}")
        if k > len(self):
            raise SelectionError(f"{self.name}: window {k} needs {k} checkpoints, the selection has {len(self)}")
        return self._with(self.checkpoints[-k:])

    def window(self, k: int, at: int | None = None) -> Trajectory:
        """The ``k`` checkpoints ending at step ``at`` (default: the newest)."""
        sel = self if at is None else self.between(None, at)
        if at is not None:
            self.at(at)
        return sel.last(k)

    def between(self, start: int | None = None, stop: int | None = None) -> Trajectory:
        """Checkpoints with ``start <= step <= stop`` (both inclusive, either open)."""
        return self._with(
            c for c in self.checkpoints
            if (start is None or c.step >= start) and (stop is None or c.step <= stop)
        )

    def every(self, n: int) -> Trajectory:
        """Every ``n``-th checkpoint, counted back from the newest so the newest is kept."""
        if n < 1:
            raise SelectionError(f"--every must be at least 1, got {n}")
        return self._with(self.checkpoints[::-1][::n][::-1])

    def where(self, keep: Callable[[Checkpoint], bool]) -> Trajectory:
        """The checkpoints for which ``keep(checkpoint)`` is true."""
        return self._with(c for c in self.checkpoints if keep(c))

    def select(self, steps: Iterable[int]) -> Trajectory:
        """Exactly these steps; each must exist."""
        return self._with(self.at(s) for s in sorted(set(steps)))


_STEP_DISTANCES = {"half_life": "--half-life", "half_life_tokens": "--half-life-tokens", "sigma_rel": "--sigma-rel"}


def check_step_units(checkpoints: Iterable[Checkpoint], params: Mapping[str, object]) -> None:
    """Refuse a weighting that measures distances in training steps on checkpoints whose steps are
    save counters (accelerate's ``checkpoint_N`` with no step recorded): ``ema --half-life`` would
    count saves as steps, a half-life wrong by the save interval, and nothing would say so.

    Raises:
        MethodError: naming the checkpoint and the flag, and what to pass instead.
    """
    used = [flag for k, flag in _STEP_DISTANCES.items() if params.get(k) is not None]
    saves = next((c for c in checkpoints if c.counts_saves), None)
    if used and saves is not None:
        raise MethodError(f"{saves.location}: its step is a save index (accelerate's checkpoint_N counts saves and "
                          f"the folder records no training step), so {used[0]} would count saves as steps; pass "
                          "--steps-per-save N (training steps between saves), or weigh by checkpoint (--decay, --window)")


def check_compatible(checkpoints: Iterable[Checkpoint]) -> None:
    """Every checkpoint whose tensors are known has the newest one's tensor names, shapes and dtypes.

    Raises:
        IncompatibleError: naming the step, the tensor and what differs.
    """
    known = [c for c in checkpoints if c.tensors is not None]
    if len(known) < 2:
        return
    ref = known[-1]
    ref_t = ref.tensors or {}
    for c in known[:-1]:
        t = c.tensors or {}
        where = str(c)
        missing = [n for n in ref_t if n not in t]
        if missing:
            raise IncompatibleError(
                f"{where}: tensor {missing[0]!r} is missing (present at step {ref.step}); "
                "mixed architectures cannot be averaged"
            )
        extra = [n for n in t if n not in ref_t]
        if extra:
            raise IncompatibleError(
                f"{where}: extra tensor {extra[0]!r} not present at step {ref.step}; "
                "mixed architectures cannot be averaged"
            )
        for n, info in ref_t.items():
            if t[n].shape != info.shape:
                raise IncompatibleError(
                    f"{where}: tensor {n!r} has shape {list(t[n].shape)}, step {ref.step} has {list(info.shape)}"
                )
            if t[n].dtype != info.dtype:
                raise IncompatibleError(
                    f"{where}: tensor {n!r} is {t[n].dtype.name}, step {ref.step} has {info.dtype.name}; "
                    "convert them to one dtype first"
                )


__all__ = ["HUB_PREFIX", "Checkpoint", "HubFile", "HubSource", "Trajectory", "check_compatible", "check_step_units"]
