"""Measurement faults a new user meets, each with real CodeCarbon: a failing reading, a dead source,
CodeCarbon's ``allow_multiple_runs = false`` lock (a stale lock file, its signal handlers).

CodeCarbon's lock file lives in the temporary folder of the process: the lock tests run in fresh
processes whose ``TMPDIR`` is the test's own folder, so they never touch the machine's real lock.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _scripts import run_script, subprocess_env

from carbonoffset.core.ledger import Ledger
from carbonoffset.core.meter import MeterSource
from carbonoffset.core.session import OffsetSession
from carbonoffset.core.sources import CodeCarbonSource
from carbonoffset.testing import BrokenEmissions

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals are POSIX")


def _wait(predicate: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_failing_codecarbon_reading_is_retried_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    source = CodeCarbonSource("FRA", refresh_s=0.1)
    source.start()
    _wait(lambda: source.coverage() is not None)
    tracker = source.tracker
    real_flush = tracker.flush
    failures: list[float] = []

    def failing_flush() -> None:  # CodeCarbon's own flush() raising mid-run (e.g. its output failing)
        failures.append(time.monotonic())
        raise RuntimeError("disk full")

    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        tracker.flush = failing_flush
        _wait(lambda: len(failures) >= 3)  # the refresh thread lives on and retries
        frozen = source.read()
        tracker.flush = real_flush
        _wait(lambda: source.read().energy_kwh > frozen.energy_kwh)  # live again
        final = source.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "CodeCarbon's reading failed (RuntimeError: disk full)" in warnings[0]
    assert final.energy_kwh > frozen.energy_kwh


def test_figures_stay_live_and_marked_estimated_while_the_meter_gives_no_readings() -> None:
    import os

    source = MeterSource("FRA", refresh_s=0.2)
    source.start()
    _wait(lambda: source.read().measured.energy_kwh > 0)

    def growing() -> bool:  # (held while the estimate made before the first reading was above it)
        before = source.read()
        time.sleep(0.1)
        return source.read().energy_kwh > before.energy_kwh

    _wait(growing)
    pid = source.meter_pid  # the process to freeze
    os.kill(pid, signal.SIGSTOP)  # alive, sending nothing: its readings froze
    try:
        first = source.read()
        time.sleep(0.5)
        second = source.read()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert second.energy_kwh > first.energy_kwh and second.emissions_kg > first.emissions_kg
    # nothing new was measured...
    assert second.measured.energy_kwh == pytest.approx(first.measured.energy_kwh, rel=1e-9)
    assert second.estimated_kwh > first.estimated_kwh  # ...and what grew says it is an estimate
    assert source.stop().energy_kwh > 0


def test_a_dead_source_warns_once_and_its_run_is_recorded_unmeasured(
    ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = OffsetSession(source=BrokenEmissions(RuntimeError, "sensor unplugged"), offset_ledger=ledger_path, auto_offset=False)
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        session.start()
        for epoch in range(3):
            session.record_epoch(epoch)
        session.stop()
    session.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "failed to start (sensor unplugged)" in warnings[0], warnings
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert run.status == "unmeasured"  # never a measured zero


def test_an_unmeasured_run_is_never_stated_as_a_measured_zero(
    ledger_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The end line, the statement, the card section and the model card metadata of a run whose
    source failed to start say it was not measured; none of them claims 0 kg or 0 g."""
    from carbonoffset.core import card

    session = OffsetSession(source=BrokenEmissions(RuntimeError, "sensor unplugged"), offset_ledger=ledger_path, auto_offset=False)
    with caplog.at_level(logging.INFO, logger="carbonoffset"):
        session.start()
        for epoch in range(3):
            session.record_epoch(epoch)
        report = session.stop()
    session.close()
    assert not report.measured
    (line,) = [r.getMessage() for r in caplog.records if r.name == "carbonoffset"]
    assert line == f"carbonoffset: {report.summary}"
    assert "not measured" in line and "recorded 0 kg" not in line
    with Ledger(ledger_path) as ledger:
        carbon = card.run_carbon(ledger, report.run_id)  # type: ignore[arg-type]
    assert "not measured" in card.statement(carbon) and " 0 g" not in card.statement(carbon)
    section = card.card_section(carbon)
    assert "Not measured" in section and "0 g" not in section and "0 Wh" not in section
    with pytest.raises(ValueError, match="not measured"):
        card.co2_eq_emissions(carbon)
    assert card.as_json(carbon)["co2_eq_emissions"] is None
    if importlib.util.find_spec("huggingface_hub") is not None:
        readme = tmp_path / "README.md"
        with pytest.raises(ValueError, match="not measured"):
            card.update_model_card(readme, report, ledger=ledger_path)
        assert not readme.exists()  # no card claims 0 g


