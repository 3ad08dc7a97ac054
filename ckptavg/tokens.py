"""Training tokens seen at each checkpoint, from what the run itself records: steps → tokens.

Methods that count in tokens (``ema --half-life-tokens``) need them; the first of these that
applies wins:

1. ``tokens_per_step`` given by the user (``--tokens-per-step``): tokens = step × it;
2. HF Trainer's ``trainer_state.json`` in a checkpoint folder: ``log_history`` entries that record
   ``num_input_tokens_seen`` (``include_num_input_tokens_seen=True``), ``num_tokens`` or ``tokens``
   at a step: exact at checkpoints logged at their own step, the newest entry's tokens per step
   for the others;
3. an OLMo branch or folder name ``step20000-tokens84B``: the newest such checkpoint's tokens per
   step (its billions are rounded, so the ratio over the largest count is the most precise);
4. an ``EleutherAI/pythia*`` Hub repo: 2,097,152 tokens per step (1024 sequences × 2048 tokens).

Otherwise :func:`tokens_seen` refuses in one line, saying to pass ``--tokens-per-step``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import MethodError
from .trajectory import Checkpoint

PYTHIA_TOKENS_PER_STEP = 2_097_152  # Biderman et al. 2023: batch 1024 × context 2048, every model of the suite
_OLMO = re.compile(r"-tokens(\d+(?:\.\d+)?)B$")
_TOKEN_KEYS = ("num_input_tokens_seen", "num_tokens", "tokens")


def _logged(checkpoints: Sequence[Checkpoint], keys: Sequence[str] = _TOKEN_KEYS) -> dict[int, float]:
    """step → the first of ``keys`` logged at that step (positive numbers), from every checkpoint
    folder's trainer_state.json (unreadable ones are skipped)."""
    seen: dict[int, float] = {}
    for c in checkpoints:
        for folder in {Path(c.location), *([c.config_dir] if c.config_dir else [])}:
            try:
                state = json.loads((folder / "trainer_state.json").read_text())
                history = state.get("log_history") or []
            except (OSError, ValueError, AttributeError):
                continue
            for entry in history if isinstance(history, list) else []:
                if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                    continue
                n = next((entry[k] for k in keys if isinstance(entry.get(k), (int, float))), None)
                if n is not None and n > 0:
                    seen[entry["step"]] = float(n)
    return seen


def _name(c: Checkpoint) -> str:
    return c.source.revision if c.source is not None else Path(c.location).name


def _pythia(c: Checkpoint, root: str) -> bool:
    repo = c.source.repo_id if c.source is not None else root.removeprefix("hf://")
    return repo.lower().startswith("eleutherai/pythia")


def tokens_seen(checkpoints: Sequence[Checkpoint], tokens_per_step: float | None = None,
                root: str = "") -> tuple[list[float], str]:
    """Tokens seen at each checkpoint, and where that came from.

    Args:
        checkpoints: oldest first.
        tokens_per_step: the user's figure; wins over anything the run records.
        root: the trajectory's root (``hf://org/name`` names a Pythia repo).

    Returns:
        ``(tokens, source)``: one count per checkpoint; source is ``--tokens-per-step``,
        ``trainer_state.json``, ``OLMo branch names`` or ``Pythia (2,097,152 tokens per step)``.

    Raises:
        MethodError: a non-positive ``tokens_per_step``, or nothing in the run says.

    >>> tokens_seen([Checkpoint(1000, "hf://EleutherAI/pythia-160m@step1000", "safetensors")], root="hf://EleutherAI/pythia-160m")[0]
    [2097152000.0]
    """
    steps = [c.step for c in checkpoints]
    if tokens_per_step is not None:
        if not tokens_per_step > 0 or tokens_per_step == float("inf"):
            raise MethodError(f"--tokens-per-step must be a positive number, got {tokens_per_step}")
        return [s * float(tokens_per_step) for s in steps], "--tokens-per-step"
    logged = _logged(checkpoints)
    if logged:
        last = max(logged)
        rate = logged[last] / last if last > 0 else None
        if all(s in logged for s in steps) or rate is not None:
            return [logged[s] if s in logged else s * (rate or 0.0) for s in steps], "trainer_state.json"
    olmo = [(c.step, float(m.group(1)) * 1e9) for c in checkpoints if c.step > 0 and (m := _OLMO.search(_name(c)))]
    if olmo:
        step, tokens = olmo[-1]
        return [s * tokens / step for s in steps], "OLMo branch names"
    if checkpoints and _pythia(checkpoints[-1], root):
        return [s * float(PYTHIA_TOKENS_PER_STEP) for s in steps], "Pythia (2,097,152 tokens per step)"
    where = root or (checkpoints[-1].location if checkpoints else "the run")
    raise MethodError(f"{where}: the run does not record tokens per step (no token counts in trainer_state.json, "
                      "no -tokensNB branch names, not EleutherAI/pythia); pass --tokens-per-step N")


def learning_rates(checkpoints: Sequence[Checkpoint]) -> list[float | None]:
    """The learning rate each checkpoint was trained at, where the run records it: HF Trainer's
    ``trainer_state.json`` logs ``learning_rate`` every ``logging_steps`` (at step s, the rate of
    step s's own update); a checkpoint gets the last value logged at or before its step (None where nothing was logged by then, or no run
    folder records it — Lightning, nanoGPT, DCP and Hub runs keep no such log we can read).

    >>> learning_rates([Checkpoint(10, "runs/none/step10", "safetensors")])
    [None]
    """
    logged = _logged(checkpoints, ("learning_rate",))
    at = sorted(logged)
    out: list[float | None] = []
    for c in checkpoints:
        before = [s for s in at if s <= c.step]
        out.append(logged[before[-1]] if before else None)
    return out


__all__ = ["PYTHIA_TOKENS_PER_STEP", "learning_rates", "tokens_seen"]
