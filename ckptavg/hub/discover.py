"""Hub step branches → Trajectory, reading metadata only (refs, file trees, index files)."""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ..errors import CheckpointError, HubError, UsageError
from ..io.layout import CONFIG_FILES, WeightSet, format_of, pick_weights
from ..trajectory import HUB_PREFIX, Checkpoint, HubFile, HubSource, Trajectory
from . import cache, fetch, transport
from .transport import HubWarning

DEFAULT_STEP_PATTERN = r"^step(\d+)$"


_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel", "buckets": "bucket"}
_SPECIAL_REF = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)")  # revisions that hold a "/"


def _split_uri(uri: str) -> tuple[str, str, str | None, str]:
    """huggingface_hub's grammar ``hf://[TYPE/]ns/name[@revision][/path]`` → (type, repo id,
    revision, path), parsed here so that every client version reads a URI the same way."""
    from urllib.parse import unquote

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not uri.startswith(HUB_PREFIX):
        raise ValueError(f"does not start with {HUB_PREFIX}")
    body = uri[len(HUB_PREFIX):]
    first, _, rest = body.partition("/")
    kind = _TYPES.get(first, "model")
    if first in _TYPES:
        body = rest
    elif first in _TYPES.values() and rest:
        raise ValueError(f"the type prefix is plural ({first}s/…)")
    body = body.strip("/")
    at = body.find("@")
    revision: str | None = None
    if at == -1 or body[:at].count("/") > 1:  # no revision, or an "@" inside a file name
        repo_id, _, path = body.partition("/")
        name, _, path = path.partition("/")
        repo_id = f"{repo_id}/{name}" if name else repo_id
    else:
        repo_id, tail = body[:at], body[at + 1:]
        ref = _SPECIAL_REF.match(tail)
        revision, path = (ref.group(), tail[ref.end():].removeprefix("/")) if ref else tail.partition("/")[::2]
        revision = unquote(revision)
        if not revision:
            raise ValueError("empty revision after '@'")
    if repo_id.count("/") != 1:
        raise ValueError(f"the repo id must be 'namespace/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(transport.first_line(e)) from None
    return kind, repo_id, revision, path


def parse_uri(uri: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` → (repo id, revision or None); models only."""
    try:
        kind, repo_id, revision, path = _split_uri(uri)
    except ValueError as e:
        raise UsageError(f"{uri}: not a Hub model (expected hf://org/name or hf://org/name@step1000): {e}") from None
    if kind != "model":
        raise UsageError(f"{uri}: a {kind} repository; only model repositories hold checkpoints")
    if path:
        raise UsageError(f"{uri}: a path inside the repo; give the repo (hf://org/name) or one revision (hf://org/name@step1000)")
    return repo_id, revision


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"step pattern {pattern!r}: not a regular expression: {e}") from None
    if rx.groups != 1 and "step" not in rx.groupindex:
        raise UsageError(
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
        raise UsageError(f"step pattern {rx.pattern!r}: matched {text!r} in branch {branch!r}, not a number") from None


def _remote_files(repo_id: str, commit: str) -> dict[str, HubFile]:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    entries = HfApi().list_repo_tree(repo_id, revision=commit)
    out = {}
    for e in entries:
        if isinstance(e, RepoFile):
            lfs = e.lfs  # a dict on every client version (a dict-backed dataclass since 0.22)
            out[e.path] = HubFile(e.path, lfs["size"] if lfs else e.size, lfs["sha256"] if lfs else None, e.blob_id)
    return out


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
        UsageError: bad URI or pattern.
        HubError: unknown repo or branch, no step branches, the Hub unreachable.
        CheckpointError: a revision without weight files, or with an index naming missing shards.

    Example:
        >>> traj = discover("hf://EleutherAI/pythia-160m-deduped")        # doctest: +SKIP
        >>> traj.window(5, at=20_000).steps                               # doctest: +SKIP
        [16000, 17000, 18000, 19000, 20000]
    """
    repo_id, only = parse_uri(uri)
    rx = _compile(step_pattern)
    root = f"{HUB_PREFIX}{repo_id}"
    offline = transport.offline()
    if offline:
        branches = cache.cached_branches(repo_id)
    else:
        from huggingface_hub import HfApi

        refs = transport.retrying(root, lambda: HfApi().list_repo_refs(repo_id))
        branches = {b.name: b.target_commit for b in refs.branches}
    steps = {b: s for b in branches if (s := _step(rx, b)) is not None}
    if only is not None:
        if _step(rx, only) is None:
            raise UsageError(f"{uri}: branch {only!r} does not match the step pattern {rx.pattern!r}")
        if only not in branches:
            where = "the cache holds no branch" if offline else "the repo has no branch"
            raise HubError(f"{uri}: {where} {only!r}; `ckptavg list {root}` shows the steps")
        steps = {only: steps[only]}
    if not steps:
        shown = ", ".join(sorted(branches)[:5]) or "none"
        raise HubError(
            f"{root}: no branch matches the step pattern {rx.pattern!r} (branches: {shown}); "
            "pass --step-pattern for other names"
        )

    # One listing (and index file) per commit: several branches may point at the same one.
    named = {branches[b]: b for b in sorted(steps, key=steps.__getitem__, reverse=True)}

    def look(commit: str) -> tuple[dict[str, HubFile], WeightSet | None]:
        branch = named[commit]
        where = f"{root}@{branch}"
        if offline:
            files = cache.cached_files(repo_id, commit)
        else:
            files = transport.retrying(where, lambda: _remote_files(repo_id, commit))
        load = lambda name: fetch.load_index(repo_id, branch, commit, files[name])  # noqa: E731
        return files, pick_weights(files, load, where, missing_ok=offline)

    with ThreadPoolExecutor(transport.WORKERS, thread_name_prefix="ckptavg-hub") as pool:
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
            raise CheckpointError(f"{where}: looks like a checkpoint (step {steps[branch]}) but holds no weight files")
        configs = tuple(files[n] for n in CONFIG_FILES if n in files)
        sources[branch] = HubSource(repo_id, branch, commit, tuple(files[n] for n in picked.files),
                                    files[picked.index] if picked.index else None, configs)
    if skipped:
        warnings.warn(
            f"{root}: HF_HUB_OFFLINE=1 and {len(skipped)} step branches have no complete weights in the cache, "
            f"skipped: {', '.join(skipped[:6])}{' …' if len(skipped) > 6 else ''}",
            HubWarning, stacklevel=2,
        )
    if not sources:
        raise HubError(f"{root}: HF_HUB_OFFLINE=1 and no step branch has its weights in the cache ({transport.cache_dir()})")

    ckpts = []
    for branch, src in _mark_duplicates(sources).items():
        ckpts.append(Checkpoint(steps[branch], src.uri, format_of(src.weights[0].name),
                                size=sum(f.size for f in src.weights), source=src))
    return Trajectory(repo_id.split("/")[-1], tuple(ckpts), root)


__all__ = ["DEFAULT_STEP_PATTERN", "discover", "parse_uri"]
