"""OffsetSession: lifecycle, background offsets, bounded stop, rank policy, round-up credit."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from carbonoffset.core.ledger import Ledger
from carbonoffset.core.session import EpochReport, OffsetSession, RunReport
from carbonoffset.core.sources import CodeCarbonSource, Measurement, warm_up_codecarbon
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import BrokenEmissions, FakeOneClickImpact, Fault, ScriptedEmissions

FAST = {"wait_initial_s": 0.01, "wait_max_s": 0.05}


def new_session(settings: dict[str, Any], source: Any, **overrides: Any) -> OffsetSession:
    return OffsetSession(source=source, offsetter_options=FAST, **{**settings, **overrides})


def ledger_state(path: Path, account: str) -> tuple[Any, ...]:
    with Ledger(path) as ledger:
        return (
            ledger.balance(account),
            ledger.offsets(account),
            ledger.runs(account),
            ledger.history(account),
        )


def test_lifecycle_reports_and_idempotent_stop(server: FakeOneClickImpact, settings: dict[str, Any]) -> None:
    source = ScriptedEmissions([0.1, 0.3, 0.6], advance_on_stop=False)
    session = new_session(settings, source, label="unit")
    assert not session.running and session.run_id is None
    run_id = session.start()
    assert run_id and session.running and source.starts == 1 and source.running
    reports = [session.record_epoch(epoch) for epoch in range(3)]
    assert all(isinstance(r, EpochReport) for r in reports)
    assert [r.epoch for r in reports] == [0, 1, 2]
    assert [r.emissions_kg for r in reports] == pytest.approx([0.1, 0.3, 0.6])
    assert [r.energy_kwh for r in reports] == pytest.approx([0.1 / 0.056, 0.3 / 0.056, 0.6 / 0.056])
    assert [r.pending_kg for r in reports[:2]] == pytest.approx([0.1, 0.3])
    assert set(reports[0].metrics()) == {
        "carbon/energy_kwh",
        "carbon/emissions_kg",
        "carbon/estimated_kg",
        "carbon/offset_kg",
        "carbon/pending_kg",
    }

    report = session.stop()
    assert isinstance(report, RunReport)
    assert not session.running and not source.running
    assert (report.run_id, report.epochs, report.environment) == (run_id, 3, "sandbox")
    assert report.emissions_kg == pytest.approx(0.6)
    assert report.confirmed_lb == 1 and report.in_flight_lb == 0
    assert report.pending_kg == pytest.approx(0.6 - KG_PER_LB, abs=1e-9)
    assert report.ledger_path == settings["offset_ledger"]
    assert report.metrics()["carbon/offset_kg"] == pytest.approx(KG_PER_LB)

    before = ledger_state(settings["offset_ledger"], report.account)
    requests = list(server.requests)
    again = session.stop()
    assert again == report
    assert session.stop(final_offset=False, status="failed") == report
    assert ledger_state(settings["offset_ledger"], report.account) == before
    assert server.requests == requests
    assert source.starts == 1
    (run,) = before[2]
    assert (run.status, run.label, run.epochs) == ("finished", "unit", 3)
    session.close()
    session.close()  # idempotent too


def test_context_manager_marks_a_failed_run_and_skips_the_final_offset(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    session = new_session(
        settings, ScriptedEmissions([0.4, 0.45], advance_on_stop=True), offset_round_up=True
    )
    with pytest.raises(RuntimeError, match="boom"), session:
        session.record_epoch(0)
        raise RuntimeError("boom")
    assert server.captures == []  # no final round-up offset after a failure
    report = session.report()
    assert report.pending_kg == pytest.approx(0.45)  # the stop reading was recorded
    with Ledger(settings["offset_ledger"]) as ledger:
        (run,) = ledger.runs()
        assert run.status == "failed"
    session.close()


def test_a_second_start_is_a_new_run_with_a_fresh_source(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    source = ScriptedEmissions([0.2])
    session = new_session(settings, source)
    first = session.start()
    session.record_epoch(0)
    started = time.monotonic()
    second = session.start()  # stops the first run (its stop must not wait for offset_timeout)
    assert time.monotonic() - started < 2.0 < settings["offset_timeout"]
    assert first != second and source.starts == 2
    session.record_epoch(0)
    report = session.stop()
    session.close()
    assert report.emissions_kg == pytest.approx(0.2)
    assert report.pending_kg == pytest.approx(0.4)
    assert server.captures == []


def test_record_epoch_never_waits_for_the_network(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    server.delay_s = 2.0
    session = new_session(
        settings, ScriptedEmissions([0.6 * (n + 1) for n in range(12)]), offset_request_timeout=5.0
    )
    session.start()
    session.record_epoch(0)  # triggers an offset in the background
    deadline = time.monotonic() + 5
    while not server.captures:  # the capture reached the server; its answer takes 2 s
        assert time.monotonic() < deadline
        time.sleep(0.01)
    durations = []
    for epoch in range(1, 11):
        started = time.perf_counter()
        report = session.record_epoch(epoch)
        durations.append(time.perf_counter() - started)
        assert report.epoch == epoch
    assert max(durations) < 0.05, durations
    with Ledger(settings["offset_ledger"]) as ledger:
        assert [o.state for o in ledger.offsets()][:1] == ["intent"]  # still in flight meanwhile
    server.delay_s = 0.0
    report = session.stop()
    session.close()
    assert report.in_flight_lb == 0
    assert server.total_lb() == report.confirmed_lb == int(0.6 * 11 // KG_PER_LB)


def test_stop_waits_at_most_offset_timeout_and_the_next_session_settles(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    server.inject(Fault(delay_s=1.0, times=100))  # captured, answered after the deadline
    server.inject(Fault(endpoint="records", status=503, body="down", times=100))
    session = new_session(settings, ScriptedEmissions([0.7]), offset_timeout=0.3, offset_request_timeout=0.4)
    session.start()
    session.record_epoch(0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        report = session.stop()
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 0.3 + 0.5, elapsed
    assert any("offset_timeout" in r.getMessage() for r in caplog.records)
    assert report.confirmed_lb == 0 and report.in_flight_lb == 1
    assert report.pending_kg == pytest.approx(0.7 - KG_PER_LB, abs=1e-9)
    assert session.wait(10)  # the worker gives up on its own, leaving the offset unknown
    with Ledger(settings["offset_ledger"]) as ledger:
        (offset,) = ledger.offsets()
        assert offset.state in ("intent", "unknown")
    session.close()

    server.clear_faults()
    nxt = new_session(settings, ScriptedEmissions([0.0]))
    nxt.start()
    assert nxt.wait(5)
    settled = nxt.outcomes
    assert [(o.offset_id, o.state) for o in settled] == [(offset.offset_id, "confirmed")]
    final = nxt.stop()
    nxt.close()
    assert len(server.captures) == 1 and server.total_lb() == 1
    assert final.pending_kg == pytest.approx(0.7 - KG_PER_LB, abs=1e-9)
    with Ledger(settings["offset_ledger"]) as ledger:
        (offset,) = ledger.offsets()
        assert offset.state == "confirmed" and offset.carbon_captured == 1


def test_close_right_after_a_timed_out_stop_lets_the_offset_finish(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """What a callback does on the next fit: close the old session at once, start a new one."""
    before = set(threading.enumerate())
    server.inject(Fault(stall_s=0.8))  # a slow answer: acted on after 0.8 s
    first = new_session(settings, ScriptedEmissions([0.7]), offset_timeout=0.1, offset_request_timeout=3.0)
    first.start()
    first.record_epoch(0)
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        assert first.stop().in_flight_lb == 1
        first.close()  # returns at once; the worker keeps the ledger open until its offset is settled
        second = new_session(settings, ScriptedEmissions([0.0]), offset_timeout=0.1)
        second.start()  # reconciles, but does not race the first session's worker
        second.record_epoch(0)
        second.stop()
        second.close()
        assert first.wait(5)
    assert not any("background job failed" in r.getMessage() for r in caplog.records)
    assert len(server.captures) == 1
    with Ledger(settings["offset_ledger"]) as ledger:
        (offset,) = ledger.offsets()
        assert offset.state == "confirmed"
        assert ledger.balance(offset.account).pending_kg == pytest.approx(0.7 - KG_PER_LB, abs=1e-9)
    # both sessions' worker threads are gone once idle and closed
    deadline = time.monotonic() + 2
    while any(t.name == "carbonoffset-worker" for t in set(threading.enumerate()) - before):
        assert time.monotonic() < deadline, "worker thread left behind"
        time.sleep(0.02)


def test_local_rank_other_than_zero_runs_no_tracker(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    source = ScriptedEmissions([0.9])
    session = new_session(settings, source, local_rank=1, global_rank=0)
    assert not session.is_tracking and session.is_writer
    session.start()
    assert source.starts == 0
    assert session.measure() == Measurement()
    # the writer still records figures summed across nodes by the integration
    session.record(Measurement(0.3, 1.0), epoch=0)
    report = session.stop()
    session.close()
    assert source.starts == 0 and source.reads == 0
    assert report.emissions_kg == pytest.approx(0.3)
    assert report.pending_kg == pytest.approx(0.3)


def test_global_rank_other_than_zero_writes_nothing(
    server: FakeOneClickImpact, settings: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = {p for p in tmp_path.rglob("*")}
    source = ScriptedEmissions([5.0])
    session = new_session(settings, source, global_rank=3, local_rank=0)
    assert session.is_tracking and not session.is_writer
    assert session.ledger is None
    assert session.start() is None
    report_epoch = session.record_epoch(0)
    assert report_epoch.emissions_kg == pytest.approx(5.0)  # it measures (local rank 0) ...
    assert (report_epoch.pending_kg, report_epoch.offset_kg) == (0.0, 0.0)
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        session.offset_now(wait=1)
        report = session.stop()
        session.close()
    assert caplog.records == []  # nothing to warn about (the key is set; this rank just does not offset)
    assert source.starts == 1
    assert report.run_id is None and report.ledger_path is None
    assert server.requests == []  # ... but never offsets
    assert not Path(settings["offset_ledger"]).exists()
    assert {p for p in tmp_path.rglob("*")} == before  # and writes no file at all


def test_round_up_final_offset_leaves_a_credit_that_later_emissions_use(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    session = new_session(settings, ScriptedEmissions([0.1, 0.2]), offset_round_up=True)
    session.start()
    session.record_epoch(0)
    session.record_epoch(1)
    assert session.wait(5) and server.captures == []  # below the threshold during the run
    report = session.stop()
    session.close()
    assert [c.carbon_captured for c in server.captures] == [1]  # ceil(0.2 / 0.45359237)
    assert report.pending_kg == 0.0
    assert report.credit_kg == pytest.approx(KG_PER_LB - 0.2, abs=1e-9)

    # later emissions use the credit up before anything is pending again
    later = new_session(settings, ScriptedEmissions([0.2]))
    later.start()
    epoch = later.record_epoch(0)
    assert epoch.pending_kg == 0.0 and epoch.credit_kg == pytest.approx(KG_PER_LB - 0.4, abs=1e-9)
    report = later.stop()
    later.close()
    assert report.credit_kg == pytest.approx(KG_PER_LB - 0.4, abs=1e-9)
    assert len(server.captures) == 1

    last = new_session(settings, ScriptedEmissions([0.6]))
    last.start()
    last.record_epoch(0)
    report = last.stop()
    last.close()
    # 1.0 kg recorded in all: 1 lb (rounded up) + 1 lb (floor of what was pending), 0.093 kg pending
    assert [c.carbon_captured for c in server.captures] == [1, 1]
    assert report.credit_kg == 0.0
    assert report.pending_kg == pytest.approx(1.0 - 2 * KG_PER_LB, abs=1e-9)


def test_missing_key_warns_once_and_still_records(
    settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings = {k: v for k, v in settings.items() if k != "offset_api_key"}
    session = new_session(settings, ScriptedEmissions([0.6, 1.2, 2.4]))
    assert not session.config.can_offset and session.config.auto_offset
    with caplog.at_level(logging.DEBUG, logger="carbonoffset"):
        session.start()
        for epoch in range(3):
            session.record_epoch(epoch)
        report = session.stop()
        session.start()
        session.record_epoch(0)
        session.stop()
        session.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "offset_api_key" in warnings[0].getMessage()
    assert str(settings["offset_ledger"]) in warnings[0].getMessage()
    assert report.pending_kg == pytest.approx(2.4)
    assert report.account == "sandbox:no-key"
    with Ledger(settings["offset_ledger"]) as ledger:
        assert ledger.balance("sandbox:no-key").recorded_kg == pytest.approx(3.0)
        assert ledger.offsets() == []


def test_a_failing_source_never_raises_into_training(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    session = new_session(settings, BrokenEmissions(OSError, "no sensors here"))
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        session.start()
        reports = [session.record_epoch(epoch) for epoch in range(3)]
        report = session.stop()
        session.close()
    assert all(r.emissions_kg == 0.0 and not r.measured for r in reports)
    # what a framework logs for such a run: no emissions figure at all, never a false 0.0
    assert all(set(r.metrics()) == {"carbon/offset_kg", "carbon/pending_kg"} for r in reports)
    assert report.emissions_kg == 0.0 and not report.measured
    assert set(report.metrics()) == {"carbon/offset_kg", "carbon/pending_kg"}
    causes = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert causes == ["emissions tracking failed to start"]  # one cause, one warning
    with Ledger(settings["offset_ledger"]) as ledger:
        assert [run.status for run in ledger.runs()] == ["unmeasured"]  # never a measured zero


def test_session_validates_its_arguments(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="max_emissions_kg"):
        OffsetSession(max_emissions_kg=0, **settings)
    with pytest.raises(ValueError, match="offset_environment"):
        OffsetSession(**{**settings, "offset_environment": "staging"})
    session = OffsetSession(**settings)
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(session)
    session.close()


def test_budget_is_reported(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    session = new_session(
        settings, ScriptedEmissions([0.1, 0.2, 0.3]), max_emissions_kg=0.25, auto_offset=False
    )
    session.start()
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        reports = [session.record_epoch(epoch, max_epochs=10) for epoch in range(3)]
    session.stop()
    session.close()
    assert [r.over_budget for r in reports] == [False, False, True]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "projected" in messages and "max_emissions_kg" in messages


# ---------------------------------------------------------------- CodeCarbon
@pytest.mark.slow
def test_codecarbon_source_measures_and_leaves_no_thread(
    server: FakeOneClickImpact, settings: dict[str, Any], tmp_path: Path
) -> None:
    # the process's first tracker starts late, in the background (tests/core/test_performance_behaviour.py);
    # this test is about a tracker that starts at once: run CodeCarbon's hardware detection first
    assert warm_up_codecarbon().wait(120)
    before = set(threading.enumerate())
    # CodeCarbon in this process (the default, a measuring process, is tested in test_meter.py)
    session = OffsetSession(
        source=CodeCarbonSource(country_iso_code="FRA"), offsetter_options=FAST, **settings
    )
    session.start()
    assert isinstance(session.source, CodeCarbonSource)
    assert type(session.source.tracker).__name__ == "OfflineEmissionsTracker"
    during = set(threading.enumerate()) - before
    assert during, "the tracker samples on a thread while running"
    busy_until = time.monotonic() + 0.5
    x = 0
    while time.monotonic() < busy_until:
        x += 1
    epoch = session.record_epoch(0)
    report = session.stop()
    session.close()
    assert epoch.emissions_kg > 0 and epoch.energy_kwh > 0
    assert report.emissions_kg >= epoch.emissions_kg
    assert report.energy_kwh >= epoch.energy_kwh
    assert report.emissions_kg < 1e-3  # half a second of CPU is micrograms, not kilograms
    assert server.captures == []
    # no CodeCarbon thread (nor our worker, after close) is left running
    deadline = time.monotonic() + 2
    while (set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], [(t.name, t) for t in left]
    # CodeCarbon wrote no CSV into the working folder
    assert not list(Path.cwd().glob("*.csv"))
    with Ledger(settings["offset_ledger"]) as ledger:
        (run,) = ledger.runs()
        assert run.emissions_kg == pytest.approx(report.emissions_kg)

    # a second run gets a new tracker (trackers are single-use) and measures again
    again = OffsetSession(source=CodeCarbonSource(country_iso_code="FRA"), offsetter_options=FAST, **settings)
    again.start()
    first_tracker = again.source.tracker  # type: ignore[union-attr]
    again.record_epoch(0)
    again.start()
    assert again.source.tracker is not first_tracker  # type: ignore[union-attr]
    again.stop()
    again.close()
    assert dataclasses.is_dataclass(report)


def test_a_broken_ledger_never_raises_into_training(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(settings["offset_ledger"])
    session = new_session(settings, ScriptedEmissions([0.6, 1.2, 1.8]), ledger=ledger)
    ledger.close()  # every ledger call now fails (as with an I/O error mid-run)
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        session.start()
        reports = [session.record_epoch(epoch) for epoch in range(3)]
        report = session.stop()
        session.close()
    assert [r.emissions_kg for r in reports] == pytest.approx([0.6, 1.2, 1.8])
    assert report.emissions_kg == pytest.approx(1.8)
    assert server.captures == []
    messages = [r.getMessage() for r in caplog.records]
    assert messages and len(messages) == len(set(messages)), messages  # warned, not once per epoch


def test_resumed_run_continues_its_totals(server: FakeOneClickImpact, settings: dict[str, Any]) -> None:
    first = new_session(settings, ScriptedEmissions([0.3]), auto_offset=False)
    run_id = first.start()
    first.record_epoch(0)
    first.stop(final_offset=False, status="interrupted")
    first.close()
    # resumed from a checkpoint that saw 0.2 kg: the ledger's 0.3 kg wins, new measurements add to it
    resumed = new_session(settings, ScriptedEmissions([0.1]), auto_offset=False)
    assert resumed.start(run_id=run_id, resume=Measurement(0.2, 1.0)) == run_id
    epoch = resumed.record_epoch(1)
    report = resumed.stop()
    resumed.close()
    assert epoch.emissions_kg == pytest.approx(0.4)
    assert report.emissions_kg == pytest.approx(0.4)
    assert report.pending_kg == pytest.approx(0.4)  # not 0.3 + 0.4
    with Ledger(settings["offset_ledger"]) as ledger:
        (run,) = ledger.runs()
        assert (run.run_id, run.status, run.epochs) == (run_id, "finished", 2)


def test_a_run_left_open_is_recorded_as_interrupted_at_exit(tmp_path: Path, ledger_path: Path) -> None:
    """A process that exits with a run still open (a framework without an exception hook) keeps
    everything the tracker measured: the atexit safety net records it as interrupted."""
    import subprocess
    import sys

    script = tmp_path / "leave_open.py"
    script.write_text(
        "from carbonoffset.core.session import OffsetSession\n"
        "from carbonoffset.testing import ScriptedEmissions\n"
        f"session = OffsetSession(offset_ledger={str(ledger_path)!r}, auto_offset=False,\n"
        "                         source=ScriptedEmissions([0.1, 0.25], advance_on_stop=True))\n"
        "session.start()\n"
        "session.record_epoch(0)\n"
        "raise SystemExit(3)  # like a fit that raised: nobody calls stop()\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "still running at exit" in result.stderr
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert run.status == "interrupted"
    assert run.emissions_kg == pytest.approx(0.25)  # the figure measured after the last epoch is kept


def test_two_fits_resumed_from_one_checkpoint_at_once_both_count(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    """A sweep branching off one checkpoint: both branches spend energy, so both count in full."""
    first = new_session(settings, ScriptedEmissions([0.3]), auto_offset=False)
    run_id = first.start()
    first.record_epoch(0)
    first.stop(final_offset=False)
    first.close()
    checkpoint = Measurement(0.3, 1.0)

    left = new_session(settings, ScriptedEmissions([0.2, 0.4]), auto_offset=False)
    right = new_session(settings, ScriptedEmissions([0.1]), auto_offset=False)
    assert left.start(run_id=run_id, resume=checkpoint) == run_id
    assert right.start(run_id=run_id, resume=checkpoint) == run_id  # while the other one runs
    assert left.record_epoch(1).emissions_kg == pytest.approx(0.5)  # each sees its own lineage
    assert right.record_epoch(1).emissions_kg == pytest.approx(0.4)
    assert left.record_epoch(2).emissions_kg == pytest.approx(0.7)
    left_report, right_report = left.stop(), right.stop()
    left.close()
    right.close()
    assert (left_report.run_id, right_report.run_id) == (run_id, run_id)  # checkpoints keep the run's id

    with Ledger(settings["offset_ledger"]) as ledger:
        balance = ledger.balance(first.config.account)
        (run,) = ledger.runs()
        history = ledger.history()
    # 0.3 before the checkpoint + 0.4 on one branch + 0.1 on the other (the larger branch alone: 0.7)
    assert balance.recorded_kg == pytest.approx(0.8)
    assert (run.run_id, run.segments, run.epochs, run.status) == (run_id, 3, 3, "finished")
    assert run.emissions_kg == pytest.approx(0.8)
    assert history[-1][1] == pytest.approx(0.8)
    assert [round(kg, 9) for _, kg in history] == sorted(round(kg, 9) for _, kg in history)


def test_a_checkpoint_ahead_of_the_ledger_adds_the_difference_once(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    """The process died after saving a checkpoint but before its ledger write: the checkpoint's
    figures count, once, however many fits resume from it."""
    first = new_session(settings, ScriptedEmissions([0.3]), auto_offset=False)
    run_id = first.start()
    first.record_epoch(0)
    first.stop(final_offset=False, status="interrupted")
    first.close()
    checkpoint = Measurement(0.5, 2.0)  # 0.2 kg more than the ledger got
    sessions = [new_session(settings, ScriptedEmissions([0.1]), auto_offset=False) for _ in range(2)]
    for session in sessions:  # two fits resumed from it at once
        session.start(run_id=run_id, resume=checkpoint)
    for session in sessions:
        assert session.record_epoch(1).emissions_kg == pytest.approx(0.6)
        session.stop(final_offset=False)
        session.close()
    with Ledger(settings["offset_ledger"]) as ledger:
        (run,) = ledger.runs()
        assert ledger.balance(first.config.account).recorded_kg == pytest.approx(0.5 + 0.1 + 0.1)
    assert run.emissions_kg == pytest.approx(0.7)


def test_a_run_unknown_to_this_ledger_resumes_with_the_checkpoint_figures(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    resumed = new_session(settings, ScriptedEmissions([0.25]), auto_offset=False)
    assert resumed.start(run_id="f" * 32, resume=Measurement(0.5, 2.0)) == "f" * 32
    resumed.record_epoch(4)
    report = resumed.stop(final_offset=False)
    resumed.close()
    assert report.emissions_kg == pytest.approx(0.75)
    with Ledger(settings["offset_ledger"]) as ledger:
        (run,) = ledger.runs()
        assert ledger.balance(resumed.config.account).recorded_kg == pytest.approx(0.75)
    assert (run.run_id, run.emissions_kg, run.epochs, run.status) == (
        "f" * 32,
        pytest.approx(0.75),
        5,
        "finished",
    )
    assert run.energy_kwh > 2.0


def test_the_run_object_front_door_budget_state_and_resume(
    server: FakeOneClickImpact, settings: dict[str, Any], ledger_path: Path
) -> None:
    """begin/epoch_end/end/state_dict on OffsetSession itself: what every front end drives."""
    first = new_session({**settings, "auto_offset": False}, ScriptedEmissions([0.2, 0.4]), max_emissions_kg=0.3)
    assert first.epoch_end(0) is None and first.end() is None  # no run yet
    run_id = first.begin()
    reports = [first.epoch_end(0, max_epochs=5), first.epoch_end(1, max_epochs=5)]
    assert [r.over_budget for r in reports if r is not None] == [False, True]
    assert first.stop_requested and first.last_report is reports[1]
    final = first.end()
    assert final is not None and first.final_report is final and final.run_id == run_id
    assert first.end() is final  # ended: the same report
    state = first.state_dict()
    assert (state["run_id"], state["emissions_kg"]) == (run_id, pytest.approx(0.4))
    first.close()

    second = new_session({**settings, "auto_offset": False}, ScriptedEmissions([0.1]))
    second.load_state_dict(state)
    assert second.begin() == run_id and not second.stop_requested
    report = second.epoch_end(2)
    assert report is not None and report.emissions_kg == pytest.approx(0.5)  # continues from 0.4 kg
    aborted = second.abort("interrupted")
    second.close()
    assert aborted is not None and aborted.emissions_kg == pytest.approx(0.5)
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert (run.run_id, run.status, run.emissions_kg) == (run_id, "interrupted", pytest.approx(0.5))


def test_ranks_are_read_when_a_run_begins(
    server: FakeOneClickImpact, settings: dict[str, Any], ledger_path: Path
) -> None:
    """A session built as global rank 1 opens no ledger; given rank 0 at begin, it records the run."""
    session = new_session({**settings, "auto_offset": False}, ScriptedEmissions([0.2]), global_rank=1)
    assert session.ledger is None and not ledger_path.exists()
    run_id = session.begin(global_rank=0, local_rank=0)
    assert run_id is not None and session.is_writer
    session.epoch_end(0)
    final = session.end()
    session.close()
    assert final is not None and final.pending_kg == pytest.approx(0.2)
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert (run.run_id, run.emissions_kg) == (run_id, pytest.approx(0.2))


def test_a_failed_run_with_an_offset_in_flight_says_why_it_waits_before_waiting(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C in a Lightning fit while an offset is in flight: Lightning ignores SIGINT from then on and
    the end of the run waits up to offset_timeout (30 s by default) for the offset. The terminal
    showed nothing during that wait, and a second Ctrl-C did nothing: say so before waiting."""
    server.inject(Fault(delay_s=3.0, times=5))  # captured at once, answered after 3 s
    session = new_session(settings, ScriptedEmissions([0.6, 0.7]), offset_timeout=1.0)
    session.begin()
    session.epoch_end(0)  # 0.6 kg: 1 lb bought in the background
    deadline = time.monotonic() + 5
    while not server.captures and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.captures and session.offsets_busy
    with caplog.at_level(logging.INFO, logger="carbonoffset"):
        session.abort("interrupted")
    messages = [r.getMessage() for r in caplog.records]
    waiting = [i for i, m in enumerate(messages) if "waiting up to 1 s" in m]
    assert len(waiting) == 1, messages
    assert "offset_timeout" in messages[waiting[0]] and "never bought twice" in messages[waiting[0]]
    still = [i for i, m in enumerate(messages) if "still in flight after offset_timeout" in m]
    assert still and waiting[0] < still[0]
    session.wait(10)
    session.close()
