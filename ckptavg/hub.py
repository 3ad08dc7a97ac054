"""Hub revisions → Trajectory, and Hub checkpoints → files in the standard Hugging Face cache.

A Hub trajectory is spelled with huggingface_hub's own URI grammar: ``hf://org/name`` is every
branch of the model repo whose name carries a step (Pythia: ``step0`` … ``step143000``), and
``hf://org/name@step1000`` is that one branch. Steps are read from branch names with a regex
(``DEFAULT_STEP_PATTERN``; OLMo's ``step1000-tokens4B`` needs ``^step(\\d+)-tokens\\d+B?$``);
``main`` and other branches without a step are ignored.

Discovery reads only metadata: the repo's refs, then the file tree of each branch's commit (names,
sizes, LFS sha256), plus each sharded revision's small index file. Checkpoints come back with
``files=()`` and ``tensors=None`` and a :class:`HubSource` saying what to fetch. Weight files
that two step branches share byte for byte (same LFS sha256) are recorded in ``same_as``: the Hub
holds the same checkpoint under two names (76 step branches of pythia-2.8b are the final model),
and :func:`materialise` refuses to average them unless told to.

:func:`materialise` runs inside :func:`ckptavg.average`, before any tensor is read: it checks
safetensors headers with range requests (names, shapes, dtypes against each other and against the
index) before the big downloads, then downloads with ``hf_hub_download`` — weights of each selected
revision, config and tokenizer files of the newest only, several files at once, pinned to the
commits discovery saw, into the standard cache where other HF tools find them. A file already in
the cache is never downloaded again. Every file is checked against the Hub's sha256 (LFS) or git
blob id after download, because ``hf_hub_download`` checks sizes only; a corrupt copy is removed
from the cache and fetched again. ``.bin`` files have no header to read remotely: the engine reads
their names and shapes after download, before averaging.

With ``HF_HUB_OFFLINE=1`` nothing touches the network: discovery reads the cache's
``refs/<branch>`` files and ``snapshots/<commit>/`` folders, so the trajectory is what the cache
holds. :func:`evict` deletes the weight files of consumed revisions from the cache (refs, configs and
blobs still used by another revision stay).

huggingface_hub is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .discovery import _NOT_WEIGHTS, CONFIG_FILES, SAFETENSORS_EXT, WEIGHT_EXT, check_compatible, read_index
from .errors import CkptavgError
from .trajectory import Checkpoint, Trajectory

if TYPE_CHECKING:
    from .io.safetensors import TensorInfo

PREFIX = "hf://"
DEFAULT_STEP_PATTERN = r"^step(\d+)$"
WORKERS = 8  # parallel API calls and downloads: enough to fill a link with large files, few enough for the Hub's rate limits
ATTEMPTS = 4  # per file and per API call: a 500, a dropped connection or a corrupt copy is retried this often
RETRY_WAIT = 1.0  # seconds before the second attempt, doubled for each further one

T = TypeVar("T")


class HubWarning(UserWarning):
    """Something about a Hub trajectory the user should know that does not stop the job."""


@dataclass(frozen=True)
class HubFile:
    """One file of a revision as the Hub lists it."""

    name: str
    size: int
    sha256: str | None = None  # LFS oid; None for a small file stored in git
    git_oid: str | None = None  # git blob id (of the LFS pointer, for an LFS file)

    @property
    def content_id(self) -> str:
        """What identifies the bytes: the LFS sha256, else the git blob id."""
        return self.sha256 or self.git_oid or self.name


@dataclass(frozen=True)
class HubSource:
    """Where a Hub checkpoint's files are: repo, branch, the commit it pointed to, and its files."""

    repo_id: str
    revision: str  # the branch, e.g. "step1000"
    commit: str  # the commit the branch pointed to at discovery; downloads are pinned to it
    weights: tuple[HubFile, ...]  # in shard order
    index: HubFile | None = None
    configs: tuple[HubFile, ...] = ()  # config and tokenizer files present at this revision
    same_as: tuple[str, ...] = ()  # other step branches holding byte-identical weight files

    @property
    def uri(self) -> str:
        return f"{PREFIX}{self.repo_id}@{self.revision}"


