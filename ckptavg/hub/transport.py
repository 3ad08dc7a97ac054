"""Talking to the Hub: the one retry loop, and Hub/network failures as one-line errors.

Every request ckptavg makes (refs, trees, headers, downloads) goes through :func:`retrying`: a
5xx/429/408 answer, a refused or broken connection, or a download whose bytes do not hash to what
the Hub lists is retried ``ATTEMPTS`` times with a doubling wait; anything else fails at once with a
:class:`~ckptavg.errors.HubError` naming the repo, branch or file. huggingface_hub is imported
inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import HubError
from . import compat

WORKERS = 8  # parallel API calls and downloads: enough to fill a link with large files, few enough for the Hub's rate limits
ATTEMPTS = 4  # per file and per API call: a 500, a dropped connection or a corrupt copy is retried this often
RETRY_WAIT = 1.0  # seconds before the second attempt, doubled for each further one

T = TypeVar("T")


class HubWarning(UserWarning):
    """Something about a Hub trajectory the user should know that does not stop the job."""


class Corrupt(Exception):
    """A downloaded file whose bytes are not the Hub's (already removed from the cache): worth another try."""


def first_line(e: BaseException) -> str:
    if compat.timed_out(e):
        return "timed out"  # requests words it "HTTPConnectionPool(host=…, port=…): Read timed out."
    e = compat.reason(e)
    text = str(e).strip()
    return (text.splitlines()[0] if text else e.__class__.__name__)[:300]


def offline() -> bool:
    return compat.offline()


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _expected(e: BaseException) -> bool:
    """An error the Hub, the network or the cache can cause (anything else is a bug and propagates)."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        NotASafetensorsRepoError,
        SafetensorsParsingError,
    )

    kinds = (OSError, HfHubHTTPError, EntryNotFoundError, SafetensorsParsingError, NotASafetensorsRepoError, Corrupt)
    return isinstance(e, kinds + compat.http_errors())


def _transient(e: BaseException) -> bool:
    """Worth another attempt: the Hub answered 5xx/429/408, or the connection failed or broke."""
    from huggingface_hub.utils import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, Corrupt):
        return True
    if offline() or isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)) or compat.remote_entry_missing(e):
        return False
    if isinstance(e, LocalEntryNotFoundError):  # the metadata request failed and the cache has nothing
        return True  # (checked first: before 1.0 it is an HfHubHTTPError without a response)
    response = getattr(e, "response", None)
    if isinstance(e, (HfHubHTTPError, *compat.http_errors())) and response is not None:
        # 0.3x clients retry a 5xx themselves, then raise requests' own HTTPError
        status = getattr(response, "status_code", 0)
        return status in (408, 429) or status >= 500
    if isinstance(e, compat.transport_errors()):  # refused, reset, timed out, closed mid-body
        return True
    # hf_hub_download's own size check after an interrupted transfer
    return isinstance(e, OSError) and "Consistency check failed" in str(e)


def _hub_error(where: str, e: BaseException) -> HubError:
    from huggingface_hub.utils import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if offline() or isinstance(e, OfflineModeIsEnabled):
        return HubError(
            f"{where}: not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE=1; "
            "run once online, or unset HF_HUB_OFFLINE"
        )
    if isinstance(e, GatedRepoError):
        return HubError(f"{where}: gated repository; accept its terms on the Hub and log in (`{compat.login_command()}`)")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"{where}: no such model repository on {endpoint()} (or it is private: log in with `{compat.login_command()}`)"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{where}: no such revision on the Hub")
    if compat.remote_entry_missing(e):
        return HubError(f"{where}: the Hub has no such file at this revision")
    return HubError(f"{where}: {first_line(e)}")


_inside = threading.local()  # .active: this thread is in retrying(), which reports retries itself


class _OwnRetries(logging.Filter):
    """Drop huggingface_hub's per-attempt warnings ("Error while downloading … Trying to resume
    download…", "Retrying in 1s") raised under :func:`retrying`: it says one line per retry itself.
    Everywhere else, and at ERROR level, the client's logging is untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not getattr(_inside, "active", False)


_FILTER = _OwnRetries()


def _quiet_client_retries() -> None:
    for name in ("huggingface_hub.file_download", "huggingface_hub.utils._http"):
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


def retrying(where: str, fn: Callable[[], T], *, failed: str = "") -> T:
    """``fn()``, retried on transient failures; any failure becomes one HubError naming ``where``.

    Args:
        where: the repo, revision or file, for messages.
        fn: one attempt; raises :class:`Corrupt` for a download whose bytes were wrong.
        failed: what the last line says failed [default: the Hub at its endpoint].
    """
    _quiet_client_retries()
    last: BaseException | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            assert last is not None
            warnings.warn(f"{where}: {first_line(last)}; retry {attempt} of {ATTEMPTS - 1}", HubWarning, stacklevel=2)
            time.sleep(RETRY_WAIT * 2 ** (attempt - 1))
        outer = getattr(_inside, "active", False)
        _inside.active = True
        try:
            return fn()
        except Exception as e:
            if not _expected(e):
                raise
            if not _transient(e):
                raise _hub_error(where, e) from None
            last = e
        finally:
            _inside.active = outer
    assert last is not None
    if failed:
        raise HubError(f"{where}: {failed} failed {ATTEMPTS} times, last: {first_line(last)}")
    raise HubError(
        f"{where}: the Hub at {endpoint()} failed {ATTEMPTS} times ({first_line(last)}); "
        "retry later, or set HF_HUB_OFFLINE=1 to use what the cache holds"
    )


__all__ = ["ATTEMPTS", "RETRY_WAIT", "WORKERS", "Corrupt", "HubWarning", "cache_dir", "endpoint", "first_line", "offline", "retrying"]
