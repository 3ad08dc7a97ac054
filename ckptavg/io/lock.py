"""Who is writing an output: a lock file beside it, and temporaries named after their host and pid.

Two runs writing the same output must not both succeed, one silently replacing the other; and a
run cleaning up after crashed runs must not delete a live run's temporary, even one on another
machine sharing the filesystem. So:

- ``.NAME.ckptavg-lock`` beside the output ``NAME`` is created with ``O_EXCL`` (atomic on local
  filesystems and NFSv3+) and holds ``{"host", "pid", "since", "nonce"}``. A second writer is
  refused with :class:`~ckptavg.errors.OutputLockedError`. A lock left by a dead process *of this
  host* is taken over; one from another host is never removed automatically (the message says how).
- Every temporary is named ``.NAME.ckptavg-tmp-HOST-PID-RANDOM``; :func:`is_stale_temporary` is
  true only for this host's temporaries whose process is gone.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, OutputLockedError

LOCK_TAG = ".ckptavg-lock"
TMP_TAG = ".ckptavg-tmp-"
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"  # safe inside a file name


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_name(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` that says which host and process made it."""
    return out.parent / f".{out.name}{TMP_TAG}{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_stale_temporary(out: Path, entry: Path) -> bool:
    """``entry`` is a temporary of ``out`` made on this host by a process that is gone.

    A temporary from another host, or in an older name without the host, is never stale: its
    owner cannot be checked from here.
    """
    prefix = f".{out.name}{TMP_TAG}"
    if not entry.name.startswith(prefix):
        return False
    parts = entry.name[len(prefix):].rsplit("-", 2)  # HOST may itself hold dashes
    if len(parts) != 3 or parts[0] != HOST or not parts[1].isdigit():
        return False
    return not pid_alive(int(parts[1]))


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}{LOCK_TAG}"


def _read(path: Path) -> dict[str, object] | None:
    """The lock's record; None while it is being written or when it is not ours to read."""
    for _ in range(10):  # a holder writes its record just after the O_EXCL create: give it 0.5 s
        try:
            rec = json.loads(path.read_text())
            if isinstance(rec, dict) and {"host", "pid", "nonce"} <= rec.keys():
                return rec
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def _create(out: Path, path: Path, record: dict[str, object]) -> bool:
    """Create the lock with its record already inside: written beside it, then hard-linked into
    place (atomic, fails if it exists; NFS-safe with the link-count check). Without hard links:
    ``O_EXCL``, the record written just after."""
    staged = temporary_name(out)
    staged.write_text(json.dumps(record) + "\n")
    try:
        os.link(staged, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        if os.stat(staged).st_nlink == 2:  # NFS: the link was made but its reply was lost
            return True
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, staged.read_bytes())
        finally:
            os.close(fd)
        return True
    finally:
        staged.unlink()


def _take_over(out: Path, path: Path, stale: dict[str, object]) -> None:
    """Remove a dead process's lock without ever removing a live one taken meanwhile."""
    grave = temporary_name(out)  # rename first: only one of several racing takers gets the file
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    try:
        moved = json.loads(grave.read_text())
    except (OSError, ValueError):
        moved = None
    if moved == stale:
        grave.unlink()
        return
    try:  # another taker's fresh lock slipped in between our read and rename: put it back
        os.link(grave, path)  # fails if a third run holds it by now (then the one moved runs unlocked)
        grave.unlink()
    except FileExistsError:
        grave.unlink()
    except OSError:  # no hard links on this filesystem
        os.rename(grave, path)


def _refusal(out: Path, path: Path, rec: dict[str, object] | None) -> OutputLockedError:
    if rec is None:
        return OutputLockedError(f"{out}: {path} exists but is not a lock ckptavg can read; "
                                 "if no ckptavg run is writing this output, delete it and retry")
    who = f"pid {rec['pid']} on {rec['host']}, since {rec.get('since', '?')}"
    if rec["host"] == HOST:
        return OutputLockedError(f"{out}: another ckptavg run ({who}) is writing it; "
                                 "wait for it to finish or choose another -o")
    return OutputLockedError(f"{out}: locked by a ckptavg run on another host ({who}); "
                             f"if no run there is writing it, delete {path} and retry")


def acquire(out: Path) -> tuple[Path, str]:
    """Take the lock of ``out`` (its parent must exist); returns the lock file and our nonce.

    Raises:
        OutputLockedError: another live run holds it, or a lock we cannot judge is in the way.
    """
    path = lock_path(out)
    nonce = uuid.uuid4().hex
    record: dict[str, object] = {
        "host": HOST, "pid": os.getpid(), "nonce": nonce,
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for _ in range(5):
        if _create(out, path, record):
            return path, nonce
        try:
            holder = _read(path)
        except FileNotFoundError:
            continue  # released meanwhile: try again
        if holder is None or holder["host"] != HOST or not isinstance(holder["pid"], int) or pid_alive(holder["pid"]):
            raise _refusal(out, path, holder)
        _take_over(out, path, holder)
    raise _refusal(out, path, None)


def release(path: Path, nonce: str) -> None:
    """Remove the lock if it is still ours (never another run's)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(rec, dict) and rec.get("nonce") == nonce:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the lock of ``out`` for the duration of the block (creating ``out``'s parent if needed).

    Example:
        >>> with output_lock(Path("runs/tiny-lawa5")):   # doctest: +SKIP
        ...     write_it()
    """
    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        path, nonce = acquire(out)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{out}: cannot create output: {e.strerror or e}") from None
    try:
        yield path
    finally:
        release(path, nonce)


__all__ = ["HOST", "acquire", "is_stale_temporary", "lock_path", "output_lock", "pid_alive", "release",
           "temporary_name"]