def is_hub(path: object) -> bool:
    """True for an ``hf://`` string."""
    return isinstance(path, str) and path.startswith(PREFIX)


# Errors ------------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else e.__class__.__name__)[:300]


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _expected(e: BaseException) -> bool:
    """An error the Hub, the network or the cache can cause (anything else is a bug and propagates)."""
    from huggingface_hub import errors

    kinds: tuple[type[BaseException], ...] = (
        OSError, errors.HfHubHTTPError, errors.EntryNotFoundError, errors.RevisionResolutionError,
        errors.SafetensorsParsingError, errors.NotASafetensorsRepoError,
    )
    try:
        import httpx2

        kinds += (httpx2.HTTPError,)
    except ImportError:  # pragma: no cover - huggingface_hub 2.x depends on httpx2
        pass
    return isinstance(e, kinds)


def _transient(e: BaseException) -> bool:
    """Worth another attempt: the Hub answered 5xx/429/408, or the connection failed or broke."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _offline() or isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)):
        return False
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else 0
        return status in (408, 429) or status >= 500
    if isinstance(e, LocalEntryNotFoundError):  # the metadata request failed and the cache has nothing
        return True
    try:
        import httpx2

        if isinstance(e, httpx2.TransportError):  # refused, reset, timed out, closed mid-body
            return True
    except ImportError:  # pragma: no cover - huggingface_hub 2.x depends on httpx2
        pass
    # hf_hub_download's own size check after an interrupted transfer
    return isinstance(e, OSError) and "Consistency check failed" in str(e)


def _hub_error(where: str, e: BaseException) -> CkptavgError:
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _offline() or isinstance(e, OfflineModeIsEnabled):
        return CkptavgError(
            f"{where}: not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE=1; "
            "run once online, or unset HF_HUB_OFFLINE"
        )
    if isinstance(e, GatedRepoError):
        return CkptavgError(f"{where}: gated repository; accept its terms on the Hub and log in (`hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return CkptavgError(
            f"{where}: no such model repository on {_endpoint()} (or it is private: log in with `hf auth login`)"
        )
    if isinstance(e, RevisionNotFoundError):
        return CkptavgError(f"{where}: no such revision on the Hub")
    if isinstance(e, RemoteEntryNotFoundError):
        return CkptavgError(f"{where}: the Hub has no such file at this revision")
    return CkptavgError(f"{where}: {_first_line(e)}")


def _retrying(where: str, fn: Callable[[], T]) -> T:
    """``fn()``, retried on transient failures; any failure becomes one CkptavgError naming ``where``."""
    last: BaseException | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(RETRY_WAIT * 2 ** (attempt - 1))
        try:
            return fn()
        except Exception as e:
            if not _expected(e):
                raise
            if not _transient(e):
                raise _hub_error(where, e) from None
            last = e
    assert last is not None
    raise CkptavgError(
        f"{where}: the Hub at {_endpoint()} failed {ATTEMPTS} times ({_first_line(last)}); "
        "retry later, or set HF_HUB_OFFLINE=1 to use what the cache holds"
    )


# Naming --------------------------------------------------------------------------------------------

def _parse(uri: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` → (repo id, revision or None); models only."""
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as e:
        raise CkptavgError(f"{uri}: not a Hub model (expected hf://org/name or hf://org/name@step1000): {_first_line(e)}") from None
    if parsed.type != "model":
        raise CkptavgError(f"{uri}: a {parsed.type} repository; only model repositories hold checkpoints")
    if parsed.path_in_repo:
        raise CkptavgError(f"{uri}: a path inside the repo; give the repo (hf://org/name) or one revision (hf://org/name@step1000)")
    return parsed.id, parsed.revision


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise CkptavgError(f"step pattern {pattern!r}: not a regular expression: {e}") from None
    if rx.groups != 1 and "step" not in rx.groupindex:
        raise CkptavgError(
            f"step pattern {pattern!r}: needs one group holding the step, e.g. {DEFAULT_STEP_PATTERN!r} "
            "(or a group named 'step')"
        )
    return rx


