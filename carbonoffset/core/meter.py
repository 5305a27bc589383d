"""CodeCarbon in a measuring subprocess: the default emissions source of training sessions.

Inside the training process CodeCarbon costs about 0.75 s of CPU per process
(its imports, hardware set-up and emissions data) and a flush every second,
all of it competing with the training for the GIL. :class:`MeterSource` runs
a real :class:`~carbonoffset.core.sources.CodeCarbonSource` in a child
process instead (``python -m carbonoffset.core._meter``), and the training
process only reads one line of JSON per ``refresh_s``. What is measured is the
same: CodeCarbon's default ``tracking_mode="machine"`` measures the whole
machine (CPU, GPU, RAM) from any process on it.

This module is the parent's side (the training process); the measuring process's side is
:mod:`carbonoffset.core._meter`.

The protocol is JSON lines. Parent to meter: ``{"op": "start", ...}`` and
``{"op": "stop"}``; end of input makes the meter stop its tracker and exit, so
it never outlives the process that started it. Meter to parent:
``{"event": "totals", ...}`` every ``refresh_s``, ``{"event": "stopped", ...}``
with the exact final figures (and their ``details``, see
:attr:`~carbonoffset.core.measurement.Measurement.details`), or ``{"event": "refused", "reason": ...}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carbonoffset.core import estimates
from carbonoffset.core.config import read_codecarbon_section
from carbonoffset.core.errors import ConfigurationError
from carbonoffset.core.estimates import PowerEstimate
from carbonoffset.core.measurement import Measurement
from carbonoffset.core.sources import CodeCarbonSource
from carbonoffset.core.units import J_PER_KWH

logger = logging.getLogger(__name__)

#: Longest :meth:`MeterSource.stop` waits for the measuring process's final figures, s.
STOP_WAIT_S = 30.0


class _Meter:
    """One measuring process and the thread that reads what it sends."""

    def __init__(self, tracker_kwargs: dict[str, Any]) -> None:
        self.tracker_kwargs = dict(tracker_kwargs)
        self.context = _context()
        self.owner_pid = os.getpid()  # a forked copy of this object must not use the pipes
        self.listener: Any = None  # called with every message, on the reader thread
        self.alive = True
        env = dict(os.environ)
        package_root = Path(__file__).resolve().parents[2]
        if not _in_site_packages(package_root):
            # a source checkout on sys.path only: the meter must import this very package (an
            # installed one is found anyway, and site-packages must not come before the stdlib)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root), env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "carbonoffset.core._meter", json.dumps(self.tracker_kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
            # its own session (POSIX): Ctrl-C in a terminal or a notebook, and a SIGINT/SIGTERM sent to
            # the process group (Jupyter, SLURM), reach the training process only; the meter still
            # ends when the training process does (end of its input)
            start_new_session=os.name == "posix",
        )
        self._send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, name="carbonoffset-meter", daemon=True)
        self.thread.start()
        _meters.add(self)

    @property
    def usable(self) -> bool:
        return self.alive and self.owner_pid == os.getpid()

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            for line in stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    self._tell(message)
        except (OSError, ValueError):  # closed under us (fork, exit)
            pass
        self.alive = False
        self._tell({"event": "gone"})
        if self.owner_pid == os.getpid():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.process.wait(STOP_WAIT_S)  # reap it (no zombie)

    def _tell(self, message: dict[str, Any]) -> None:
        listener = self.listener
        if listener is not None:
            try:
                listener(message)
            except Exception:  # noqa: BLE001 -- the reader must keep reading
                logger.debug("meter message %r not handled", message, exc_info=True)

    def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False when the meter is gone (or belongs to the parent of a fork)."""
        if not self.usable:
            return False
        stdin = self.process.stdin
        try:
            with self._send_lock:
                assert stdin is not None
                stdin.write(json.dumps(message) + "\n")
                stdin.flush()
            return True
        except (OSError, ValueError):
            self.alive = False
            return False

    def close(self) -> None:
        """End the meter: it sees the end of its input, stops any tracker and exits."""
        self.alive = False
        self.listener = None
        if self.owner_pid == os.getpid() and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()

    def kill(self) -> None:
        """End a meter that may not be answering: close its input and kill it."""
        self.close()
        if self.owner_pid == os.getpid():
            with contextlib.suppress(OSError):
                self.process.kill()

    def forget_in_child(self) -> None:
        """In a forked child: drop this process's copies of the parent's pipes."""
        self.alive = False
        self.listener = None
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                # not stream.close(): the parent's reader thread may have held the stream's lock at
                # the fork, forever here; the file descriptor itself is pointed at /dev/null
                with contextlib.suppress(OSError, ValueError):
                    null = os.open(os.devnull, os.O_RDWR)
                    os.dup2(null, stream.fileno())
                    os.close(null)


