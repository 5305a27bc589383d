"""Where emissions figures come from.

An *emissions source* measures one run: ``start()``, then ``read()`` any number
of times (cumulative figures since ``start``), then ``stop()``. The default is
:class:`CodeCarbonSource`; tests and users who measure differently inject
their own (see :class:`carbonoffset.testing.ScriptedEmissions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import platform
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)


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
            :attr:`CodeCarbonSource.late_start_estimate`.
        estimated_kwh: the estimated part of ``energy_kwh``, kWh.
        details: what the figures were measured on and where, as JSON values: for CodeCarbon the
            :data:`DETAIL_FIELDS` of its ``EmissionsData`` (hardware, location, tracking mode,
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
            if not isinstance(getattr(self, name), numbers.Real):
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
        except Exception:  # a handler must never raise into CodeCarbon  # noqa: BLE001
            logger.debug("could not read CodeCarbon totals", exc_info=True)
            return
        self.last, self.duration_s, self.power_w, self.at = last, duration_s, power_w, time.perf_counter()
        self.count += 1

    def live_out(self, total: Any, delta: Any) -> None:
        self.out(total, delta)

    def task_out(self, data: Any, experiment_name: Any) -> None:
        pass

    def exit(self) -> None:
        pass


#: Tracker arguments that select CodeCarbon's hardware set-up (what its per-process cache is keyed on).
_HARDWARE_ARGS = (
    "tracking_mode",
    "gpu_ids",
    "force_cpu_power",
    "force_ram_power",
    "force_mode_cpu_load",
    "rapl_include_dram",
    "rapl_prefer_psys",
)
_warm_lock = threading.Lock()
_warm: dict[tuple[tuple[str, str], ...], threading.Event] = {}

#: Longest a fork waits for a CodeCarbon start running on a background thread, s.
FORK_WAIT_S = 30.0
_unfinished: set[threading.Event] = set()  # background starts not done yet (guarded by _warm_lock)
_fork_hook: list[bool] = []  # [True] once the hook is registered (hooks cannot be removed)


def _wait_for_background_starts() -> None:
    """``os.register_at_fork`` "before" hook: let CodeCarbon starts on background threads finish.

    Those threads import modules, read ``platform`` information and run
    py-cpuinfo's subprocess, holding locks as they go. A process forked
    meanwhile (Lightning ``ddp_fork``, a forked ``DataLoader`` worker,
    ``multiprocessing``) inherits every held lock from a thread that does not
    exist in the child, and its first tracker start would wait on it forever
    (and a distributed job's other ranks with it). Costs nothing once they are
    done; each wait is bounded by :data:`FORK_WAIT_S`.
    """
    if threading.current_thread().name.startswith("carbonoffset-"):
        return  # a fork made by such a thread itself must not wait for it
    with _warm_lock:
        pending = list(_unfinished)
    for event in pending:
        event.wait(FORK_WAIT_S)


def _forget_background_starts() -> None:
    """``os.register_at_fork`` "after in child" hook: the threads running background starts
    do not exist in the child, so nothing there will ever finish them. Forget them (later
    forks in the child must not wait for them; a warm-up there starts anew), and renew the
    lock guarding them, which such a thread may have held at the fork."""
    global _warm_lock
    _warm_lock = threading.Lock()
    _unfinished.clear()
    for key in [key for key, event in _warm.items() if not event.is_set()]:
        del _warm[key]


def _track_background_start(event: threading.Event) -> None:
    """Make forks wait for ``event`` (set when a background start is done) while it is unset.

    Call it on the thread that starts the background work, before starting it.
    """
    # Fork hooks run their "before" parts in reverse order of registration, so ours must be
    # registered after those of the modules CodeCarbon's start uses: concurrent.futures.thread's
    # takes a lock its thread pools need, and waiting for the start while holding it would never
    # end. Imported here rather than during a fork's wait, its "after" part also never runs
    # without its "before" part ("RuntimeError: release unlocked lock").
    import concurrent.futures.thread  # noqa: F401

    with _warm_lock:
        if not _fork_hook and hasattr(os, "register_at_fork"):  # POSIX
            os.register_at_fork(before=_wait_for_background_starts, after_in_child=_forget_background_starts)
            _fork_hook.append(True)
        if not event.is_set():
            _unfinished.add(event)


def _background_start_done(event: threading.Event) -> None:
    with _warm_lock:
        event.set()
        _unfinished.discard(event)


#: How much lower (Linux ``nice`` steps) CodeCarbon's first hardware detection runs than training.
BACKGROUND_NICE = 10


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority by :data:`BACKGROUND_NICE` (Linux only).

    On Linux the nice value belongs to each thread and is inherited by what it
    starts: py-cpuinfo's detection subprocess (which busy-waits about 1 s of
    CPU) then yields to the training's threads instead of slowing them down.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (AttributeError, OSError):  # pragma: no cover - not permitted: run at normal priority
        pass


#: File (in the user cache folder) where the CPU model CodeCarbon detected is kept per machine.
CPU_MODEL_CACHE = "cpu-model.json"
_prime_lock = threading.Lock()


def _machine_key() -> str:
    """Identifies this machine's CPU: host name, architecture, CPU count and, on Linux, the CPU's
    identity in ``/proc/cpuinfo`` (x86 vendor, family, model and model name; Arm implementer,
    architecture, variant and part)."""
    parts = [platform.node(), platform.machine(), platform.processor(), str(os.cpu_count())]
    wanted = {"vendor_id", "cpu family", "model", "model name"}  # x86
    wanted |= {"CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Hardware"}  # Arm
    seen: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo_file:
            for line in cpuinfo_file:
                name, _, value = line.partition(":")
                if name.strip() in wanted:
                    seen.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    parts += [f"{name}={value}" for name, value in sorted(seen.items())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cpu_model_cache() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("carbonoffset", appauthor=False) / CPU_MODEL_CACHE


def _prime_cpu_model() -> bool:
    """Give CodeCarbon the CPU model it detected in an earlier process on this machine.

    Almost all of a process's first ``tracker.start()`` (1-2 s of CPU) is
    CodeCarbon's ``detect_cpu_model()``: py-cpuinfo runs a subprocess that
    busy-waits to measure the clock. CodeCarbon caches the answer for the
    process (``functools.lru_cache``); this fills that cache from
    :data:`CPU_MODEL_CACHE` (written by :func:`_remember_cpu_model`), so later
    processes skip the detection. CodeCarbon then measures exactly as it would
    have. For the microseconds of the call, ``cpuinfo.get_cpu_info`` answers
    with the cached model name only.

    Returns:
        Whether CodeCarbon knows the CPU model now (it did already, or the cache had it).
    """
    try:
        import cpuinfo
        from codecarbon.core import util as cc_util
    except Exception:  # noqa: BLE001 -- another CodeCarbon layout: let it detect as usual
        return False
    detect = getattr(cc_util, "detect_cpu_model", None)
    if detect is None or not hasattr(detect, "cache_info"):
        return False
    if detect.cache_info().currsize:
        return True
    try:
        brand = json.loads(_cpu_model_cache().read_text(encoding="utf-8"))[_machine_key()]
    except Exception:  # noqa: BLE001 -- no cache yet, or unreadable: detect as usual
        return False
    if not _plausible_model(brand):
        return False  # detected anew, and the entry rewritten
    with _prime_lock:
        original = cpuinfo.get_cpu_info
        cpuinfo.get_cpu_info = lambda: {"brand_raw": brand}
        try:
            detect()
        finally:
            cpuinfo.get_cpu_info = original
    return True


def _plausible_model(brand: object) -> bool:
    return isinstance(brand, str) and 0 < len(brand.strip()) <= 256


def _remember_cpu_model() -> None:
    """Write the CPU model CodeCarbon detected in this process to :data:`CPU_MODEL_CACHE`."""
    try:
        from codecarbon.core import util as cc_util

        detect = cc_util.detect_cpu_model
        if not detect.cache_info().currsize:  # not detected (yet) in this process: never run it here
            return
        brand = detect()
        if not _plausible_model(brand):
            return
        path, key = _cpu_model_cache(), _machine_key()
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 -- missing or unreadable: start a new one
            known = {}
        if not isinstance(known, dict):
            known = {}
        if known.get(key) == brand:
            return
        known[key] = brand
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known), encoding="utf-8")
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 -- a cache only: never let it disturb tracking
        logger.debug("could not remember the CPU model", exc_info=True)


def _start_knowing_the_cpu(tracker: Any) -> None:
    """``tracker.start()``, reusing the CPU model an earlier process on this machine detected
    (:func:`_prime_cpu_model`), or remembering the one this start detects for the next."""
    primed = _prime_cpu_model()
    tracker.start()
    if not primed:
        _remember_cpu_model()


def _start_in_background(tracker: Any) -> None:
    """:func:`_start_knowing_the_cpu` on a short-lived low-priority thread (see
    :func:`_lower_priority`); waits for it."""

    def start() -> None:
        _lower_priority()
        _start_knowing_the_cpu(tracker)

    thread = threading.Thread(target=start, name="carbonoffset-tracker-start", daemon=True)
    thread.start()
    thread.join()


def _hardware_key(tracker_kwargs: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in tracker_kwargs.items() if k in _HARDWARE_ARGS))


def _quiet_codecarbon(kwargs: dict[str, Any]) -> None:
    # CodeCarbon applies ``log_level`` only after its constructor has logged "offline tracker
    # init" and "Multiple instances ... allowed": set its logger's level first, as it would.
    level = kwargs.get("log_level", "error")
    logging.getLogger("codecarbon").setLevel(level.upper() if isinstance(level, str) else level)


def _hardware_ready(tracker_kwargs: dict[str, Any]) -> bool:
    with _warm_lock:
        event = _warm.get(_hardware_key(tracker_kwargs))
    return event is not None and event.is_set()


def _mark_ready(tracker_kwargs: dict[str, Any]) -> None:
    with _warm_lock:
        _warm.setdefault(_hardware_key(tracker_kwargs), threading.Event()).set()


def warm_up_codecarbon(**tracker_kwargs: Any) -> threading.Event:
    """Run CodeCarbon's one-time hardware detection now, on a background thread.

    The first tracker of a process spends 1-2 s in ``start()`` detecting the
    hardware (py-cpuinfo runs in a subprocess); CodeCarbon caches the result
    for the process. This runs that detection early, with a throwaway offline
    tracker (no output, no network), so that later runs start at once. Called
    when a framework callback is constructed; calling it again is free.

    Args:
        **tracker_kwargs: the CodeCarbon arguments the real tracker will use
            (only the hardware-selecting ones matter: ``tracking_mode``,
            ``gpu_ids``, ``force_cpu_power``, ...).

    Until the detection is done, a fork of this process waits for it (at most
    :data:`FORK_WAIT_S`): a child forked while it holds a lock would hang on
    its first tracker start.

    Returns:
        An event set once the detection is done (or has failed: the real
        tracker then tries again and reports the error).
    """
    key = _hardware_key(tracker_kwargs)
    with _warm_lock:
        event = _warm.get(key)
        if event is not None:
            return event
        event = _warm[key] = threading.Event()
    _track_background_start(event)
    thread = threading.Thread(
        target=_warm_up, args=(tracker_kwargs, event), name="carbonoffset-warm-up", daemon=True
    )
    thread.start()
    return event


def _warm_up(tracker_kwargs: dict[str, Any], event: threading.Event) -> None:
    try:
        from codecarbon import OfflineEmissionsTracker  # at normal priority: start() may wait for it

        _lower_priority()  # the detection subprocess yields to training
        _quiet_codecarbon(tracker_kwargs)
        hardware = {k: v for k, v in tracker_kwargs.items() if k in _HARDWARE_ARGS}
        tracker = OfflineEmissionsTracker(
            country_iso_code="FRA",
            output_methods=[],
            log_level=tracker_kwargs.get("log_level", "error"),
            measure_power_secs=3600,
            **hardware,
        )
        _start_knowing_the_cpu(tracker)
        tracker.stop()  # also loads the emissions data a first flush() would (~0.1 s)
    except Exception:  # noqa: BLE001 -- the real tracker reports problems
        logger.debug("CodeCarbon warm-up failed", exc_info=True)
    finally:
        _background_start_done(event)


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
      CPU priority, see :data:`BACKGROUND_NICE`) and ``start()`` returns at
      once; :attr:`tracker` is set once built. Until the tracker runs,
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
      :func:`warm_up_codecarbon` (called when a framework callback is built)
      runs the detection early, so the gap is often zero or short.
    * While a tracker starts on the background thread, a fork of the process
      waits for it (at most :data:`FORK_WAIT_S`), so that the child does not
      inherit a lock held by that thread.
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
        _quiet_codecarbon(kwargs)
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
            self._handler = _TotalsHandler()
            self._gap = None
            self._cached = None
            self._flush_failed = False
            self.late_start_s = 0.0
            self._halt = threading.Event()
            self._started = threading.Event()
            background = not _hardware_ready(self.tracker_kwargs)
            self._read_flushes = not background
            tracker = None
            settled = threading.Event()  # set once the background start and its first flush are done
            if background:
                _track_background_start(settled)
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
                _start_in_background(tracker)
            except Exception as exc:  # noqa: BLE001 -- CodeCarbon swallows most errors itself
                logger.warning("emissions tracking failed to start (%s); training continues", exc)
            started.set()
            _mark_ready(self.tracker_kwargs)
            # the process's first flush also loads CodeCarbon's emissions data (~0.1 s, imports):
            # do it now, here, not in read() on the training thread, and before forks may go on
            with self._lock:
                if self.tracker is tracker:
                    self._flush_locked()
            _background_start_done(settled)
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
            power_w = last.energy_kwh * 3.6e6 / handler.duration_s
        energy_kwh = power_w * gap_s / 3.6e6
        intensity = last.emissions_kg / last.energy_kwh if last.energy_kwh > 0 else 0.0
        return Measurement.estimate(energy_kwh * intensity, energy_kwh)

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
        return handler.last.energy_kwh * 3.6e6 / handler.duration_s if handler.duration_s > 0 else 0.0

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
        if tracker is not None and self._started.is_set():
            tracker.stop()
            self._update_locked(final=True)
            handler = self._handler
            if ended is not None and handler.count and handler.at - handler.duration_s >= ended > self._t0:
                self._gap = self._estimate_gap(handler, ended - self._t0)
                self.late_start_s = ended - self._t0
                self._cached = self._gap  # the tracker measured only time after the run
        return self._cached if self._cached is not None else Measurement()
