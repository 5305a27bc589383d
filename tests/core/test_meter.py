"""MeterSource: CodeCarbon measuring in a separate process (the default source of sessions).

Real CodeCarbon (offline, France) runs in a real measuring process; its
failures are real too: the process is killed, stopped (SIGSTOP), refused by a
CodeCarbon configuration, or cannot be started at all.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from _scripts import run_script

from carbonoffset.core import meter as meter_module
from carbonoffset.core.measurement import Measurement
from carbonoffset.core.meter import MeterSource, warm_up_meter

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and fork are POSIX")


def _busy(seconds: float) -> None:
    until = time.monotonic() + seconds
    x = 0
    while time.monotonic() < until:
        x += 1


def _first_reading(source: MeterSource, timeout_s: float = 60.0) -> Measurement:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reading = source.read()
        if reading.measured.energy_kwh > 0:  # CodeCarbon's own figures, not only the estimate
            return reading
        time.sleep(0.05)
    raise AssertionError("the measuring process sent no figures")


def _meter_pid(source: MeterSource) -> int:
    pid = source.meter_pid  # the process behind the run
    assert pid is not None
    return pid


def _gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


_DEFAULT_SESSION = textwrap.dedent(
    """
    import json, os, sys, time
    import psutil
    from carbonoffset.core import Ledger, MeterSource, OffsetSession

    session = OffsetSession(offset_ledger=sys.argv[1], country_iso_code="FRA", offset_api_key="test_SECRET_meter_key",
                            offset_environment="sandbox", auto_offset=False,
                            offset_api_url="http://127.0.0.1:9")  # the start-of-run key check stays local
    session.start()
    meter = session.source.meter_pid
    command = psutil.Process(meter).cmdline()
    until = time.monotonic() + 2.5
    x = 0
    while time.monotonic() < until:
        x += 1
    epoch = session.record_epoch(0)
    report = session.stop()
    session.close()
    with Ledger(sys.argv[1]) as ledger:
        (run,) = ledger.runs()
    print(json.dumps({
        "source": type(session.source).__name__, "codecarbon_imported": "codecarbon" in sys.modules,
        "meter_pid": meter, "own_pid": os.getpid(), "command": command, "epoch_kg": epoch.emissions_kg,
        "epoch_estimated_kg": epoch.estimated_kg,
        "final_kg": report.emissions_kg, "final_kwh": report.energy_kwh, "ledger_kg": run.emissions_kg,
        "ledger_kwh": run.energy_kwh,
    }))
    """
)


def test_a_default_session_measures_in_a_measuring_process_and_imports_no_codecarbon(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    (out,) = run_script(_DEFAULT_SESSION.replace("sys.argv[1]", repr(str(ledger))))
    assert out["source"] == "MeterSource"
    assert out["codecarbon_imported"] is False  # all of CodeCarbon's cost is in the other process
    assert out["meter_pid"] != out["own_pid"]
    assert out["command"][1:3] == ["-m", "carbonoffset.core._meter"]
    assert not any("SECRET" in part for part in out["command"])  # the key never goes to the meter
    assert out["epoch_kg"] > 0  # from the first epoch, even before the meter's first reading
    # what was measured never exceeds the final figures; the rest is an estimate, labelled as one (how
    # close it comes depends on the load against the remembered run's: the Performance page's tolerance)
    assert out["epoch_kg"] - out["epoch_estimated_kg"] <= out["final_kg"] * (1 + 1e-9)
    assert 0 <= out["epoch_estimated_kg"] <= out["epoch_kg"]
    assert out["final_kg"] < 1e-3  # seconds of CPU: micrograms
    assert out["ledger_kg"] == out["final_kg"] and out["ledger_kwh"] == out["final_kwh"] > 0
    assert _gone(out["meter_pid"])  # it ended with the process that started it


def test_the_measuring_process_imports_no_ledger_nor_offset_client() -> None:
    """What ``python -m carbonoffset.core._meter`` imports before CodeCarbon: its start-up competes
    with the training for the CPU, and the ledger (SQLAlchemy) and the offset client are not its work."""
    import subprocess

    code = (
        "import sys, carbonoffset.core._meter, carbonoffset.core.codecarbon_startup; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'sqlalchemy', 'makeimpact', 'psycopg'} "
        "or m.startswith(('carbonoffset.core.ledger', 'carbonoffset.core.offsetter', 'carbonoffset.core.session'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_consecutive_runs_reuse_one_warm_meter_and_start_from_zero() -> None:
    warm_up_meter()
    source = MeterSource("FRA", refresh_s=0.2)
    source.start()
    first_pid = _meter_pid(source)
    _first_reading(source)
    _busy(1.0)
    first = source.stop()
    assert first.energy_kwh > 0 and not source.measuring
    # the first run began while the meter was still starting: that time is estimated, not lost
    assert source.late_start_s > 0 and 0 < source.late_start_estimate.energy_kwh < first.energy_kwh

    source.start()
    assert _meter_pid(source) == first_pid  # the same, already warm, measuring process
    fresh = source.read()  # a new run starts from zero: only the estimate of its first moments
    assert fresh.measured == Measurement() and 0 < fresh.energy_kwh < first.energy_kwh / 10
    _first_reading(source)
    _busy(1.0)
    second = source.stop()
    assert second.energy_kwh > 0
    assert source.late_start_s < 0.5  # a warm meter starts its tracker at once (a line of JSON late)


def test_a_meter_killed_mid_run_is_replaced_in_process_and_nothing_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = MeterSource("FRA", refresh_s=0.2)
    source.start()
    before = _first_reading(source)
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        os.kill(_meter_pid(source), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not source.measuring_in_process and time.monotonic() < deadline:
            time.sleep(0.02)
        _busy(2.5)
        final = source.stop()
    assert any("measures in the training process:" in r.getMessage() for r in caplog.records)
    assert final.energy_kwh > before.energy_kwh and final.emissions_kg > before.emissions_kg
    # the time between the meter's last reading and the in-process tracker's start is estimated
    assert source.late_start_s > 0 and source.late_start_estimate.energy_kwh > 0
    # figures never went back: the replacement adds to what the meter had measured
    assert final.energy_kwh >= before.measured.energy_kwh + source.late_start_estimate.energy_kwh


@pytest.mark.parametrize("where", ["config file", "environment", "argument"])
def test_process_tracking_mode_is_measured_in_process_without_starting_a_meter(
    where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # tracking_mode=process measures the process CodeCarbon runs in: a meter would measure itself
    kwargs: dict[str, Any] = {}
    if where == "config file":
        Path(".codecarbon.config").write_text("[codecarbon]\ntracking_mode = process\n", encoding="utf-8")
    elif where == "environment":
        monkeypatch.setenv("CODECARBON_TRACKING_MODE", "process")
    else:
        kwargs["tracking_mode"] = "process"
    warm_up_meter(**kwargs)
    assert not meter_module.idle_meter_pids()  # none started here (this folder, home, CODECARBON_*)
    source = MeterSource("FRA", refresh_s=0.2, **kwargs)
    with caplog.at_level(logging.INFO, logger="carbonoffset"):
        source.start()
    assert source.meter_pid is None and source.measuring_in_process
    assert any("tracking_mode 'process'" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)  # a choice, not a failure
    _busy(1.0)
    assert source.stop().energy_kwh > 0


def test_a_meter_that_cannot_start_falls_back_to_measuring_in_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    source = MeterSource("FRA", refresh_s=0.2)
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        source.start()
    monkeypatch.undo()
    assert any("could not be started" in r.getMessage() for r in caplog.records)
    assert source.measuring
    _busy(1.0)
    assert source.stop().energy_kwh > 0


def test_a_meter_that_stops_answering_is_killed_and_the_run_completed_in_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(meter_module, "STOP_WAIT_S", 1.0)
    source = MeterSource("FRA", refresh_s=0.2)
    source.start()
    _first_reading(source)
    _busy(1.0)
    pid = _meter_pid(source)
    os.kill(pid, signal.SIGSTOP)  # alive but answering nothing
    last = source.read()
    _busy(1.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        final = source.stop()
    assert time.monotonic() - started < 30  # STOP_WAIT_S, then an in-process tracker's start and stop
    assert any("did not give the run's final figures" in r.getMessage() for r in caplog.records)
    assert _gone(pid)  # killed, not left stopped
    # the time since the meter's last reading is estimated at the power measured here, added to it
    assert source.late_start_s > 1.5 and source.late_start_estimate.energy_kwh > 0
    assert final.energy_kwh >= last.measured.energy_kwh + source.late_start_estimate.energy_kwh
    assert final.emissions_kg > last.emissions_kg
    assert not source.measuring


def test_a_meter_that_never_gave_figures_leaves_nothing_unmeasured(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(meter_module, "STOP_WAIT_S", 1.0)
    source = MeterSource("FRA", refresh_s=0.2)
    source.start()
    pid = _meter_pid(source)
    os.kill(pid, signal.SIGSTOP)  # before it could send anything
    _busy(2.0)
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        final = source.stop()
    assert any("did not give the run's final figures" in r.getMessage() for r in caplog.records)
    assert _gone(pid)
    # the whole run is estimated (at the power an in-process tracker measures), never zero
    assert source.late_start_s > 2.0
    assert final.energy_kwh >= source.late_start_estimate.energy_kwh > 0


_FORK = textwrap.dedent(
    """
    import json, os, sys, time
    from carbonoffset.core.meter import MeterSource

    def busy(s):
        until = time.monotonic() + s
        while time.monotonic() < until:
            pass

    def first_reading(source):
        while source.read().energy_kwh == 0:
            time.sleep(0.05)

    parent = MeterSource("FRA", refresh_s=0.2)
    parent.start()
    first_reading(parent)
    parent_meter = parent.meter_pid
    read_r, read_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        inherited = parent.stop()  # a copy: must not stop the parent's run
        own = MeterSource("FRA", refresh_s=0.2)
        own.start()
        own_meter = own.meter_pid
        first_reading(own)
        busy(0.5)
        final = own.stop()
        os.write(read_w, json.dumps({"own_meter": own_meter, "child_kwh": final.energy_kwh,
                                     "inherited_kwh": inherited.energy_kwh}).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = json.loads(os.read(read_r, 10000))
    before = parent.read()
    busy(1.0)
    while parent.read() == before:
        time.sleep(0.05)
    final = parent.stop()
    print(json.dumps({"parent_meter": parent_meter, "parent_kwh": final.energy_kwh,
                      "before_kwh": before.energy_kwh, **child}))
    """
)


def test_a_forked_child_measures_with_its_own_meter_and_leaves_the_parents_alone() -> None:
    (out,) = run_script(_FORK)
    assert out["own_meter"] != out["parent_meter"]
    assert out["child_kwh"] > 0
    assert out["parent_kwh"] > out["before_kwh"] > 0  # the parent's run went on measuring after the fork


def test_tracker_arguments_must_be_json_values() -> None:
    with pytest.raises(ValueError, match="JSON values.*CodeCarbonSource"):
        MeterSource("FRA", output_handlers=[object()])
    with pytest.raises(ValueError, match="refresh_s"):
        MeterSource("FRA", refresh_s=0)


def test_messages_from_an_earlier_run_are_ignored() -> None:
    source = MeterSource("FRA", refresh_s=0.2)
    source.start()
    _first_reading(source)
    late = source.receiver()  # where the measuring process's messages of this run go
    source.stop()
    source.start()
    # a reading of the previous run arriving late does not leak into the new one
    late({"event": "totals", "emissions_kg": 1.0, "energy_kwh": 1.0, "at": time.time()})
    assert source.read().emissions_kg < 1.0
    source.stop()


def test_the_power_a_run_measured_is_remembered_for_the_first_seconds_of_the_next() -> None:
    from carbonoffset.core import estimates

    before = estimates.prior("FRA", {})
    assert before.origin == "default"  # a machine (home) where carbonoffset never ran
    assert before.kg_per_kwh == pytest.approx(0.056039)  # CodeCarbon's figure for France
    assert before.power_w == estimates.DEFAULT_W_PER_THREAD * (os.cpu_count() or 1) + estimates.ram_w(
        estimates.memory_gb()
    )
    source = MeterSource("FRA", refresh_s=0.2)
    source.start()
    _first_reading(source)
    _busy(2.5)
    final = source.stop()
    key = estimates.settings_key("FRA", {})
    deadline = time.monotonic() + 20
    while estimates.remembered(key) is None:  # written by the meter once it answered stop()
        assert time.monotonic() < deadline, "nothing remembered"
        time.sleep(0.05)
    remembered = estimates.prior("FRA", {})
    assert remembered.origin == "remembered"
    assert remembered.kg_per_kwh == pytest.approx(final.emissions_kg / final.energy_kwh, rel=0.01)
    assert 1 < remembered.power_w < 1000
    # without RAPL CodeCarbon draws the CPU's power from the machine's load (its cpu_load mode):
    # the load is kept with the power, so the next run's estimate follows its own load
    assert remembered.cpu_w is not None and 0 < remembered.cpu_w < remembered.power_w
    assert remembered.cpu_load is not None and 0 < remembered.cpu_load <= 1
    assert remembered.at_load(remembered.cpu_load) == pytest.approx(remembered.power_w)
    assert remembered.at_load(0.0) < remembered.power_w < remembered.at_load(1.0) or remembered.cpu_load == 1
    # the next run's first moments are estimated at it
    source.start()
    first = source.read()  # before the meter's first reading of this run
    assert first.measured == Measurement() and first.estimated_kwh > 0
    source.stop()