def _context() -> tuple[str, ...]:
    """What a meter reads CodeCarbon's configuration from besides its arguments: the working
    folder (``./.codecarbon.config``), the home folder and ``CODECARBON_*`` variables. A meter is
    only reused where these are unchanged."""
    env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("CODECARBON_"))
    return (os.getcwd(), os.path.expanduser("~"), *env)


_pool_lock = threading.Lock()
_idle: list[_Meter] = []  # started meters waiting for a run (guarded by _pool_lock)
_meters: weakref.WeakSet[_Meter] = weakref.WeakSet()
_sources: weakref.WeakSet[MeterSource] = weakref.WeakSet()
_fork_hook: list[bool] = []


def _forget_meters() -> None:
    """``os.register_at_fork`` "after in child" hook: the meters belong to the parent, and a lock
    held by one of its threads at the fork would never be released here."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _idle.clear()
    for meter in list(_meters):
        meter.forget_in_child()
    for source in list(_sources):
        source._lock = threading.Lock()  # noqa: SLF001


def _in_site_packages(path: Path) -> bool:
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return any(str(path) == str(Path(folder).resolve()) for folder in folders)


def _in_process_reason(tracker_kwargs: dict[str, Any]) -> str | None:
    """Why a measuring process would not work for these settings, or None."""
    if getattr(sys, "frozen", False) or not sys.executable:
        return "a frozen application cannot start a Python measuring process"
    mode = tracker_kwargs.get("tracking_mode") or _configured_tracking_mode()
    if str(mode).strip().lower() == "process":
        return "tracking_mode 'process' measures the process CodeCarbon runs in"
    return None


def _configured_tracking_mode() -> str | None:
    """CodeCarbon's ``tracking_mode`` setting: ``CODECARBON_TRACKING_MODE`` > ``./.codecarbon.config``
    > ``~/.codecarbon.config`` (CodeCarbon's order), read without importing CodeCarbon."""
    value = os.environ.get("CODECARBON_TRACKING_MODE")
    if value:
        return value
    for folder in (Path.cwd(), Path.home()):
        try:
            mode = read_codecarbon_section(folder / ".codecarbon.config").get("tracking_mode")
        except ConfigurationError:
            continue  # reported when the settings are read; CodeCarbon decides
        if mode:
            return mode
    return None


def _take(tracker_kwargs: dict[str, Any]) -> _Meter:
    """An idle meter started for these tracker arguments, or a new one."""
    with _pool_lock:
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_forget_meters)
            _fork_hook.append(True)
        for meter in list(_idle):
            _idle.remove(meter)
            if _fits(meter, tracker_kwargs):
                return meter
            meter.close()
    return _Meter(tracker_kwargs)


def _fits(meter: _Meter, tracker_kwargs: dict[str, Any]) -> bool:
    return meter.usable and meter.tracker_kwargs == tracker_kwargs and meter.context == _context()


def _give_back(meter: _Meter) -> None:
    meter.listener = None
    if not meter.usable:
        meter.close()
        return
    with _pool_lock:
        _idle.append(meter)


def warm_up_meter(**tracker_kwargs: Any) -> None:
    """Start a measuring process now, so that a later :class:`MeterSource` run finds it ready.

    The process imports CodeCarbon and runs its one-time hardware set-up (about
    0.9 s of CPU; CodeCarbon's CPU-model detection, 1-2 s more on a machine's
    first run, at a lower priority) while the training is still being set up.
    Costs the calling thread only the process start (a few ms); calling it
    again while a started process is idle is free. Called when a framework
    callback is built.

    Args:
        **tracker_kwargs: the CodeCarbon arguments the source will pass (JSON values).

    Raises:
        OSError: the process could not be started (callers fall back to measuring in process).
    """
    if _in_process_reason(tracker_kwargs) is not None:
        return
    with _pool_lock:
        if any(_fits(m, tracker_kwargs) for m in _idle):
            return
    meter = _take(tracker_kwargs)
    _give_back(meter)


