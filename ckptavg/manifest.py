"""``ckptavg.json``: the provenance of an averaged checkpoint, and the proof that ckptavg wrote it.

Besides what was averaged (method, inputs, weights, dtypes) the record says how the folder was
written (``max_shard_size``, its ``files``) and, for each input, a cheap ``fingerprint`` of its
bytes (:func:`fingerprint`: no full read). A series re-run keeps an output only if all of this
matches; a folder is replaced without ``--force`` only if :func:`owns` proves ckptavg wrote it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .tokens import learning_rates
from .trajectory import Checkpoint

MANIFEST_NAME = "ckptavg.json"
_ENDS = 64 * 2**10  # bytes hashed at each end of a file (a zip's central directory holds every member's CRC-32)
_MAX_HEADER = 16 * 2**20  # a safetensors header up to this size is hashed whole


def sha256_file(path: Path, block: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def build(
    checkpoints: Sequence[Checkpoint],
    weights: Sequence[float],
    method: str,
    params: Mapping[str, Any],
    *,
    dtype: str,
    accumulate: str,
    trajectory: str = "",
    hashes: Mapping[Path, str] | None = None,
    files: Sequence[str] = (),
    fingerprints: Sequence[Mapping[str, Any]] | None = None,
    max_shard_size: int | None = None,
) -> dict[str, Any]:
    """The record of one averaged model; ``files`` (folder outputs only) lists everything the folder holds."""
    inputs = []
    rates = learning_rates(checkpoints)  # where the run logged it (HF Trainer), else None and not recorded
    for i, (c, w) in enumerate(zip(checkpoints, weights)):
        entry: dict[str, Any] = {"step": c.step, "location": c.location, "format": c.format, "weight": w}
        if rates[i] is not None:
            entry["learning_rate"] = rates[i]
        if c.format == "zero":  # DeepSpeed ZeRO: not the model-states file, the optimizer's fp32 partitions
            entry["weights_from"] = "fp32 master weights from the DeepSpeed ZeRO optimizer states"
        if c.source is not None:  # a Hub branch can move; the commit says which bytes were averaged
            entry["commit"] = c.source.commit
        if hashes:
            entry["sha256"] = {Path(f).name: hashes[f] for f in c.files}
        if fingerprints is not None:
            entry["fingerprint"] = dict(fingerprints[i])
        inputs.append(entry)
    # Integer and bool tensors (attention masks, position ids, step counters) are not averaged: they
    # are copied from the newest input, and the record says which.
    kinds = checkpoints[-1].tensors if checkpoints else None
    tensors = {} if kinds is None else {"tensors": {
        "averaged": sum(t.dtype.floating for t in kinds.values()),
        "copied_from_newest": sorted(n for n, t in kinds.items() if not t.dtype.floating),
    }}
    return {
        "tool": "ckptavg",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trajectory": trajectory,
        "method": {"name": method, **{k: v for k, v in params.items() if v is not None}},
        "dtype": dtype,
        "accumulate": accumulate,
        "inputs": inputs,
        **tensors,
        **({"max_shard_size": max_shard_size, "files": list(files)} if files else {}),
    }


def write(directory: Path, manifest: Mapping[str, Any]) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST_NAME).read_text())


def _file_print(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = n + 8 if 0 < n <= _MAX_HEADER and n + 8 <= st.st_size else _ENDS  # safetensors: the whole header
        f.seek(0)
        h.update(f.read(head))
        if st.st_size > head:
            f.seek(max(head, st.st_size - _ENDS))
            h.update(f.read(_ENDS))
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()}


def fingerprint(checkpoint: Checkpoint) -> dict[str, Any]:
    """What identifies an input's bytes without reading them all: a Hub revision's commit and file
    ids; for local files, each one's size, mtime_ns and the sha256 of its ends (a safetensors
    header whole, the central directory of a ``.bin``/``.pt`` zip). A checkpoint re-saved in place
    changes it.

    Raises:
        OSError: a file cannot be read.
    """
    if checkpoint.source is not None:
        return {"commit": checkpoint.source.commit, "files": [f.content_id for f in checkpoint.source.weights]}
    files = [*checkpoint.files, *([checkpoint.index] if checkpoint.index else [])]
    key = getattr(checkpoint, "key", None)  # which state dict of a .pt file was averaged (--key)
    return {"files": [_file_print(Path(p)) for p in files], **({"key": key} if key is not None else {})}


def owns(folder: Path) -> bool:
    """Whether ckptavg provably wrote ``folder``: a real folder (not a link) whose ``ckptavg.json``
    is ckptavg's and lists every entry in it, each a plain file. Such a folder holds nothing a
    user put there, so replacing it loses nothing that ckptavg cannot write again."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        man = read(folder)
        listed = set(man["files"]) if man.get("tool") == "ckptavg" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if not listed or MANIFEST_NAME not in listed:
        return False
    return all(p.name in listed and p.is_file() and not p.is_symlink() for p in folder.iterdir())
