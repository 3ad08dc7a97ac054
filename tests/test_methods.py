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
