"""Unit conversions: the exact pound, floor/ceil to whole pounds, remainders and caps."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from carbonoffset.core import units
from carbonoffset.core.units import (
    KG_PER_LB,
    MAX_OFFSET_LB,
    MIN_THRESHOLD_KG,
    kg_to_lb,
    lb_to_kg,
    whole_lb_ceil,
    whole_lb_floor,
)


def test_pound_is_exactly_0_45359237_kg() -> None:
    # the nearest double to 45359237 / 10**8, i.e. the exact definition
    assert KG_PER_LB == 45359237 / 10**8
    assert abs(Fraction(KG_PER_LB) - Fraction(45359237, 10**8)) <= Fraction(math.ulp(KG_PER_LB)) / 2
    assert repr(KG_PER_LB) == "0.45359237"
    assert lb_to_kg(1) == 0.45359237
    assert kg_to_lb(0.45359237) == 1.0
    assert lb_to_kg(10) == pytest.approx(4.5359237, abs=1e-15)


def test_minimum_threshold_is_just_above_one_pound() -> None:
    assert MIN_THRESHOLD_KG == 0.5
    assert whole_lb_floor(MIN_THRESHOLD_KG) == 1  # crossing the threshold always buys >= 1 lb
    assert units.MIN_OFFSET_LB == 1
    assert MAX_OFFSET_LB == 10_000_000


@pytest.mark.parametrize(
    ("emissions_kg", "expected_lb"),
    [
        (0.0, 0),
        (-1.0, 0),
        (0.4, 0),
        (0.45359236, 0),
        (0.45359237, 1),
        (0.5, 1),
        (0.7, 1),  # floor(0.7 / 0.45359237) from the issue
        (0.90718473, 1),
        (0.90718474, 2),
        (2.0, 4),
        (45.359237, 100),
    ],
)
def test_floor_rounds_down(emissions_kg: float, expected_lb: int) -> None:
    assert whole_lb_floor(emissions_kg) == expected_lb
    assert isinstance(whole_lb_floor(emissions_kg), int)


@pytest.mark.parametrize(
    ("emissions_kg", "expected_lb"),
    [
        (0.0, 0),
        (-3.0, 0),
        (1e-6, 1),
        (0.2, 1),
        (0.45359237, 1),
        (0.45359238, 2),
        (0.7, 2),
        (2.0, 5),
    ],
)
def test_ceil_rounds_up(emissions_kg: float, expected_lb: int) -> None:
    assert whole_lb_ceil(emissions_kg) == expected_lb
    assert isinstance(whole_lb_ceil(emissions_kg), int)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 1000, 123_457])
def test_exact_multiples_are_not_lost_to_float_noise(n: int) -> None:
    emissions_kg = n * KG_PER_LB  # may be off by one ulp
    assert whole_lb_floor(emissions_kg) == n
    assert whole_lb_ceil(emissions_kg) == n
    # summing the pound in kg n times (how a ledger accumulates) also gives n
    accumulated = math.fsum([KG_PER_LB] * n)
    assert whole_lb_floor(accumulated) == n


def test_remainder_is_never_lost() -> None:
    rng = random.Random(20240517)
    for _ in range(2000):
        emissions_kg = rng.uniform(0, 500)
        amount_lb = whole_lb_floor(emissions_kg)
        remainder_kg = emissions_kg - lb_to_kg(amount_lb)
        # the remainder is what stays pending: less than one pound, never negative beyond float noise
        assert -1e-9 <= remainder_kg < KG_PER_LB
        assert lb_to_kg(amount_lb) + remainder_kg == pytest.approx(emissions_kg, abs=1e-12)
        up_lb = whole_lb_ceil(emissions_kg)
        credit_kg = lb_to_kg(up_lb) - emissions_kg
        assert -1e-9 <= credit_kg < KG_PER_LB
        assert up_lb - amount_lb in (0, 1)


def test_floor_and_ceil_are_capped_at_the_api_maximum() -> None:
    huge_kg = lb_to_kg(MAX_OFFSET_LB) * 3
    assert whole_lb_floor(huge_kg) == MAX_OFFSET_LB
    assert whole_lb_ceil(huge_kg) == MAX_OFFSET_LB
    # the cap keeps the rest pending: what was not bought is still positive
    assert huge_kg - lb_to_kg(whole_lb_floor(huge_kg)) > 0