def idle_meter_pids() -> list[int]:
    """Process ids of the started measuring processes waiting for a run that were started in the
    current context (working folder, home folder and ``CODECARBON_*`` variables: where a meter
    reads CodeCarbon's settings from), whatever their tracker arguments.

    A later :class:`MeterSource` run with the same tracker arguments takes one of them instead of
    starting a process (see :func:`warm_up_meter`).
    """
    context = _context()
    with _pool_lock:
        return [meter.process.pid for meter in _idle if meter.context == context]


class MeterSource:
    """Measures with CodeCarbon in a separate measuring process (the default for training sessions).

    Same figures as :class:`~carbonoffset.core.sources.CodeCarbonSource` (which
    runs in that process, a new tracker for every ``start()``), without its cost
    in the training process: no CodeCarbon import, no hardware detection, no
    flushes there. ``start()`` only sends a message (a few ms when it must
    start the process); ``stop()`` waits for the exact final figures.

    ``read()`` (microseconds) returns the figures the meter sent last, plus
    an estimate of the time they do not cover yet: the run's first seconds,
    before the meter's first reading (1-5 s into a run, more on a busy
    machine), and the seconds since its last reading. That time is estimated
    at the power CodeCarbon measured last in this run, and before its first
    reading at the power last measured on this machine with these settings,
    or CodeCarbon's defaults for it (:mod:`carbonoffset.core.estimates`). So
    the figures are above zero from the run's first moment and never go
    down; the estimated part is :attr:`Measurement.estimated_kg` (it also
    includes CodeCarbon's late-start estimate, see :attr:`late_start_s`).
    ``stop()`` returns CodeCarbon's own final figures.

    Args:
        country_iso_code: as for :class:`~carbonoffset.core.sources.CodeCarbonSource`.
        refresh_s: seconds between two readings the meter sends (> 0, default 1.0).
        **tracker_kwargs: as for ``CodeCarbonSource``, but JSON values only (numbers,
            strings, lists): they are sent to the measuring process.

    The source measures in the training process (a ``CodeCarbonSource``) from
    the start when a measuring process would measure the wrong thing or cannot
    work: ``tracking_mode="process"`` (here, in ``CODECARBON_TRACKING_MODE`` or
    in a ``.codecarbon.config``), which measures the process it runs in, and a
    frozen application (PyInstaller and the like), whose ``sys.executable`` is
    the application itself.

    Failures never lose a run's emissions. When the meter cannot be started,
    refuses or dies, or does not give the final figures within
    :data:`STOP_WAIT_S` (it is then killed), an in-process
    :class:`~carbonoffset.core.sources.CodeCarbonSource` takes over on top of
    the meter's last complete figures, and the time they do not cover is
    estimated like a late start (:attr:`late_start_s`), at the power that
    tracker measures.

    Raises:
        ValueError: ``refresh_s`` is not a number > 0, or a tracker argument is not JSON.
    """

    def __init__(
        self, country_iso_code: str | None = None, *, refresh_s: float = 1.0, **tracker_kwargs: Any
    ) -> None:
        if not (isinstance(refresh_s, (int, float)) and refresh_s > 0):
            raise ValueError(f"refresh_s must be a number of seconds > 0 (got {refresh_s!r})")
        try:
            json.dumps(tracker_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"tracker arguments for the measuring process must be JSON values ({exc}); "
                "use CodeCarbonSource to pass other objects"
            ) from None
        self.country_iso_code = country_iso_code
        self.refresh_s = float(refresh_s)
        self.tracker_kwargs = tracker_kwargs
        #: seconds of the run no tracker measured (estimated, see the class notes)
        self.late_start_s = 0.0
        #: the figures estimated for that time (included in every figure returned)
        self.late_start_estimate = Measurement()
        self._lock = threading.Lock()
        self._meter: _Meter | None = None
        self._fallback: CodeCarbonSource | None = None
        self._base = Measurement()  # the meter's figures, when a fallback took over
        self._cached = Measurement()
        self._covered_to = 0.0  # perf_counter(): the meter's figures cover the run up to here
        self._t0 = 0.0
        self._busy0: tuple[float, float] | None = None
        self._run = 0  # messages from an earlier run are ignored
        # (figures, covered up to, CodeCarbon's power W): what read() extrapolates, replaced at once
        self._snapshot: tuple[Measurement, float, float] = (Measurement(), 0.0, 0.0)
        self._prior: PowerEstimate | None = None
        self._returned = Measurement()  # read() never returns less than it returned before
        self._read_lock = threading.Lock()
        self._stopping = False
        self._final: Measurement | None = None
        self._answered = threading.Event()
        _sources.add(self)

    @property
    def measuring(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (in the measuring process or, after a
        fall-back, in this one)."""
        return self._meter is not None or self._fallback is not None

    @property
    def meter_pid(self) -> int | None:
        """Process id of the measuring process measuring the current run; ``None`` between runs
        and while the run is measured in this process (:attr:`measuring_in_process`)."""
        meter = self._meter
        return meter.process.pid if meter is not None else None

    @property
    def measuring_in_process(self) -> bool:
        """True while the current run is measured in this process by a ``CodeCarbonSource``
        (from the start, or after a fall-back: see the class notes); False while the measuring
        process measures it, and between runs."""
        return self._fallback is not None

    def receiver(self) -> Callable[[dict[str, Any]], None]:
        """The function the measuring process's messages for the current run are handed to (on
        the reader thread), one JSON object of the protocol (see the module notes) a call.

        It is bound to the run current when it is taken: after the next :meth:`start`, what it
        is given is ignored, so a late reading never leaks into another run.
        """
        run = self._run
        return lambda message: self._on_message(run, message)

    # ----------------------------------------------------------------- protocol
    def start(self) -> None:
        """Begin a new run in the measuring process (starting one when none is idle)."""
        self.stop()
        with self._lock:
            self._run += 1
            self._t0 = self._covered_to = time.perf_counter()
            self._busy0 = estimates.busy_times()  # the machine's CPU load of the run, for the prior
            self._cached = self._base = self.late_start_estimate = self._returned = Measurement()
            self._snapshot = (Measurement(), self._t0, 0.0)
            self.late_start_s = 0.0
            self._fallback = None
            self._stopping = False
            self._final = None
            self._answered = threading.Event()
            self._prior = None
            threading.Thread(
                target=self._find_prior, args=(self._run,), name="carbonoffset-estimate", daemon=True
            ).start()
            reason = _in_process_reason(self.tracker_kwargs)
            if reason is not None:
                self._fall_back_locked(reason, quiet=True)
                return
            try:
                meter = _take(self.tracker_kwargs)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                self._fall_back_locked(f"the measuring process could not be started ({exc})")
                return
            self._meter = meter
            meter.listener = self.receiver()
            sent = meter.send(
                {
                    "op": "start",
                    "sent": time.monotonic(),
                    "country_iso_code": self.country_iso_code,
                    "refresh_s": self.refresh_s,
                    "tracker_kwargs": self.tracker_kwargs,
                }
            )
            if not sent:
                self._fall_back_locked("the measuring process ended")

    def _find_prior(self, run: int) -> None:
        """On a short-lived thread (a file read, a few ms the first time in a process)."""
        found = estimates.prior(self.country_iso_code, self.tracker_kwargs)
        if run == self._run:
            self._prior = found

    def _on_message(self, run: int, message: dict[str, Any]) -> None:
        """On the meter's reader thread."""
        event = message.get("event")
        with self._lock:
            if run != self._run or self._fallback is not None:
                return
            if event in ("totals", "stopped"):
                figures = Measurement(
                    float(message["emissions_kg"]),
                    float(message["energy_kwh"]),
                    float(message.get("late_start_kg", 0.0)),
                    float(message.get("late_start_kwh", 0.0)),
                    details=message.get("details") or {},
                )
                self._cached = figures
                # the figures cover the run up to when CodeCarbon measured them, except a late
                # start not estimated yet (its seconds are "unmeasured_s")
                age_s = max(0.0, time.monotonic() - float(message["at"]))
                self._covered_to = max(
                    self._t0, time.perf_counter() - age_s - float(message.get("unmeasured_s", 0.0))
                )
                self.late_start_s = float(message.get("late_start_s", 0.0))
                self.late_start_estimate = Measurement.estimate(
                    float(message.get("late_start_kg", 0.0)), float(message.get("late_start_kwh", 0.0))
                )
                self._snapshot = (figures, self._covered_to, float(message.get("power_w", 0.0)))
                if event == "stopped":
                    self._final = figures
                    self._answered.set()
            elif event in ("refused", "gone"):
                if self._stopping:
                    self._answered.set()  # stop() goes on in process
                elif self._meter is not None:
                    self._fall_back_locked(str(message.get("reason") or "the measuring process ended"))

    def _fall_back_locked(self, reason: str, *, quiet: bool = False) -> None:
        """Measure in this process from now on, on top of the meter's last figures; the part of
        the run they do not cover is estimated like a late start."""
        meter, self._meter = self._meter, None
        if meter is not None:
            meter.kill()
        (logger.info if quiet else logger.warning)(
            "carbonoffset measures in the training process: %s", reason
        )
        self._base = self._cached
        fallback = CodeCarbonSource(self.country_iso_code, refresh_s=self.refresh_s, **self.tracker_kwargs)
        try:
            fallback.start(started_ago_s=time.perf_counter() - self._covered_to)
        except Exception as exc:  # noqa: BLE001 -- e.g. arguments CodeCarbon refuses
            logger.warning("emissions tracking failed to start (%s); training continues", exc)
        self._fallback = fallback

    def read(self) -> Measurement:
        """Cumulative figures since :meth:`start`: the meter's last reading plus the estimate of the
        time it does not cover (see the class notes); > 0 once any time passed, never decreasing."""
        fallback = self._fallback
        if fallback is not None:
            figures = self._base + fallback.read()
            coverage = fallback.coverage()
            covered_to = self._covered_to if coverage is None else coverage[0] - coverage[1]
            power_w = fallback.power_w
        else:
            figures, covered_to, power_w = self._snapshot
        return self._live(figures, covered_to, power_w)

    #: CPU seconds (all cores) the machine must have run since :meth:`start` before its load is
    #: used to move a remembered power to it (:meth:`estimates.PowerEstimate.at_load`): ``/proc/stat``
    #: counts in 10 ms ticks, so a shorter window says little.
    LOAD_WINDOW_CPU_S = 0.5

    def _prior_power_w(self, prior: estimates.PowerEstimate) -> float:
        """The prior's power at the machine's CPU load since :meth:`start` (before the first reading)."""
        if prior.cpu_w is None:
            return prior.power_w
        now = estimates.busy_times()
        start = self._busy0
        if now is None or start is None or now[1] - start[1] < self.LOAD_WINDOW_CPU_S:
            return prior.power_w
        return prior.at_load(estimates.load_between(start, now))

    def _live(self, figures: Measurement, covered_to: float, power_w: float) -> Measurement:
        prior = self._prior or estimates.FIRST_GUESS
        measured = figures.measured
        kg_per_kwh = (
            measured.emissions_kg / measured.energy_kwh if measured.energy_kwh > 0 else prior.kg_per_kwh
        )
        gap_s = max(0.0, time.perf_counter() - covered_to)
        gap_kwh = (power_w if power_w > 0 else self._prior_power_w(prior)) * gap_s / J_PER_KWH
        live = figures + Measurement.estimate(gap_kwh * kg_per_kwh, gap_kwh)
        with self._read_lock:
            last = self._returned
            if live.emissions_kg < last.emissions_kg or live.energy_kwh < last.energy_kwh:
                # the first reading came in below the estimate made before it: hold the figure
                kg, kwh = max(live.emissions_kg, last.emissions_kg), max(live.energy_kwh, last.energy_kwh)
                live = Measurement(kg, kwh, kg - measured.emissions_kg, kwh - measured.energy_kwh)
            self._returned = live
        return live

    def stop(self) -> Measurement:
        """Stop the run and return its exact final figures (see the class notes for failures)."""
        with self._lock:
            meter = self._meter
            if meter is None and self._fallback is None:
                return self._final if self._final is not None else self._cached
            if meter is not None and meter.owner_pid != os.getpid():
                # a forked copy of a run the parent measures: the parent stops it, not this process
                self._meter = None
                return self._cached
            self._stopping = True
            answered = self._answered
        if meter is not None and meter.send({"op": "stop", "sent": time.monotonic()}):
            answered.wait(STOP_WAIT_S)
        with self._lock:
            if self._meter is not None and self._final is not None:
                _give_back(self._meter)
                self._meter = None
                return self._final
            if self._fallback is None:  # no final figures: the rest of the run is measured here
                self._fall_back_locked("the measuring process did not give the run's final figures")
            fallback = self._fallback
        assert fallback is not None
        final = self._base + fallback.stop()
        with self._lock:
            self.late_start_s += fallback.late_start_s
            self.late_start_estimate += fallback.late_start_estimate
            self._fallback, self._final = None, final
        return final
