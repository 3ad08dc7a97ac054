"""Which checkpoints of a trajectory to use: one vocabulary for every command and function.

``merge``/``eval``/:func:`ckptavg.average` average the checkpoints a Selection picks
(:meth:`Selection.apply`); ``series``, :func:`ckptavg.iter_series` and sweeps produce a model at
each *target* it picks (:meth:`Selection.targets`), each averaging the ``window`` checkpoints up to
it. The same words mean the same thing everywhere:

- ``steps``: exactly these steps (each must exist);
- ``start``/``stop``: the steps from ``start`` to ``stop``, both inclusive;
- ``spacing``: steps whose distance from ``start`` (from 0 without one) is a multiple of this many
  training steps (Pythia's every-1000 saves among its log-spaced early ones);
- ``every``: every n-th checkpoint, counted back from the newest, so the newest is kept;
- ``at``: up to this step, which must exist;
- ``window``: the latest k (LAWA's window) — for targets, how many checkpoints each averages.

    >>> Selection(window=5, at=20_000)
    Selection(window=5, at=20000)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import SelectionError
from .trajectory import Trajectory


@dataclass(frozen=True)
class Selection:
    """Applied in this order: explicit ``steps``, the ``start``..``stop`` range, the ``spacing`` in
    steps, ``every`` n-th checkpoint, everything up to ``at``, then the latest ``window``.

    Raises:
        SelectionError: a value out of range (``window``/``every``/``spacing`` below 1, ``start``
            after ``stop``, an empty ``steps``), naming the flag.
    """

    window: int | None = None
    at: int | None = None
    start: int | None = None
    stop: int | None = None
    every: int | None = None
    spacing: int | None = None
    steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("window", "every", "spacing"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise SelectionError(f"--{name} must be a whole number of at least 1, got {v!r}")
        for name in ("at", "start", "stop"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise SelectionError(f"--{'from' if name == 'start' else 'to' if name == 'stop' else name} "
                                     f"must be a step (a whole number ≥ 0), got {v!r}")
        if self.start is not None and self.stop is not None and self.start > self.stop:
            raise SelectionError(f"--from {self.start} is after --to {self.stop}")
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(self.steps))
            if not self.steps:
                raise SelectionError("--steps is empty")
            bad = [s for s in self.steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
            if bad:
                raise SelectionError(f"--steps must be steps (whole numbers ≥ 0), got {bad[0]!r}")

    def __repr__(self) -> str:
        set_ = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) is not None)
        return f"Selection({set_})"

    def _candidates(self, traj: Trajectory) -> Trajectory:
        sel = traj.select(self.steps) if self.steps else traj
        if self.start is not None or self.stop is not None:
            sel = sel.between(self.start, self.stop)
        if self.spacing:
            origin, spacing = (self.start if self.start is not None else 0), self.spacing
            sel = sel.where(lambda c: (c.step - origin) % spacing == 0)
        if self.every:
            sel = sel.every(self.every)
        if self.at is not None:
            traj.at(self.at)
            sel = sel.between(None, self.at)
        return sel

    def apply(self, traj: Trajectory) -> Trajectory:
        """The checkpoints to average. Empty selections are an error, naming the run's steps.

        Example:
            >>> Selection(window=2, at=3000).apply(traj).steps      # doctest: +SKIP
            [2000, 3000]
        """
        sel = self._candidates(traj)
        if self.window:
            sel = sel.last(self.window)
        if not len(sel):
            raise SelectionError(f"{traj.name}: nothing selected by {self!r} (the run has steps {_span(traj)})")
        return sel

    def targets(self, traj: Trajectory) -> Trajectory:
        """The checkpoints at which a series or sweep produces a model (``window`` is how many
        checkpoints each averages, not a filter). Empty is an error, naming the run's steps."""
        sel = self._candidates(traj)
        if not len(sel):
            raise SelectionError(f"{traj.name}: no target step selected by {self!r} (the run has steps {_span(traj)})")
        return sel

    @property
    def is_empty(self) -> bool:
        """True when nothing is set (the whole trajectory)."""
        return self == Selection()


def _span(traj: Trajectory) -> str:
    return f"{traj.steps[0]}..{traj.steps[-1]}" if len(traj) else "none"


_LEGACY = {"stride": "every", "window": "window", "start": "start", "stop": "stop", "steps": "steps"}


def with_legacy(selection: Selection | None, where: str, **legacy: Any) -> Selection:
    """``selection`` with the keyword arguments older releases took instead (``window=``,
    ``stride=``, ``start=``, ``stop=``, ``steps=``) folded in, with a DeprecationWarning."""
    given = {k: v for k, v in legacy.items() if v is not None and not (k == "stride" and v == 1)}
    sel = selection or Selection()
    if not given:
        return sel
    unknown = set(given) - set(_LEGACY)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    words = ", ".join(f"{_LEGACY[k]}={v!r}" for k, v in given.items())
    warnings.warn(f"{where}({', '.join(given)}=…) is deprecated: pass selection=Selection({words})",
                  DeprecationWarning, stacklevel=3)
    changes: dict[str, Any] = {_LEGACY[k]: (tuple(v) if k == "steps" else v) for k, v in given.items()}
    return replace(sel, **changes)


__all__ = ["Selection", "with_legacy"]
