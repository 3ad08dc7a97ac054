"""ckptavg: turn a training run's checkpoints into better models by averaging them.

    >>> import ckptavg
    >>> traj = ckptavg.discover("runs/tiny")                               # doctest: +SKIP
    >>> ckptavg.average(traj.window(5), "tiny-uniform5")                   # doctest: +SKIP
    >>> sd = ckptavg.average(traj.last(5), method="ema", half_life=2000)   # doctest: +SKIP

Importing this package is cheap: names resolve on first use, so ``ckptavg --help`` never pays
for numpy, torch or lm_eval.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .discovery import discover
    from .engine import average
    from .errors import CkptavgError
    from .evaluate import score
    from .selection import Selection
    from .trajectory import Checkpoint, Trajectory

_LAZY = {
    "discover": "discovery",
    "average": "engine",
    "CkptavgError": "errors",
    "Checkpoint": "trajectory",
    "Trajectory": "trajectory",
    "Selection": "selection",
    "score": "evaluate",
}

__all__ = ["Checkpoint", "CkptavgError", "Selection", "Trajectory", "__version__", "average", "discover", "score"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