def _step(rx: re.Pattern[str], branch: str) -> int | None:
    m = rx.search(branch)
    if m is None:
        return None
    text = m.group("step") if "step" in rx.groupindex else m.group(1)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise CkptavgError(f"step pattern {rx.pattern!r}: matched {text!r} in branch {branch!r}, not a number") from None


# Discovery -----------------------------------------------------------------------------------------

def _pick(
    files: Mapping[str, HubFile], where: str, load_index: Callable[[HubFile], dict[str, str]], strict: bool
) -> tuple[str, tuple[HubFile, ...], HubFile | None] | None:
    """(format, weight files in shard order, index) among a revision's files, in the same order of
    preference as local checkpoint folders; None if there are none (or, not ``strict``, shards are missing)."""

    def sharded(idx: HubFile) -> tuple[HubFile, ...] | None:
        names = list(dict.fromkeys(sorted(load_index(idx).values())))
        missing = [n for n in names if n not in files]
        if missing and strict:
            raise CkptavgError(f"{where}/{idx.name}: lists shard {missing[0]}, which this revision does not have")
        return None if missing else tuple(files[n] for n in names)

    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "torch")):
        if index_name in files:
            shards = sharded(files[index_name])
            return None if shards is None else (fmt, shards, files[index_name])
        single = index_name.removesuffix(".index.json")
        if single in files:
            return fmt, (files[single],), None
    indexes = sorted(n for n in files if n.endswith(".index.json"))
    if len(indexes) == 1:
        shards = sharded(files[indexes[0]])
        fmt = "safetensors" if ".safetensors." in indexes[0] else "torch"
        return None if shards is None else (fmt, shards, files[indexes[0]])
    weights = [n for n in sorted(files) if n.lower().endswith(WEIGHT_EXT) and not _NOT_WEIGHTS.search(n)]
    for fmt, group in (("safetensors", [n for n in weights if n.endswith(SAFETENSORS_EXT)]),
                       ("torch", [n for n in weights if not n.endswith(SAFETENSORS_EXT)])):
        if len(group) == 1:
            return fmt, (files[group[0]],), None
        if len(group) > 1:
            raise CkptavgError(f"{where}: several weight files and no index ({', '.join(group[:4])})")
    return None


def _index_loader(repo_id: str, branch: str, commit: str) -> Callable[[HubFile], dict[str, str]]:
    def load(idx: HubFile) -> dict[str, str]:
        path = _fetch(repo_id, branch, commit, idx, None)
        try:
            return read_index(path)
        except CkptavgError as e:  # name the Hub file, not the cache path
            raise CkptavgError(str(e).replace(str(path), f"{PREFIX}{repo_id}@{branch}/{idx.name}")) from None

    return load


def _remote_files(repo_id: str, commit: str) -> dict[str, HubFile]:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    entries = HfApi().list_repo_tree(repo_id, revision=commit)
    out = {}
    for e in entries:
        if isinstance(e, RepoFile):
            lfs = e.lfs
            out[e.path] = HubFile(e.path, lfs.size if lfs else e.size, lfs.sha256 if lfs else None, e.blob_id)
    return out


def _storage(repo_id: str) -> Path:
    # The cache's documented layout: <HF_HUB_CACHE>/models--org--name/{refs,snapshots,blobs}
    return _cache_dir() / ("models--" + repo_id.replace("/", "--"))


_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_OID = re.compile(r"[0-9a-f]{40}")


def _cached_files(repo_id: str, commit: str) -> dict[str, HubFile]:
    """Files of a revision that the cache holds, identified by the blob names they link to."""
    snap = _storage(repo_id) / "snapshots" / commit
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


def _cached_branches(repo_id: str) -> dict[str, str]:
    refs = _storage(repo_id) / "refs"
    if not refs.is_dir():
        raise CkptavgError(
            f"{PREFIX}{repo_id}: HF_HUB_OFFLINE=1 and the Hugging Face cache ({_cache_dir()}) holds no revision of it; "
            "run once online, or unset HF_HUB_OFFLINE"
        )
    return {p.name: p.read_text().strip() for p in sorted(refs.iterdir()) if p.is_file()}


