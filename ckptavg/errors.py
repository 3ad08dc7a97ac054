"""The exceptions users see for bad input: one hierarchy under :class:`CkptavgError`.

Every class carries a one-line message naming the file, step or tensor and saying what to do. The
CLI prints it without a traceback and exits non-zero (2 for bad flags: :class:`UsageError`).

    >>> try:
    ...     Selection(window=0)                               # doctest: +SKIP
    ... except ckptavg.SelectionError as e:                   # doctest: +SKIP
    ...     print(e)
"""

from __future__ import annotations


class CkptavgError(Exception):
    """Expected bad input: a one-line message naming the file, step or tensor, and what to do."""


class UsageError(CkptavgError, ValueError):
    """A flag or argument is out of range or contradicts another (the CLI exits 2)."""


class SelectionError(UsageError):
    """Which steps to use: a window larger than the run, a step that does not exist, an empty selection."""


class MethodError(UsageError):
    """A weighting method that does not exist, or parameters it does not take or cannot use."""


class CheckpointError(CkptavgError):
    """An input checkpoint cannot be read: missing, corrupt, not a model, an index that disagrees."""


class IncompatibleError(CheckpointError):
    """Checkpoints that cannot be averaged together: different tensor names, shapes or dtypes."""


class NonFiniteError(CkptavgError):
    """A tensor holds NaN/Inf (``allow_nonfinite`` averages it anyway)."""


class DuplicateError(CkptavgError):
    """Hub revisions whose weights are byte-identical to another step's (``allow_duplicates``)."""


class HubError(CkptavgError):
    """The Hub or the Hugging Face cache could not give what was asked (offline, gated, not found, failing)."""


class OutputError(CkptavgError):
    """The output cannot be written where asked (inside an input, not a directory, no permission)."""


class OutputExistsError(OutputError):
    """The output exists and holds something; ``force`` replaces it."""


class OutputLockedError(OutputError):
    """Another ckptavg run is writing the same output (its lock file names the host and pid)."""


class MissingDependencyError(CkptavgError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


__all__ = [
    "CheckpointError", "CkptavgError", "DuplicateError", "HubError", "IncompatibleError", "MethodError",
    "MissingDependencyError", "NonFiniteError", "OutputError", "OutputExistsError",
    "OutputLockedError", "SelectionError", "UsageError",
]
