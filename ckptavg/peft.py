"""PEFT LoRA adapters: the exact average of their weight updates, merged into the base model.

A LoRA adapter changes a base weight W by ΔW = s·B·A (s = lora_alpha / r, or / √r with rsLoRA).
Averaging a run of adapters tensor by tensor (``ckptavg merge``'s default for adapter folders,
``--peft adapter``) averages A and B separately, and mean(B)·mean(A) is not mean(B·A): the cross
terms B_i·A_j of different checkpoints enter the product. The result is still an adapter
(PEFT loads it, the rank stays r), close to the exact average when the checkpoints are close.

:func:`merge_adapters` (``--peft merged-delta``) computes the exact one instead: for each adapted
weight, W + Σ_i w_i·s·B_i·A_i in fp32, written as a full model (the base's config and files) —
an adapter of rank r cannot hold it. Streamed one base tensor at a time: memory is one base
tensor plus each input's (small) A and B for it.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import manifest as _manifest
from .averaging import input_paths, method_weights
from .errors import CheckpointError, NonFiniteError, SelectionError, UsageError
from .io.files import load_json
from .io.layout import ADAPTER_CONFIG, CONFIG_FILES, weights_stem
from .io.readers import CheckpointReader
from .io.sinks import SafetensorsDirSink, atomic_directory, check_output
from .selection import Selection
from .trajectory import Checkpoint, Trajectory

if TYPE_CHECKING:
    import torch

_PREFIX = "base_model.model."  # what PEFT puts before the base model's module names
_PAIR = (".lora_A.weight", ".lora_B.weight")


def is_adapter(ckpt: Checkpoint) -> bool:
    """A PEFT adapter checkpoint: ``adapter_model.safetensors``/``.bin`` beside ``adapter_config.json``."""
    return weights_stem(ckpt.files) == "adapter_model" and ckpt.config_dir is not None \
        and (ckpt.config_dir / ADAPTER_CONFIG).is_file()


def adapter_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's ``adapter_config.json``, checked to be a LoRA whose merge ckptavg can compute.

    Raises:
        CheckpointError: no config, another PEFT method, DoRA, or per-module alphas (``alpha_pattern``).
    """
    if not is_adapter(ckpt):
        raise CheckpointError(f"{ckpt.location}: not a PEFT adapter (adapter_model.safetensors + {ADAPTER_CONFIG})")
    assert ckpt.config_dir is not None
    path = ckpt.config_dir / ADAPTER_CONFIG
    cfg = load_json(path, ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r}; merged-delta handles LoRA only "
                              "(use --peft adapter to average the adapter tensors)")
    for flag in ("use_dora", "alpha_pattern"):
        if cfg.get(flag):
            raise CheckpointError(f"{path}: {flag} is set, which merged-delta does not handle; use --peft adapter")
    if not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise CheckpointError(f"{path}: no numeric lora_alpha")
    return cfg


def _pairs(tensors: Mapping[str, Any], where: str) -> dict[str, tuple[str, str]]:
    """Base weight name → (lora_A name, lora_B name) from an adapter's tensor names."""
    pairs: dict[str, tuple[str, str]] = {}
    for name in tensors:
        if not name.endswith(_PAIR):
            raise CheckpointError(f"{where}: tensor {name!r} is not a LoRA A/B matrix (modules_to_save, biases and "
                                  "embedding adapters are not merged); use --peft adapter")
        module = name[: -len(_PAIR[0])].removeprefix(_PREFIX)
        a, b = (f"{name[: -len(_PAIR[0])]}{s}" for s in _PAIR)
        if a not in tensors or b not in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} has no {'lora_B' if name == a else 'lora_A'} partner")
        pairs[f"{module}.weight"] = (a, b)
    return pairs


