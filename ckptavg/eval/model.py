"""The model to score: one transformers object, whether its weights come from disk or memory.

A merged (or any HF) directory is loaded with ``from_pretrained(dir)``. One step of a run, or a
merge spec on it, is averaged by :func:`ckptavg.average` with ``out=None`` and built with
``from_pretrained(None, config=…, state_dict=…)``: never written to disk. Both loads go through
the same transformers code (key renames such as GPT-NeoX ``embed_out`` → ``lm_head``, tied
weights, dtype), so the same weights score the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import CheckpointError, MissingDependencyError, SelectionError, UsageError
from ..peft import is_adapter
from ..selection import Selection
from ..trajectory import Trajectory
from .tasks import require_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..trajectory import Checkpoint

DTYPES = ("auto", "float32", "bfloat16", "float16")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _is_hf_directory(c: Checkpoint) -> bool:
    d = Path(c.location)
    return d.is_dir() and (d / "config.json").is_file() and any((d / n).is_file() for n in _HF_WEIGHTS)


def _torch_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise UsageError(f"unknown model dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    import torch

    return dtype if dtype == "auto" else getattr(torch, dtype)


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype``
    before (which 4.56+ still reads, with a deprecation warning)."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _check_loaded(model: Any, info: Mapping[str, Any], where: str) -> None:
    # from_pretrained leaves a weight the checkpoint lacks randomly initialised, with a warning
    # nobody reads: the scores would look plausible and mean nothing.
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(
            f"{where}: the weights do not fit {type(model).__name__} built from its config.json: "
            f"tensor {missing[0]!r} is missing ({len(missing)} in all)"
        )
    bad = list(info.get("mismatched_keys") or [])
    if bad:
        name = bad[0][0] if isinstance(bad[0], (tuple, list)) else bad[0]
        raise CheckpointError(f"{where}: tensor {name!r} has the wrong shape for {type(model).__name__}")


def _refuse_custom_code(config_dir: Path) -> None:
    # transformers would import the checkpoint's own modeling_*.py (or stop at an interactive y/N
    # prompt); ckptavg never runs code that came with a checkpoint.
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = config_dir / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    model_type = cfg.get("model_type")
    auto_map = cfg.get("auto_map")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    code = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    what = f"its own code ({code})" if code else "code transformers does not ship"
    raise CheckpointError(
        f"{path}: model_type {model_type!r} needs {what}; ckptavg never runs code that comes with a "
        "checkpoint (merge it, then score the folder with lm-eval --trust_remote_code if you trust it)"
    )


def _load_tokenizer(source: str | os.PathLike[str], given: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if given:  # the user's --tokenizer is wrong, not the checkpoint
            raise UsageError(f"{source}: cannot load a tokenizer ({first})") from None
        raise CheckpointError(f"{source}: cannot load a tokenizer ({first}); pass --tokenizer NAME_OR_PATH") from None


def _adapter_base(c: Checkpoint) -> Path:
    """The local base model folder a PEFT adapter names (``base_model_name_or_path``)."""
    from ..peft import adapter_config

    cfg = adapter_config(c)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not Path(base).is_dir():
        raise CheckpointError(f"{c.location}: adapter_config.json's base_model_name_or_path ({base!r}) is not a local "
                              "folder; eval loads the base from there (set it to the base model's folder)")
    return Path(base).resolve()


def _has_tokenizer(d: Path | None) -> bool:
    return d is not None and any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _with_adapter(model: Any, c: Checkpoint, state: dict[str, Any]) -> Any:
    """``model`` with the adapter ``state`` (PEFT's own names) loaded through PEFT and merged into its weights."""
    try:
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    except ImportError as e:
        raise MissingDependencyError(f"scoring a PEFT adapter needs peft (missing module {e.name!r}): "
                                     "pip install peft") from None
    assert c.config_dir is not None
    peft_model = get_peft_model(model, PeftConfig.from_pretrained(str(c.config_dir)))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise CheckpointError(f"{c.location}: adapter tensor {unexpected[0]!r} fits no module of the base model")
    return peft_model.merge_and_unload()


def load_model(
    target: str | os.PathLike[str] | Trajectory,
    *,
    step: int | None = None,
    selection: Selection | None = None,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    decay: float | None = None,
    half_life: float | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    tokenizer: str | os.PathLike[str] | None = None,
    allow_duplicates: bool = False,
    progress: bool = True,
    **method_params: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Build the transformers model (eval mode, on ``device``) for a target.

    Args:
        target: an HF directory (e.g. a ``ckptavg merge`` output), a single checkpoint, or a run;
            or a Trajectory already discovered (a sweep discovers a Hub run once, not per job).
        step: the run's checkpoint at this step, read in memory.
        selection: a merge spec on the run, averaged in memory with ``method``/``weights``/
            ``decay``/``half_life`` exactly as :func:`ckptavg.average` does; nothing is written.
        method, weights, decay, half_life: the weighting, as for :func:`ckptavg.average`.
        dtype: ``auto`` (the config's, as ``from_pretrained`` does), ``float32``, ``bfloat16``, ``float16``.
        device: where the model goes (``cpu``, ``cuda``, ``cuda:1``, ``mps`` …).
        tokenizer: name or path [default: the files beside the (newest) checkpoint].
        allow_duplicates: use Hub revisions whose weights are byte-identical to another step's
            instead of refusing them (see :func:`ckptavg.sources.materialise`).
        progress: show the download and averaging progress bars.
        method_params: the other methods' parameters (``schedule``, ``sigma_rel``,
            ``half_life_tokens``, ``tokens_per_step``), as for :func:`ckptavg.average`.

    Returns:
        ``(model, tokenizer, provenance)``; provenance says whether the weights came from disk or
        memory and, in ckptavg.json's shape, which inputs with which weights produced them.

    Raises:
        UsageError: an unknown ``dtype``, or both ``step`` and ``selection``; a ``tokenizer``
            that cannot be loaded.
        SelectionError: a run of several checkpoints with nothing saying which to use, or a
            selection that picks none.
        CheckpointError: no config.json or tokenizer beside the weights, a config with no
            causal-LM class, weights that do not fit the config.
        MissingDependencyError: transformers is not installed.
        CkptavgError: everything :func:`ckptavg.average` and discovery refuse.

    Example:
        >>> model, tok, prov = load_model("runs/tiny", selection=Selection(window=5))  # doctest: +SKIP
        >>> prov["loaded_from"]                                                       # doctest: +SKIP
        'memory'
    """
    from .. import manifest as _manifest
    from ..averaging import average, method_weights
    from ..sources import discover, materialise

    require_transformers()
    torch_dtype = _torch_dtype(dtype)
    if step is not None and selection is not None:
        raise UsageError("give either --step (one checkpoint) or a merge spec (--window/--at …), not both")
    if isinstance(target, Trajectory):
        traj, target = target, target.root or target.name
    else:
        traj = discover(target)
    if step is not None:
        selection = Selection(steps=(step,))
    spec = selection is not None or method != "uniform" or any(
        x is not None for x in (weights, decay, half_life, *method_params.values()))
    if not spec and len(traj) > 1:
        raise SelectionError(
            f"{target}: a run of {len(traj)} checkpoints (steps {traj.steps[0]}..{traj.steps[-1]}); "
            "choose one with --step S, or average with --window K [--at S]"
        )
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # transformers' stubs type neither from_pretrained(output_loading_info=True) nor the mapping's values.
    loaded: Any
    cls: Any
    config_dir: Path | None
    if not spec and _is_hf_directory(traj[0]):
        config_dir = Path(traj[0].location).resolve()
        _refuse_custom_code(config_dir)
        tok_src = tokenizer or config_dir
        tok = _load_tokenizer(tok_src, tokenizer is not None)
        loaded = AutoModelForCausalLM.from_pretrained(config_dir, **_dtype_kwarg(torch_dtype), output_loading_info=True,
                                                      trust_remote_code=False)
        model, info = loaded
        _check_loaded(model, info, str(config_dir))
        has_record = (config_dir / _manifest.MANIFEST_NAME).is_file()
        record = _manifest.read(config_dir) if has_record else None
        loaded_from = "disk"
    else:
        ckpts = list((selection or Selection()).apply(traj))
        if not ckpts:
            raise SelectionError(f"{target}: the selection has no checkpoints")
        # A bad method or weights must fail before a Hub run's revisions are downloaded.
        method_weights(ckpts, method, dict(weights=weights, decay=decay, half_life=half_life, **method_params), traj.root)
        # hf:// revisions become files in the HF cache here, so the newest one's config.json is local.
        ckpts = materialise(ckpts, allow_duplicates=allow_duplicates, progress=progress)
        newest = ckpts[-1]
        adapter = is_adapter(newest)  # a PEFT adapter: the model is its base, with the (averaged) adapter merged in
        config_dir = _adapter_base(newest) if adapter else newest.config_dir
        if config_dir is None or not (config_dir / "config.json").is_file():
            raise CheckpointError(
                f"{newest.location}: no config.json beside the weights; eval builds the model from it "
                "(save the run's HF config there)"
            )
        _refuse_custom_code(config_dir)
        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise CheckpointError(
                f"{config_dir / 'config.json'}: model_type {config.model_type!r} has no causal-LM class in transformers"
            )
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        adapter_tok = newest.config_dir if adapter and _has_tokenizer(newest.config_dir) else None
        tok_src = tokenizer or adapter_tok or config_dir
        tok = _load_tokenizer(tok_src, tokenizer is not None)
        state = average(Trajectory(traj.name, tuple(ckpts), traj.root), method=method, weights=weights, decay=decay,
                        half_life=half_life, allow_duplicates=allow_duplicates, progress=progress, **method_params)
        record = state.manifest
        if adapter:
            loaded = cls.from_pretrained(config_dir, **_dtype_kwarg(torch_dtype), output_loading_info=True,
                                         trust_remote_code=False)
            model, info = loaded
            _check_loaded(model, info, str(config_dir))
            model = _with_adapter(model, newest, dict(state))
        else:
            from ..keys import strip_plan

            strip = strip_plan(list(state), config_dir)  # module./_orig_mod./model. wrappers: the config's names
            weights_in = {k[len(strip[0]):]: v for k, v in state.items()} if strip else dict(state)
            loaded = cls.from_pretrained(None, config=config, state_dict=weights_in, **_dtype_kwarg(torch_dtype),
                                         output_loading_info=True)
            del weights_in
            model, info = loaded
            _check_loaded(model, info, newest.location)
        del state  # only the model should keep the averaged tensors alive from here on
        loaded_from = "memory"
    model = model.to(device).eval()
    provenance = {
        "tool": "ckptavg",
        "version": __version__,
        "target": str(target),
        "loaded_from": loaded_from,
        "weights": record,
        "config": str(config_dir),
        "tokenizer": str(tok_src),
        "model": {"class": type(model).__name__, "dtype": str(model.dtype).removeprefix("torch."),
                  "device": str(model.device), "parameters": sum(p.numel() for p in model.parameters())},
    }
    return model, tok, provenance


__all__ = ["DTYPES", "load_model"]
