"""Weighting methods turn steps into normalised weights; the registry helps with typos."""

from __future__ import annotations

import math

import pytest

from ckptavg import methods
from ckptavg.errors import CkptavgError


def test_uniform():
    assert methods.weights("uniform", [1, 5, 9, 10]) == [0.25] * 4


def test_weighted_normalises():
    assert methods.weights("weighted", [1, 2], weights=[1, 3]) == [0.25, 0.75]
    with pytest.raises(CkptavgError, match="3 weights given for 2"):
        methods.weights("weighted", [1, 2], weights=[1, 1, 1])
    with pytest.raises(CkptavgError, match="needs --weights"):
        methods.weights("weighted", [1, 2])


def test_weights_near_the_float_limit_normalise_instead_of_overflowing():
    # Their sum is inf; scaled by the largest they are [1, 1, 1e-308] / 2.
    assert methods.weights("weighted", [1, 2, 3], weights=[1e308, 1e308, 1]) == [0.5, 0.5, 0.5e-308]
    assert methods.weights("weighted", [1, 2], weights=[1.7e308, 1.7e308]) == [0.5, 0.5]


def test_ema_half_life_uses_step_distance_not_position():
    steps = [0, 1, 2, 4, 512, 1000]
    w = methods.weights("ema", steps, half_life=100)
    raw = [2 ** (-(1000 - s) / 100) for s in steps]
    assert w == pytest.approx([r / sum(raw) for r in raw])
    # Checkpoints 0..4 are ~10 half-lives old: together they weigh ~4 * 2**-10 of the newest.
    assert sum(w[:4]) / w[-1] == pytest.approx(sum(raw[:4]), rel=1e-12)


def test_ema_decay_counts_checkpoints():
    w = methods.weights("ema", [10, 20, 40], decay=0.5)
    assert w == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert math.fsum(w) == pytest.approx(1.0)


@pytest.mark.parametrize("params, msg", [
    ({}, "exactly one of"), ({"decay": 0.9, "half_life": 5}, "exactly one of"),
    ({"decay": 1.5}, "must be in"), ({"half_life": 0}, "must be a positive finite"),
    ({"half_life": float("inf")}, "must be a positive finite"),
])
def test_ema_parameter_errors(params, msg):
    with pytest.raises(CkptavgError, match=msg):
        methods.weights("ema", [1, 2], **params)


def test_unknown_method_suggests_and_unknown_parameter_is_named():
    with pytest.raises(CkptavgError, match="did you mean 'uniform'"):
        methods.weights("unifrom", [1])
    with pytest.raises(CkptavgError, match="does not take 'decay'"):
        methods.weights("uniform", [1], decay=0.9)


def test_register_a_new_method():
    @methods.register("linear-ramp-test")
    def ramp(steps):
        return list(range(1, len(steps) + 1))

    assert methods.weights("linear-ramp-test", [5, 6, 7]) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(ValueError, match="already registered"):
        methods.register("uniform")(ramp)


# WSM, WMA, power-EMA, tokens: oracles from the papers' formulas, computed here independently -------
def _mean(f, a: float, b: float, n: int = 200_000) -> float:
    """The mean of f over [a, b] by the midpoint rule (an independent check of the closed forms)."""
    h = (b - a) / n
    return math.fsum(f(a + (i + 0.5) * h) for i in range(n)) / n


def _wsm_by_hand(steps, f):
    # The decay runs across the checkpoints' cells: half a gap before the oldest to half a gap after
    # the newest; w_j = the decay's mean over update j; c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_n = w_n.
    start = steps[0] - (steps[1] - steps[0]) / 2
    span = steps[-1] + (steps[-1] - steps[-2]) / 2 - start
    tau = [(s - start) / span for s in steps]
    w = [_mean(f, tau[j - 1], tau[j]) for j in range(1, len(steps))]
    return [1 - w[0]] + [w[j - 1] - w[j] for j in range(1, len(w))] + [w[-1]]


@pytest.mark.parametrize("steps", [[100, 200], [0, 5, 10, 15], list(range(1000, 9000, 1000)), list(range(7, 70, 7))],
                         ids=["k2", "k4", "k8", "k9"])
def test_wsm_linear_is_the_uniform_average(steps):
    assert methods.weights("wsm", steps, schedule="linear") == pytest.approx([1 / len(steps)] * len(steps), rel=1e-12)


SHAPES = {
    "1-sqrt": lambda t: 1 - math.sqrt(t),
    "cosine": lambda t: (1 + math.cos(math.pi * t)) / 2,
    "inv-sqrt": lambda t: 1 / math.sqrt(1 + 99 * t),
    "linear": lambda t: 1 - t,
}