def _mark_duplicates(sources: dict[str, HubSource]) -> dict[str, HubSource]:
    owners: dict[str, set[str]] = defaultdict(set)
    for branch, s in sources.items():
        for f in s.weights:
            owners[f.content_id].add(branch)
    out = {}
    for branch, s in sources.items():
        others = set().union(*(owners[f.content_id] for f in s.weights)) - {branch}
        out[branch] = replace(s, same_as=tuple(sorted(others)))
    return out


def discover(uri: str, *, step_pattern: str = DEFAULT_STEP_PATTERN) -> Trajectory:
    """The step branches of a Hub model repo as a Trajectory, reading metadata only.

    Args:
        uri: ``hf://org/name`` (every branch whose name matches ``step_pattern``) or
            ``hf://org/name@step1000`` (one branch).
        step_pattern: regex with one group holding the step number, searched in branch names.

    Returns:
        A Trajectory named after the repo, ``root`` = ``hf://org/name``; each Checkpoint has
        ``location`` ``hf://org/name@<branch>``, ``files=()``, ``tensors=None`` and a
        :class:`HubSource`. With ``HF_HUB_OFFLINE=1``, only branches whose weights are all in the
        cache (others are skipped with a :class:`HubWarning`).

    Raises:
        CkptavgError: bad URI or pattern, unknown repo or branch, no step branches, a revision
            without weight files or with an index naming missing shards, the Hub unreachable.

    Example:
        >>> traj = discover("hf://EleutherAI/pythia-160m-deduped")        # doctest: +SKIP
        >>> traj.window(5, at=20_000).steps                               # doctest: +SKIP
        [16000, 17000, 18000, 19000, 20000]
    """
    repo_id, only = _parse(uri)
    rx = _compile(step_pattern)
    root = f"{PREFIX}{repo_id}"
    offline = _offline()
    if offline:
        branches = _cached_branches(repo_id)
    else:
        from huggingface_hub import HfApi

        refs = _retrying(root, lambda: HfApi().list_repo_refs(repo_id))
        branches = {b.name: b.target_commit for b in refs.branches}
    steps = {b: s for b in branches if (s := _step(rx, b)) is not None}
    if only is not None:
        if _step(rx, only) is None:
            raise CkptavgError(f"{uri}: branch {only!r} does not match the step pattern {rx.pattern!r}")
        if only not in branches:
            where = "the cache holds no branch" if offline else "the repo has no branch"
            raise CkptavgError(f"{uri}: {where} {only!r}; `ckptavg list {root}` shows the steps")
        steps = {only: steps[only]}
    if not steps:
        shown = ", ".join(sorted(branches)[:5]) or "none"
        raise CkptavgError(
            f"{root}: no branch matches the step pattern {rx.pattern!r} (branches: {shown}); "
            "pass --step-pattern for other names"
        )

    # One listing (and index file) per commit: several branches may point at the same one.
    named = {branches[b]: b for b in sorted(steps, key=steps.__getitem__, reverse=True)}

    def look(commit: str) -> tuple[dict[str, HubFile], tuple[str, tuple[HubFile, ...], HubFile | None] | None]:
        where = f"{root}@{named[commit]}"
        if offline:
            files = _cached_files(repo_id, commit)
        else:
            files = _retrying(where, lambda: _remote_files(repo_id, commit))
        return files, _pick(files, where, _index_loader(repo_id, named[commit], commit), strict=not offline)

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ckptavg-hub") as pool:
        looked = dict(zip(named, pool.map(look, named)))

    sources: dict[str, HubSource] = {}
    skipped: list[str] = []
    for branch in sorted(steps, key=steps.__getitem__):
        commit = branches[branch]
        files, picked = looked[commit]
        where = f"{root}@{branch}"
        if picked is None:
            if offline:
                skipped.append(branch)
                continue
            raise CkptavgError(f"{where}: looks like a checkpoint (step {steps[branch]}) but holds no weight files")
        fmt, weights, index = picked
        configs = tuple(files[n] for n in CONFIG_FILES if n in files)
        sources[branch] = HubSource(repo_id, branch, commit, weights, index, configs)
    if skipped:
        warnings.warn(
            f"{root}: HF_HUB_OFFLINE=1 and {len(skipped)} step branches have no complete weights in the cache, "
            f"skipped: {', '.join(skipped[:6])}{' …' if len(skipped) > 6 else ''}",
            HubWarning, stacklevel=2,
        )
    if not sources:
        raise CkptavgError(f"{root}: HF_HUB_OFFLINE=1 and no step branch has its weights in the cache ({_cache_dir()})")

    ckpts = []
    for branch, s in _mark_duplicates(sources).items():
        fmt = "safetensors" if s.weights[0].name.endswith(SAFETENSORS_EXT) else "torch"
        ckpts.append(Checkpoint(steps[branch], s.uri, fmt, size=sum(f.size for f in s.weights), source=s))
    return Trajectory(repo_id.split("/")[-1], tuple(ckpts), root)


