"""What makes CodeCarbon's first tracker of a process start fast and safely (used by
:class:`~carbonoffset.core.sources.CodeCarbonSource`).

* **Warm-up**: :func:`warm_up_codecarbon` runs CodeCarbon's one-time hardware detection early,
  on a background thread at a lower CPU priority (:data:`BACKGROUND_NICE`).
* **Forks**: while such a start runs on a background thread, a fork of the process waits for it
  (at most :data:`FORK_WAIT_S`, fork hooks registered with ``os.register_at_fork``), so that the
  child does not inherit a lock that thread holds.
* **CPU-model cache**: the CPU model CodeCarbon detected (1-2 s of py-cpuinfo) is kept per
  machine in :data:`CPU_MODEL_CACHE` and handed to CodeCarbon by later processes, by replacing
  ``cpuinfo.get_cpu_info`` process-wide for the microseconds of the call.

CodeCarbon itself is imported only on the threads that start trackers, never at import.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from carbonoffset.core.user_cache import JsonCacheFile, machine_key

logger = logging.getLogger(__name__)


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


def track_background_start(event: threading.Event) -> None:
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


def background_start_done(event: threading.Event) -> None:
    """Set ``event`` (given to :func:`track_background_start`): forks no longer wait for it."""
    with _warm_lock:
        event.set()
        _unfinished.discard(event)


def unfinished_background_starts() -> int:
    """How many CodeCarbon starts on background threads a fork of this process would wait for now
    (0 in a forked child: the threads running them are the parent's)."""
    with _warm_lock:
        return len(_unfinished)


#: How much lower (Linux ``nice`` steps) CodeCarbon's first hardware detection runs than training.
BACKGROUND_NICE = 10


def lower_thread_priority() -> None:
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
_cpu_models = JsonCacheFile(CPU_MODEL_CACHE)
_prime_lock = threading.Lock()


def cpu_model_cache_path() -> Path:
    """Where :data:`CPU_MODEL_CACHE` is: ``<user cache folder>/carbonoffset/cpu-model.json``."""
    return _cpu_models.path


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
    brand = _cpu_models.read().get(machine_key())  # None: no cache yet, or unreadable
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
        known, key = _cpu_models.read(), machine_key()  # missing or unreadable: a new one
        if known.get(key) == brand:
            return
        known[key] = brand
        _cpu_models.write(known)
    except Exception:  # noqa: BLE001 -- a cache only: never let it disturb tracking
        logger.debug("could not remember the CPU model", exc_info=True)


def _start_knowing_the_cpu(tracker: Any) -> None:
    """``tracker.start()``, reusing the CPU model an earlier process on this machine detected
    (:func:`_prime_cpu_model`), or remembering the one this start detects for the next."""
    primed = _prime_cpu_model()
    tracker.start()
    if not primed:
        _remember_cpu_model()


def start_in_background(tracker: Any) -> None:
    """:func:`_start_knowing_the_cpu` on a short-lived low-priority thread (see
    :func:`lower_thread_priority`); waits for it."""

    def start() -> None:
        lower_thread_priority()
        _start_knowing_the_cpu(tracker)

    thread = threading.Thread(target=start, name="carbonoffset-tracker-start", daemon=True)
    thread.start()
    thread.join()


def _hardware_key(tracker_kwargs: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in tracker_kwargs.items() if k in _HARDWARE_ARGS))


def quiet_codecarbon(kwargs: dict[str, Any]) -> None:
    """Set the ``codecarbon`` logger to the ``log_level`` of these tracker arguments (default
    ``"error"``) before a tracker is built."""
    # CodeCarbon applies ``log_level`` only after its constructor has logged "offline tracker
    # init" and "Multiple instances ... allowed": set its logger's level first, as it would.
    level = kwargs.get("log_level", "error")
    logging.getLogger("codecarbon").setLevel(level.upper() if isinstance(level, str) else level)


def hardware_ready(tracker_kwargs: dict[str, Any]) -> bool:
    """Whether CodeCarbon's hardware detection for these tracker arguments is done in this
    process (a tracker then starts in about 5 ms)."""
    with _warm_lock:
        event = _warm.get(_hardware_key(tracker_kwargs))
    return event is not None and event.is_set()


def mark_hardware_ready(tracker_kwargs: dict[str, Any]) -> None:
    """Record that a tracker with these arguments started: see :func:`hardware_ready`."""
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
    track_background_start(event)
    thread = threading.Thread(
        target=_warm_up, args=(tracker_kwargs, event), name="carbonoffset-warm-up", daemon=True
    )
    thread.start()
    return event


def _warm_up(tracker_kwargs: dict[str, Any], event: threading.Event) -> None:
    try:
        from codecarbon import OfflineEmissionsTracker  # at normal priority: start() may wait for it

        lower_thread_priority()  # the detection subprocess yields to training
        quiet_codecarbon(tracker_kwargs)
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
        background_start_done(event)
