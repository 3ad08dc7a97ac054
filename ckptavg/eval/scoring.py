"""The one call: load a model once, score it with lm-eval and/or a held-out loss, and say which
weights were scored; plus the JSON form of the result."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..selection import Selection
from ..trajectory import Trajectory
from .heldout import held_out_loss
from .model import load_model
from .tasks import download_hint, offline_env, parse_tasks, require_lm_eval, resolve_tasks


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
    allow_duplicates: bool = False,
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **method_params: Any,
) -> dict[str, Any]:
    """Score a merged directory, one checkpoint, or an in-memory average with lm-eval and/or a
    held-out loss, using one model object for both.

    Args:
        target: see :func:`ckptavg.eval.load_model` (with ``step``, ``selection``, ``method``,
            ``weights``, ``decay``, ``half_life``, ``dtype``, ``device``, ``tokenizer``,
            ``allow_duplicates``).
        tasks: lm-eval task names (list or ``"a,b"``): built-ins such as ``lambada_openai``,
            ``piqa``, ``winogrande``, ``arc_easy``, ``arc_challenge``, ``sciq`` (downloaded once),
            ckptavg's packaged ``ckptavg_basics`` (offline), or names defined under ``include_path``.
        include_path: folder(s) of task YAMLs, e.g. ``dataset_path: json`` with local ``data_files``.
        limit: at most this many examples per task (a fraction if < 1), for quick checks.
        batch_size: lm-eval's batch size (an int or ``"auto"``); also windows per pass for ``text``.
        text: a ``.txt`` or ``.jsonl`` file for :func:`ckptavg.eval.held_out_loss` (no lm-eval needed).
        seq_len: held-out window length (at least 2).
        offline: set HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE during the call.
        allow_duplicates: use Hub revisions whose weights are byte-identical to another step's.
        output: also write the result as JSON to this file.
        progress: show the download and averaging progress bars.
        method_params: ``schedule``, ``sigma_rel``, ``half_life_tokens``, ``tokens_per_step``, as for
            :func:`ckptavg.average`.

    Returns:
        lm-eval's results dict (``results``, ``configs``, ``versions``, ``n-samples``, ``config`` …;
        only when ``tasks``), plus ``held_out`` (when ``text``) and ``ckptavg``: the provenance
        from :func:`ckptavg.eval.load_model`, the evaluation settings and timings.

    Raises:
        UsageError: nothing to score, a ``text`` file that does not exist, a bad ``seq_len``, an
            unknown task or include path; and the bad arguments :func:`ckptavg.eval.load_model` refuses.
        SelectionError: a run of several checkpoints and nothing saying which to score.
        CheckpointError: no config.json beside the weights, weights that do not fit it.
        MissingDependencyError: lm-eval (for ``tasks``) or transformers is not installed.
        HubError: a task's data could not be downloaded.
        CkptavgError: everything :func:`ckptavg.average` refuses.

    Example:
        >>> r = score("runs/tiny", "ckptavg_basics", selection=Selection(window=5), limit=50)  # doctest: +SKIP
        >>> r["results"]["ckptavg_basics"]["acc,none"]                                          # doctest: +SKIP
    """
    names = parse_tasks(tasks)
    # Argument mistakes are caught here, before minutes of downloading and averaging.
    if not names and text is None:
        raise UsageError("nothing to score: give --tasks (e.g. ckptavg_basics) and/or --text FILE")
    if text is not None and not Path(text).is_file():
        raise UsageError(f"{text}: no such file")
    if seq_len is not None and seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    if isinstance(include_path, (str, os.PathLike)):
        include_path = [include_path]
    includes = [str(p) for p in include_path or ()]
    if isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)  # lm-eval reads a float as a fraction of the task, even 20.0
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    seconds: dict[str, float] = {}
    with offline_env(offline):
        if names:
            lm_eval = require_lm_eval()
            specs, task_manager = resolve_tasks(names, includes)
        t0 = time.perf_counter()
        model, tok, provenance = load_model(
            target, step=step, selection=selection, method=method, weights=weights, decay=decay,
            half_life=half_life, dtype=dtype, device=device, tokenizer=tokenizer,
            allow_duplicates=allow_duplicates, progress=progress, **method_params,
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
                raise download_hint(e) from None
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


def _plain(x: Any) -> Any:
    # lm-eval's results hold numpy scalars, dtypes, sets and callables, which json cannot write.
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (TypeError, ValueError):
            pass
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def to_json(result: Mapping[str, Any]) -> str:
    """``result`` as indented JSON (the format of ``--results`` and ``--json``).

    Args:
        result: what :func:`score` returned.

    Returns:
        The JSON text; numpy scalars become numbers, sets lists, anything else its ``str``.

    Raises:
        Nothing for lm-eval's results (every value has a fallback).
    """
    return json.dumps(result, indent=2, default=_plain)


__all__ = ["score", "to_json"]