# Materialising -------------------------------------------------------------------------------------

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
    return _cache_dir().parent / "ckptavg-verified" / f.content_id, f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _verified(path: Path, f: HubFile) -> str | None:
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


def _drop(path: Path) -> None:
    """Remove a bad copy from the cache: the snapshot link and the blob it points to."""
    blob = path.parent / os.readlink(path) if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


def _fetch(repo_id: str, branch: str, commit: str, f: HubFile, bar_class: type | None) -> Path:
    """One file of a revision, in the cache and verified; downloaded only if not there yet."""
    from huggingface_hub import hf_hub_download

    where = f"{PREFIX}{repo_id}@{branch}/{f.name}"
    last = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(RETRY_WAIT * 2 ** (attempt - 1))
        try:
            # Pinned to the commit discovery listed: a cached copy is returned without any request.
            path = Path(hf_hub_download(repo_id, f.name, revision=commit, tqdm_class=bar_class or _bar_class(None)))
        except Exception as e:
            if not _expected(e):
                raise
            if not _transient(e):
                raise _hub_error(where, e) from None
            last = _first_line(e)
            continue
        bad = _verified(path, f)
        if bad is None:
            return path
        _drop(path)
        last = f"corrupt download ({bad}); the copy was removed from the cache"
    raise CkptavgError(f"{where}: download failed {ATTEMPTS} times, last: {last}")


def _bar_class(bar: Any | None) -> type:
    """A tqdm class for hf_hub_download that shows nothing itself and adds bytes to ``bar`` (if any)."""
    from tqdm import tqdm

    class Into(tqdm):  # type: ignore[misc, type-arg]
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


def _refuse_duplicates(ckpts: Sequence[Checkpoint], allow: bool) -> None:
    dupes = [c for c in ckpts if c.source is not None and c.source.same_as]
    if not dupes:
        return
    c = dupes[0]
    assert c.source is not None
    what = (f"{c.location}: weight files are byte-identical (same LFS sha256) to branch "
            f"{', '.join(c.source.same_as[:3])}: the Hub holds one checkpoint under several names, so this "
            f"step's weights may not be this step's")
    if not allow:
        extra = f" ({len(dupes) - 1} more selected revisions too)" if len(dupes) > 1 else ""
        raise CkptavgError(f"{what}{extra}; refusing to average (pass --allow-duplicates to average anyway)")
    warnings.warn(f"{what}; averaging anyway (allow_duplicates)", HubWarning, stacklevel=3)