def _base_checkpoint(base: str | os.PathLike[str] | None, cfg: Mapping[str, Any], where: str) -> Checkpoint:
    from .sources import discover, is_hub

    given = base if base is not None else cfg.get("base_model_name_or_path")
    if not given:
        raise UsageError(f"{where}: {ADAPTER_CONFIG} names no base_model_name_or_path; pass --base PATH (the base "
                         "model's folder)")
    if is_hub(str(given)) or not Path(given).exists():
        raise UsageError(f"{where}: base model {given!r} is not a local folder; pass --base PATH (download it first, "
                         "e.g. huggingface-cli download NAME --local-dir PATH)")
    traj = discover(given)
    if len(traj) != 1:
        raise UsageError(f"{given}: the base model must be one checkpoint, found {len(traj)}")
    return traj[0]


def _scaling(cfg: Mapping[str, Any], r: int) -> float:
    alpha = float(cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def merge_adapters(
    source: str | os.PathLike[str] | Trajectory | Sequence[Checkpoint],
    out: str | os.PathLike[str],
    *,
    selection: Selection | None = None,
    method: str = "uniform",
    base: str | os.PathLike[str] | None = None,
    force: bool = False,
    fsync: bool = True,
    progress: bool = True,
    **method_params: Any,
) -> Path:
    """Write base + the weighted mean of each adapter's ΔW = s·B·A as a full model (``--peft merged-delta``).

    Args:
        source: a run of PEFT adapter checkpoints (folder, Trajectory or list, oldest first).
        out: the output folder (``model.safetensors``, the base's config and tokenizer files — the
            newest adapter's tokenizer files when it has them — and ``ckptavg.json``), written atomically.
        selection: which checkpoints (default: all).
        method, method_params: the weighting, as for :func:`ckptavg.average` (``half_life`` …).
        base: the base model's folder [default: ``base_model_name_or_path`` of the adapter config].
        force: replace an existing output ckptavg may replace.
        fsync: flush the output to disk before it appears.
        progress: unused (the work is one pass over the base); kept for the same signature as ``average``.

    Returns:
        The output folder.

    Raises:
        CheckpointError: inputs that are not LoRA adapters ckptavg can merge, adapters whose target
            weights the base lacks or whose shapes do not fit it.
        UsageError: no base model. NonFiniteError: NaN/Inf in an adapter.

    Example:
        >>> merge_adapters("runs/lora", "lora-merged", selection=Selection(window=3))  # doctest: +SKIP
    """
    from .sources import discover

    del progress
    traj = discover(source) if isinstance(source, (str, os.PathLike)) else source
    root = str(getattr(traj, "root", ""))
    ckpts = list((selection or Selection()).apply(traj if isinstance(traj, Trajectory)
                                                   else Trajectory("adapters", tuple(traj), root)))
    if not ckpts:
        raise SelectionError("nothing selected: the selection has no checkpoints")
    if not is_adapter(ckpts[-1]):
        raise UsageError(f"{ckpts[-1].location}: --peft merged-delta needs PEFT adapter checkpoints "
                         f"(adapter_model.safetensors + {ADAPTER_CONFIG})")
    cfg = adapter_config(ckpts[-1])
    for c in ckpts:
        adapter_config(c)
    weights, params = method_weights(ckpts, method, method_params, root)
    base_ckpt = _base_checkpoint(base, cfg, ckpts[-1].location)
    plan = dict(base_ckpt.tensors or {})
    assert ckpts[-1].tensors is not None
    pairs = _pairs(ckpts[-1].tensors, ckpts[-1].location)
    for name in pairs:
        if name not in plan:
            raise CheckpointError(f"{ckpts[-1].location}: the adapter changes {name!r}, which the base model "
                                  f"{base_ckpt.location} does not have; pass the right --base")
    paths = input_paths(ckpts, root) + [Path(base_ckpt.location)]
    check_output(Path(out), force, paths)
    scalings: dict[str, float] = {}
    with atomic_directory(Path(out), force=force, fsync=fsync, inputs=paths) as tmp:
        readers = [CheckpointReader(c.files, c.format, str(c), key=c.key) for c in ckpts]
        base_reader = CheckpointReader(base_ckpt.files, base_ckpt.format, f"base {base_ckpt.location}")
        sink = SafetensorsDirSink(tmp, list(plan.values()), label=Path(os.path.abspath(out)))
        try:
            for name, info in plan.items():
                raw = base_reader.read(name)
                if name in pairs and info.dtype.floating:
                    w = _merged(name, info, raw, pairs[name], readers, weights, cfg, bool(cfg.get("fan_in_fan_out")),
                                scalings)
                    sink.write(name, 0, w)
                else:
                    sink.write(name, 0, raw)
        except BaseException:
            sink.abort()
            raise
        finally:
            for r in [*readers, base_reader]:
                r.close()
        sink.close()
        _copy_files(base_ckpt.config_dir, ckpts[-1].config_dir, tmp)
        files = sorted([p.name for p in tmp.iterdir()] + [_manifest.MANIFEST_NAME])
        record = _manifest.build(ckpts, weights, method, params, dtype="same as the base", accumulate="float32",
                                 trajectory=root, files=files, fingerprints=[_manifest.fingerprint(c) for c in ckpts])
        record["tensors"] = {"merged": len(pairs), "copied_from_base": len(plan) - len(pairs)}
        record["peft"] = {"mode": "merged-delta", "base": str(Path(base_ckpt.location).resolve()),
                          "merged": len(pairs), "scaling": sorted(set(scalings.values())),
                          "why": "base + Σ w_i·s·B_i·A_i: the exact mean of the adapters' weight updates"}
        _manifest.write(tmp, record)
    return Path(os.path.abspath(out))


def _merged(name: str, info: Any, raw: Any, pair: tuple[str, str], readers: Sequence[CheckpointReader],
            weights: Sequence[float], cfg: Mapping[str, Any], transposed: bool, scalings: dict[str, float]) -> Any:
    """Raw values of base weight ``name`` + Σ w_i·s·B_i·A_i, in fp32, rounded to the base's dtype."""
    import torch

    from .io.dtypes import from_accumulator, to_torch

    acc = to_torch(raw, info.dtype, info.shape).to(torch.float32)
    delta = torch.zeros(acc.shape, dtype=torch.float32)
    for reader, w in zip(readers, weights):
        if w == 0.0:
            continue
        a, b = (_tensor(reader, n) for n in pair)  # A: (r, in), B: (out, r)
        r = a.shape[0]
        scalings[name] = s = _scaling(cfg, r)
        d = b @ a
        d = d.T if transposed else d
        if d.shape != acc.shape:
            raise CheckpointError(f"{reader.label}: LoRA update of {name!r} has shape {list(d.shape)}, the base "
                                  f"weight {list(acc.shape)}")
        delta += (w * s) * d
    out = (acc + delta).contiguous()
    return from_accumulator(out.reshape(-1).numpy(), info.dtype)


def _tensor(reader: CheckpointReader, name: str) -> torch.Tensor:
    import torch

    from .io.dtypes import to_torch

    info = reader.tensors[name]
    t = to_torch(reader.read(name), info.dtype, info.shape).to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{reader.label}: tensor {name!r} holds NaN or Inf")
    return t


def _copy_files(base_dir: Path | None, adapter_dir: Path | None, dst: Path) -> None:
    """The base's config/tokenizer files; the newest adapter's tokenizer files over them (training may
    have added tokens), never its adapter_config.json (the output is a full model)."""
    for src, names in ((base_dir, CONFIG_FILES), (adapter_dir, _TOKENIZER_FILES)):
        for name in names if src is not None else ():
            p = Path(src or ".") / name
            if name != ADAPTER_CONFIG and p.is_file():
                shutil.copyfile(p, dst / name)
    if not (dst / "config.json").is_file():
        raise CheckpointError(f"{base_dir}: the base model has no config.json to describe the merged model")


_TOKENIZER_FILES = tuple(n for n in CONFIG_FILES if n not in ("config.json", "generation_config.json", ADAPTER_CONFIG))


__all__ = ["adapter_config", "is_adapter", "merge_adapters"]
