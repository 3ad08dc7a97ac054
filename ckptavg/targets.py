"""Which averaged models a series produces, and from what: :func:`plan` turns a trajectory, a
:class:`~ckptavg.selection.Selection` and a method into :class:`~ckptavg.engine_series.Target` s (the
target's step, its inputs and their weights); :func:`ema_factors` says how much a running EMA
shrinks before each input. ``exclude``: steps left out of every window (and not targets), as
``--exclude-anomalies`` asks (:mod:`ckptavg.stability`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from . import methods
from .engine_series import Target
from .errors import MethodError, SelectionError, UsageError
from .selection import Selection, with_legacy
from .tokens import tokens_seen
from .trajectory import Trajectory, check_step_units

WEIGHTED = ("wsm", "wma", "power-ema")  # per-target weights over each target's window
METHODS = ("uniform", "ema", *WEIGHTED)


def plan(
    traj: Trajectory,
    selection: Selection | None = None,
    *,
    method: str = "uniform",
    decay: float | None = None,
    half_life: float | None = None,
    half_life_tokens: float | None = None,
    tokens_per_step: float | None = None,
    schedule: str | None = None,
    sigma_rel: float | None = None,
    partial: bool = False,
    non_overlapping: bool = False,
    exclude: Collection[int] = (),
    **legacy: Any,
) -> list[Target]:
    """Which averaged models a series produces, and from what.

    Uniform (LAWA, ``selection.window`` = k): the target at checkpoint i averages checkpoints
    i-k+1 … i. Targets are the checkpoints ``selection`` picks from the first full window on
    (``partial=True``: from the first checkpoint, averaging what exists). ``non_overlapping``:
    disjoint blocks of k from the first checkpoint, as the LAWA authors' script averages. EMA: the
    target at checkpoint i is the EMA of checkpoints 0 … i (weights as in
    :func:`ckptavg.methods.ema`, ``half_life_tokens`` in :func:`ckptavg.tokens.tokens_seen`'s tokens);
    ``window`` does not apply. ``wsm``, ``wma`` and ``power-ema`` weigh each target's window as a merge
    of it would (power-ema without ``window``: all up to the target). Greedy soups are merge-only.
    Steps in ``exclude`` are no target and no input: each window (or EMA) is the one without them,
    weighed as a merge of what remains would be.

    Raises:
        SelectionError: no target, a requested target before its first full window.
        MethodError: a method other than uniform/ema/wsm/wma/power-ema, or parameters it does not take.
    """
    sel = with_legacy(selection, "plan", **legacy)
    if method not in METHODS:
        raise MethodError(f"series supports methods {', '.join(METHODS)}, not {method!r}")
    extra = {"schedule": schedule, "sigma_rel": sigma_rel}
    check_step_units(traj, {"half_life": half_life, "half_life_tokens": half_life_tokens, **extra})
    n = len(traj)
    if n == 0:
        raise SelectionError(f"{traj.name}: the trajectory is empty")
    window = sel.window
    if method == "uniform":
        if not window:
            raise UsageError("series --method uniform needs --window k (k ≥ 1)")
        if any(x is not None for x in (decay, half_life, half_life_tokens, schedule, sigma_rel)):
            raise MethodError("--decay/--half-life/--schedule/--sigma-rel do not apply to --method uniform")
        first = 0 if partial else window - 1
    elif method in WEIGHTED:
        if not window and method != "power-ema":
            raise UsageError(f"series --method {method} needs --window k (k ≥ 2), each target's window")
        methods.weights(method, [1, 2], decay=decay, half_life=half_life, half_life_tokens=half_life_tokens,
                        tokens_per_step=tokens_per_step, **extra)  # validates the parameters
        first = 0 if partial or not window else window - 1
    else:
        if window is not None:
            raise UsageError("series --method ema runs over the whole trajectory; drop --window")
        methods.weights("ema", [0, 1], decay=decay, half_life=half_life, half_life_tokens=half_life_tokens,
                        tokens_per_step=tokens_per_step if half_life_tokens is None else 1.0, **extra)
        first = 0
    index = {c.step: i for i, c in enumerate(traj)}
    picked = [index[c.step] for c in sel.targets(traj)]
    if sel.steps:
        too_early = [traj[i].step for i in picked if i < first]
        if too_early:
            raise SelectionError(f"step {too_early[0]}: fewer than {window} checkpoints up to it (use --partial)")
    candidates = [i for i in picked if i >= first]
    if non_overlapping:
        assert window is not None
        candidates = [i for i in candidates if (i - first) % window == 0]
    if not candidates:
        raise SelectionError(f"{traj.name}: no target step selected (steps {traj.steps[0]}..{traj.steps[-1]})")
    all_steps = traj.steps
    tokens = tokens_seen(list(traj), tokens_per_step, traj.root)[0] if half_life_tokens is not None else None
    targets = []
    for i in (i for i in candidates if all_steps[i] not in exclude):
        if method == "uniform":
            assert window is not None
            ins = _kept(range(max(0, i - window + 1), i + 1), all_steps, exclude)
            w = tuple(methods.weights("uniform", [all_steps[j] for j in ins]))
        elif method in WEIGHTED:
            ins = _kept(range(max(0, i - window + 1) if window else 0, i + 1), all_steps, exclude)
            w = tuple(methods.weights(method, [all_steps[j] for j in ins], **extra))
        elif tokens is not None:
            ins = _kept(range(i + 1), all_steps, exclude)
            w = tuple(methods.weights("ema", [all_steps[j] for j in ins], half_life_tokens=half_life_tokens,
                                      tokens=[tokens[j] for j in ins]))
        else:
            ins = _kept(range(i + 1), all_steps, exclude)
            w = tuple(methods.weights("ema", [all_steps[j] for j in ins], decay=decay, half_life=half_life))
        targets.append(Target(i, all_steps[i], ins, w))
    if not targets:
        raise SelectionError(f"{traj.name}: every target step is excluded as anomalous")
    return targets


def _kept(indices: range, steps: Sequence[int], exclude: Collection[int]) -> tuple[int, ...]:
    return tuple(j for j in indices if steps[j] not in exclude)


def _step_factors(steps: Sequence[float], decay: float | None, half_life: float | None) -> list[float]:
    """How much the EMA state shrinks before checkpoint j is added (0 before the first); ``steps``
    are tokens when ``half_life`` is in tokens."""
    if decay is not None:
        return [0.0] + [decay] * (len(steps) - 1)
    assert half_life is not None
    return [0.0] + [0.5 ** ((steps[j] - steps[j - 1]) / half_life) for j in range(1, len(steps))]


def series_params(method: str, window: int | None, decay: float | None, half_life: float | None,
                  **extra: Any) -> dict[str, Any]:
    """What ``ckptavg.json`` records as a series' method parameters."""
    if method == "uniform":
        return {"window": window}
    return {"window": window, **extra} if method in WEIGHTED else {"decay": decay, "half_life": half_life, **extra}


def ema_factors(traj: Trajectory, params: Mapping[str, Any], exclude: Collection[int] = ()) -> list[float]:
    """The EMA factors of a series by trajectory index, in steps or in tokens; an input after
    excluded steps shrinks the state by the whole gap back to the previous input kept."""
    kept = [j for j, s in enumerate(traj.steps) if s not in exclude]
    if params.get("half_life_tokens") is not None:
        tokens = tokens_seen(list(traj), params.get("tokens_per_step"), traj.root)[0]
        f = _step_factors([tokens[j] for j in kept], None, params["half_life_tokens"])
    else:
        f = _step_factors([traj.steps[j] for j in kept], params.get("decay"), params.get("half_life"))
    out = [0.0] * len(traj)
    for j, x in zip(kept, f):
        out[j] = x
    return out


__all__ = ["METHODS", "WEIGHTED", "ema_factors", "plan", "series_params"]
