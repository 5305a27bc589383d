"""CodeCarbon in the training process: :class:`CodeCarbonSource`, and the run details it keeps.

What a source is (:class:`Measurement`, :class:`EmissionsSource`) is in
:mod:`carbonoffset.core.measurement`; what makes CodeCarbon's first tracker start fast and fork-safe
(:func:`warm_up_codecarbon`, the fork hooks, the CPU-model cache) is in
:mod:`carbonoffset.core.codecarbon_startup`. ``Measurement``, ``EmissionsSource`` and
``warm_up_codecarbon`` are importable from here too, as before; the start-up's settings
(``FORK_WAIT_S``, ``BACKGROUND_NICE``, ``CPU_MODEL_CACHE``) live in that module only.
The default source of sessions measures in a separate process:
:class:`~carbonoffset.core.meter.MeterSource`.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from typing import Any

from carbonoffset.core import estimates
from carbonoffset.core.codecarbon_startup import (
    background_start_done,
    hardware_ready,
    mark_hardware_ready,
    quiet_codecarbon,
    start_in_background,
    track_background_start,
    warm_up_codecarbon,
)
from carbonoffset.core.measurement import EmissionsSource, Measurement
from carbonoffset.core.units import J_PER_KWH

__all__ = [
    "DETAIL_FIELDS",
    "CodeCarbonSource",
    "EmissionsSource",
    "Measurement",
    "codecarbon_details",
    "warm_up_codecarbon",
]

logger = logging.getLogger(__name__)


#: The fields of CodeCarbon's public ``EmissionsData`` kept in :attr:`Measurement.details`: what the
#: run was measured on and where (never its coordinates, nor CodeCarbon's own run ids).
DETAIL_FIELDS = (
    "country_name",
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "on_cloud",
    "os",
    "python_version",
    "codecarbon_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "ram_total_size",
    "tracking_mode",
    "pue",
    "duration",
)


def _json_value(value: Any) -> Any:
    """A JSON value for ``value`` (numbers stay numbers; NaN and infinities, which JSON lacks, become None)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def codecarbon_details(total: Any) -> dict[str, Any]:
    """The :data:`DETAIL_FIELDS` of a CodeCarbon ``EmissionsData`` that it has, as JSON values."""
    return {
        name: _json_value(getattr(total, name))
        for name in DETAIL_FIELDS
        if getattr(total, name, None) is not None
    }


class _TotalsHandler:
    """A CodeCarbon output handler that keeps the last cumulative total it was given.

    Besides the totals it keeps, from CodeCarbon's public ``EmissionsData``,
    how long the tracker had been measuring (``duration``, s) and when the
    total arrived (``time.perf_counter()``), so a source can tell when the
    tracker's measurement began.
    """

    def __init__(self) -> None:
        self.last = Measurement()
        self.duration_s = 0.0
        self.power_w = 0.0
        self.cpu_energy_kwh = 0.0
        self.at = 0.0
        self.count = 0

    def out(self, total: Any, delta: Any) -> None:
        try:
            last = Measurement(
                float(total.emissions or 0.0),
                float(total.energy_consumed or 0.0),
                details=codecarbon_details(total),
            )
            duration_s = float(getattr(total, "duration", 0.0) or 0.0)
            power_w = sum(
                float(getattr(total, name, 0.0) or 0.0) for name in ("cpu_power", "gpu_power", "ram_power")
            )
            cpu_energy_kwh = float(getattr(total, "cpu_energy", 0.0) or 0.0)
        except Exception:  # a handler must never raise into CodeCarbon  # noqa: BLE001
            logger.debug("could not read CodeCarbon totals", exc_info=True)
            return
        self.cpu_energy_kwh = cpu_energy_kwh
        self.last, self.duration_s, self.power_w, self.at = last, duration_s, power_w, time.perf_counter()
        self.count += 1

    def live_out(self, total: Any, delta: Any) -> None:
        self.out(total, delta)

    def task_out(self, data: Any, experiment_name: Any) -> None:
        pass

    def exit(self) -> None:
        pass


def _cpu_power_from_load(tracker: Any) -> bool:
    """Whether a CodeCarbon tracker's CPU power comes from its load curve (``cpu_load`` mode).
    CodeCarbon has no public name for this: its hardware objects' ``_mode`` is read, and any
    other layout counts as "no" (the remembered power is then used as it is)."""
    try:
        return any(
            type(part).__name__ == "CPU" and getattr(part, "_mode", None) == "cpu_load"
            for part in getattr(tracker, "_hardware", ())
        )
    except Exception:  # noqa: BLE001 -- another CodeCarbon
        return False


