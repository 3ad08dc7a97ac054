"""Weighting methods: a selection's steps → one normalised weight per checkpoint.

A method never opens a file. Register a new one with ``@register("name")``; its keyword parameters
are what users may pass (``--decay``, ``--half-life``, ``--weights``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence

from .errors import MethodError, SelectionError

WeightFn = Callable[..., list[float]]
_REGISTRY: dict[str, WeightFn] = {}


def register(name: str) -> Callable[[WeightFn], WeightFn]:
    """Decorator: make a weighting function available under ``name``."""

    def deco(fn: WeightFn) -> WeightFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> WeightFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MethodError(f"unknown method {name!r}{hint} (available: {', '.join(available())})") from None


def weights(name: str, steps: Sequence[int], **params: object) -> list[float]:
    """Normalised weights (summing to 1) of method ``name`` for checkpoints at ``steps``.

    Args:
        name: a registered method (``uniform``, ``weighted``, ``ema``).
        steps: the selected checkpoints' steps, oldest first.
        params: the method's parameters; ``None`` values are ignored.

    Raises:
        MethodError: unknown method or parameter, or parameters out of range.
        SelectionError: no steps.

    >>> weights("ema", [0, 1000, 2000], half_life=1000)
    [0.14285714285714285, 0.2857142857142857, 0.5714285714285714]
    """
    fn = get(name)
    given = {k: v for k, v in params.items() if v is not None}
    accepted = [p for p in inspect.signature(fn).parameters if p != "steps"]
    for k in given:
        if k not in accepted:
            takes = ", ".join(accepted) or "no parameters"
            raise MethodError(f"method {name!r} does not take {k!r} (it takes {takes})")
    if not steps:
        raise SelectionError("nothing selected: the selection has no checkpoints")
    w = [float(x) for x in fn(list(steps), **given)]
    if not all(math.isfinite(x) and x >= 0 for x in w) or max(w) <= 0:
        raise MethodError(f"method {name!r} produced unusable weights {w}")
    top = max(w)  # scale first: weights near 1e308 are valid, but their sum overflows
    scaled = [x / top for x in w]
    total = math.fsum(scaled)
    return [x / total for x in scaled]


@register("uniform")
def uniform(steps: list[int]) -> list[float]:
    """Equal weights: the plain average (LAWA when the selection is the latest k)."""
    return [1.0] * len(steps)


@register("weighted")
def weighted(steps: list[int], weights: Sequence[float] | None = None) -> list[float]:
    """Explicit weights, one per checkpoint, normalised to sum to 1."""
    if weights is None:
        raise MethodError("method 'weighted' needs --weights, one per selected checkpoint")
    w = [float(x) for x in weights]
    if len(w) != len(steps):
        raise MethodError(f"{len(w)} weights given for {len(steps)} selected checkpoints (steps {steps})")
    if any(x < 0 or not math.isfinite(x) for x in w):
        raise MethodError(f"weights must be finite and non-negative, got {w}")
    if sum(w) == 0:
        raise MethodError("weights sum to zero")
    return w


@register("ema")
def ema(steps: list[int], decay: float | None = None, half_life: float | None = None) -> list[float]:
    """Exponential moving average, newest checkpoint heaviest.

    ``decay`` β counts checkpoints: w_i ∝ β^(n-1-i), i.e. a zero-initialised EMA over the sequence
    with its bias correction, which is what ``(1-β)·Σ β^j x_{n-1-j} / (1-β^n)`` works out to.
    ``half_life`` h counts training steps: w_i ∝ 0.5^((s_last - s_i)/h), so irregular spacing
    (Pythia's log-spaced early steps) weighs each checkpoint by how long ago it was saved.
    """
    if (decay is None) == (half_life is None):
        raise MethodError("method 'ema' needs exactly one of --decay (per checkpoint) or --half-life (in steps)")
    if decay is not None:
        if not 0 < decay < 1:
            raise MethodError(f"--decay must be in (0, 1), got {decay}")
        n = len(steps)
        return [decay ** (n - 1 - i) for i in range(n)]
    assert half_life is not None
    if not (half_life > 0 and math.isfinite(half_life)):
        raise MethodError(f"--half-life must be a positive finite number of steps, got {half_life}")
    last = steps[-1]
    return [0.5 ** ((last - s) / half_life) for s in steps]
