"""Zero-shot scoring: hand a model to lm-evaluation-harness, and a quick held-out loss without it.

The model comes from one of three targets, all built into the same transformers model object:

- a merged (or any HF) directory: loaded from disk with ``from_pretrained(dir)``;
- one checkpoint of a run (``step=S``) or a merge spec (``selection=Selection(window=5, at=S)``,
  any method), on a local or ``hf://`` run: averaged **in memory** by :func:`ckptavg.average` (``out=None``) and loaded with
  ``from_pretrained(None, config=…, state_dict=…)``, never written to disk. Both loads go through
  the same transformers code (key renames such as GPT-NeoX ``embed_out`` → ``lm_head``, tied
  weights, dtype), so the same weights score the same either way.

The model is wrapped in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` and scored with
``lm_eval.simple_evaluate``. torch, transformers and lm_eval are imported inside the functions:
``ckptavg --help`` pays for none of them, and a user without the ``eval`` extra gets one line
saying what to install.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import CkptavgError
from ..selection import Selection
from ..trajectory import Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..trajectory import Checkpoint

EXTRA_HINT = "pip install 'ckptavg[eval]'"
TASKS_DIR = Path(__file__).parent.parent / "tasks"  # packaged tasks: TASKS_DIR/<name>/<name>.yaml
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
MAX_DEFAULT_SEQ_LEN = 2048  # held-out windows: the model's context, capped so long-context models stay quick
DTYPES = ("auto", "float32", "bfloat16", "float16")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# Optional dependencies -----------------------------------------------------------------------
def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise CkptavgError(f"ckptavg eval needs transformers (missing module {e.name!r}): {EXTRA_HINT}") from None


def _require_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate, part of the extra)
    except ImportError as e:
        raise CkptavgError(
            f"scoring tasks needs lm-evaluation-harness (missing module {e.name!r}): {EXTRA_HINT}"
        ) from None
    return lm_eval


@contextmanager
def _offline_env(enabled: bool) -> Iterator[None]:
    """Set the HF offline variables for the duration of a call, then restore them.

    huggingface_hub and datasets read the variables when first imported, so modules already
    imported (e.g. by a notebook) get their switch flipped too, and flipped back afterwards.
    """
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    switches = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                ("datasets.config", "HF_DATASETS_OFFLINE")]
    saved_flags = [(mod, attr, getattr(mod, attr)) for name, attr in switches
                   if (mod := sys.modules.get(name)) is not None and hasattr(mod, attr)]
    os.environ.update({k: "1" for k in OFFLINE_VARS})
    for mod, attr, _ in saved_flags:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in saved_flags:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Tasks ---------------------------------------------------------------------------------------
def packaged_tasks() -> list[str]:
    """Names of the tasks shipped with ckptavg (they need no download)."""
    return sorted(p.name for p in TASKS_DIR.iterdir() if (p / f"{p.name}.yaml").is_file()) if TASKS_DIR.is_dir() else []


def packaged_task(name: str) -> dict[str, Any]:
    """A packaged task's lm-eval config: its YAML as a dict with ``data_files`` made absolute
    (they are relative to the YAML). lm-eval takes it directly: ``simple_evaluate(tasks=[cfg])``."""
    import yaml

    folder = TASKS_DIR / name
    cfg = yaml.safe_load((folder / f"{name}.yaml").read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, Mapping):
        cfg["dataset_kwargs"]["data_files"] = {k: str(folder / v) for k, v in files.items()}
    elif isinstance(files, str):
        cfg["dataset_kwargs"]["data_files"] = str(folder / files)
    return cfg


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _task_specs(tasks: Sequence[str], include_path: Sequence[str]) -> tuple[list[Any], Any]:
    """lm-eval task specs and a TaskManager that knows them; unknown names fail here, before
    any averaging. Built-in tasks are indexed only when asked for (scanning them takes seconds)."""
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not Path(p).is_dir():
            raise CkptavgError(f"{p}: --include-path must be a folder of task YAMLs")
    shipped = packaged_tasks()
    paths = list(include_path) or None
    tm = TaskManager(include_path=paths, include_defaults=False)

    def unknown() -> list[str]:
        return [t for t in tasks if t not in shipped and t not in tm.all_tasks and not _is_yaml_path(t)]

    if unknown():
        tm = TaskManager(include_path=paths)
    if missing := unknown():
        close = difflib.get_close_matches(missing[0], shipped + tm.all_tasks, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise CkptavgError(
            f"unknown task {missing[0]!r}; {hint}(lm-eval's built-in names, ckptavg's packaged "
            f"{', '.join(shipped)}, or a task under --include-path)"
        )
    local = set(tm.all_tasks) if include_path else set()
    return [packaged_task(t) if t in shipped and t not in local else t for t in tasks], tm


def _task_list(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    return [t.strip() for t in tasks if t.strip()]


# Model ---------------------------------------------------------------------------------------
def _is_hf_directory(c: Checkpoint) -> bool:
    d = Path(c.location)
    return d.is_dir() and (d / "config.json").is_file() and any((d / n).is_file() for n in _HF_WEIGHTS)


def _torch_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise CkptavgError(f"unknown model dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    import torch

    return dtype if dtype == "auto" else getattr(torch, dtype)


def _check_loaded(model: Any, info: Mapping[str, Any], where: str) -> None:
    """A weight the model needs but the checkpoint lacks would be left random: refuse."""
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise CkptavgError(
            f"{where}: the weights do not fit {type(model).__name__} built from its config.json: "
            f"tensor {missing[0]!r} is missing ({len(missing)} in all)"
        )
    bad = list(info.get("mismatched_keys") or [])
    if bad:
        name = bad[0][0] if isinstance(bad[0], (tuple, list)) else bad[0]
        raise CkptavgError(f"{where}: tensor {name!r} has the wrong shape for {type(model).__name__}")


def _load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CkptavgError(f"{source}: cannot load a tokenizer ({first}); pass --tokenizer NAME_OR_PATH") from None


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
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Build the transformers model (eval mode, on ``device``) for a target.

    Args:
        target: an HF directory (e.g. a ``ckptavg merge`` output), a single checkpoint, or a run;
            or a Trajectory already discovered (a sweep discovers a Hub run once, not per job).
        step: the run's checkpoint at this step, read in memory.
        selection: a merge spec on the run, averaged in memory with ``method``/``weights``/
            ``decay``/``half_life`` exactly as :func:`ckptavg.average` does; nothing is written.
        dtype: ``auto`` (the config's, as ``from_pretrained`` does), ``float32``, ``bfloat16``, ``float16``.
        tokenizer: name or path [default: the files beside the (newest) checkpoint].

    Returns:
        ``(model, tokenizer, provenance)``; provenance says whether the weights came from disk or
        memory and, in ckptavg.json's shape, which inputs with which weights produced them.

    Raises:
        CkptavgError: ambiguous target, no config.json or tokenizer, weights that do not fit the
            config, and everything :func:`ckptavg.average` refuses.

    Example:
        >>> model, tok, prov = load_model("runs/tiny", selection=Selection(window=5))  # doctest: +SKIP
        >>> prov["loaded_from"]                                                       # doctest: +SKIP
        'memory'
    """
    from .. import manifest as _manifest
    from .. import methods
    from ..sources import discover, materialise
    from ..averaging import average

    _require_transformers()
    torch_dtype = _torch_dtype(dtype)
    if step is not None and selection is not None:
        raise CkptavgError("give either --step (one checkpoint) or a merge spec (--window/--at …), not both")
    if isinstance(target, Trajectory):
        traj, target = target, target.root or target.name
    else:
        traj = discover(target)
    if step is not None:
        selection = Selection(steps=(step,))
    spec = selection is not None or method != "uniform" or any(x is not None for x in (weights, decay, half_life))
    if not spec and len(traj) > 1:
        raise CkptavgError(
            f"{target}: a run of {len(traj)} checkpoints (steps {traj.steps[0]}..{traj.steps[-1]}); "
            "choose one with --step S, or average with --window K [--at S]"
        )
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not spec and _is_hf_directory(traj[0]):
        config_dir = Path(traj[0].location).resolve()
        tok_src = tokenizer or config_dir
        tok = _load_tokenizer(tok_src)
        model, info = AutoModelForCausalLM.from_pretrained(config_dir, dtype=torch_dtype, output_loading_info=True)
        _check_loaded(model, info, str(config_dir))
        has_record = (config_dir / _manifest.MANIFEST_NAME).is_file()
        record = _manifest.read(config_dir) if has_record else None
        loaded_from = "disk"
    else:
        ckpts = list((selection or Selection()).apply(traj))
        if not ckpts:
            raise CkptavgError(f"{target}: the selection has no checkpoints")
        methods.weights(method, [c.step for c in ckpts], weights=weights, decay=decay,
                        half_life=half_life)  # a bad method or weights fail before any download
        ckpts = materialise(ckpts, progress=progress)  # hf:// revisions → files in the HF cache, the newest's config too
        newest = ckpts[-1]
        config_dir = newest.config_dir
        if config_dir is None or not (config_dir / "config.json").is_file():
            raise CkptavgError(
                f"{newest.location}: no config.json beside the weights; eval builds the model from it "
                "(save the run's HF config there)"
            )
        config = AutoConfig.from_pretrained(config_dir)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise CkptavgError(
                f"{config_dir / 'config.json'}: model_type {config.model_type!r} has no causal-LM class in transformers"
            )
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        tok_src = tokenizer or config_dir
        tok = _load_tokenizer(tok_src)
        state = average(Trajectory(traj.name, tuple(ckpts), traj.root), method=method, weights=weights, decay=decay,
                        half_life=half_life, progress=progress)
        record = state.manifest
        model, info = cls.from_pretrained(None, config=config, state_dict=dict(state), dtype=torch_dtype,
                                          output_loading_info=True)
        del state
        _check_loaded(model, info, newest.location)
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


