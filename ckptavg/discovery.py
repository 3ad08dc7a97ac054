"""Deprecated: ``ckptavg.discovery`` was split into :mod:`ckptavg.sources` (``discover``),
:mod:`ckptavg.local` (run folders, ``parse_step``), :mod:`ckptavg.io.layout` (index files) and
:mod:`ckptavg.trajectory` (``check_compatible``). This alias goes away in the next release."""

from __future__ import annotations

import warnings

from .io.layout import read_index
from .local import find_weights, parse_step
from .sources import discover
from .trajectory import check_compatible

warnings.warn("ckptavg.discovery is deprecated: use ckptavg.discover / ckptavg.sources", DeprecationWarning, stacklevel=2)

__all__ = ["check_compatible", "discover", "find_weights", "parse_step", "read_index"]
