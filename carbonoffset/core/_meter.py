"""The measuring process itself (the child side of :mod:`carbonoffset.core.meter`).

``python -m carbonoffset.core._meter [TRACKER_KWARGS_JSON]`` runs a real
:class:`~carbonoffset.core.sources.CodeCarbonSource` for each run the parent starts, and answers
in the JSON-lines protocol described in :mod:`carbonoffset.core.meter` on its standard output (what
CodeCarbon prints goes to standard error). Imported only in that process: the training process
never imports this module, nor CodeCarbon.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import IO, Any

from carbonoffset.core import estimates
from carbonoffset.core.sources import CodeCarbonSource


def _tracking_mode(tracker_kwargs: dict[str, Any]) -> str:
    mode = tracker_kwargs.get("tracking_mode")
    if mode is None:
        from codecarbon.core.config import get_hierarchical_config

        mode = get_hierarchical_config().get(  # type: ignore[no-untyped-call]
            "tracking_mode", "machine"
        )
    return str(mode)


def _remember(source: CodeCarbonSource, country_iso_code: str | None, kwargs: dict[str, Any]) -> None:
    """Keep the average power CodeCarbon measured in the run and its intensity for the next runs'
    estimates (:func:`estimates.remember`), when it measured at least
    :attr:`CodeCarbonSource.GAP_POWER_MIN_S` (a shorter run's power is a single reading)."""
    final = source.read()  # the final figures (cached by stop()); their intensity is CodeCarbon's
    if source.coverage() is None or final.energy_kwh <= 0 or source.measured_s < source.GAP_POWER_MIN_S:
        return
    by_load = source.cpu_power_from_load and source.mean_cpu_load is not None
    estimates.remember(
        estimates.settings_key(country_iso_code, kwargs),
        power_w=source.average_power_w,
        kg_per_kwh=final.emissions_kg / final.energy_kwh,
        cpu_w=source.average_cpu_power_w if by_load else None,
        cpu_load=source.mean_cpu_load if by_load else None,
    )


def _serve(inbox: queue.Queue[str | None], send: Any) -> None:
    """Run trackers as the parent asks until its input ends."""
    source: CodeCarbonSource | None = None
    message_country: str | None = None
    kwargs: dict[str, Any] = {}
    next_at = float("inf")
    while True:
        try:
            line = inbox.get(timeout=max(0.0, next_at - time.monotonic()) if source else None)
        except queue.Empty:
            line = ""
        if line is None:  # the parent closed our input (it stopped, exited or died)
            if source is not None:
                source.stop()
            return
        if source is not None and time.monotonic() >= next_at:
            send("totals", source)
            next_at = time.monotonic() + source.refresh_s
        if not line:
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        op = message.get("op")
        if op == "start":
            if source is not None:
                source.stop()
                source = None
            kwargs = dict(message.get("tracker_kwargs") or {})
            if _tracking_mode(kwargs) == "process":
                send("refused", None, reason="tracking_mode 'process' would measure the measuring process")
                continue
            message_country = message.get("country_iso_code")
            source = CodeCarbonSource(
                message_country, refresh_s=float(message.get("refresh_s", 1.0)), **kwargs
            )
            sent = float(message.get("sent", time.monotonic()))  # the parent's clock: system-wide
            source.start(started_ago_s=max(0.0, time.monotonic() - sent))
            next_at = time.monotonic() + min(source.refresh_s, 0.2)  # a first reading soon
        elif op == "stop":
            # stops it: the exact final figures (of the run up to when the stop was sent)
            send("stopped", source, ended=float(message.get("sent", time.monotonic())))
            if source is not None:
                _remember(source, message_country, kwargs)
            source = None


def main(argv: list[str]) -> int:
    """The measuring process: ``python -m carbonoffset.core._meter [TRACKER_KWARGS_JSON]``.

    Args:
        argv: ``sys.argv``; ``argv[1]``, when given, the tracker arguments as a JSON object
            (those the parent's :class:`~carbonoffset.core.meter.MeterSource` was given), used for
            the hardware warm-up before the first run.

    Returns:
        The exit status, 0 (the parent closed this process's input).
    """
    # The parent stops this process through its pipe, and it ends when the pipe closes. Ctrl-C in a
    # terminal, or a Jupyter kernel shutting down, sends SIGINT to the whole process group: ignore it
    # here (the parent handles it: stopping the run sends the final figures), so no KeyboardInterrupt
    # traceback is printed (the meter has its own session on POSIX; this covers the rest).
    # SIGTERM too: SLURM (scancel, the time limit) and systemd signal every process of a job's
    # cgroup, whatever its session; the training process ends the run (the final figures) and this
    # process then sees the end of its input, as after a kill -9 of the training process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    protocol: IO[str] = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    try:
        os.dup2(2, 1)  # anything CodeCarbon prints goes to stderr, never into the protocol
    except OSError:  # no stderr (pythonw)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    # Normal priority: a lower one only postpones the ~0.9 s of CPU the start needs (the training
    # loses the same CPU either way) and, on a machine the training keeps busy, starts the
    # tracker at the very end of the run, its energy all estimated. CodeCarbon's CPU-model
    # detection (1-2 s, once per machine) still runs at a lower priority
    # (codecarbon_startup.lower_thread_priority).
    logging.basicConfig(level=logging.WARNING, format="carbonoffset meter: %(levelname)s %(message)s")
    send_lock = threading.Lock()

    def send(event: str, source: CodeCarbonSource | None, **extra: Any) -> None:
        ended = float(extra.pop("ended", time.monotonic()))
        message: dict[str, Any] = {"event": event, **extra}
        if source is not None:
            ended_ago_s = max(0.0, time.monotonic() - ended)
            figures = source.read() if event == "totals" else source.stop(ended_ago_s=ended_ago_s)
            coverage = source.coverage()
            if coverage is None:  # nothing measured: a zero would claim the run so far was covered
                if event == "stopped":
                    send("refused", None, reason="CodeCarbon gave no figures for the run")
                return
            measured_at, unmeasured_s = coverage
            message.update(
                emissions_kg=figures.emissions_kg,
                energy_kwh=figures.energy_kwh,
                at=time.monotonic() - (time.perf_counter() - measured_at),
                unmeasured_s=unmeasured_s,
                late_start_s=source.late_start_s,
                late_start_kg=source.late_start_estimate.emissions_kg,
                late_start_kwh=source.late_start_estimate.energy_kwh,
                power_w=source.power_w,
            )
            if event == "stopped":
                message["details"] = dict(figures.details)  # hardware, location (Measurement.details)
        elif event == "stopped":
            message.update(emissions_kg=0.0, energy_kwh=0.0, at=time.monotonic())
        try:
            with send_lock:
                protocol.write(json.dumps(message) + "\n")
        except (OSError, ValueError):  # the parent is gone
            os._exit(0)

    inbox: queue.Queue[str | None] = queue.Queue()

    def read_input() -> None:
        for line in sys.stdin:
            inbox.put(line)
        inbox.put(None)

    threading.Thread(target=read_input, name="meter-input", daemon=True).start()
    tracker_kwargs = json.loads(argv[1]) if len(argv) > 1 else {}
    import codecarbon  # noqa: F401 -- here, not concurrently on the warm-up thread and in _serve

    from carbonoffset.core.codecarbon_startup import warm_up_codecarbon

    warm_up_codecarbon(**tracker_kwargs)  # before the first run asks
    _serve(inbox, send)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