# Held-out loss -------------------------------------------------------------------------------
def _read_documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CkptavgError(f"{path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise CkptavgError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CkptavgError(f"{path}:{lineno}: expected an object with a string \"text\" field")
        docs.append(obj["text"])
    return docs


def _context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 1:
            return min(v, MAX_DEFAULT_SEQ_LEN)
    return MAX_DEFAULT_SEQ_LEN


def held_out_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike[str],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Token-level mean negative log-likelihood (nats) and perplexity of a text file.

    Definition: the documents (a ``.jsonl`` file: each line's ``"text"``; any other file: its
    whole text, one document) are tokenized without special tokens and concatenated, with the
    tokenizer's EOS token between consecutive documents. The stream is cut into non-overlapping
    windows of ``seq_len`` tokens (the last may be shorter; a 1-token remainder is dropped). In
    each window, every token but the first is predicted from the tokens before it *in that
    window*; ``loss`` is the sum of those NLLs over all windows divided by their count
    (``predicted_tokens``), so a single window gives exactly ``model(ids, labels=ids).loss``.
    ``perplexity = exp(loss)``. Logits are upcast to float32 before the softmax.

    Args:
        seq_len: window length [default: the model's context, at most 2048].
        batch_size: full windows per forward pass.

    Returns:
        ``{"file", "documents", "tokens", "windows", "seq_len", "predicted_tokens", "loss", "perplexity"}``.

    Raises:
        CkptavgError: unreadable file, bad JSONL line, fewer than two tokens.

    Example:
        >>> held_out_loss(model, tok, "valid.jsonl", seq_len=512)["perplexity"]  # doctest: +SKIP
    """
    import torch
    import torch.nn.functional as F

    p = Path(path)
    docs = _read_documents(p)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
    n_ctx = seq_len or _context_length(model.config)
    if n_ctx < 2:
        raise CkptavgError(f"seq_len must be at least 2, got {n_ctx}")
    windows = [ids[i : i + n_ctx] for i in range(0, len(ids), n_ctx)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise CkptavgError(f"{p}: fewer than 2 tokens; nothing to score")
    full = [w for w in windows if len(w) == n_ctx]
    batches = [full[i : i + batch_size] for i in range(0, len(full), max(1, batch_size))]
    batches += [[w] for w in windows if len(w) < n_ctx]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            x = torch.tensor(batch, device=model.device)  # (B, T)
            logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x.shape[0] * (x.shape[1] - 1)
    loss = nll / count
    return {"file": str(p), "documents": len(docs), "tokens": len(ids), "windows": len(windows), "seq_len": n_ctx,
            "predicted_tokens": count, "loss": loss, "perplexity": math.exp(loss)}


# The one call --------------------------------------------------------------------------------
def score(
    target: str | os.PathLike[str] | Trajectory,
    tasks: str | Sequence[str] | None = None,
    *,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str = "cpu",
    dtype: str = "auto",
    step: int | None = None,
    selection: Selection | None = None,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    decay: float | None = None,
    half_life: float | None = None,
    text: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    offline: bool = False,
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a merged directory, one checkpoint, or an in-memory average with lm-eval and/or a
    held-out loss, using one model object for both.

    Args:
        target: see :func:`load_model` (with ``step``, ``selection``, ``method``, ``weights``,
            ``decay``, ``half_life``, ``dtype``, ``device``, ``tokenizer``).
        tasks: lm-eval task names (list or ``"a,b"``): built-ins such as ``lambada_openai``,
            ``piqa``, ``winogrande``, ``arc_easy``, ``arc_challenge``, ``sciq`` (downloaded once),
            ckptavg's packaged ``ckptavg_basics`` (offline), or names defined under ``include_path``.
        include_path: folder(s) of task YAMLs, e.g. ``dataset_path: json`` with local ``data_files``.
        limit: at most this many examples per task (a fraction if < 1), for quick checks.
        batch_size: lm-eval's batch size (an int or ``"auto"``); also windows per pass for ``text``.
        text: a ``.txt`` or ``.jsonl`` file for :func:`held_out_loss` (no lm-eval needed).
        seq_len: held-out window length.
        offline: set HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE during the call.
        output: also write the result as JSON to this file.
        progress: show the averaging progress bar.

    Returns:
        lm-eval's results dict (``results``, ``configs``, ``versions``, ``n-samples``, ``config`` …;
        only when ``tasks``), plus ``held_out`` (when ``text``) and ``ckptavg``: the provenance
        from :func:`load_model`, the evaluation settings and timings.

    Raises:
        CkptavgError: nothing to score, lm-eval missing (names the extra), unknown task, and
            everything :func:`load_model` refuses.

    Example:
        >>> r = score("runs/tiny", "ckptavg_basics", selection=Selection(window=5), limit=50)  # doctest: +SKIP
        >>> r["results"]["ckptavg_basics"]["acc,none"]                                          # doctest: +SKIP
    """
    names = _task_list(tasks)
    if not names and text is None:
        raise CkptavgError("nothing to score: give --tasks (e.g. ckptavg_basics) and/or --text FILE")
    if text is not None and not Path(text).is_file():
        raise CkptavgError(f"{text}: no such file")
    if isinstance(include_path, (str, os.PathLike)):
        include_path = [include_path]
    includes = [str(p) for p in include_path or ()]
    if isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    seconds: dict[str, float] = {}
    with _offline_env(offline):
        if names:
            lm_eval = _require_lm_eval()
            specs, task_manager = _task_specs(names, includes)
        t0 = time.perf_counter()
        model, tok, provenance = load_model(
            target, step=step, selection=selection, method=method, weights=weights, decay=decay,
            half_life=half_life, dtype=dtype, device=device, tokenizer=tokenizer, progress=progress,
        )
        seconds["load"] = time.perf_counter() - t0
        result: dict[str, Any] = {}
        if names:
            from lm_eval.models.huggingface import HFLM

            t0 = time.perf_counter()
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
            try:
                result.update(lm_eval.simple_evaluate(
                    model=lm, tasks=specs, task_manager=task_manager, limit=limit, batch_size=batch_size,
                    device=device, log_samples=False,
                ) or {})
            except ConnectionError as e:
                raise CkptavgError(
                    f"{e}; built-in tasks download their data once (later runs, --offline too, read the "
                    "cache); with no network use ckptavg_basics or a local task YAML with --include-path"
                ) from None
            seconds["tasks"] = time.perf_counter() - t0
        if text is not None:
            t0 = time.perf_counter()
            result["held_out"] = held_out_loss(model, tok, text, seq_len=seq_len,
                                               batch_size=batch_size if isinstance(batch_size, int) else 1)
            seconds["text"] = time.perf_counter() - t0
    result["ckptavg"] = provenance | {
        "tasks": names, "include_path": includes, "limit": limit, "batch_size": batch_size,
        "offline": offline, "text": str(text) if text is not None else None, "seconds": seconds,
    }
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_json(result) + "\n")
    return result


# Presentation --------------------------------------------------------------------------------
def _plain(x: Any) -> Any:
    """JSON fallback for what lm-eval leaves in its results (numpy scalars, dtypes, sets, callables)."""
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (TypeError, ValueError):
            pass
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def to_json(result: Mapping[str, Any]) -> str:
    """``result`` as indented JSON (the format of ``--output`` and ``--json``)."""
    return json.dumps(result, indent=2, default=_plain)


__all__ = ["held_out_loss", "load_model", "packaged_task", "packaged_tasks", "score", "to_json"]