def _tensors_from_headers(ckpts: Sequence[Checkpoint]) -> list[Checkpoint]:
    """Safetensors checkpoints with ``tensors`` read from headers: cached files locally, others
    with two small range requests each; index files checked against the headers."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    from .io.dtypes import DTYPES
    from .io.safetensors import TensorInfo, read_header

    def header(c: Checkpoint, f: HubFile) -> dict[str, TensorInfo] | None:
        s = c.source
        assert s is not None
        local = try_to_load_from_cache(s.repo_id, f.name, revision=s.commit)
        if isinstance(local, str):
            try:
                return read_header(Path(local))[0]
            except CkptavgError:
                return None  # a bad cached copy: verified and replaced at download, read after
        if _offline():
            return None
        meta = _retrying(f"{s.uri}/{f.name}", lambda: HfApi().parse_safetensors_file_metadata(
            s.repo_id, f.name, revision=s.commit))
        out = {}
        for name, t in meta.tensors.items():
            dtype = DTYPES.get(t.dtype)
            if dtype is None:
                raise CkptavgError(f"{s.uri}/{f.name}: tensor {name!r} has unknown dtype {t.dtype!r}")
            out[name] = TensorInfo(name, dtype, tuple(t.shape))
        return out

    jobs = [(c, f) for c in ckpts if c.format == "safetensors" and c.source is not None for f in c.source.weights]
    if not jobs:
        return []
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ckptavg-hub") as pool:
        heads = list(pool.map(lambda job: header(*job), jobs))
    found: dict[str, dict[str, dict[str, TensorInfo]]] = defaultdict(dict)
    broken: set[str] = set()
    for (c, f), h in zip(jobs, heads):
        if h is None:
            broken.add(c.location)
        else:
            found[c.location][f.name] = h
    out = []
    for c in ckpts:
        if c.location not in found or c.location in broken:
            continue
        s = c.source
        assert s is not None
        tensors: dict[str, TensorInfo] = {}
        owner: dict[str, str] = {}
        for fname, h in found[c.location].items():
            for name, info in h.items():
                if name in tensors:
                    raise CkptavgError(f"{s.uri}: tensor {name!r} is in two shards: {owner[name]} and {fname}")
                tensors[name], owner[name] = info, fname
        if s.index is not None:
            wm = _index_loader(s.repo_id, s.revision, s.commit)(s.index)
            where = f"{s.uri}/{s.index.name}"
            for name, fname in wm.items():
                if owner.get(name) != fname:
                    held = f"stored in {owner[name]}" if name in owner else "not stored there"
                    raise CkptavgError(f"{where}: tensor {name!r} is listed in {fname} but {held}")
            extra = sorted(set(owner) - set(wm))
            if extra:
                raise CkptavgError(f"{where}: tensor {extra[0]!r} in {owner[extra[0]]} is missing from the index")
        out.append(replace(c, tensors=tensors))
    return out


def materialise(
    checkpoints: Iterable[Checkpoint], *, allow_duplicates: bool = False, progress: bool = True
) -> list[Checkpoint]:
    """Hub checkpoints → the same checkpoints with local ``files`` in the HF cache; others unchanged.

    Before downloading: refuses revisions whose weights duplicate another step branch (unless
    ``allow_duplicates``), and checks safetensors headers (names, shapes, dtypes, index agreement)
    with range requests. Then downloads, in parallel, each selected revision's weight files and
    the newest one's config/tokenizer files, skipping what the cache holds, and verifies each file
    against the Hub's sha256. Returned checkpoints have ``tensors=None``: the engine reads the
    downloaded headers itself.

    Args:
        checkpoints: a selection, oldest first (the last one is the newest).
        allow_duplicates: average revisions whose weight files are byte-identical to another
            step branch's, with a :class:`HubWarning` instead of an error.
        progress: one byte-count bar for all downloads on stderr.

    Returns:
        The checkpoints, in the same order.

    Raises:
        CkptavgError: duplicates, mismatched headers or index, a file that stays corrupt or
            unreachable after retries, a file missing from the cache in offline mode.

    Example:
        >>> sel = discover("hf://EleutherAI/pythia-160m-deduped").window(5, at=20_000)  # doctest: +SKIP
        >>> [c.files for c in materialise(sel)]                                           # doctest: +SKIP
    """
    ckpts = list(checkpoints)
    todo = [c for c in ckpts if c.source is not None and not c.files]
    if not todo:
        return ckpts
    _refuse_duplicates(todo, allow_duplicates)
    check_compatible(_tensors_from_headers(todo))

    from huggingface_hub import try_to_load_from_cache
    from tqdm import tqdm

    newest = ckpts[-1]
    jobs: list[tuple[HubSource, HubFile]] = []
    for c in todo:
        s = c.source
        assert s is not None
        jobs += [(s, f) for f in s.weights + ((s.index,) if s.index else ())]
        if c is newest:
            jobs += [(s, f) for f in s.configs]
    # The same bytes at several revisions (allowed duplicates) are fetched once, then linked.
    first: dict[str, tuple[HubSource, HubFile]] = {}
    for s, f in jobs:
        first.setdefault(f.content_id, (s, f))
    missing = sum(f.size for s, f in first.values()
                  if not isinstance(try_to_load_from_cache(s.repo_id, f.name, revision=s.commit), str))
    paths: dict[tuple[str, str, str], Path] = {}
    with tqdm(total=missing, unit="B", unit_scale=True, desc="downloading", leave=False,
              disable=not progress or missing == 0) as bar:
        bar_class = _bar_class(bar)

        def get(job: tuple[HubSource, HubFile]) -> None:
            s, f = job
            paths[(s.repo_id, s.commit, f.name)] = _fetch(s.repo_id, s.revision, s.commit, f, bar_class)

        with ThreadPoolExecutor(WORKERS, thread_name_prefix="ckptavg-download") as pool:
            list(pool.map(get, first.values()))
            list(pool.map(get, [j for j in jobs if (j[0].repo_id, j[0].commit, j[1].name) not in paths]))
    if not _offline():
        _remember_branches([c.source for c in todo if c.source is not None])

    out = []
    for c in ckpts:
        s = c.source
        if s is not None and not c.files:
            files = tuple(paths[(s.repo_id, s.commit, f.name)] for f in s.weights)
            index = paths[(s.repo_id, s.commit, s.index.name)] if s.index else None
            c = replace(c, files=files, index=index, config_dir=files[0].parent, tensors=None)
        out.append(c)
    return out


def _remember_branches(sources: Sequence[HubSource]) -> None:
    """Record branch → commit in the cache's refs/, so HF_HUB_OFFLINE=1 discovery finds them later."""
    from huggingface_hub import HfApi

    def one(s: HubSource) -> None:
        try:
            resolved = _retrying(s.uri, lambda: HfApi().resolve_revision(s.repo_id, revision=s.revision))
        except CkptavgError as e:
            warnings.warn(f"{e} (not recorded in the cache's refs; offline discovery will not see it)",
                          HubWarning, stacklevel=4)
            return
        if resolved.resolved != s.commit:
            warnings.warn(f"{s.uri}: the branch moved to {resolved.resolved[:10]} during the run; "
                          f"averaged commit {s.commit[:10]}", HubWarning, stacklevel=4)

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ckptavg-hub") as pool:
        list(pool.map(one, list({s.uri: s for s in sources}.values())))