class CodeCarbonSource:
    """Measures with CodeCarbon: a **new tracker for every** ``start()`` (trackers are single-use).

    Args:
        country_iso_code: ISO 3166-1 alpha-3 code; when given, CodeCarbon's
            ``OfflineEmissionsTracker`` is used (no network). Otherwise the
            online ``EmissionsTracker`` (geo-IP look-up at the first flush).
        refresh_s: seconds between two background refreshes of the cached
            figures (> 0, default 1.0); see "Cost" below.
        **tracker_kwargs: passed to the CodeCarbon tracker (e.g.
            ``measure_power_secs``, ``tracking_mode``). By default no CSV
            file is written (``output_methods=[]``) and CodeCarbon logs at
            ``error``.

    Cost and accuracy:

    * ``read()`` returns the tracker's cumulative figures as of the last
      refresh, made by a background thread (``carbonoffset-refresh``) with the
      tracker's public ``flush()`` every ``refresh_s`` seconds (the first one
      0.1 s after the tracker starts). So ``read()`` costs microseconds and
      its figures are **at most** ``refresh_s`` **seconds old** (plus one
      flush, ~1 ms). Before the first refresh of a run ``read()`` flushes
      itself (about 1 ms), except after a late start (below). ``stop()`` is
      exact: it stops the tracker and returns its final figures.
    * The first tracker of a process spends 1-2 s detecting the hardware
      (CodeCarbon caches the result per process). ``start()`` never waits for
      it: when that detection has not run yet in this process, the tracker is
      built and started on the background thread (the detection at a lower
      CPU priority, see :data:`~carbonoffset.core.codecarbon_startup.BACKGROUND_NICE`)
      and ``start()`` returns at once; :attr:`tracker` is set once built, and
      :attr:`start_finished` once it started. Until the tracker runs,
      ``read()`` returns zeros. The time between ``start()`` and the moment the
      tracker began measuring (:attr:`late_start_s`, from the ``duration`` of
      CodeCarbon's own totals) is accounted for, not lost: its energy
      (:attr:`late_start_estimate`) is that gap times the power CodeCarbon
      reports (CPU + GPU + RAM, W) in the tracker's first reading covering at
      least :attr:`GAP_POWER_MIN_S` seconds (or in its final reading if the
      run is shorter), its emissions that energy at the run's carbon
      intensity; the estimate is added to every figure from then on (so
      figures never decrease; before it is known they are a lower bound).
      Under heavy CPU load the detection, at its lower priority, takes longer
      (several seconds), and the estimated share grows accordingly.
      :func:`~carbonoffset.core.codecarbon_startup.warm_up_codecarbon` (called
      when a framework callback is built) runs the detection early, so the gap
      is often zero or short.
    * While a tracker starts on the background thread, a fork of the process
      waits for it (at most :data:`~carbonoffset.core.codecarbon_startup.FORK_WAIT_S`),
      so that the child does not inherit a lock held by that thread.
    """

    #: Seconds of tracking the first reading must cover before its power is used for the gap.
    GAP_POWER_MIN_S = 2.0
    #: Delay of the first background refresh after the tracker starts, s.
    FIRST_REFRESH_S = 0.1

    def __init__(
        self, country_iso_code: str | None = None, *, refresh_s: float = 1.0, **tracker_kwargs: Any
    ) -> None:
        if not (isinstance(refresh_s, (int, float)) and refresh_s > 0):
            raise ValueError(f"refresh_s must be a number of seconds > 0 (got {refresh_s!r})")
        self.country_iso_code = country_iso_code
        self.refresh_s = float(refresh_s)
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Any = None
        self.late_start_s = 0.0
        self._cpu_power_from_load = False
        self._busy0: tuple[float, float] | None = None
        self._mean_cpu_load: float | None = None
        self._handler = _TotalsHandler()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._started = threading.Event()
        self._t0 = 0.0
        self._gap: Measurement | None = None  # estimate for the late start, once known
        self._cached: Measurement | None = None
        self._read_flushes = False  # read() may flush itself until the first refresh
        self._flush_failed = False  # warned about a failing flush() in this run

    def _build(self) -> Any:
        from codecarbon import EmissionsTracker, OfflineEmissionsTracker

        # allow_multiple_runs: CodeCarbon's lock file (its ``allow_multiple_runs = false`` setting) would
        # refuse a run while another CodeCarbon runs or after a killed one left the file, and replaces
        # the process's SIGINT/SIGTERM handlers; carbonoffset's trackers never take it (an argument
        # given here still wins)
        kwargs: dict[str, Any] = {
            "output_methods": [],
            "log_level": "error",
            "allow_multiple_runs": True,
            **self.tracker_kwargs,
        }
        kwargs["output_handlers"] = [self._handler, *kwargs.get("output_handlers", [])]
        quiet_codecarbon(kwargs)
        if self.country_iso_code:
            return OfflineEmissionsTracker(country_iso_code=self.country_iso_code, **kwargs)
        return EmissionsTracker(**kwargs)

    def warm_up(self) -> threading.Event:
        """Start CodeCarbon's hardware detection for this source's settings (see :func:`warm_up_codecarbon`)."""
        return warm_up_codecarbon(**self.tracker_kwargs)

    def start(self, *, started_ago_s: float = 0.0) -> None:
        """Build a new tracker and start it; never waits for CodeCarbon's first hardware detection.

        Args:
            started_ago_s: seconds (>= 0) since the run really began, when it began before this
                call (a measuring process told late, a tracker taking over from another one).
                That time is estimated like a late start (see the class notes), never dropped.
        """
        self.stop()  # a running tracker (if any) ends first
        with self._lock:
            self._t0 = time.perf_counter() - max(0.0, float(started_ago_s))
            self._busy0, self._mean_cpu_load = estimates.busy_times(), None
            self._handler = _TotalsHandler()
            self._gap = None
            self._cached = None
            self._flush_failed = False
            self.late_start_s = 0.0
            self._halt = threading.Event()
            self._started = threading.Event()
            background = not hardware_ready(self.tracker_kwargs)
            self._read_flushes = not background
            tracker = None
            settled = threading.Event()  # set once the background start and its first flush are done
            if background:
                track_background_start(settled)
            else:
                self.tracker = tracker = self._build()
                tracker.start()  # ~5 ms once CodeCarbon knows the hardware
                self._started.set()
                if started_ago_s <= 0:
                    self._gap = Measurement()  # started right here: nothing to estimate
            self._thread = threading.Thread(
                target=self._run,
                args=(tracker, self._halt, self._started, settled),
                name="carbonoffset-refresh",
                daemon=True,
            )
            self._thread.start()

    def _run(
        self, tracker: Any, halt: threading.Event, started: threading.Event, settled: threading.Event
    ) -> None:
        """Background thread: build and start the tracker (late start), then refresh the cached figures."""
        if tracker is None:
            try:
                tracker = self._build()  # imports CodeCarbon (~0.15 s) off the training thread too
                with self._lock:
                    self.tracker = tracker
                start_in_background(tracker)
            except Exception as exc:  # noqa: BLE001 -- CodeCarbon swallows most errors itself
                logger.warning("emissions tracking failed to start (%s); training continues", exc)
            started.set()
            mark_hardware_ready(self.tracker_kwargs)
            # the process's first flush also loads CodeCarbon's emissions data (~0.1 s, imports):
            # do it now, here, not in read() on the training thread, and before forks may go on
            with self._lock:
                if self.tracker is tracker:
                    self._flush_locked()
            background_start_done(settled)
            wait = self.refresh_s
        else:
            wait = self.FIRST_REFRESH_S
        while not halt.wait(wait):
            wait = self.refresh_s
            with self._lock:
                if self.tracker is not tracker:
                    return
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self.tracker is not None and self._started.is_set():
            try:
                self.tracker.flush()
            except Exception as exc:  # noqa: BLE001 -- a failed reading must not end the refreshes
                if not self._flush_failed:
                    self._flush_failed = True
                    logger.warning(
                        "CodeCarbon's reading failed (%s: %s); carbonoffset retries every %g s and "
                        "estimates the time its figures do not cover",
                        type(exc).__name__,
                        exc,
                        self.refresh_s,
                    )
                return
            self._update_locked(final=False)

    @staticmethod
    def _estimate_gap(handler: _TotalsHandler, gap_s: float) -> Measurement:
        """The gap's energy at the power CodeCarbon reports (CPU + GPU + RAM, W; its average power
        so far when it reports none), and its emissions at the run's carbon intensity so far."""
        last = handler.last
        power_w = handler.power_w
        if power_w <= 0 and handler.duration_s > 0:
            power_w = last.energy_kwh * J_PER_KWH / handler.duration_s
        energy_kwh = power_w * gap_s / J_PER_KWH
        intensity = last.emissions_kg / last.energy_kwh if last.energy_kwh > 0 else 0.0
        kg = energy_kwh * intensity
        # what it was estimated from was measured on this hardware, here: the details stay with it
        return Measurement(kg, energy_kwh, kg, energy_kwh, details=last.details)

    @property
    def start_finished(self) -> bool:
        """Whether the tracker start of the current run is over: at once in :meth:`start`, or on
        the background thread after a late start (see the class notes). A start that failed is
        over too (it was logged); ``False`` before the first :meth:`start`."""
        return self._started.is_set()

    @property
    def late_start_estimate(self) -> Measurement:
        """The figures estimated for the time the tracker started late (zeros when it did not,
        or until its power is known); included in every figure returned."""
        return self._gap or Measurement()

    def _late_by_s(self, handler: _TotalsHandler) -> float:
        """Seconds between the run's start and the moment the tracker began measuring."""
        began = handler.at - handler.duration_s  # from the duration CodeCarbon reports
        return max(0.0, began - self._t0)

    @property
    def power_w(self) -> float:
        """The power CodeCarbon reported last (CPU + GPU + RAM, W); 0 until its first figures."""
        return self._handler.power_w

    @property
    def measured_s(self) -> float:
        """Seconds the tracker has measured (CodeCarbon's ``duration``); 0 until its first figures."""
        return self._handler.duration_s

    @property
    def average_power_w(self) -> float:
        """CodeCarbon's energy over the time it measured, as a power (W); 0 until its first figures."""
        handler = self._handler
        return handler.last.energy_kwh * J_PER_KWH / handler.duration_s if handler.duration_s > 0 else 0.0

    @property
    def average_cpu_power_w(self) -> float:
        """The CPU's part of :attr:`average_power_w`, W; 0 until the first figures."""
        handler = self._handler
        return handler.cpu_energy_kwh * J_PER_KWH / handler.duration_s if handler.duration_s > 0 else 0.0

    @property
    def mean_cpu_load(self) -> float | None:
        """The machine's mean CPU load over the last run, 0..1 (:func:`estimates.load_between`,
        from :meth:`start` to :meth:`stop`; CodeCarbon's own ``cpu_utilization_percent`` is
        sampled only every ``measure_power_secs``), ``None`` before a stop or off Linux."""
        return self._mean_cpu_load

    @property
    def cpu_power_from_load(self) -> bool:
        """Whether CodeCarbon computed this run's CPU power from the CPU load (its ``cpu_load``
        mode, used without RAPL or another power meter), as far as it can be told; kept at stop."""
        return self._cpu_power_from_load

    def coverage(self) -> tuple[float, float] | None:
        """What the figures :meth:`read` returns cover: ``(measured_at, unmeasured_s)``, with
        ``measured_at`` the ``time.perf_counter()`` at which CodeCarbon measured them and
        ``unmeasured_s`` the seconds of a late start before that not estimated yet (0 once the
        estimate is included, see :attr:`late_start_estimate`); ``None`` until the tracker's first
        figures (zeros cover nothing)."""
        handler = self._handler
        if not handler.count:
            return None
        return handler.at, (self._late_by_s(handler) if self._gap is None else 0.0)

    def _update_locked(self, *, final: bool) -> None:
        handler = self._handler
        if not handler.count:
            return
        if self._gap is None:
            gap_s = self._late_by_s(handler)
            if gap_s <= 0.0:
                self._gap = Measurement()
            elif final or (handler.duration_s >= self.GAP_POWER_MIN_S and handler.last.energy_kwh > 0):
                self._gap = self._estimate_gap(handler, gap_s)
                self.late_start_s = gap_s
                logger.info(
                    "CodeCarbon started %.2f s after the run (first hardware detection); that gap is "
                    "estimated at %.3g kWh from the power it measured after %.1f s",
                    gap_s,
                    self._gap.energy_kwh,
                    handler.duration_s,
                )
        self._cached = handler.last + (self._gap or Measurement())

    def read(self) -> Measurement:
        """Cumulative figures since :meth:`start` (at most ``refresh_s`` s old; zeros until the tracker runs)."""
        cached = self._cached
        if cached is not None:
            return cached
        if not self._read_flushes:  # the tracker starts late (in the background): no figures yet
            return Measurement()
        with self._lock:
            if self._cached is None:
                self._flush_locked()
            return self._cached if self._cached is not None else Measurement()

    def stop(self, *, ended_ago_s: float = 0.0) -> Measurement:
        """Stop the tracker (waiting for a start still in progress) and return the exact final figures.

        Args:
            ended_ago_s: seconds (>= 0) since the run really ended, when it ended before this call
                (a measuring process told late). If the tracker only began after that end (a run
                shorter than its late start), nothing of the run was measured: the whole run is
                estimated (at the power of the tracker's reading) instead of counting the time the
                tracker measured after the run.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            self._halt.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            return self._stop_locked(time.perf_counter() - max(0.0, float(ended_ago_s)))

    def _stop_locked(self, ended: float | None = None) -> Measurement:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            self._cpu_power_from_load = _cpu_power_from_load(tracker)
            self._mean_cpu_load = estimates.load_between(self._busy0, estimates.busy_times())
        if tracker is not None and self._started.is_set():
            tracker.stop()
            self._update_locked(final=True)
            handler = self._handler
            if ended is not None and handler.count and handler.at - handler.duration_s >= ended > self._t0:
                self._gap = self._estimate_gap(handler, ended - self._t0)
                self.late_start_s = ended - self._t0
                self._cached = self._gap  # the tracker measured only time after the run
        return self._cached if self._cached is not None else Measurement()
