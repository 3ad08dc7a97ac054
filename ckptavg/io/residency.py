"""How much of a file sits in the page cache: ``mincore`` on a mapping that touches no page.

Linux only (elsewhere: None). Mapping a file and asking the kernel which of its pages are
resident reads no data and faults nothing in: a 10 GB file costs a 2.5 MB answer vector and a
few milliseconds. ``merge --dry-run`` reports it, because a warm merge runs at CPU speed and a
cold one at the disk's (README, "Engine").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc: Any = None


def _lib() -> Any:
    """libc with mmap/mincore/munmap typed, or None off Linux or without a loadable libc."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            return None
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.mmap.restype = ctypes.c_void_p
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        lib.mincore.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.munmap.restype = ctypes.c_int
        _libc = lib
    return _libc


def resident_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of ``path`` in the page cache (whole pages, at most its size), or None if that
    cannot be told."""
    lib = _lib()
    if lib is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            return None
        try:
            vec = np.zeros((size + _PAGE - 1) // _PAGE, np.uint8)  # one byte per page; bit 0: resident
            if lib.mincore(addr, size, vec.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))) != 0:
                return None
        finally:
            lib.munmap(addr, size)
        return min(size, int(np.count_nonzero(vec & 1)) * _PAGE)
    finally:
        os.close(fd)


def cached_bytes(paths: Iterable[str | os.PathLike[str]]) -> int | None:
    """Bytes of all ``paths`` in the page cache, or None if any cannot be told."""
    total = 0
    for p in paths:
        n = resident_bytes(p)
        if n is None:
            return None
        total += n
    return total


__all__ = ["cached_bytes", "resident_bytes"]
