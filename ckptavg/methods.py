"""Weighting methods: a selection's steps → one normalised weight per checkpoint.

A method never opens a file. Register a new one with ``@register("name")``; its keyword parameters
are what users may pass (``--decay``, ``--half-life``, ``--weights``, ``--schedule``, ``--sigma-rel``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence

from . import schedules
from .errors import MethodError, SelectionError

WeightFn = Callable[..., list[float]]
_REGISTRY: dict[str, WeightFn] = {}
# Above this relative L2 error the checkpoints are too sparse for the power-EMA profile asked for.
COARSE_ERROR = 0.2


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
        name: a registered method (``uniform``, ``weighted``, ``ema``, ``wsm``, ``wma``, ``power-ema``).
        steps: the selected checkpoints' steps, oldest first.
        params: the method's parameters; ``None`` values are ignored.

    Raises:
        MethodError: unknown method or parameter, or parameters out of range.
        SelectionError: no steps.

    >>> weights("ema", [0, 1000, 2000], half_life=1000)
    [0.14285714285714285, 0.2857142857142857, 0.5714285714285714]
    """
    fn = get(name)
    given = _given(name, fn, params)
    if not steps:
        raise SelectionError("nothing selected: the selection has no checkpoints")
    w = [float(x) for x in fn(list(steps), **given)]
    if not all(math.isfinite(x) and x >= 0 for x in w) or max(w) <= 0:
        raise MethodError(f"method {name!r} produced unusable weights {w}")
    top = max(w)  # scale first: weights near 1e308 are valid, but their sum overflows
    scaled = [x / top for x in w]
    total = math.fsum(scaled)
    return [x / total for x in scaled]


def _given(name: str, fn: WeightFn, params: dict[str, object]) -> dict[str, object]:
    given = {k: v for k, v in params.items() if v is not None}
    accepted = [p for p in inspect.signature(fn).parameters if p != "steps"]
    for k in given:
        if k not in accepted:
            takes = ", ".join(p for p in accepted if p != "tokens") or "no parameters"
            raise MethodError(f"method {name!r} does not take {k!r} (it takes {takes})")
    return given


def details(name: str, steps: Sequence[int], **params: object) -> dict[str, object]:
    """What a method says about its weights besides them, for ``ckptavg.json`` and ``--dry-run``:
    ``power-ema`` gives ``gamma`` and ``profile_error`` (relative L2 distance between the EDM2
    profile and the one the checkpoints realise; above :data:`COARSE_ERROR` the spacing is too
    coarse); other methods give nothing.

    >>> details("power-ema", [0, 500, 1000], sigma_rel=0.1)["gamma"]  # doctest: +ELLIPSIS
    6.937...
    """
    given = _given(name, get(name), params)
    if name != "power-ema" or not steps:
        return {}
    gamma = _gamma(given.get("sigma_rel"))  # type: ignore[arg-type]
    return {"gamma": gamma, "profile_error": schedules.power_ema_error(_increasing(name, steps), gamma)}


