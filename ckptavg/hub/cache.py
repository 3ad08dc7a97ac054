"""The standard Hugging Face cache as ckptavg uses it: what a revision holds offline, which blobs
were verified, branch refs for offline discovery, and eviction of consumed revisions."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import HubError
from ..trajectory import HUB_PREFIX, Checkpoint, HubFile, HubSource
from . import transport
from .transport import HubWarning

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_OID = re.compile(r"[0-9a-f]{40}")


def storage(repo_id: str) -> Path:
    # The cache's documented layout: <HF_HUB_CACHE>/models--org--name/{refs,snapshots,blobs}
    return transport.cache_dir() / ("models--" + repo_id.replace("/", "--"))


def cached_files(repo_id: str, commit: str) -> dict[str, HubFile]:
    """Files of a revision that the cache holds, identified by the blob names they link to."""
    snap = storage(repo_id) / "snapshots" / commit
    out: dict[str, HubFile] = {}
    if not snap.is_dir():
        return out
    for p in sorted(snap.iterdir()):
        if not p.is_file():  # a folder, or a link whose blob was deleted
            continue
        blob = os.path.basename(os.readlink(p)) if p.is_symlink() else ""
        out[p.name] = HubFile(p.name, p.stat().st_size,
                              blob if _SHA256.fullmatch(blob) else None,
                              blob if _GIT_OID.fullmatch(blob) else None)
    return out


def cached_branches(repo_id: str) -> dict[str, str]:
    refs = storage(repo_id) / "refs"
    if not refs.is_dir():
        raise HubError(
            f"{HUB_PREFIX}{repo_id}: HF_HUB_OFFLINE=1 and the Hugging Face cache ({transport.cache_dir()}) holds no revision of it; "
            "run once online, or unset HF_HUB_OFFLINE"
        )
    return {p.name: p.read_text().strip() for p in sorted(refs.iterdir()) if p.is_file()}


def _verify(path: Path, f: HubFile) -> str | None:
    """None if the file's bytes are the Hub's, else what is wrong."""
    size = path.stat().st_size
    if size != f.size:
        return f"{size} bytes, the Hub lists {f.size}"
    if f.sha256:
        h = hashlib.sha256()
        want = f.sha256
    elif f.git_oid and _GIT_OID.fullmatch(f.git_oid):
        h = hashlib.sha1(f"blob {size}\0".encode())  # git's blob id: sha1 over a header and the bytes
        want = f.git_oid
    else:
        return None
    with open(path, "rb") as fh:
        while block := fh.read(8 * 2**20):
            h.update(block)
    got = h.hexdigest()
    return None if got == want else f"bytes hash to {got[:12]}…, the Hub lists {want[:12]}…"


def _stamp(path: Path, f: HubFile) -> tuple[Path, str]:
    """Where ckptavg remembers that a cached blob was verified, and what it must still look like
    (size, mtime, inode): a 12B revision is then hashed once, not at every run that uses it.
    Kept beside the HF cache, not inside it, so huggingface_hub's cache tools never see it."""
    st = path.resolve().stat()
    return transport.cache_dir().parent / "ckptavg-verified" / f.content_id, f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def verified(path: Path, f: HubFile) -> str | None:
    """``_verify``, skipped for a blob verified before and untouched since."""
    marker, state = _stamp(path, f)
    try:
        if marker.read_text() == state:
            return None
    except OSError:
        pass
    bad = _verify(path, f)
    if bad is None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(state)
        except OSError:
            pass  # a read-only cache: verify again next time
    return bad


def drop(path: Path) -> None:
    """Remove a bad copy from the cache: the snapshot link and the blob it points to."""
    blob = path.parent / os.readlink(path) if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


def remember_branches(sources: Sequence[HubSource]) -> None:
    """Record branch → commit in the cache's refs/, so HF_HUB_OFFLINE=1 discovery finds them later."""
    from huggingface_hub import HfApi

    def one(s: HubSource) -> None:
        try:
            resolved = transport.retrying(s.uri, lambda: HfApi().resolve_revision(s.repo_id, revision=s.revision))
        except HubError as e:
            warnings.warn(f"{e} (not recorded in the cache's refs; offline discovery will not see it)",
                          HubWarning, stacklevel=4)
            return
        if resolved.resolved != s.commit:
            warnings.warn(f"{s.uri}: the branch moved to {resolved.resolved[:10]} during the run; "
                          f"averaged commit {s.commit[:10]}", HubWarning, stacklevel=4)

    with ThreadPoolExecutor(transport.WORKERS, thread_name_prefix="ckptavg-hub") as pool:
        list(pool.map(one, list({s.uri: s for s in sources}.values())))


def evict(checkpoints: Iterable[Checkpoint]) -> int:
    """Delete the weight files of these Hub checkpoints from the HF cache, once consumed.

    Uses huggingface_hub's own cache deletion: a blob still linked from another revision stays,
    and so do refs, index, config and tokenizer files, so the revision can be fetched again later.
    Local checkpoints are ignored.

    Returns:
        Bytes freed.

    Raises:
        HubError: the cache of a repo is inconsistent (``hf cache ls`` shows why).

    Example:
        >>> sel = discover("hf://EleutherAI/pythia-12b").window(5, at=143_000)   # doctest: +SKIP
        >>> average(sel, "pythia-12b-lawa5"); evict(sel)                         # doctest: +SKIP
    """
    targets = {(c.source.repo_id, c.source.commit, f.name)
               for c in checkpoints if c.source is not None for f in c.source.weights}
    if not targets or not transport.cache_dir().is_dir():
        return 0
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(transport.cache_dir())
    repos = {r for r, _, _ in targets}
    for w in info.warnings:
        for r in repos:
            if storage(r).name in str(w):
                raise HubError(f"{HUB_PREFIX}{r}: cannot evict, the cache is inconsistent: {transport.first_line(w)}")
    files = [f for repo in info.repos if repo.repo_type == "model" and repo.repo_id in repos
             for rev in repo.revisions for f in rev.files
             if (repo.repo_id, rev.commit_hash, f.file_name) in targets]
    if not files:
        return 0
    strategy = info.delete_files(*files)
    strategy.execute()
    return int(strategy.expected_freed_size)


__all__ = ["cached_branches", "cached_files", "drop", "evict", "remember_branches", "storage", "verified"]
