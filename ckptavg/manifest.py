"""``ckptavg.json``: the provenance of an averaged checkpoint."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .trajectory import Checkpoint

MANIFEST_NAME = "ckptavg.json"


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
) -> dict[str, Any]:
    inputs = []
    for c, w in zip(checkpoints, weights):
        entry: dict[str, Any] = {"step": c.step, "location": c.location, "format": c.format, "weight": w}
        if c.source is not None:  # a Hub branch can move; the commit says which bytes were averaged
            entry["commit"] = c.source.commit
        if hashes:
            entry["sha256"] = {Path(f).name: hashes[f] for f in c.files}
        inputs.append(entry)
    return {
        "tool": "ckptavg",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trajectory": trajectory,
        "method": {"name": method, **{k: v for k, v in params.items() if v is not None}},
        "dtype": dtype,
        "accumulate": accumulate,
        "inputs": inputs,
        **({"files": list(files)} if files else {}),
    }


def write(directory: Path, manifest: Mapping[str, Any]) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST_NAME).read_text())
