"""huggingface_hub 0.20 → 2.x behind a few functions: the one module that knows which client is installed.

Users run ckptavg inside the environment that trains or evaluates their models, so the client is
whatever their transformers pins (0.2x/0.3x for transformers 4.40–4.57, 1.x or 2.x for 5.x).
What differs between those versions, and how it is bridged here:

- **HTTP stack**: requests (0.x), httpx (1.x) or httpx2 (2.x). Their errors are matched through
  whichever of the three the client has imported (:func:`http_errors`, :func:`transport_errors`).
- **Errors**: 1.x split "no such file" into ``RemoteEntryNotFoundError`` and
  ``LocalEntryNotFoundError``; in 0.x the remote one is a plain ``EntryNotFoundError`` and the
  local one its subclass (:func:`remote_entry_missing` tells them apart on every version). All the
  other classes are imported from ``huggingface_hub.utils``, where every version exports them.
- **Downloads**: ``hf_hub_download(tqdm_class=…)`` arrived in 1.x. Before, the client's own bars
  are switched off in ckptavg's download threads only, and the shared bar advances by whole files.
  Before 0.23 a broken transfer resumes only with ``resume_download=True``, which is passed.
- **Single-file cache deletion**: ``HFCacheInfo.delete_files`` (2.x, which also knows its shared
  blob store); before, the same rule by hand: unlink the snapshot entries, then each blob that no
  other cached file links to.
- **Offline**: ``constants.HF_HUB_OFFLINE`` is read at every call (``is_offline_mode()`` of 2.x
  returns it); downloads pass ``local_files_only`` so that no version depends on the HTTP session
  it built before the switch was flipped.

``lfs["size"]`` (not ``lfs.size``) reads a tree entry's LFS info on every version: a TypedDict in
0.20/0.21, a dict-backed dataclass since. huggingface_hub is imported inside the functions.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

_quiet = threading.local()  # .on: this thread downloads for ckptavg; the client's own bars stay off


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _loaded(*names: tuple[str, str]) -> tuple[type[BaseException], ...]:
    # Only stacks the client already imported: an error it raised comes from one of them.
    return tuple(getattr(sys.modules[m], a) for m, a in names if m in sys.modules and hasattr(sys.modules[m], a))


def http_errors() -> tuple[type[BaseException], ...]:
    """Every error of the client's HTTP stack (requests' are OSErrors already)."""
    return _loaded(("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException"))


def transport_errors() -> tuple[type[BaseException], ...]:
    """Refused, reset, timed out, closed mid-body: worth another attempt."""
    return _loaded(("httpx2", "TransportError"), ("httpx", "TransportError"),
                   ("requests", "ConnectionError"), ("requests", "Timeout"),
                   ("requests.exceptions", "ChunkedEncodingError"))


def reason(e: BaseException) -> BaseException:
    """The error worth showing: requests wraps urllib3's (``ConnectionError(MaxRetryError(…))``,
    which prints as a tuple) and urllib3 keeps the cause in ``.reason``."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    inner = getattr(e, "reason", None)
    return inner if isinstance(inner, BaseException) else e


def timed_out(e: BaseException) -> bool:
    """A connect or read timeout, however the stack wraps it (requests raises a read timeout in
    the middle of a body as a ConnectionError holding urllib3's ReadTimeoutError)."""
    kinds: tuple[type[BaseException], ...] = (TimeoutError, *_loaded(("httpx2", "TimeoutException"), ("httpx", "TimeoutException"),
                                    ("requests", "Timeout"), ("urllib3.exceptions", "TimeoutError")))
    inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
    return any(isinstance(x, kinds) for x in (e, inner, e.__cause__, e.__context__))


def remote_entry_missing(e: BaseException) -> bool:
    """The Hub answered that the file does not exist at this revision (not: the cache lacks it)."""
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    return isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError)


@cache
def login_command() -> str:
    """How this client's CLI logs in: ``hf`` arrived in 0.34, ``huggingface-cli`` before."""
    import importlib.util

    return "hf auth login" if importlib.util.find_spec("huggingface_hub.cli") else "huggingface-cli login"


@cache
def _download_options() -> tuple[bool, dict[str, Any]]:
    """(takes ``tqdm_class``, arguments every call passes). Before 0.23 a broken transfer started
    over unless ``resume_download=True``; since, the client always resumes (and warns if asked)."""
    from huggingface_hub import hf_hub_download

    params = inspect.signature(hf_hub_download).parameters
    resume = params.get("resume_download")
    return "tqdm_class" in params, {"resume_download": True} if resume is not None and resume.default is False else {}


def _silence_client_bars() -> None:
    """Before ``tqdm_class``, every bar of the client asks ``are_progress_bars_disabled`` of its tqdm
    module; answer yes in ckptavg's download threads, and what the client would say elsewhere."""
    mod = sys.modules.get("huggingface_hub.utils.tqdm")
    original = getattr(mod, "are_progress_bars_disabled", None)
    if original is None or getattr(original, "ckptavg", False):
        return

    def are_progress_bars_disabled(*args: Any, **kwargs: Any) -> bool:
        return getattr(_quiet, "on", False) or bool(original(*args, **kwargs))

    are_progress_bars_disabled.ckptavg = True  # type: ignore[attr-defined]
    setattr(mod, "are_progress_bars_disabled", are_progress_bars_disabled)  # noqa: B010


def bar_class(bar: Any | None) -> type:
    """A tqdm class for ``hf_hub_download`` that shows nothing itself and adds bytes to ``bar`` (if any)."""
    from tqdm import tqdm

    class Into(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if bar is not None:
                bar.update(n)
            return None

        # Present so Xet and resumed downloads report to this bar once, not through a second one.
        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return Into


def download(repo_id: str, filename: str, commit: str, bar: Any | None) -> Path:
    """``hf_hub_download`` pinned to ``commit``: its bytes counted on ``bar``, the client drawing nothing."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    takes_tqdm_class, options = _download_options()
    options = options | {"revision": commit, "local_files_only": offline()}
    if takes_tqdm_class:
        return Path(hf_hub_download(repo_id, filename, tqdm_class=bar_class(bar), **options))
    _silence_client_bars()
    cached = isinstance(try_to_load_from_cache(repo_id, filename, revision=commit), str)
    outer = getattr(_quiet, "on", False)
    _quiet.on = True
    try:
        path = Path(hf_hub_download(repo_id, filename, **options))
    finally:
        _quiet.on = outer
    if bar is not None and not cached:
        bar.update(path.stat().st_size)
    return path


def delete_cached_files(info: Any, files: Iterable[Any]) -> int:
    """Delete these ``CachedFileInfo`` entries of a ``scan_cache_dir()`` result; returns bytes freed.

    A blob still linked from a file not deleted stays; refs and snapshot folders stay."""
    chosen = list(files)
    if hasattr(info, "delete_files"):
        strategy = info.delete_files(*chosen)
        strategy.execute()
        return int(strategy.expected_freed_size)
    selected = {f.file_path for f in chosen}
    kept = {f.blob_path for repo in info.repos for rev in repo.revisions for f in rev.files
            if f.file_path not in selected}
    blobs = {f.blob_path: f.size_on_disk for f in chosen if f.blob_path not in kept}
    # Snapshot entries first: a link must never point at a deleted blob.
    for f in chosen:
        Path(f.file_path).unlink(missing_ok=True)
    for blob in blobs:
        Path(blob).unlink(missing_ok=True)
    return sum(blobs.values())


__all__ = ["bar_class", "delete_cached_files", "download", "http_errors", "login_command", "offline",
           "reason", "remote_entry_missing", "timed_out", "transport_errors"]