_LOCKED = textwrap.dedent(
    """
    import json, logging, os, signal, sys, tempfile, time
    from pathlib import Path
    from carbonoffset.core import Ledger, OffsetSession

    Path(".codecarbon.config").write_text("[codecarbon]\\nallow_multiple_runs = false\\n")
    lock = Path(tempfile.gettempdir()) / ".codecarbon.lock"
    lock.write_text("")  # left by a CodeCarbon run that was killed
    warnings = []
    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())
    logging.getLogger("carbonoffset").addHandler(Keep())

    def busy(s):
        until = time.monotonic() + s
        while time.monotonic() < until:
            pass

    # 1. the default session (its measuring process) and in-process tracking take no lock
    session = OffsetSession(offset_ledger=LEDGER, country_iso_code="FRA", auto_offset=False)
    session.start()
    busy(1.5)
    epoch = session.record_epoch(0)
    final = session.stop()
    session.close()
    from carbonoffset.core.sources import CodeCarbonSource
    user_handler = lambda signum, frame: None
    signal.signal(signal.SIGTERM, user_handler)
    source = CodeCarbonSource("FRA")
    source.start()
    busy(0.5)
    in_process = source.stop()
    handlers_kept = signal.getsignal(signal.SIGTERM) is user_handler
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # 2. the drop-in honours the setting: refused, named once, recorded as unmeasured
    from carbonoffset import OfflineEmissionsTracker
    from carbonoffset.testing import FakeOneClickImpact
    fake = FakeOneClickImpact(environment="sandbox").start()  # the key check: never the real service
    tracker = OfflineEmissionsTracker(country_iso_code="FRA", offset_api_key="test_lock_key",
                                      offset_environment="sandbox", auto_offset=False, offset_ledger=LEDGER2,
                                      offset_api_url=fake.url, output_methods=[], log_level="critical")
    tracker.start()
    busy(0.3)
    dropin = tracker.stop()
    tracker.offset_handler.close()
    fake.stop()
    with Ledger(LEDGER) as ledger:
        (session_run,) = ledger.runs()
    with Ledger(LEDGER2) as ledger:
        dropin_runs = [(r.status, r.emissions_kg) for r in ledger.runs()]
    print(json.dumps({"epoch_kg": epoch.emissions_kg, "final_kg": final.emissions_kg,
                      "session_status": session_run.status, "session_kg": session_run.emissions_kg,
                      "in_process_kwh": in_process.energy_kwh, "handlers_kept": handlers_kept,
                      "dropin": dropin, "dropin_runs": dropin_runs, "warnings": warnings,
                      "lock": str(lock), "lock_still_there": lock.exists()}))
    """
)


def _locked_env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**subprocess_env(), "TMPDIR": str(tmp), "HOME": str(tmp_path / "home")}


def test_a_stale_codecarbon_lock_never_gives_a_measured_zero(tmp_path: Path) -> None:
    script = (
        f"LEDGER = {str(tmp_path / 'a.sqlite3')!r}\nLEDGER2 = {str(tmp_path / 'b.sqlite3')!r}\n" + _LOCKED
    )
    (out,) = run_script(script, env=_locked_env(tmp_path))
    # carbonoffset's own trackers (measuring process, in process) do not take CodeCarbon's lock
    assert 0 < out["epoch_kg"] <= out["final_kg"]
    assert out["session_status"] == "finished" and out["session_kg"] == out["final_kg"]
    assert out["in_process_kwh"] > 0 and out["handlers_kept"] is True
    # the drop-in is CodeCarbon's tracker with its setting: refused, said once, never a measured zero
    assert out["dropin"] is None  # CodeCarbon's own answer for a refused run
    assert out["dropin_runs"] == [["unmeasured", 0.0]]
    named = [w for w in out["warnings"] if "CodeCarbon refused to start: lock file" in w]
    assert len(named) == 1 and out["lock"] in named[0]
    assert len(out["warnings"]) == 1, out["warnings"]
    assert out["lock_still_there"]  # not ours to delete


_HANDLERS = textwrap.dedent(
    """
    import json, os, signal, time
    from pathlib import Path
    from carbonoffset import OfflineEmissionsTracker

    Path(".codecarbon.config").write_text("[codecarbon]\\nallow_multiple_runs = false\\n")
    seen = []
    def user_term(signum, frame):
        seen.append(signum)
    signal.signal(signal.SIGTERM, user_term)
    tracker = OfflineEmissionsTracker(country_iso_code="FRA", output_methods=[], log_level="critical")
    tracker.start()
    os.kill(os.getpid(), signal.SIGTERM)  # the user's handler runs, no SystemExit
    time.sleep(0.1)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        ctrl_c = "nothing raised"
    except KeyboardInterrupt:
        ctrl_c = "KeyboardInterrupt"
    except SystemExit as exc:
        ctrl_c = f"SystemExit({exc.code})"
    kg = tracker.stop()
    print(json.dumps({"user_handler_ran": seen == [signal.SIGTERM], "ctrl_c": ctrl_c, "kg": kg}))
    """
)


def test_codecarbon_lock_keeps_the_users_signal_handlers_and_ctrl_c(tmp_path: Path) -> None:
    (out,) = run_script(_HANDLERS, env=_locked_env(tmp_path))
    assert out["user_handler_ran"] is True
    assert out["ctrl_c"] == "KeyboardInterrupt"
    assert out["kg"] is not None and out["kg"] > 0  # the lock was free: measured as usual
