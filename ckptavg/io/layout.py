"""What a checkpoint folder holds: weight and config file names, index files, shard checks.

The one place that knows Hugging Face's layout conventions, used by local discovery, the Hub, the
writer and series' completeness check alike:

- which files are weights (``.safetensors``, ``.bin``/``.pt``/``.pth``/``.ckpt``) and which sit
  beside them without being the model (optimizer, scheduler, RNG and trainer state);
- which weights a folder (or a Hub revision's file list) means, in the order
  ``from_pretrained`` loads them: ``model.safetensors``, ``model.safetensors.index.json``,
  ``pytorch_model.bin``, ``pytorch_model.bin.index.json``, then one other index, then one other
  weight file — so a stale single file beside shards is averaged exactly when transformers would
  load it;
- reading an index (validated: no duplicate keys, shard names inside the folder) and writing one;
- checking shards against each other and their index (a tensor in two shards, a tensor listed in
  one shard but stored in another, a tensor missing from the index).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .files import JSON_LIMIT, parse_json, read_regular

if TYPE_CHECKING:  # numpy stays unimported for discovery of Hub metadata and for `ckptavg --help`
    from .safetensors import TensorInfo

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_EXT = SAFETENSORS_EXT + TORCH_EXT
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# from_pretrained's order of precedence when a folder holds several of these
STANDARD_WEIGHTS = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", TORCH_INDEX)

# Files beside the weights in training checkpoints that are not the model.
# (Megatron's model_optim_rng.pt holds the model under 'model', so it is kept.)
NOT_WEIGHTS = re.compile(r"^(?!model_optim_rng\.).*(optim|scheduler|rng_state|training_args|scaler|trainer_state)", re.I)

# Copied from the newest input next to an averaged model, so transformers can load it.
CONFIG_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
    "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)


DCP_METADATA = ".metadata"  # torch.distributed.checkpoint: this file + __R_S.distcp shards


def is_dcp(names: Iterable[str]) -> bool:
    """A folder's file names are a ``torch.distributed.checkpoint``: ``.metadata`` and ``.distcp`` shards."""
    names = list(names)
    return DCP_METADATA in names and any(n.endswith(".distcp") for n in names)


def format_of(name: str) -> str:
    """``safetensors`` or ``torch``, from a weight file's name."""
    return "safetensors" if name.lower().endswith(SAFETENSORS_EXT) else "torch"


def is_weight_file(name: str) -> bool:
    """A weight file's name that is not optimizer/trainer state."""
    return name.lower().endswith(WEIGHT_EXT) and not NOT_WEIGHTS.search(name)


@dataclass(frozen=True)
class WeightSet:
    """The weights of one checkpoint: ``files`` in shard order, relative to its folder."""

    format: str  # "safetensors" or "torch"
    files: tuple[str, ...]
    index: str | None = None


def pick_weights(
    names: Collection[str], load_index: Callable[[str], Mapping[str, str]], where: str, *, missing_ok: bool = False
) -> WeightSet | None:
    """Which of ``names`` (the files of a folder or of a Hub revision) are the model's weights.

    Args:
        names: file names in the folder (plain files only).
        load_index: reads an index file's ``weight_map`` (tensor → shard file name).
        where: the folder or revision, for messages.
        missing_ok: a shard listed in the index but absent from ``names`` gives None instead of an
            error (an offline cache that holds part of a revision).

    Returns:
        The weights, or None when ``names`` holds none.

    Raises:
        CheckpointError: an index lists a shard that is not there; several weight files and no index.
    """

    def sharded(index: str) -> WeightSet | None:
        shards = tuple(dict.fromkeys(sorted(load_index(index).values())))
        missing = [s for s in shards if s not in names]
        if missing:
            if missing_ok:
                return None
            raise CheckpointError(f"{where}/{index}: shard {missing[0]} is missing")
        return WeightSet("safetensors" if ".safetensors." in index else "torch", shards, index)

    for index, single in ((SAFETENSORS_INDEX, "model.safetensors"), (TORCH_INDEX, "pytorch_model.bin")):
        if single in names:  # from_pretrained takes the single file over an index beside it
            return WeightSet(format_of(single), (single,))
        if index in names:
            return sharded(index)
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if len(indexes) == 1:
        return sharded(indexes[0])
    weights = sorted(n for n in names if is_weight_file(n))
    for fmt in ("safetensors", "torch"):
        group = [n for n in weights if format_of(n) == fmt]
        if len(group) == 1:
            return WeightSet(fmt, (group[0],))
        if len(group) > 1:
            raise CheckpointError(
                f"{where}: several weight files and no index ({', '.join(group[:4])}); "
                "point at one file or add an index.json"
            )
    return None


def _no_duplicate_keys(path: object) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise CheckpointError(f"{path}: key {k!r} appears twice (a tensor mapped to two shards?)")
            seen[k] = v
        return seen

    return hook


