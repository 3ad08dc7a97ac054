"""ckptavg: turn a training run's checkpoints into better models by averaging them.

    >>> import ckptavg
    >>> traj = ckptavg.discover("runs/tiny")                                          # doctest: +SKIP
    >>> ckptavg.average(traj, "tiny-lawa5", selection=ckptavg.Selection(window=5))    # doctest: +SKIP
    >>> sd = ckptavg.average(traj.last(5), method="ema", half_life=2000)              # doctest: +SKIP

Importing this package is cheap: names resolve on first use, so ``ckptavg --help`` never pays
for numpy, torch or lm_eval.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    CheckpointError,
    CkptavgError,
    DuplicateError,
    HubError,
    IncompatibleError,
    MethodError,
    MissingDependencyError,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    OutputLockedError,
    SelectionError,
    UsageError,
)

if TYPE_CHECKING:
    from .averaging import StateDict, average
    from .eval import load_model, score
    from .selection import Selection
    from .series import iter_series
    from .soup import greedy_soup
    from .sources import discover
    from .stability import inspect
    from .sweep import run_sweep
    from .trajectory import Checkpoint, Trajectory

_LAZY = {
    "discover": "sources",
    "average": "averaging",
    "StateDict": "averaging",
    "iter_series": "series",
    "greedy_soup": "soup",
    "Checkpoint": "trajectory",
    "Trajectory": "trajectory",
    "Selection": "selection",
    "score": "eval",
    "load_model": "eval",
    "run_sweep": "sweep",
    "inspect": "stability",
}

__all__ = [
    "CheckpointError", "Checkpoint", "CkptavgError", "DuplicateError", "HubError", "IncompatibleError",
    "MethodError", "MissingDependencyError", "NonFiniteError", "OutputError", "OutputExistsError", "OutputLockedError",
    "Selection", "SelectionError", "StateDict", "Trajectory", "UsageError", "__version__", "average", "discover", "greedy_soup", "inspect",
    "iter_series", "load_model", "run_sweep", "score",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