@pytest.mark.parametrize("schedule", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("steps", [[0, 10, 20, 30], [1000, 1100, 1400, 2000, 2100]], ids=["even", "irregular"])
def test_wsm_weights_follow_the_paper_formula(schedule, steps):
    expect = _wsm_by_hand(steps, SHAPES[schedule])
    assert methods.weights("wsm", steps, schedule=schedule) == pytest.approx(expect, abs=1e-9)


def test_wsm_1_sqrt_by_hand_on_four_checkpoints():
    # Cells of 10 steps from -5 to 35: the checkpoints sit at tau = 1/8, 3/8, 5/8, 7/8; the mean of
    # 1 - sqrt(tau) over [a, b] is 1 - (2/3)(b^1.5 - a^1.5)/(b - a).
    t = [1 / 8, 3 / 8, 5 / 8, 7 / 8]
    w = [1 - 2 / 3 * (t[j] ** 1.5 - t[j - 1] ** 1.5) / (t[j] - t[j - 1]) for j in (1, 2, 3)]
    c = [1 - w[0], w[0] - w[1], w[1] - w[2], w[2]]
    assert methods.weights("wsm", [0, 10, 20, 30], schedule="1-sqrt") == pytest.approx(c, rel=1e-12)
    assert c[0] > c[1] > c[2] > c[3] > 0  # a decay that is steep early leans on the oldest checkpoint


def test_wsm_irregular_spacing_differs_from_counting_checkpoints():
    # Linear decay over a window whose last gap is 10x the others: not uniform, by the real steps.
    w = methods.weights("wsm", [0, 10, 20, 120], schedule="linear")
    assert w == pytest.approx(_wsm_by_hand([0, 10, 20, 120], SHAPES["linear"]), abs=1e-9)
    assert max(w) - min(w) > 0.05


@pytest.mark.parametrize("params, msg", [
    ({}, "needs --schedule"), ({"schedule": "1sqrt"}, "did you mean '1-sqrt'"),
    ({"schedule": "cosine", "decay": 0.5}, "does not take 'decay'"),
])
def test_wsm_parameter_errors(params, msg):
    with pytest.raises(CkptavgError, match=msg):
        methods.weights("wsm", [1, 2, 3], **params)


def test_wma_grows_linearly_newest_largest():
    assert methods.weights("wma", [10, 20, 40, 80]) == pytest.approx([0.1, 0.2, 0.3, 0.4], rel=1e-15)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.10, 6.94), (0.05, 16.97)])  # EDM2's quoted pairs
def test_power_ema_gamma_matches_edm2(sigma_rel, gamma):
    g = methods.details("power-ema", [0, 1], sigma_rel=sigma_rel)["gamma"]
    assert g == pytest.approx(gamma, abs=0.01)
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-12)


def test_power_ema_integrates_the_profile_over_each_cell():
    steps, g = [0, 100, 250, 400, 1000], methods.details("power-ema", [0, 1], sigma_rel=0.15)["gamma"]
    cells = [0, 50, 175, 325, 700, 1000]  # midpoints between checkpoints; 0 and the newest step at the ends
    density = lambda t: (g + 1) * t**g / 1000 ** (g + 1)  # noqa: E731  EDM2's p(t) at T = 1000
    expect = [_mean(density, a, b, 20_000) * (b - a) for a, b in zip(cells, cells[1:])]
    w = methods.weights("power-ema", steps, sigma_rel=0.15)
    assert w == pytest.approx(expect, rel=1e-6)
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-15)


def test_power_ema_converges_to_the_profile_as_spacing_shrinks():
    errors = [methods.details("power-ema", list(range(0, 1001, s)), sigma_rel=0.05)["profile_error"]
              for s in (200, 50, 10, 2)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 < 0.3 < errors[0]
    # First-order: the realised profile tends to p(t_i) * (cell width) at each checkpoint.
    g = methods.details("power-ema", [0, 1], sigma_rel=0.05)["gamma"]
    w = methods.weights("power-ema", list(range(0, 1001)), sigma_rel=0.05)
    assert w[900] == pytest.approx((g + 1) * 0.9**g / 1000, rel=1e-3)


@pytest.mark.parametrize("sigma_rel", [0, -0.1, 0.31, float("nan")])
def test_power_ema_refuses_impossible_lengths(sigma_rel):
    with pytest.raises(CkptavgError, match="--sigma-rel must be in"):
        methods.weights("power-ema", [1, 2], sigma_rel=sigma_rel)


def test_ema_half_life_in_tokens_is_the_half_life_in_steps_times_tokens_per_step():
    steps = [0, 3, 10, 50, 51]
    w = methods.weights("ema", steps, half_life_tokens=40 * 2_097_152, tokens_per_step=2_097_152)
    assert w == pytest.approx(methods.weights("ema", steps, half_life=40), rel=1e-12)
    with pytest.raises(CkptavgError, match="needs the tokens per step"):
        methods.weights("ema", steps, half_life_tokens=1e9)
    with pytest.raises(CkptavgError, match="exactly one of"):
        methods.weights("ema", steps, half_life_tokens=1e9, half_life=3, tokens_per_step=1)
