"""Hub checkpoints → verified files in the standard Hugging Face cache (:func:`materialise`)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, DuplicateError, HubError
from ..io.layout import join_shards, parse_index
from ..trajectory import HUB_PREFIX, Checkpoint, HubFile, HubSource, check_compatible
from . import cache, compat, transport
from .transport import HubWarning


def fetch(repo_id: str, branch: str, commit: str, f: HubFile, bar: Any | None = None) -> Path:
    """One file of a revision, in the cache and verified; downloaded only if not there yet (bytes on ``bar``)."""

    def attempt() -> Path:
        # Pinned to the commit discovery listed: a cached copy is returned without any request.
        path = compat.download(repo_id, f.name, commit, bar)
        bad = cache.verified(path, f)
        if bad is not None:
            cache.drop(path)
            raise transport.Corrupt(f"corrupt download ({bad}); the copy was removed from the cache")
        return path

    try:
        return transport.retrying(f"{HUB_PREFIX}{repo_id}@{branch}/{f.name}", attempt, failed="download")
    except HubError:
        # Clients before 0.23 (resume_download=True) leave an empty partial file when the Hub never
        # sent a byte; a partial file holding bytes stays, for the next run to resume.
        cache.drop_empty_partial(repo_id, f)
        raise


def load_index(repo_id: str, branch: str, commit: str, idx: HubFile) -> dict[str, str]:
    """The validated ``weight_map`` of a revision's index file (fetched into the cache)."""
    path = fetch(repo_id, branch, commit, idx)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{HUB_PREFIX}{repo_id}@{branch}/{idx.name}: cannot read the index: {e}") from None
    return parse_index(text, f"{HUB_PREFIX}{repo_id}@{branch}/{idx.name}")


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
        raise DuplicateError(f"{what}{extra}; refusing to average (pass --allow-duplicates to average anyway)")
    warnings.warn(f"{what}; averaging anyway (allow_duplicates)", HubWarning, stacklevel=3)


def _tensors_from_headers(ckpts: Sequence[Checkpoint]) -> list[Checkpoint]:
    """Safetensors checkpoints with ``tensors`` read from headers: cached files locally, others
    with two small range requests each; index files checked against the headers."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    from ..io.dtypes import DTYPES
    from ..io.safetensors import TensorInfo, read_header

    def header(c: Checkpoint, f: HubFile) -> dict[str, TensorInfo] | None:
        s = c.source
        assert s is not None
        local = try_to_load_from_cache(s.repo_id, f.name, revision=s.commit)
        if isinstance(local, str):
            try:
                return read_header(Path(local))[0]
            except CheckpointError:
                return None  # a bad cached copy: verified and replaced at download, read after
        if transport.offline():
            return None
        meta = transport.retrying(f"{s.uri}/{f.name}", lambda: HfApi().parse_safetensors_file_metadata(
            s.repo_id, f.name, revision=s.commit))
        out = {}
        for name, t in meta.tensors.items():
            dtype = DTYPES.get(t.dtype)
            if dtype is None:
                raise CheckpointError(f"{s.uri}/{f.name}: tensor {name!r} has unknown dtype {t.dtype!r}")
            out[name] = TensorInfo(name, dtype, tuple(t.shape))
        return out

    jobs = [(c, f) for c in ckpts if c.format == "safetensors" and c.source is not None for f in c.source.weights]
    if not jobs:
        return []
    with ThreadPoolExecutor(transport.WORKERS, thread_name_prefix="ckptavg-hub") as pool:
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
        wm = load_index(s.repo_id, s.revision, s.commit, s.index) if s.index is not None else None
        tensors = join_shards(found[c.location].items(), s.uri, wm, f"{s.uri}/{s.index.name}" if s.index else None)
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
        DuplicateError: revisions holding another step's weights.
        CheckpointError: mismatched headers or index.
        HubError: mismatched headers or index, a file that stays corrupt or
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

        def get(job: tuple[HubSource, HubFile], counted: bool = True) -> None:
            s, f = job
            paths[(s.repo_id, s.commit, f.name)] = fetch(s.repo_id, s.revision, s.commit, f, bar if counted else None)

        with ThreadPoolExecutor(transport.WORKERS, thread_name_prefix="ckptavg-download") as pool:
            list(pool.map(get, first.values()))
            # the same bytes under another revision: linked to the blob just fetched, not counted again
            list(pool.map(lambda j: get(j, False), [j for j in jobs if (j[0].repo_id, j[0].commit, j[1].name) not in paths]))
    if not transport.offline():
        cache.remember_branches([c.source for c in todo if c.source is not None])

    out = []
    for c in ckpts:
        s = c.source
        if s is not None and not c.files:
            files = tuple(paths[(s.repo_id, s.commit, f.name)] for f in s.weights)
            index = paths[(s.repo_id, s.commit, s.index.name)] if s.index else None
            c = replace(c, files=files, index=index, config_dir=files[0].parent, tensors=None)
        out.append(c)
    return out


__all__ = ["fetch", "load_index", "materialise"]