def evict(checkpoints: Iterable[Checkpoint]) -> int:
    """Delete the weight files of these Hub checkpoints from the HF cache, once consumed.

    Uses huggingface_hub's own cache deletion: a blob still linked from another revision stays,
    and so do refs, index, config and tokenizer files, so the revision can be fetched again later.
    Local checkpoints are ignored.

    Returns:
        Bytes freed.

    Raises:
        CkptavgError: the cache of a repo is inconsistent (``hf cache ls`` shows why).

    Example:
        >>> sel = discover("hf://EleutherAI/pythia-12b").window(5, at=143_000)   # doctest: +SKIP
        >>> average(sel, "pythia-12b-lawa5"); evict(sel)                         # doctest: +SKIP
    """
    targets = {(c.source.repo_id, c.source.commit, f.name)
               for c in checkpoints if c.source is not None for f in c.source.weights}
    if not targets or not _cache_dir().is_dir():
        return 0
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(_cache_dir())
    repos = {r for r, _, _ in targets}
    for w in info.warnings:
        for r in repos:
            if _storage(r).name in str(w):
                raise CkptavgError(f"{PREFIX}{r}: cannot evict, the cache is inconsistent: {_first_line(w)}")
    files = [f for repo in info.repos if repo.repo_type == "model" and repo.repo_id in repos
             for rev in repo.revisions for f in rev.files
             if (repo.repo_id, rev.commit_hash, f.file_name) in targets]
    if not files:
        return 0
    strategy = info.delete_files(*files)
    strategy.execute()
    return int(strategy.expected_freed_size)


__all__ = ["DEFAULT_STEP_PATTERN", "HubFile", "HubSource", "HubWarning", "discover", "evict", "is_hub", "materialise"]