def _increasing(name: str, steps: Sequence[int]) -> list[int]:
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise MethodError(f"method {name!r} needs distinct steps, oldest first, got {list(steps)}")
    if steps[0] < 0:
        raise MethodError(f"method {name!r} needs steps ≥ 0, got {steps[0]}")
    return list(steps)


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
def ema(steps: list[int], decay: float | None = None, half_life: float | None = None,
        half_life_tokens: float | None = None, tokens_per_step: float | None = None,
        tokens: Sequence[float] | None = None) -> list[float]:
    """Exponential moving average, newest checkpoint heaviest.

    ``decay`` β counts checkpoints: w_i ∝ β^(n-1-i), i.e. a zero-initialised EMA over the sequence
    with its bias correction, which is what ``(1-β)·Σ β^j x_{n-1-j} / (1-β^n)`` works out to.
    ``half_life`` h counts training steps: w_i ∝ 0.5^((s_last - s_i)/h), so irregular spacing
    (Pythia's log-spaced early steps) weighs each checkpoint by how long ago it was saved.
    ``half_life_tokens`` counts training tokens: w_i ∝ 0.5^((n_last - n_i)/h) with n_i the tokens seen
    at checkpoint i, given as ``tokens`` (see :func:`ckptavg.tokens.tokens_seen`, which
    :func:`ckptavg.average` calls) or as ``steps × tokens_per_step``.
    """
    if half_life_tokens is not None:
        if decay is not None or half_life is not None:
            raise MethodError("method 'ema' needs exactly one of --decay, --half-life or --half-life-tokens")
        if not (half_life_tokens > 0 and math.isfinite(half_life_tokens)):
            raise MethodError(f"--half-life-tokens must be a positive finite number of tokens, got {half_life_tokens}")
        if tokens is None:
            if tokens_per_step is None:
                raise MethodError("--half-life-tokens needs the tokens per step: pass --tokens-per-step N")
            if not (tokens_per_step > 0 and math.isfinite(tokens_per_step)):
                raise MethodError(f"--tokens-per-step must be a positive number, got {tokens_per_step}")
            tokens = [s * tokens_per_step for s in steps]
        if len(tokens) != len(steps):
            raise MethodError(f"{len(tokens)} token counts given for {len(steps)} checkpoints")
        return [0.5 ** ((tokens[-1] - n) / half_life_tokens) for n in tokens]
    if tokens_per_step is not None:
        raise MethodError("--tokens-per-step applies to --half-life-tokens only")
    if (decay is None) == (half_life is None):
        raise MethodError("method 'ema' needs exactly one of --decay (per checkpoint), --half-life (in steps) "
                          "or --half-life-tokens")
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


@register("wsm")
def wsm(steps: list[int], schedule: str | None = None) -> list[float]:
    """WSM (Tian et al., ICLR 2026): the merge that emulates decaying the learning rate with
    ``schedule`` (``linear``, ``cosine``, ``1-sqrt``, ``inv-sqrt``) across the window, from the
    checkpoints' real step spacing: c_0 = 1 − w_1, c_j = w_j − w_{j+1}, c_n = w_n with w_j the
    schedule's mean over update j (:mod:`ckptavg.schedules`). ``linear`` on equally spaced
    checkpoints is exactly the uniform average.
    """
    if schedule is None:
        raise MethodError(f"method 'wsm' needs --schedule ({', '.join(schedules.SCHEDULES)})")
    if schedule not in schedules.SCHEDULES:
        close = difflib.get_close_matches(schedule, schedules.SCHEDULES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MethodError(f"unknown --schedule {schedule!r}{hint} (available: {', '.join(schedules.SCHEDULES)})")
    return schedules.wsm(_increasing("wsm", steps), schedule)


@register("wma")
def wma(steps: list[int]) -> list[float]:
    """Weighted moving average (PMA, Li et al. 2025): w_i ∝ i + 1, oldest first, newest largest."""
    return [float(i + 1) for i in range(len(steps))]


def _gamma(sigma_rel: float | None) -> float:
    if sigma_rel is None:
        raise MethodError("method 'power-ema' needs --sigma-rel, e.g. 0.05 (EDM2's relative EMA length)")
    if not 0 < sigma_rel <= schedules.SIGMA_REL_MAX:
        raise MethodError(f"--sigma-rel must be in (0, {schedules.SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    return schedules.gamma_from_sigma_rel(sigma_rel)


@register("power-ema")
def power_ema(steps: list[int], sigma_rel: float | None = None) -> list[float]:
    """Post-hoc power-function EMA (Karras et al., EDM2 2024) of relative length ``sigma_rel`` at
    the newest step, by quadrature over the checkpoints' real spacing (:mod:`ckptavg.schedules`);
    :func:`details` says how far the realised profile is from the exact one.
    """
    return schedules.power_ema(_increasing("power-ema", steps), _gamma(sigma_rel))
