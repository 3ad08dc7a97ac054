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
    "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json", "adapter_config.json",
)
# PEFT's adapter weights (beside adapter_config.json); an average of adapters is written under the same stem
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def code_files(folder: Path) -> list[str]:
    """The ``.py`` files of ``folder`` that its ``config.json`` / ``tokenizer_config.json`` ``auto_map``
    names (``"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"`` → ``modeling_tiny.py``): copied
    beside an average so that ``from_pretrained(out, trust_remote_code=True)`` finds them. Entries in
    another repo (``"org/repo--modeling_x.Cls"``) and files that are not there are left out."""
    found: list[str] = []
    for cfg_name in ("config.json", "tokenizer_config.json"):
        try:
            cfg = parse_json(read_regular(folder / cfg_name, JSON_LIMIT, cfg_name), folder / cfg_name, cfg_name)
        except (OSError, CheckpointError):
            continue
        auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
        refs = [r for v in (auto_map.values() if isinstance(auto_map, dict) else ())
                for r in (v if isinstance(v, list) else [v]) if isinstance(r, str) and "--" not in r and "." in r]
        for ref in refs:
            name = ref.rsplit(".", 1)[0].replace(".", "/") + ".py"
            if "/" not in name and name not in found and (folder / name).is_file():
                found.append(name)
    return found


def weights_stem(files: Sequence[str | os.PathLike[str]]) -> str:
    """The output's weight-file stem for inputs whose newest weights are ``files``: ``adapter_model``
    for a PEFT adapter (what ``PeftModel.from_pretrained`` opens), else ``model``."""
    return "adapter_model" if len(files) == 1 and Path(files[0]).name in ADAPTER_WEIGHTS else "model"


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
            if all(_LIGHTNING_NAME.search(n) for n in group):  # a folder of Lightning saves is a run, not shards
                raise CheckpointError(f"{where}: {len(group)} Lightning checkpoints ({_some(group, 2)}) in one "
                                      "checkpoint folder; give the folder holding them as the run, or one of them")
            raise CheckpointError(
                f"{where}: several weight files and no index ({', '.join(group[:4])}); "
                "point at one file or add an index.json"
            )
    return None


_ZERO = re.compile(r"^(?:bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$|_optim_states\.pt$")
_LIGHTNING_NAME = re.compile(r"(?:^|[-_])(?:epoch|step)=\d+", re.I)
ADAPTER_CONFIG = "adapter_config.json"  # PEFT: the adapter's settings beside adapter_model.safetensors/.bin


def _some(names: Sequence[str], n: int = 3) -> str:
    more = f", … ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def no_weights_reason(names: Collection[str], subdirs: Collection[str] = (), dcp_subdirs: Collection[str] = ()) -> str:
    """What a folder that holds no model weights holds instead, and what to do: one clause for the
    message "…holds no weight files: <this>".

    ``names`` are its plain files, ``subdirs`` its folders, ``dcp_subdirs`` those holding ``.distcp``
    shards. Recognised: DCP shards without their
    ``.metadata`` (or one level down), DeepSpeed ZeRO optimizer shards without ``*_model_states.pt``,
    an accelerate ``save_state`` folder without the model, a PEFT ``adapter_config.json`` without
    the adapter's weights, Lightning ``.ckpt`` names, pickles; else the first names found.

    >>> no_weights_reason(["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])[:47]
    'only training state (optimizer.bin, random_stat'
    """
    files = sorted(names)
    distcp = [n for n in files if n.endswith(".distcp")]
    if distcp:
        if DCP_METADATA not in files:
            return (f"torch.distributed.checkpoint shards ({_some(distcp, 2)}) but no {DCP_METADATA}, "
                    "which DCP needs to read them: copy the checkpoint's .metadata file beside them")
        return f"a torch.distributed.checkpoint ({DCP_METADATA} + {_some(distcp, 2)}) that could not be read"
    zero = [n for n in files if _ZERO.search(n)]
    if zero:
        return (f"DeepSpeed ZeRO optimizer shards ({_some(zero, 2)}) and no *_model_states.pt: the weights are "
                "partitioned inside them; consolidate with the zero_to_fp32.py script DeepSpeed saved in the run "
                "folder (python zero_to_fp32.py RUN OUT), then average OUT")
    if ADAPTER_CONFIG in files:
        return (f"a PEFT {ADAPTER_CONFIG} but no adapter_model.safetensors or adapter_model.bin: the adapter's "
                "weights were not saved here (save_pretrained writes both)")
    ckpt = [n for n in files if n.lower().endswith(".ckpt")]
    if ckpt:
        return f"Lightning checkpoints ({_some(ckpt, 2)}): give the folder holding them as the run"
    state = [n for n in files if NOT_WEIGHTS.search(n) or n.endswith(".pkl")]
    if state and len(state) == len([n for n in files if n.lower().endswith(WEIGHT_EXT + (".pkl",))]):
        if "optimizer.bin" in files or any(n.startswith("random_states_") for n in files):
            return (f"only training state ({_some(state, 4)}): accelerate's save_state wrote no model here "
                    "(model.safetensors or pytorch_model.bin); was the model passed to accelerator.prepare()?")
        return f"only training state ({_some(state, 4)}), no model weights"
    if dcp_subdirs:
        d = sorted(dcp_subdirs)[0]
        what = "optimizer state, not the model" if d.startswith("optimizer") else "not readable as the model"
        return f"a torch.distributed.checkpoint one level down in {d}/ ({what})"
    if not files and not subdirs:
        return "it is empty"
    shown = [*files, *(f"{d}/" for d in sorted(subdirs))]
    return (f"found {_some(shown, 4)}; expected {', '.join(STANDARD_WEIGHTS[::2])}, a .pt/.bin/.ckpt state dict "
            "or a DCP folder")


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

    if fmt in ("dcp", "zero"):  # one DCP or ZeRO folder: files[0] is opened, the rest is read through it
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
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CONFIG_FILES", "DCP_METADATA", "code_files", "NOT_WEIGHTS", "SAFETENSORS_EXT", "STANDARD_WEIGHTS", "TORCH_EXT", "WEIGHT_EXT", "WeightSet",
    "format_of", "is_complete_output", "is_dcp", "is_weight_file", "join_shards", "no_weights_reason", "parse_index", "pick_weights", "read_index",
    "read_tensors", "shard_names", "weights_stem", "write_index",
]
