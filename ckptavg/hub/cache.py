"""The standard Hugging Face cache as ckptavg uses it: what a revision holds offline, which blobs
were verified, branch refs for offline discovery, and eviction of consumed revisions."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import HubError
from ..trajectory import HUB_PREFIX, Checkpoint, HubFile, HubSource
from . import compat, transport
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


def drop_empty_partial(repo_id: str, f: HubFile) -> None:
    """Remove the client's zero-byte ``blobs/<etag>.incomplete`` of a download that never started."""
    part = storage(repo_id) / "blobs" / f"{f.content_id}.incomplete"
    try:
        if part.stat().st_size == 0:
            part.unlink()
    except OSError:
        pass


def remember_branches(sources: Sequence[HubSource]) -> None:
    """Record branch → commit in the cache's refs/ (the file huggingface_hub itself writes when it
    resolves a branch), so HF_HUB_OFFLINE=1 discovery finds them later; warn if a branch moved."""
    from huggingface_hub import HfApi

    by_repo: dict[str, list[HubSource]] = {}
    for s in {s.uri: s for s in sources}.values():
        by_repo.setdefault(s.repo_id, []).append(s)

    def one(repo_id: str) -> None:
        try:
            refs = transport.retrying(f"{HUB_PREFIX}{repo_id}", lambda: HfApi().list_repo_refs(repo_id))
        except HubError as e:
            warnings.warn(f"{e} (not recorded in the cache's refs; offline discovery will not see it)",
                          HubWarning, stacklevel=4)
            return
        now = {b.name: b.target_commit for b in refs.branches}
        for s in by_repo[repo_id]:
            if now.get(s.revision, s.commit) != s.commit:
                warnings.warn(f"{s.uri}: the branch moved to {now[s.revision][:10]} during the run; "
                              f"averaged commit {s.commit[:10]}", HubWarning, stacklevel=4)
                continue
            _write_ref(repo_id, s.revision, s.commit)

    with ThreadPoolExecutor(transport.WORKERS, thread_name_prefix="ckptavg-hub") as pool:
        list(pool.map(one, list(by_repo)))


def _write_ref(repo_id: str, branch: str, commit: str) -> None:
    ref = storage(repo_id) / "refs" / branch
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)  # readers see the old ref or the new one, never half a file
    except OSError as e:
        warnings.warn(f"{HUB_PREFIX}{repo_id}@{branch}: cannot record the branch in the cache's refs ({e}); "
                      "offline discovery will not see it", HubWarning, stacklevel=5)


def evict(checkpoints: Iterable[Checkpoint]) -> int:
    """Delete the weight files of these Hub checkpoints from the HF cache, once consumed.

    Uses huggingface_hub's own single-file deletion where the client has it (2.x), the same rule
    otherwise: a blob still linked from another revision stays, and so do refs, index, config and
    tokenizer files, so the revision can be fetched again later.
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
    return compat.delete_cached_files(info, files)


__all__ = ["cached_branches", "cached_files", "drop", "drop_empty_partial", "evict", "remember_branches", "storage",
           "verified"]
