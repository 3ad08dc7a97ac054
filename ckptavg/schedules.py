"""The arithmetic behind the schedule-shaped methods: WSM decay shapes and EDM2 power-EMA profiles.

Pure functions of the checkpoints' steps (floats in, floats out, no numpy), checked by
:mod:`ckptavg.methods`, which registers them as ``wsm`` and ``power-ema``.

**WSM** (Tian et al., "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging", ICLR 2026).
Checkpoints x_0 … x_n of a constant-LR run differ by updates u_j = x_j − x_{j−1}. Scaling update j
by a decay factor w_j (1 ≥ w_1 ≥ … ≥ w_n ≥ 0) gives x_0 + Σ w_j u_j = Σ c_j x_j with
c_0 = 1 − w_1, c_j = w_j − w_{j+1}, c_n = w_n. Here w_j is the *mean* of the decay shape f over
update j's real steps: each checkpoint owns the span halfway to its neighbours (the oldest and the
newest half a gap beyond them), the decay runs from 1 to f(1) across those k = n + 1 spans, and
time is the step, so irregular spacing is integrated as it was trained. For equal spacing the
mean over update j is f at its centre, τ = j/k, so a linear decay gives w_j = 1 − j/k and every
c_j = 1/k: exactly the uniform average (LAWA).

**Power EMA** (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, CVPR 2024). The power-function EMA at training time T weighs time t ∈ [0, T] by
p(t) = (γ+1) t^γ / T^(γ+1); its relative width σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))) picks γ.
Saved raw weights sample the trajectory, so each checkpoint gets the profile's mass over its
nearest-neighbour cell (midpoints between checkpoints; the oldest takes everything back to 0, the
newest ends at T = its step): w_i = b_{i+1}^(γ+1) − b_i^(γ+1) in time units of T. The realised
profile is piecewise constant (w_i / cell width); its relative L2 distance to p,
sqrt(1 − Σ w_i²/|cell_i| / ∫p²) with ∫p² = (γ+1)²/(2γ+1), says how coarse the spacing is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

# Antiderivatives F of each decay shape f on τ ∈ [0, 1] (f(0) = 1): the mean of f over [a, b] is
# (F(b) − F(a)) / (b − a), exact, however wide the interval.
_INV_SQRT_A = 99.0  # inv-sqrt: f = 1/sqrt(1 + 99τ) ends at a tenth of the peak, where LR schedules commonly end
SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x - x * x / 2,  # f = 1 − τ
    "cosine": lambda x: x / 2 + math.sin(math.pi * x) / (2 * math.pi),  # f = (1 + cos πτ) / 2
    "1-sqrt": lambda x: x - 2 / 3 * x**1.5,  # f = 1 − sqrt(τ) (Hägele et al. 2024's cool-down)
    "inv-sqrt": lambda x: 2 / _INV_SQRT_A * (math.sqrt(1 + _INV_SQRT_A * x) - 1),  # f = 1/sqrt(1 + 99τ)
}

# σ_rel(γ) rises from 0 at γ = −1 to its maximum at γ = (√5 − 3)/2 (the root of γ² + 3γ + 1), then falls.
_GAMMA_PEAK = (math.sqrt(5) - 3) / 2


def _sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = _sigma_rel(_GAMMA_PEAK)  # ≈ 0.3003: no power profile is wider


def decay_factors(steps: Sequence[float], schedule: str) -> list[float]:
    """w_1 … w_n: the mean of the decay shape over each update interval of ``steps`` (oldest first)."""
    F = SCHEDULES[schedule]
    t = [float(s) for s in steps]
    start = t[0] - (t[1] - t[0]) / 2
    span = t[-1] + (t[-1] - t[-2]) / 2 - start
    tau = [(x - start) / span for x in t]
    return [(F(tau[j]) - F(tau[j - 1])) / (tau[j] - tau[j - 1]) for j in range(1, len(t))]


def wsm(steps: Sequence[float], schedule: str) -> list[float]:
    """WSM merge coefficients c_0 … c_n for checkpoints at ``steps`` (strictly increasing).

    >>> [round(c, 12) for c in wsm([100, 200, 300, 400], "linear")]
    [0.25, 0.25, 0.25, 0.25]
    """
    if len(steps) == 1:
        return [1.0]
    w = decay_factors(steps, schedule)
    c = [1 - w[0]] + [w[j - 1] - w[j] for j in range(1, len(w))] + [w[-1]]
    return [max(0.0, x) for x in c]  # a monotone shape gives c ≥ 0; rounding may leave −1e-17


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """γ of the power-function EMA profile of relative width ``sigma_rel`` (0 < σ_rel ≤ SIGMA_REL_MAX):
    the largest root of (γ+1)/((γ+2)²(γ+3)) = σ_rel², as EDM2's ``sigma_rel_to_gamma``.

    >>> round(gamma_from_sigma_rel(0.10), 2)
    6.94
    """
    lo, hi = _GAMMA_PEAK, 10.0 / sigma_rel + 10.0  # σ_rel(γ) ≈ 1/γ for large γ
    for _ in range(200):  # σ_rel(γ) falls on [lo, hi]: bisection to the last bit
        mid = (lo + hi) / 2
        if _sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _cells(steps: Sequence[float]) -> list[float]:
    """Cell boundaries in units of the newest step: 0, the midpoints, 1."""
    T = float(steps[-1])
    u = [s / T for s in steps]
    return [0.0] + [(u[i - 1] + u[i]) / 2 for i in range(1, len(u))] + [1.0]


def power_ema(steps: Sequence[float], gamma: float) -> list[float]:
    """Each checkpoint's share of the power profile t^γ on [0, T = steps[-1]] (they sum to 1)."""
    if len(steps) == 1 or steps[-1] <= 0:
        return [1.0] + [0.0] * (len(steps) - 1)
    b = [x ** (gamma + 1) for x in _cells(steps)]
    return [b[i + 1] - b[i] for i in range(len(steps))]


def power_ema_error(steps: Sequence[float], gamma: float) -> float:
    """Relative L2 distance between the power profile and the piecewise-constant one the
    checkpoints at ``steps`` realise (0: exact; 1: nothing of it)."""
    if steps[-1] <= 0:
        return 1.0
    cells = _cells(steps) if len(steps) > 1 else [0.0, 1.0]
    w = power_ema(steps, gamma)
    realised = math.fsum(wi * wi / (cells[i + 1] - cells[i]) for i, wi in enumerate(w) if wi)
    exact = (gamma + 1) ** 2 / (2 * gamma + 1)
    return math.sqrt(max(0.0, 1 - realised / exact))


__all__ = ["SCHEDULES", "SIGMA_REL_MAX", "decay_factors", "gamma_from_sigma_rel", "power_ema", "power_ema_error", "wsm"]
