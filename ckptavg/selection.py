"""Which checkpoints of a trajectory to average: the flags of ``ckptavg merge`` as one value."""

from __future__ import annotations

from dataclasses import dataclass

from .trajectory import Trajectory


@dataclass(frozen=True)
class Selection:
    """Applied in this order: explicit ``steps``, the ``start``..``stop`` range, ``every`` n-th,
    then the ``window`` of the latest k ending at step ``at`` (``at`` alone: everything up to it).
    """

    window: int | None = None
    at: int | None = None
    start: int | None = None
    stop: int | None = None
    every: int | None = None
    steps: tuple[int, ...] | None = None

    def apply(self, traj: Trajectory) -> Trajectory:
        sel = traj.select(self.steps) if self.steps else traj
        if self.start is not None or self.stop is not None:
            sel = sel.between(self.start, self.stop)
        if self.every:
            sel = sel.every(self.every)
        if self.at is not None:
            sel.at(self.at)
            sel = sel.between(None, self.at)
        if self.window:
            sel = sel.last(self.window)
        return sel
