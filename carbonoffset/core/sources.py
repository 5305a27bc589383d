"""Where emissions figures come from.

An *emissions source* measures one run: ``start()``, then ``read()`` any number
of times (cumulative figures since ``start``), then ``stop()``. The default is
:class:`CodeCarbonSource`; tests and users who measure differently inject
their own (see :class:`carbonoffset.testing.ScriptedEmissions`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Cumulative figures of one run.

    Attributes:
        emissions_kg: emissions since the run started, kg CO2eq (>= 0).
        energy_kwh: energy since the run started, kWh (>= 0).
    """

    emissions_kg: float = 0.0
    energy_kwh: float = 0.0

    def __add__(self, other: Measurement) -> Measurement:
        return Measurement(self.emissions_kg + other.emissions_kg, self.energy_kwh + other.energy_kwh)


@runtime_checkable
class EmissionsSource(Protocol):
    """What :class:`~carbonoffset.core.session.OffsetSession` needs from a measurer.

    ``start`` begins a new measurement (a source may be started again after
    ``stop``; each start is a new run, figures restart at zero). ``read`` and
    ``stop`` return cumulative :class:`Measurement` values since ``start``.
    """

    def start(self) -> None: ...

    def read(self) -> Measurement: ...

    def stop(self) -> Measurement: ...


class _TotalsHandler:
    """A CodeCarbon output handler that keeps the last cumulative total it was given."""

    def __init__(self) -> None:
        self.last = Measurement()

    def out(self, total: Any, delta: Any) -> None:
        try:
            self.last = Measurement(float(total.emissions or 0.0), float(total.energy_consumed or 0.0))
        except Exception:  # a handler must never raise into CodeCarbon  # noqa: BLE001
            logger.debug("could not read CodeCarbon totals", exc_info=True)

    def live_out(self, total: Any, delta: Any) -> None:
        self.out(total, delta)

    def task_out(self, data: Any, experiment_name: Any) -> None:
        pass

    def exit(self) -> None:
        pass


class CodeCarbonSource:
    """Measures with CodeCarbon: a **new tracker for every** ``start()`` (trackers are single-use).

    Args:
        country_iso_code: ISO 3166-1 alpha-3 code; when given, CodeCarbon's
            ``OfflineEmissionsTracker`` is used (no network). Otherwise the
            online ``EmissionsTracker`` (geo-IP look-up at the first flush).
        **tracker_kwargs: passed to the CodeCarbon tracker (e.g.
            ``measure_power_secs``, ``tracking_mode``). By default no CSV
            file is written (``output_methods=[]``) and CodeCarbon logs at
            ``error``.

    ``read()`` calls the tracker's public ``flush()`` (about 0.02 ms without
    CSV output); call it once per epoch, not per step.
    """

    def __init__(self, country_iso_code: str | None = None, **tracker_kwargs: Any) -> None:
        self.country_iso_code = country_iso_code
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Any = None
        self._handler = _TotalsHandler()
        self._lock = threading.Lock()

    def _build(self) -> Any:
        from codecarbon import EmissionsTracker, OfflineEmissionsTracker

        kwargs: dict[str, Any] = {"output_methods": [], "log_level": "error", **self.tracker_kwargs}
        kwargs["output_handlers"] = [self._handler, *kwargs.get("output_handlers", [])]
        # CodeCarbon applies ``log_level`` only after its constructor has logged "offline tracker
        # init" and "Multiple instances ... allowed": set its logger's level first, as it would.
        level = kwargs["log_level"]
        logging.getLogger("codecarbon").setLevel(level.upper() if isinstance(level, str) else level)
        if self.country_iso_code:
            return OfflineEmissionsTracker(country_iso_code=self.country_iso_code, **kwargs)
        return EmissionsTracker(**kwargs)

    def start(self) -> None:
        with self._lock:
            if self.tracker is not None:
                self._stop_locked()
            self._handler = _TotalsHandler()
            self.tracker = self._build()
            self.tracker.start()

    def read(self) -> Measurement:
        with self._lock:
            if self.tracker is not None:
                self.tracker.flush()
            return self._handler.last

    def stop(self) -> Measurement:
        with self._lock:
            return self._stop_locked()

    def _stop_locked(self) -> Measurement:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.stop()
        return self._handler.last
