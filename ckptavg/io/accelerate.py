"""accelerate ``save_state`` folders: which training step a ``checkpoint_N/`` really is.

With ``ProjectConfiguration(automatic_checkpoint_naming=True)``, ``accelerator.save_state()`` writes
``checkpoints/checkpoint_0, checkpoint_1, …``: N counts *saves*, not training steps. Beside the
weights (``model.safetensors`` or ``pytorch_model.bin``) it writes ``optimizer.bin``,
``scheduler.bin``, ``random_states_0.pkl`` and one ``custom_checkpoint_K.pkl`` per object given to
``accelerator.register_for_checkpointing``. The real step is read, in this order, from:

1. a ``custom_checkpoint_K.pkl`` whose state is a mapping with an integer ``step``,
   ``global_step``, ``completed_steps``, ``iteration`` or ``iter_num`` (a user's step counter);
2. ``optimizer.bin``: the ``step`` count Adam, AdamW and most torch optimizers keep per parameter
   (the number of ``optimizer.step()`` calls that updated it: real optimizer steps, gradient
   accumulation included); the largest one.

Both are read with ``torch.load(weights_only=True)`` (tensors memory-mapped: an optimizer file is
not read whole). ``scheduler.bin``'s ``last_epoch`` is not used: accelerate steps a prepared
scheduler once per process per optimizer step, so it counts steps × processes. ``random_states_*.pkl``
is a plain pickle and is never opened. Without either, the steps are save indices and the caller
says so (:data:`SAVE_INDEX`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

SAVE_INDEX = "save index"  # Checkpoint.step_from when the step is accelerate's save counter
_NAME = re.compile(r"^checkpoint_(\d+)$")
_CUSTOM = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")
_STEP_KEYS = ("step", "global_step", "completed_steps", "iteration", "iter_num")
_CUSTOM_LIMIT = 1 << 20  # a step counter's state is tiny; a bigger custom object is not read for it


def save_index(name: str) -> int | None:
    """N of an automatic ``checkpoint_N`` folder name, else None."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def is_save_state(names: Collection[str]) -> bool:
    """A folder's file names are an accelerate ``save_state`` (its RNG or optimizer files are there)."""
    return any(n.startswith("random_states_") and n.endswith(".pkl") for n in names) or "optimizer.bin" in names


def _custom_step(path: Path) -> int | None:
    from .torchfile import load_pickle

    if path.stat().st_size > _CUSTOM_LIMIT:
        return None
    try:
        obj = load_pickle(path)
    except CheckpointError:
        return None  # a custom object's state that is not plain data: not a step counter ckptavg can read
    if not isinstance(obj, Mapping):
        return None
    for k in _STEP_KEYS:
        v = obj.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
        if v is not None and hasattr(v, "numel") and v.numel() == 1 and not v.is_floating_point():
            return int(v.item())
    return None


def _optimizer_step(path: Path) -> int | None:
    from .torchfile import load_pickle

    obj = load_pickle(path)
    states: list[Any] = []
    for sd in obj if isinstance(obj, list) else [obj]:  # several prepared optimizers: a list of state dicts
        state = sd.get("state") if isinstance(sd, Mapping) else None
        states += list(state.values()) if isinstance(state, Mapping) else []
    steps = []
    for s in states:
        v = s.get("step") if isinstance(s, Mapping) else None
        if v is not None and hasattr(v, "numel") and v.numel() == 1:
            steps.append(int(v.item()))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(int(v))
    return max(steps) if steps else None


def saved_step(folder: Path, names: Collection[str]) -> tuple[int, str] | None:
    """(training step, the file it came from) for a ``save_state`` folder, or None when it records none.

    Raises:
        CheckpointError: an ``optimizer.bin`` that is not a readable torch file, or that asks for code.
    """
    for name in sorted(n for n in names if _CUSTOM.match(n)):
        step = _custom_step(folder / name)
        if step is not None:
            return step, name
    if "optimizer.bin" in names:
        step = _optimizer_step(folder / "optimizer.bin")
        if step is not None:
            return step, "optimizer.bin"
    return None


__all__ = ["SAVE_INDEX", "is_save_state", "save_index", "saved_step"]
