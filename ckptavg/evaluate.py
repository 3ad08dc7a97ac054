"""Deprecated alias of :mod:`ckptavg.eval`, kept for one release so old imports keep working."""

from __future__ import annotations

import warnings

from .eval import (
    DTYPES,
    EXTRA_HINT,
    TASKS_DIR,
    held_out_loss,
    load_model,
    packaged_task,
    packaged_tasks,
    score,
    to_json,
)

# stacklevel=2 points at the importer's ``import ckptavg.evaluate`` line, not at this module.
warnings.warn("ckptavg.evaluate is deprecated: use ckptavg.eval", DeprecationWarning, stacklevel=2)

__all__ = ["DTYPES", "EXTRA_HINT", "TASKS_DIR", "held_out_loss", "load_model", "packaged_task", "packaged_tasks",
           "score", "to_json"]
