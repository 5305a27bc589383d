"""Unit conversions used by the offset accounting.

Emissions are kept in kilograms of CO2-equivalent (kg CO2eq) everywhere; the
1ClickImpact API sells carbon capture in **whole pounds** (integer ``amount``,
1 to 10,000,000). This module is the one place that converts between them.

Constants:
    ``KG_PER_LB = 0.45359237`` -- 1 international avoirdupois pound is exactly
    0.45359237 kg (International Yard and Pound Agreement, 1959; exact by
    definition).
    ``G_PER_KG = 1000`` -- model cards take grams (Hugging Face ``co2_eq_emissions``).
    ``J_PER_KWH = 3.6e6`` -- 1 kWh = 1000 W x 3600 s = 3.6e6 J (SI, exact by definition): energy in
    kWh from a power in W over seconds.
    ``BYTES_PER_GIB = 1024**3`` -- one gibibyte (IEC 80000-13, exact): memory sizes.
"""

from __future__ import annotations

import decimal
import math
from typing import Final

KG_PER_LB: Final[float] = 0.45359237
"""Kilograms in one pound, exact by definition (1959 international agreement)."""

G_PER_KG: Final[int] = 1000
"""Grams in one kilogram (SI, exact)."""

J_PER_KWH: Final[float] = 3.6e6
"""Joules in one kilowatt-hour: 1000 W x 3600 s, exact by definition (SI). ``power_w * seconds /
J_PER_KWH`` is an energy in kWh."""

BYTES_PER_GIB: Final[int] = 1024**3
"""Bytes in one gibibyte (IEC 80000-13, exact)."""

MIN_OFFSET_LB: Final[int] = 1
"""Smallest amount the API accepts for ``capture_carbon`` (whole pounds). Source: the 1ClickImpact
API reference, ``POST /v1/capture_carbon``: ``amount`` is an integer number of pounds, 1 to 10,000,000."""

MAX_OFFSET_LB: Final[int] = 10_000_000
"""Largest amount the API accepts for one ``capture_carbon`` call (whole pounds); same source as
:data:`MIN_OFFSET_LB`. The SDK does not check it: :class:`~carbonoffset.core.client.OffsetClient` does."""

MIN_THRESHOLD_KG: Final[float] = 0.5
"""Smallest allowed ``offset_threshold`` in kg: just above one pound (0.4536 kg),
so a threshold crossing always buys at least one whole pound."""

_EPS_KG: Final[float] = 1e-12


def lb_to_kg(amount_lb: float) -> float:
    """Convert pounds to kilograms.

    Args:
        amount_lb: mass in pounds (any real number).

    Returns:
        The mass in kilograms (``amount_lb * 0.45359237``).
    """
    return amount_lb * KG_PER_LB


def kg_to_lb(emissions_kg: float) -> float:
    """Convert kilograms to (fractional) pounds: ``emissions_kg / 0.45359237``."""
    return emissions_kg / KG_PER_LB


def whole_lb_floor(emissions_kg: float) -> int:
    """Whole pounds that ``emissions_kg`` fully covers (rounds **down**).

    The remainder (``emissions_kg - whole_lb_floor(emissions_kg) * KG_PER_LB``)
    is what stays pending; it is never rounded away. A tolerance of 1e-12 kg
    absorbs float noise so that exactly ``n`` pounds in kg gives ``n``.

    Args:
        emissions_kg: pending emissions in kg CO2eq; values <= 0 give 0.

    Returns:
        An integer >= 0, capped at :data:`MAX_OFFSET_LB`.
    """
    if emissions_kg <= 0:
        return 0
    return min(MAX_OFFSET_LB, int(math.floor((emissions_kg + _EPS_KG) / KG_PER_LB)))


def whole_lb_ceil(emissions_kg: float) -> int:
    """Whole pounds needed to cover ``emissions_kg`` completely (rounds **up**).

    Used only for an explicit round-up offset (e.g. the final offset of a run
    when ``offset_round_up`` is set): the overshoot
    ``whole_lb_ceil(x) * KG_PER_LB - x`` becomes a credit used by later
    emissions.

    Args:
        emissions_kg: pending emissions in kg CO2eq; values <= 0 give 0.

    Returns:
        An integer >= 0, capped at :data:`MAX_OFFSET_LB`.
    """
    if emissions_kg <= _EPS_KG:
        return 0
    return min(MAX_OFFSET_LB, int(math.ceil((emissions_kg - _EPS_KG) / KG_PER_LB)))


def kg_to_g(emissions_kg: float) -> float:
    """Convert kilograms to grams exactly: the decimal point of ``emissions_kg`` moves three places.

    ``emissions_kg * 1000`` in binary floating point can add noise to the last digit
    (``0.0041 * 1000 == 4.1000000000000005``); this shifts the shortest decimal form of the
    value instead, so ``kg_to_g(0.0041) == 4.1`` and ``kg_to_g(1.0) == 1000.0``.

    Args:
        emissions_kg: a finite mass in kg.

    Returns:
        The mass in grams, the float nearest to ``emissions_kg`` (as written) times 1000.

    Raises:
        ValueError: ``emissions_kg`` is NaN or infinite.
    """
    if not math.isfinite(emissions_kg):
        raise ValueError(f"emissions_kg must be a finite number (got {emissions_kg!r})")
    return float(decimal.Decimal(repr(float(emissions_kg))).scaleb(3))
