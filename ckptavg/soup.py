"""Greedy soup along a trajectory (Wortsman et al., "Model soups", ICML 2022, applied to one run's
checkpoints): newest first, a checkpoint joins the uniform average only if held-out loss improves.

Every candidate soup is averaged in memory (:func:`ckptavg.average` with ``out=None``, through
:func:`ckptavg.eval.load_model`) and scored by :func:`ckptavg.eval.held_out_loss`; nothing is written
until the chosen soup is merged like ``ckptavg merge`` (``out``), with the choice and the loss of
every candidate in its ``ckptavg.json`` under ``method``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SelectionError, UsageError
from .selection import Selection
from .trajectory import Trajectory


@dataclass(frozen=True)
class SoupStep:
    """One candidate: the soup with ``step`` added, its held-out ``loss``, and whether it was ``kept``."""

    step: int
    loss: float
    kept: bool


@dataclass(frozen=True)
class Soup:
    """The greedy soup's result: ``steps`` chosen (oldest first, uniform weights), its held-out
    ``loss``, ``curve`` (one :class:`SoupStep` per candidate, newest first) and ``out`` if written."""

    steps: tuple[int, ...]
    loss: float
    curve: tuple[SoupStep, ...]
    text: str
    out: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> list[float]:
        return [1.0 / len(self.steps)] * len(self.steps)


def greedy_soup(
    source: str | os.PathLike[str] | Trajectory,
    text: str | os.PathLike[str],
    selection: Selection | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    tokenizer: str | os.PathLike[str] | None = None,
    allow_duplicates: bool = False,
    force: bool = False,
    fsync: bool = True,
    progress: bool = True,
) -> Soup:
    """Greedy soup of the selected checkpoints, scored on the held-out ``text``.

    The newest checkpoint starts the soup; each older one (newest first) is added if the uniform
    average of the soup plus it has a strictly lower held-out loss than the soup so far.

    Args:
        source: a run (folder or ``hf://org/name``) or a Trajectory.
        text: the held-out ``.txt``/``.jsonl`` file (see :func:`ckptavg.eval.held_out_loss`).
        selection: the candidates (e.g. ``Selection(window=10)``; default: every checkpoint).
        out: also merge the chosen soup here, like ``ckptavg merge -o`` (``force`` replaces).
        seq_len, batch_size: held-out windows; device, dtype, tokenizer: the model, as for
            :func:`ckptavg.eval.load_model`.

    Returns:
        The :class:`Soup`.

    Raises:
        SelectionError: nothing selected. UsageError: a bad text file or ``seq_len``.
        CkptavgError: everything :func:`ckptavg.average` refuses.

    Example:
        >>> greedy_soup("runs/tiny", "valid.jsonl", Selection(window=10)).steps   # doctest: +SKIP
    """
    from .averaging import average
    from .eval import held_out_loss, load_model
    from .sources import discover

    if not Path(text).is_file():  # before minutes of averaging
        raise UsageError(f"{text}: no such file")
    if seq_len is not None and seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    traj = source if isinstance(source, Trajectory) else discover(source)
    cands = list((selection or Selection()).apply(traj))
    if not cands:
        raise SelectionError(f"{traj.name}: the selection has no checkpoints")

    def loss(steps: list[int]) -> float:
        model, tok, _ = load_model(traj, selection=Selection(steps=tuple(sorted(steps))), dtype=dtype, device=device,
                                   tokenizer=tokenizer, allow_duplicates=allow_duplicates, progress=progress)
        return float(held_out_loss(model, tok, text, seq_len=seq_len, batch_size=batch_size)["loss"])

    chosen = [cands[-1].step]
    best = loss(chosen)
    curve = [SoupStep(chosen[0], best, True)]
    for c in reversed(cands[:-1]):
        trial = loss([*chosen, c.step])
        kept = trial < best
        curve.append(SoupStep(c.step, trial, kept))
        if kept:
            chosen.append(c.step)
            best = trial
    steps = tuple(sorted(chosen))
    record = {"name": "greedy-soup", "candidates": [c.step for c in cands], "chosen": list(steps),
              "text": str(Path(text).resolve()), "text_sha256": hashlib.sha256(Path(text).read_bytes()).hexdigest(),
              "seq_len": seq_len, "loss": best,
              "curve": [{"step": s.step, "loss": s.loss, "kept": s.kept} for s in curve]}
    written = None
    if out is not None:
        # The weights are uniform over the chosen steps; the record says why these, written with
        # the rest of ckptavg.json before the folder appears.
        written = average(traj, out, selection=Selection(steps=steps), force=force, fsync=fsync,
                          allow_duplicates=allow_duplicates, progress=progress, note={"method": record})
    return Soup(steps, best, tuple(curve), str(text), written, record)


__all__ = ["Soup", "SoupStep", "greedy_soup"]
