"""Deterministic emissions sources for tests and demos."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from carbonoffset.core.measurement import Measurement


class ScriptedEmissions:
    """An emissions source whose cumulative readings follow a script.

    Each ``read()`` returns the next cumulative value of ``emissions_kg``
    (the last one repeats once the script is used up); ``stop()`` returns the
    last value read (or the next one when ``advance_on_stop``). Energy is
    derived as ``emissions_kg / intensity_kg_per_kwh``.

    Args:
        emissions_kg: cumulative kg CO2eq per read, non-decreasing, >= 0; or
            a callable ``(n_reads) -> kg``.
        intensity_kg_per_kwh: carbon intensity used to derive energy (> 0;
            default 0.056 kg/kWh, roughly France's grid).
        advance_on_stop: ``stop()`` takes the next scripted value.
        details: the :attr:`~carbonoffset.core.measurement.Measurement.details` every figure carries
            (e.g. ``{"cpu_model": ..., "country_iso_code": ...}``); default none.

    Every ``start()`` begins a new run: the script restarts from its first value.
    """

    def __init__(
        self,
        emissions_kg: Sequence[float] | Callable[[int], float],
        *,
        intensity_kg_per_kwh: float = 0.056,
        advance_on_stop: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        if intensity_kg_per_kwh <= 0:
            raise ValueError("intensity_kg_per_kwh must be > 0")
        if not callable(emissions_kg):
            values = [float(v) for v in emissions_kg]
            if not values or any(v < 0 for v in values) or values != sorted(values):
                raise ValueError("emissions_kg must be a non-empty, non-decreasing sequence of values >= 0")
        self._script = emissions_kg
        self._intensity = intensity_kg_per_kwh
        self._advance_on_stop = advance_on_stop
        self._details = dict(details or {})
        self._lock = threading.Lock()
        self.reads = 0
        self.starts = 0
        self.running = False
        self._last = Measurement()

    def _value(self, n: int) -> float:
        if callable(self._script):
            return float(self._script(n))
        values = self._script
        return float(values[min(n, len(values) - 1)])

    def _next(self) -> Measurement:
        kg = self._value(self.reads)
        self.reads += 1
        self._last = Measurement(kg, kg / self._intensity, details=self._details)
        return self._last

    def start(self) -> None:
        with self._lock:
            self.starts += 1
            self.reads = 0
            self.running = True
            self._last = Measurement()

    def read(self) -> Measurement:
        with self._lock:
            return self._next()

    def stop(self) -> Measurement:
        with self._lock:
            self.running = False
            return self._next() if self._advance_on_stop else self._last


class BrokenEmissions:
    """An emissions source that cannot measure at all (a broken custom source, no sensor):
    :meth:`start`, :meth:`read` and :meth:`stop` each raise ``error_type(message)``.

    What a run does with it: training goes on, one warning names the cause, and the run is recorded
    as ``unmeasured``, never as a measured zero (see :class:`~carbonoffset.core.session.OffsetSession`).

    Args:
        error_type: the exception class raised (default :class:`RuntimeError`).
        message: its message.
    """

    def __init__(self, error_type: type[Exception] = RuntimeError, message: str = "no sensor") -> None:
        self.error_type = error_type
        self.message = message

    def start(self) -> None:
        raise self.error_type(self.message)

    def read(self) -> Measurement:
        raise self.error_type(self.message)

    def stop(self) -> Measurement:
        raise self.error_type(self.message)
