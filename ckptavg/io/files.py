"""Opening input files safely: regular files only, a bounded number of descriptors, capped JSON.

- :func:`open_regular` never blocks on a FIFO or a device named like a weight file: it opens with
  ``O_NONBLOCK`` and refuses anything ``fstat`` does not call a regular file, naming the path.
- :class:`LazyFd` is a file that is opened when read or written and may be closed again between
  calls: one process-wide :class:`FdPool` keeps at most a few dozen of them open (least recently
  used are closed first), so ``series`` over 600 checkpoints holds as many descriptors as over 6.
- :func:`load_json` reads an index, ``config.json`` or ``trainer_state.json`` with a size cap, and
  turns every way ``json`` can fail (bad UTF-8, syntax, nesting past the recursion limit, an
  integer of 5,000 digits) into one :class:`~ckptavg.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

JSON_LIMIT = 256_000_000  # bytes; an index of a million tensors is ~80 MB, a config.json a few KB

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def kind(mode: int) -> str:
    """What a ``st_mode`` is, in words (``a FIFO``, ``a regular file`` …)."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else "special")


def not_regular(path: object, mode: int) -> CheckpointError:
    return CheckpointError(f"{path}: is {kind(mode)}, not a regular file; ckptavg reads checkpoints only from "
                           "regular files (reading it could block forever)")


def check_regular(path: Path) -> int:
    """``path``'s size after checking (following symlinks) that it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)
    return st.st_size


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of regular file ``path``; a FIFO, socket or device is refused without blocking."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of regular file ``path``, refused when over ``limit`` bytes (``what``: for messages)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {what} is {size} bytes, over the {limit}-byte limit")
        chunks, got = [], 0
        while got <= size:  # reading one byte past the size notices a file that grew
            b = os.read(fd, size + 1 - got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:
            raise CheckpointError(f"{path}: {what} grew past the {limit}-byte limit while being read")
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def json_problem(e: BaseException) -> str:
    """What ``json.loads`` (or decoding its bytes) objected to, in a few words."""
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    return (str(e).splitlines() or [e.__class__.__name__])[0][:120]  # e.g. an integer past 4300 digits


def parse_json(raw: bytes | str, where: object, what: str = "JSON file",
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` whose every failure is one CheckpointError naming ``where``."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{where}: not a valid {what}: {json_problem(e)}") from None


def load_json(path: Path, what: str = "JSON file", limit: int = JSON_LIMIT) -> Any:
    """The parsed contents of a JSON file (regular files only, at most ``limit`` bytes)."""
    return parse_json(read_regular(path, limit, what), path, what)


def _default_capacity() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(4, min(256, soft // 4))  # a quarter of the limit leaves the rest to torch, threads, outputs


class FdPool:
    """At most ``capacity`` descriptors of :class:`LazyFd` files open at once, closing the least
    recently used idle one to make room. A descriptor in use (between ``use`` and its end) is
    never closed under its reader; with more users than capacity the pool briefly holds more."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity or _default_capacity()
        self._lock = threading.Lock()
        self._open: OrderedDict[LazyFd, None] = OrderedDict()

    @property
    def open_count(self) -> int:
        return len(self._open)

    def _make_room(self) -> None:
        if len(self._open) < self.capacity:
            return
        for f in list(self._open):
            if f.users == 0:
                del self._open[f]
                try:
                    f.release()
                except OSError:  # a write-back error: Linux keeps it for the next fsync on a new descriptor
                    pass
                if len(self._open) < self.capacity:
                    return

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork


# The descriptor limit is the process's, so the pool that respects it is too: one for all readers
# and writers of the process, whichever threads and calls use them.
POOL = FdPool()
os.register_at_fork(after_in_child=POOL._after_fork)


class LazyFd:
    """A file opened on first use, which the pool may close between uses and reopens as needed."""

    def __init__(self, path: Path, flags: int = os.O_RDONLY, pool: FdPool | None = None) -> None:
        self.path = path
        self.flags = flags
        self.pool = pool or POOL
        self.fd: int | None = None
        self.users = 0
        self._closed = False

    def acquire(self) -> int:
        """The open descriptor, pinned until :meth:`done` (hot paths; elsewhere ``with use()``)."""
        pool = self.pool
        with pool._lock:
            self._closed = False
            if self.fd is None:
                pool._make_room()
                self.fd = open_regular(self.path, self.flags)
                if self.flags == os.O_RDONLY and hasattr(os, "posix_fadvise"):
                    # chunks are read front to back: a larger read-ahead window for cold disks
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.users += 1
            pool._open[self] = None
            pool._open.move_to_end(self)
            return self.fd

    def done(self) -> None:
        with self.pool._lock:
            self.users -= 1
            if self._closed and self.users == 0:
                self.pool._open.pop(self, None)
                self.release()

    @contextmanager
    def use(self) -> Iterator[int]:
        """``with f.use() as fd:`` the open descriptor, which the pool leaves open meanwhile."""
        fd = self.acquire()
        try:
            yield fd
        finally:
            self.done()

    def release(self) -> None:
        """Close the descriptor (the pool's lock is held)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close for good: later ``use`` reopens (a closed reader read again works, as before)."""
        with self.pool._lock:
            if self.users:
                self._closed = True  # the last user closes it
                return
            self.pool._open.pop(self, None)
            self.release()


__all__ = ["JSON_LIMIT", "POOL", "FdPool", "LazyFd", "check_regular", "kind", "load_json", "not_regular",
           "json_problem", "open_regular", "parse_json", "read_regular"]
