"""Outputs in the input's own shape (``--format``): a nanoGPT ``ckpt.pt``, a Lightning ``.ckpt``, a
model-only DCP folder, besides the HF-style folder every merge can write.

What a run is (:func:`input_kind`) is read from the newest input: a DCP folder; a torch file holding
``model`` and ``model_args`` (nanoGPT's ``train.py``) or ``state_dict`` and
``pytorch-lightning_version`` (Lightning); safetensors or a ``pytorch_model*.bin`` (HF). Anything
else (a DeepSpeed ``mp_rank_00_model_states.pt``, a custom ``.pt``) has no shape ckptavg can write
back, so ``--format same`` refuses it rather than guess.

The writers take the averaged state dict (one model in memory: ``torch.save`` and DCP's writer need
every tensor at once) and write into the hidden temporary folder the output is built in; the sinks
module renames it into place. Everything that is not the model comes from the newest input,
loaded with ``weights_only=True`` and the same allow-list as the readers
(:func:`ckptavg.io.torchfile.load_pickle`); optimizer and scheduler states are dropped (they belong
to one point of the run, not to an average) and the returned record says so.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OutputError, UsageError

# Imports nothing heavy at module level: the CLI reads FORMATS for --format's choices.

FORMATS = ("hf", "same", "nanogpt", "lightning", "dcp")
NANOGPT_FILE = "ckpt.pt"  # what nanoGPT's sample.py and train.py (init_from='resume') open in out_dir
LIGHTNING_FILE = "model.ckpt"
DCP_SHARD = "__0_0.distcp"

# Where each tool keeps the model in its file, and what is dropped from the newest input's dict.
MODEL_KEY = {"nanogpt": "model", "lightning": "state_dict"}
DROPPED = {"nanogpt": ("optimizer",), "lightning": ("optimizer_states", "lr_schedulers")}

DESCRIBE = {
    "hf": "an HF-style folder (safetensors or pytorch_model.bin)",
    "nanogpt": "a nanoGPT checkpoint (a dict with 'model' and 'model_args')",
    "lightning": "a Lightning checkpoint (a dict with 'state_dict' and 'pytorch-lightning_version')",
    "dcp": "a torch.distributed.checkpoint (DCP) folder",
    None: "a torch file of no format ckptavg writes back (not nanoGPT, Lightning, DCP or an HF pytorch_model.bin)",
}

# How the output is loaded: recorded in ckptavg.json and printed by merge.
LOAD = {
    "hf": "AutoModel.from_pretrained(OUT) for an HF model; else safetensors.torch.load_file(OUT/model.safetensors) "
          "into your module's load_state_dict",
    "nanogpt": f"python sample.py --out_dir=OUT (nanoGPT reads OUT/{NANOGPT_FILE}: GPTConfig(**model_args), "
               "_orig_mod. stripped, load_state_dict)",
    "lightning": f"YourModule.load_from_checkpoint('OUT/{LIGHTNING_FILE}')",
    "dcp": "torch.distributed.checkpoint.load(state_dict, checkpoint_id=OUT) into the model's state dict "
           "(torchtitan/OLMo-core: point the model-only checkpoint load at OUT)",
}


def input_kind(fmt: str, files: Sequence[Path], key: str | None = None) -> str | None:
    """What wrote a checkpoint: ``hf``, ``nanogpt``, ``lightning``, ``dcp``, or None (no format
    ckptavg writes back). ``fmt``/``files``/``key`` as a :class:`~ckptavg.trajectory.Checkpoint`
    has them; a single torch file is loaded (``weights_only``, memory-mapped) to look at its keys.

    Example:
        >>> input_kind("torch", [Path("out/ckpt_5000.pt")])           # doctest: +SKIP
        'nanogpt'
    """
    if fmt == "dcp":
        return "dcp"
    if fmt == "safetensors":
        return "hf"
    if len(files) != 1:  # pytorch_model-00001-of-00002.bin …
        return "hf" if files and all(Path(f).name.startswith("pytorch_model") for f in files) else None
    from .torchfile import load_pickle

    obj = load_pickle(Path(files[0]))
    if isinstance(obj, Mapping):
        if "model" in obj and isinstance(obj.get("model_args"), Mapping):
            return "nanogpt"
        if "state_dict" in obj and "pytorch-lightning_version" in obj:
            return "lightning"
    return "hf" if Path(files[0]).name.startswith("pytorch_model") else None


def resolve(requested: str, kind: str | None, where: str, key: str | None = None) -> str:
    """The format to write for ``requested`` (one of :data:`FORMATS`) from input of ``kind``.

    ``same`` is the input's own format; ``nanogpt`` and ``lightning`` need an input of that tool
    (its ``model_args`` / hyper-parameters cannot be made up); ``dcp`` and ``hf`` are written from
    any input, keys exactly as the input's.

    Raises:
        UsageError: one line naming ``where`` (the newest input) and what it is.
    """
    if requested not in FORMATS:
        raise UsageError(f"--format {requested}: unknown; choose one of {', '.join(FORMATS)}")
    want = kind if requested == "same" else requested
    if want is None:
        raise UsageError(f"--format same: {where} is {DESCRIBE[None]}; use --format hf or --format dcp")
    if want in MODEL_KEY:
        if kind != want:
            raise UsageError(f"--format {requested}: {where} is {DESCRIBE[kind]}, not {DESCRIBE[want]}; "
                             "what that tool needs beside the weights is not there: use --format hf or same")
        if key not in (None, MODEL_KEY[want]):
            raise UsageError(f"--format {requested}: --key {key} is not where {want} keeps the model "
                             f"({MODEL_KEY[want]!r}); use --format hf to write the tensors under --key {key}")
    return want


def write_torch_file(kind: str, directory: Path, state_dict: Mapping[str, Any], newest: Path,
                     label: Path) -> dict[str, Any]:
    """``directory/ckpt.pt`` (nanoGPT) or ``directory/model.ckpt`` (Lightning): the newest input's
    dict, its model replaced by ``state_dict`` and its optimizer state dropped.

    ``label`` is the final output folder, named in errors. Returns the ``format`` record for
    ``ckptavg.json``.

    Raises:
        CheckpointError: the newest input cannot be read again. OutputError: the write failed.
    """
    import torch

    from .sinks import write_error
    from .torchfile import load_pickle

    obj = load_pickle(newest)
    if not isinstance(obj, Mapping) or MODEL_KEY[kind] not in obj:
        raise CheckpointError(f"{newest}: no {MODEL_KEY[kind]!r} entry any more; was it replaced during the merge?")
    dropped = [k for k in DROPPED[kind] if k in obj]
    out = {k: (dict(state_dict) if k == MODEL_KEY[kind] else v) for k, v in obj.items() if k not in dropped}
    name = NANOGPT_FILE if kind == "nanogpt" else LIGHTNING_FILE
    path = directory / name
    try:
        with open(path, "wb") as f:
            torch.save(out, f)
    except OSError as e:
        raise write_error(e, label / name, sum(t.numel() * t.element_size() for t in state_dict.values())) from None
    except RuntimeError as e:  # torch's zip writer words a failed write as a RuntimeError
        raise OutputError(f"{label / name}: {str(e).strip().splitlines()[0][:200]} while writing the output; "
                          "nothing was left in place") from None
    del obj, out
    return {"name": kind, "file": name, "from": str(newest), "model_key": MODEL_KEY[kind],
            "dropped": dropped, "load": LOAD[kind]}


def write_dcp(directory: Path, state_dict: Mapping[str, Any], prefix: Sequence[str], label: Path,
              fsync: bool = True, dropped: Sequence[str] = ()) -> dict[str, Any]:
    """A model-only DCP checkpoint in ``directory`` (``.metadata`` + ``__0_0.distcp``) written by
    torch's own ``FileSystemWriter`` in this one process, the model nested under ``prefix`` as the
    input had it (OLMo-core, accelerate: ``("model",)``; torchtitan: at the top level).
    ``dropped``: the input's entries that are not the model (optimizer, train state), recorded.

    Returns the ``format`` record for ``ckptavg.json``.

    Raises:
        OutputError: the write failed.
    """
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.api import CheckpointException

    from .sinks import write_error

    nested: dict[str, Any] = dict(state_dict)
    for p in reversed(tuple(prefix)):
        nested = {p: nested}
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled … single process": intended
            warnings.simplefilter("ignore")
            save(nested, storage_writer=FileSystemWriter(os.fspath(directory), sync_files=fsync), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 — DCP wraps a failed write (full disk included)
        failures = getattr(e, "failures", None)  # rank → its exception (or (exception, traceback))
        if isinstance(failures, Mapping) and failures:
            first = next(iter(failures.values()))
            e = first[0] if isinstance(first, tuple) else first
        if isinstance(e, OSError):
            raise write_error(e, label / DCP_SHARD) from None
        text = str(e).strip().splitlines()
        raise OutputError(f"{label}: writing the DCP checkpoint failed: {(text[-1] if text else type(e).__name__)[:200]}"
                          "; nothing was left in place") from None
    return {"name": "dcp", "files": [".metadata", DCP_SHARD], "model_key": ".".join(prefix) or None,
            "dropped": list(dropped), "load": LOAD["dcp"]}


__all__ = ["DESCRIBE", "FORMATS", "LOAD", "input_kind", "resolve", "write_dcp", "write_torch_file"]
