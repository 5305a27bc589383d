"""What an emissions source is (:class:`EmissionsSource`, the protocol users implement) and the
figures it returns (:class:`Measurement`).

The default source is :class:`~carbonoffset.core.meter.MeterSource` (CodeCarbon in a measuring
process); :class:`~carbonoffset.core.sources.CodeCarbonSource` measures in this process; tests and
users who measure differently inject their own (see :class:`carbonoffset.testing.ScriptedEmissions`).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Cumulative figures of one run.

    Attributes:
        emissions_kg: emissions since the run started, kg CO2eq (>= 0).
        energy_kwh: energy since the run started, kWh (>= 0).
        estimated_kg: the part of ``emissions_kg`` that is an estimate rather
            than CodeCarbon's measurement, kg CO2eq (0 <= ``estimated_kg`` <=
            ``emissions_kg``): time no tracker measured yet, see
            :class:`~carbonoffset.core.meter.MeterSource` and
            :attr:`~carbonoffset.core.sources.CodeCarbonSource.late_start_estimate`.
        estimated_kwh: the estimated part of ``energy_kwh``, kWh.
        details: what the figures were measured on and where, as JSON values: for CodeCarbon the
            :data:`~carbonoffset.core.sources.DETAIL_FIELDS` of its ``EmissionsData`` (hardware, location, tracking mode,
            versions; ``ram_total_size`` in GB, ``duration`` in s); empty when the source gives none.
            Not compared by ``==``. A sum keeps both sides' details (the right side's win).
            Keyword only in practice: the third positional field is ``estimated_kg``.

    Raises:
        TypeError: a figure is not a number (e.g. details given positionally).
    """

    emissions_kg: float = 0.0
    energy_kwh: float = 0.0
    estimated_kg: float = 0.0
    estimated_kwh: float = 0.0
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # details positionally (``Measurement(kg, kwh, {...})``) would land in ``estimated_kg``
        for name in ("emissions_kg", "energy_kwh", "estimated_kg", "estimated_kwh"):
            value = getattr(self, name)
            # (``type() is float`` first: the ABC check alone was a third of the epoch hook's CPU)
            if type(value) is not float and not isinstance(value, numbers.Real):
                raise TypeError(
                    f"Measurement.{name} must be a number (got {type(getattr(self, name)).__name__}); "
                    "pass details by keyword: Measurement(kg, kwh, details={...})"
                )

    def __add__(self, other: Measurement) -> Measurement:
        details = (
            {**self.details, **other.details}
            if other.details and self.details
            else other.details or self.details
        )
        return Measurement(
            self.emissions_kg + other.emissions_kg,
            self.energy_kwh + other.energy_kwh,
            self.estimated_kg + other.estimated_kg,
            self.estimated_kwh + other.estimated_kwh,
            details=details,
        )

    @property
    def measured(self) -> Measurement:
        """The measured part only (the estimated part left out), with no estimate in it."""
        return Measurement(
            max(0.0, self.emissions_kg - self.estimated_kg),
            max(0.0, self.energy_kwh - self.estimated_kwh),
            details=self.details,
        )

    @staticmethod
    def estimate(emissions_kg: float, energy_kwh: float) -> Measurement:
        """Figures that are estimated in full."""
        return Measurement(emissions_kg, energy_kwh, emissions_kg, energy_kwh)


@runtime_checkable
class EmissionsSource(Protocol):
    """What :class:`~carbonoffset.core.session.OffsetSession` needs from a measurer: it measures
    one run with ``start()``, then ``read()`` any number of times, then ``stop()``.

    ``start`` begins a new measurement (a source may be started again after
    ``stop``; each start is a new run, figures restart at zero). ``read`` and
    ``stop`` return cumulative :class:`Measurement` values since ``start``.
    """

    def start(self) -> None: ...

    def read(self) -> Measurement: ...

    def stop(self) -> Measurement: ...