def parse_index(text: str | bytes, where: object) -> dict[str, str]:
    """Validated ``weight_map`` of an index file's text: tensor name → shard file name."""
    doc = parse_json(text, where, "index file", object_pairs_hook=_no_duplicate_keys(where))
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{where}: not a valid index file: no weight_map")
    for name, fname in wm.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"{where}: tensor {name!r} maps to {fname!r}, not a file name")
        if os.path.isabs(fname) or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise CheckpointError(f"{where}: tensor {name!r} maps to {fname!r}, outside the checkpoint folder")
    return wm


def read_index(path: Path) -> dict[str, str]:
    """Validated ``weight_map`` of an HF index file: tensor name → shard file name (regular files
    only, at most :data:`~ckptavg.io.files.JSON_LIMIT` bytes)."""
    return parse_index(read_regular(Path(path), JSON_LIMIT, "index file"), path)


def write_index(path: Path, shards: Iterable[tuple[str, Sequence[TensorInfo]]]) -> None:
    """HF ``model.safetensors.index.json``: total size and tensor -> shard file."""
    weight_map: dict[str, str] = {}
    total = 0
    for fname, entries in shards:
        for t in entries:
            weight_map[t.name] = fname
            total += t.nbytes
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def shard_names(n: int, stem: str = "model") -> list[str]:
    """transformers' names for ``n`` safetensors shards."""
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def join_shards(
    headers: Iterable[tuple[str, Mapping[str, TensorInfo]]], where: str, weight_map: Mapping[str, str] | None = None,
    index_name: str | None = None,
) -> dict[str, TensorInfo]:
    """Tensors of all shards (name → info), checked against each other and against the index.

    Args:
        headers: (shard file name, its tensors) in shard order.
        where: the checkpoint, for messages.
        weight_map: the index's tensor → shard file name, if there is an index.
        index_name: how to name the index in messages [default: ``where``].

    Raises:
        CheckpointError: a tensor in two shards, a tensor the index places elsewhere or not at
            all, an index entry no shard stores.
    """
    tensors: dict[str, TensorInfo] = {}
    owner: dict[str, str] = {}
    for fname, h in headers:
        for name, info in h.items():
            if name in tensors:
                raise CheckpointError(f"{where}: tensor {name!r} is in two shards: {owner[name]} and {fname}")
            tensors[name], owner[name] = info, fname
    if weight_map is not None:
        idx = index_name or where
        for name, fname in weight_map.items():
            if owner.get(name) != fname:
                held = f"stored in {owner[name]}" if name in owner else "not stored there"
                raise CheckpointError(f"{idx}: tensor {name!r} is listed in {fname} but {held}")
        extra = sorted(set(owner) - set(weight_map))
        if extra:
            raise CheckpointError(f"{idx}: tensor {extra[0]!r} in {owner[extra[0]]} is missing from the index")
    return tensors


def read_tensors(
    fmt: str, files: Sequence[Path], index: Path | None = None, key: str | None = None
) -> dict[str, TensorInfo]:
    """Tensor name → TensorInfo over all shards of a local checkpoint, headers only; checks the index.
    ``key``: torch files only, where the state dict sits (see :func:`ckptavg.io.readers.open_file`)."""
    from .readers import open_file

    def headers() -> Iterable[tuple[str, Mapping[str, TensorInfo]]]:
        for f in files:
            reader = open_file(f, fmt, key)
            try:
                yield f.name, reader.tensors
            finally:
                reader.close()

    if fmt == "dcp":  # one DCP folder: its .metadata (files[0]) describes every shard beside it
        files = files[:1]
    if len(files) == 1 and index is None:  # nothing to join: the header's own dict, not two copies of it
        reader = open_file(files[0], fmt, key)
        reader.close()  # only the header was read; nothing is open
        return reader.tensors
    where = str(files[0].parent) if files else "checkpoint"
    return join_shards(headers(), where, read_index(index) if index is not None else None, str(index))


def is_complete_output(folder: Path, files: Sequence[str]) -> bool:
    """A written model folder whose safetensors ``files`` all parse and agree with its index."""
    from .safetensors import read_header

    shards = [f for f in files if f.endswith(SAFETENSORS_EXT)]
    if not shards:
        return False
    try:
        index = folder / SAFETENSORS_INDEX
        join_shards(((f, read_header(folder / f)[0]) for f in shards), str(folder),
                    read_index(index) if len(shards) > 1 else None)
    except (CheckpointError, OSError):
        return False
    return True


__all__ = [
    "CONFIG_FILES", "DCP_METADATA", "NOT_WEIGHTS", "SAFETENSORS_EXT", "STANDARD_WEIGHTS", "TORCH_EXT", "WEIGHT_EXT", "WeightSet",
    "format_of", "is_complete_output", "is_dcp", "is_weight_file", "join_shards", "parse_index", "pick_weights", "read_index",
    "read_tensors", "shard_names", "write_index",
]
