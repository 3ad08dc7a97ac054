"""Where averaged tensors go (a sharded safetensors directory, or a state dict in memory), and how
a folder output appears: built in a temporary sibling, renamed into place whole, never over an input
and never over something else without ``force``; a failed write is one line naming the file.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import OutputError, OutputExistsError
from .dtypes import to_torch
from .layout import SAFETENSORS_INDEX, shard_names, write_index
from .lock import is_stale_temporary, output_lock, temporary_name
from .safetensors import SafetensorsWriter, TensorInfo, plan_shards

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError  # unreachable


def write_error(e: OSError, file: str | os.PathLike[str], needed: int | None = None) -> OutputError:
    """One line for a failed output write: the file, what the OS said, and for a full disk (or quota,
    or file-size limit) how much room the output needs."""
    if e.errno in DISK_FULL:
        room = f" (the output needs about {_human(needed)})" if needed else ""
        return OutputError(f"{file}: {e.strerror or e} while writing the output{room}; nothing was left in place "
                           "and the inputs are untouched: free space or choose another -o")
    return OutputError(f"{file}: {e.strerror or e} while writing the output; nothing was left in place")


class Sink(Protocol):
    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Raw values for elements [start, start + len(values)) of flattened tensor ``name``."""


class SafetensorsDirSink:
    """Writes ``model.safetensors`` (or HF-named shards plus ``model.safetensors.index.json``).

    ``label`` is the folder named in error messages (the final output, not its hidden temporary);
    any OSError while writing becomes an :class:`~ckptavg.errors.OutputError` naming the file.
    """

    def __init__(self, directory: Path, entries: Sequence[TensorInfo], max_shard_size: int | None = None,
                 *, label: Path | None = None, stem: str = "model", strip: str = "") -> None:
        self.directory = directory
        self.label = label or directory
        self._strip = len(strip)  # a wrapper prefix every name loses in the file (ckptavg.keys); written under the rest
        if strip:
            entries = [TensorInfo(t.name[len(strip):], t.dtype, t.shape) for t in entries]
        self.nbytes = sum(t.nbytes for t in entries)  # what the weights need on disk, headers aside
        shards = plan_shards(entries, max_shard_size)
        if stem != "model" and len(shards) > 1:  # PEFT opens one adapter_model.safetensors, never shards
            raise OutputError(f"{self.label}: a {stem}.safetensors cannot be sharded (PEFT loads one file); "
                              "drop --max-shard-size")
        names = shard_names(len(shards), stem)
        self.files = [directory / n for n in names]
        self._writers: list[SafetensorsWriter] = []
        self._route: dict[str, SafetensorsWriter] = {}
        path = self.files[0]
        try:
            for path, shard in zip(self.files, shards):
                w = SafetensorsWriter(path, shard)
                self._writers.append(w)
                for t in shard:
                    self._route[t.name] = w
            if len(shards) > 1:
                path = directory / SAFETENSORS_INDEX
                write_index(path, zip(names, shards))
        except OSError as e:
            self.close()
            raise self._failed(e, path) from None
        except BaseException:
            self.close()
            raise

    def _failed(self, e: OSError, path: Path) -> OutputError:
        return write_error(e, self.label / path.name, self.nbytes)

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        name = name[self._strip:]
        w = self._route[name]
        try:
            w.write(name, start, values)
        except OSError as e:
            raise self._failed(e, w.path) from None

    def close(self, fsync: bool = False) -> None:
        failed: OutputError | None = None
        for w in self._writers:
            try:
                w.close(fsync)
            except OSError as e:
                failed = failed or self._failed(e, w.path)
        if failed is not None:
            raise failed

    def abort(self) -> None:
        """Close after a failure: the files are about to be deleted, so errors do not matter."""
        try:
            self.close()
        except OutputError:
            pass


class StateDictSink:
    """Collects the averaged tensors in memory; ``state_dict()`` returns torch tensors."""

    def __init__(self, entries: Sequence[TensorInfo]) -> None:
        self.entries = list(entries)
        self.arrays = {t.name: np.empty(t.numel, t.dtype.storage) for t in entries}

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        self.arrays[name][start : start + len(values)] = values

    def state_dict(self) -> dict[str, Any]:
        return {t.name: to_torch(self.arrays.pop(t.name), t.dtype, t.shape) for t in self.entries}



def remove_entry(p: Path) -> None:
    """Delete ``p`` without following it: a link is unlinked (its target is left alone), a folder's
    own links are unlinked, never traversed (``shutil.rmtree``'s rule)."""
    if p.is_symlink() or not p.is_dir():
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(p, ignore_errors=True)


