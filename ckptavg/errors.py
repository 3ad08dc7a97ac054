"""The one exception type users see for bad input."""

from __future__ import annotations


class CkptavgError(Exception):
    """Expected bad input: a one-line message naming the file, step or tensor, and what to do.

    The CLI prints it without a traceback and exits non-zero.
    """