def clean_stale(out: Path) -> list[Path]:
    """Remove temporaries that crashed runs of *this host* left beside ``out`` (their process is
    gone). Another host's temporaries are never touched: their process cannot be checked from here."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if is_stale_temporary(out, p):
            remove_entry(p)
            removed.append(p)
    return removed


def check_inputs(out: Path, inputs: Sequence[str | os.PathLike[str]], *, replaces: bool = True) -> None:
    """Refuse an output inside an input, or one that contains an input, comparing real paths
    (symlinks resolved) both ways.

    ``replaces``: ``out`` itself is replaced (merge), so a link at ``out`` is not followed; else the
    outputs are written inside ``out`` (series), which may be a link to the real folder.

    Raises:
        OutputError: naming the input.
    """
    out = Path(os.path.abspath(out))
    where = out.parent.resolve() / out.name if replaces else out.resolve()
    for p in inputs:
        src = Path(p).resolve()
        if where == src or src in where.parents:
            raise OutputError(f"{out}: output would be written inside the input {p}; choose another -o")
        if where in src.parents:
            real = "" if Path(os.path.abspath(p)) == src else f" (really {src})"
            raise OutputError(f"{out}: the output folder contains the input {p}{real}; choose another -o")


def check_output(out: Path, force: bool, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse an output that would overwrite work or land inside an input, before any work.

    Without ``force`` only an absent or empty folder is written; ``force`` replaces a folder or a
    symbolic link (the link itself, never its target), and never an input.
    """
    out = Path(os.path.abspath(out))
    check_inputs(out, inputs)
    if out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: is a symbolic link (to {os.readlink(out)}); give the real folder as -o, "
                                    "or use --force to replace the link itself (its target is left alone)")
        return
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise OutputExistsError(f"{out}: already exists and is not empty; use --force to replace it")


def begin_directory(out: Path, force: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Check ``out`` and create the hidden temporary sibling the output is built in (named after
    this host and process, so that only this host cleans it up once the process is gone)."""
    out = Path(os.path.abspath(out))
    check_output(out, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = temporary_name(out)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{out}: cannot create output: {e.strerror or e}") from None
    return tmp


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_directory(tmp: Path, out: Path, fsync: bool = True) -> None:
    """Move a finished temporary into place (replacing an old ``out`` only once the new one is whole).

    An old ``out`` is swapped with the temporary in one step where the OS can (else renamed to a
    temporary name of this process first) and then deleted without following links: nothing named
    ``out`` is ever missing or half-written, and a kill during the deletion leaves only a temporary
    that the next run on this host removes.

    With ``fsync`` every file and the folder reach the disk before the rename, and the rename
    before this returns: after a power loss ``out`` is either absent or whole, never a folder of
    empty files.
    """
    out = Path(os.path.abspath(out))
    if fsync:
        for p in sorted(tmp.iterdir()):
            if p.is_file() and not p.is_symlink():
                _fsync(p)
        _fsync(tmp)
    if os.path.lexists(out):
        old = tmp  # after the swap the temporary's name holds the old output
        if not _exchange(tmp, out):
            old = temporary_name(out)
            os.rename(out, old)
            os.rename(tmp, out)
        remove_entry(old)
    else:
        os.rename(tmp, out)
    if fsync:
        _fsync(out.parent)


def public_error(e: OSError, tmp: Path, out: Path) -> OutputError | None:
    """The one-line error for an OSError raised while building ``out`` in ``tmp``: a full disk
    anywhere, or any error on a file of the output (named at its final place); None otherwise."""
    name = Path(os.fsdecode(e.filename)) if e.filename else None
    inside = name is not None and (name == tmp or tmp in name.parents)
    if not inside and e.errno not in DISK_FULL:
        return None
    shown = out / name.relative_to(tmp) if name is not None and inside else (name or out)
    return write_error(e, shown)


@contextmanager
def atomic_directory(out: Path, force: bool = False, fsync: bool = True,
                     inputs: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it is renamed to ``out``, on any error
    (or a kill) nothing appears at ``out``. The output is locked meanwhile (a second writer gets
    :class:`~ckptavg.errors.OutputLockedError`). A leftover temporary is hidden (dot name) and is
    removed by the next run on this host once its process is gone.

    Raises:
        OutputError: ``out`` is inside or holds an input, exists (without ``force``), is locked,
            or a write failed (one line naming the file).
    """
    out = Path(os.path.abspath(out))
    with output_lock(out):
        tmp = begin_directory(out, force, inputs)
        try:
            yield tmp
            commit_directory(tmp, out, fsync)
        except OSError as e:
            remove_entry(tmp)
            err = public_error(e, tmp, out)
            if err is None:
                raise
            raise err from None
        except BaseException:
            remove_entry(tmp)
            raise
