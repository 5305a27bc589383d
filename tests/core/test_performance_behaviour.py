"""What keeps tracking off the training's critical path, as behaviour (never timings).

* CodeCarbonSource: a process's first tracker starts in the background and the
  time it started late is accounted for; later trackers start at once; read()
  serves figures refreshed by a background thread instead of flushing.
* OffsetSession: epoch figures are written to the ledger by a background thread
  (a locked ledger never blocks record_epoch), yet flush()/ledger/report() see
  them and the epoch reports agree with the ledger.
* Ledger: a big file opens with a check of its accounting tables only; the
  complete check (verify) still refuses a corrupt file without modifying it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _scripts import run_script, subprocess_env

from carbonoffset.core.codecarbon_startup import BACKGROUND_NICE, lower_thread_priority
from carbonoffset.core.errors import LedgerError
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.measurement import Measurement
from carbonoffset.core.session import OffsetSession
from carbonoffset.core.sources import CodeCarbonSource
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions

FAST = {"wait_initial_s": 0.01, "wait_max_s": 0.05}
SANDBOX = "sandbox:feedfacecafe"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------- CodeCarbonSource
_COLD_PROCESS = textwrap.dedent(
    """
    import json, time
    from carbonoffset.core.sources import CodeCarbonSource, Measurement

    class Probe:  # CodeCarbon's public output-handler interface: the tracker's own totals
        def __init__(self):
            self.totals = []
        def out(self, total, delta):
            power = total.cpu_power + total.gpu_power + total.ram_power
            self.totals.append((total.duration, total.energy_consumed, total.emissions, power))
        def live_out(self, total, delta):
            pass
        def task_out(self, data, experiment_name):
            pass
        def exit(self):
            pass

    def busy(seconds):
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            pass

    out = {}
    probe = Probe()
    source = CodeCarbonSource(country_iso_code="FRA", refresh_s=0.2, output_handlers=[probe])
    source.start()  # the first tracker of this process: CodeCarbon has not detected the hardware yet
    out["first_read"] = [source.read().emissions_kg, source.read().energy_kwh]
    reads = []
    until = time.monotonic() + 90.0  # read while "training" until figures came for 3 s
    while time.monotonic() < until:
        busy(0.1)
        reads.append(source.read().energy_kwh)
        if reads[-1] > 0 and until > time.monotonic() + 3.0:
            until = time.monotonic() + 3.0
    tracker = source.tracker
    out["tracker_built"] = type(tracker).__name__
    final = source.stop()
    out["reads"] = reads
    out["late_start_s"] = source.late_start_s
    out["estimate"] = [source.late_start_estimate.emissions_kg, source.late_start_estimate.energy_kwh]
    out["final"] = [final.emissions_kg, final.energy_kwh]
    out["tracker_final"] = [tracker.final_emissions_data.emissions, tracker.final_emissions_data.energy_consumed]
    out["probe"] = probe.totals

    # the second tracker of the process starts at once: nothing to estimate
    probe2 = Probe()
    again = CodeCarbonSource(country_iso_code="FRA", output_handlers=[probe2])
    again.start()
    busy(0.3)
    second_tracker = again.tracker
    second = again.stop()
    out["second_late_start_s"] = again.late_start_s
    out["second_estimate"] = [again.late_start_estimate.emissions_kg, again.late_start_estimate.energy_kwh]
    out["second_final"] = [second.emissions_kg, second.energy_kwh]
    out["second_tracker_final"] = [
        second_tracker.final_emissions_data.emissions, second_tracker.final_emissions_data.energy_consumed
    ]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def cold_process() -> dict[str, Any]:
    """One fresh process: its first CodeCarbon tracker (cold) and a second one (warm)."""
    (result,) = run_script(_COLD_PROCESS)
    return result


@pytest.mark.slow
def test_first_tracker_starts_in_the_background_and_its_late_start_is_accounted_for(
    cold_process: dict[str, Any],
) -> None:
    result = cold_process
    # start() returned before the tracker ran: no figures yet; the tracker came later
    assert result["first_read"] == [0.0, 0.0]
    assert result["tracker_built"] == "OfflineEmissionsTracker"
    # figures appear once the tracker runs, and never decrease
    reads = result["reads"]
    assert reads[-1] > 0
    assert reads == sorted(reads)
    # the tracker began measuring after start(): that gap is estimated, not lost ...
    late = result["late_start_s"]
    assert late > 0
    tracker_kg, tracker_kwh = result["tracker_final"]
    final_kg, final_kwh = result["final"]
    assert final_kwh > tracker_kwh > 0 and final_kg > tracker_kg > 0
    # ... as the gap times the power CodeCarbon reported in its first reading covering >= GAP_POWER_MIN_S
    # (or its final one), at the carbon intensity of that reading
    probe = result["probe"]
    _, energy, emissions, power_w = next(
        (t for t in probe if t[0] >= CodeCarbonSource.GAP_POWER_MIN_S and t[1] > 0), probe[-1]
    )
    gap_kwh = power_w * late / 3.6e6
    assert power_w > 0
    assert final_kwh == pytest.approx(tracker_kwh + gap_kwh, rel=1e-9)
    assert final_kg == pytest.approx(tracker_kg + gap_kwh * emissions / energy, rel=1e-9)
    assert result["estimate"] == pytest.approx([final_kg - tracker_kg, final_kwh - tracker_kwh], rel=1e-9)


@pytest.mark.slow
def test_later_trackers_start_at_once_and_report_exactly_what_codecarbon_measured(
    cold_process: dict[str, Any],
) -> None:
    assert cold_process["second_late_start_s"] == 0.0
    assert cold_process["second_estimate"] == [0.0, 0.0]
    assert cold_process["second_final"] == cold_process["second_tracker_final"]
    assert cold_process["second_final"][1] > 0


_SHORT_COLD_RUN = textwrap.dedent(
    """
    import json, time
    from carbonoffset.core.sources import CodeCarbonSource

    def run(seconds):
        source = CodeCarbonSource(country_iso_code="FRA")
        began = time.perf_counter()
        source.start()
        until = time.monotonic() + seconds
        while time.monotonic() < until:  # "training"
            pass
        final = source.stop()
        wall_s = time.perf_counter() - began
        return {"wall_s": wall_s, "late_s": source.late_start_s, "kwh": final.energy_kwh,
                "estimate_kwh": source.late_start_estimate.energy_kwh}

    cold = run(0.3)  # over before CodeCarbon's first hardware detection is
    warm = run(1.0)
    print(json.dumps({"cold": cold, "warm": warm}))
    """
)


@pytest.mark.slow
def test_a_first_run_shorter_than_the_hardware_detection_is_measured_at_a_real_power() -> None:
    (result,) = run_script(_SHORT_COLD_RUN)
    cold, warm = result["cold"], result["warm"]
    # the tracker measured almost nothing of this run itself: the estimate carries it ...
    assert cold["late_s"] > 0.5 * cold["wall_s"]
    assert cold["kwh"] > cold["estimate_kwh"] > 0
    # ... at a power like the one a tracker measures over a whole run (not the near zero of a
    # reading only milliseconds long)
    cold_w = cold["kwh"] * 3.6e6 / cold["wall_s"]
    warm_w = warm["kwh"] * 3.6e6 / warm["wall_s"]
    assert warm["late_s"] == 0.0
    assert 0.25 * warm_w < cold_w < 4 * warm_w, (cold_w, warm_w)


_FORK_DURING_START = textwrap.dedent(
    """
    import json, os, sys
    from carbonoffset.core.sources import CodeCarbonSource

    source = CodeCarbonSource(country_iso_code="FRA")
    source.start()  # the process's first tracker: starts on a background thread
    pid = os.fork()  # e.g. a DataLoader worker, right after the fit began
    if pid == 0:
        # the child sees the parent's state as of the fork, and can track on its own
        child = CodeCarbonSource(country_iso_code="FRA")
        child.start()
        ok = child.stop().energy_kwh >= 0
        print(json.dumps({"started_at_fork": source.start_finished, "child_tracked": ok}), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    source.stop()
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_fork_waits_for_a_tracker_starting_in_the_background() -> None:
    assert run_script(_FORK_DURING_START) == [{"started_at_fork": True, "child_tracked": True}]


_CPU_MODEL_PROCESS = textwrap.dedent(
    """
    import json
    import cpuinfo
    from codecarbon.core import util
    from carbonoffset.core.codecarbon_startup import cpu_model_cache_path, warm_up_codecarbon
    from carbonoffset.core.sources import CodeCarbonSource

    calls = []
    original = cpuinfo.get_cpu_info

    def counting():
        calls.append(1)
        return original()

    cpuinfo.get_cpu_info = counting  # py-cpuinfo's slow detection (a busy-waiting subprocess)
    assert warm_up_codecarbon().wait(120)
    source = CodeCarbonSource(country_iso_code="FRA")
    source.start()
    kwh = source.stop().energy_kwh
    print(json.dumps({"model": util.detect_cpu_model(), "detections": len(calls), "kwh": kwh,
                      "cache": str(cpu_model_cache_path())}))
    """
)


@pytest.mark.slow
def test_the_cpu_model_is_detected_once_per_machine_not_once_per_process(tmp_path: Path) -> None:
    env = {**subprocess_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def process() -> dict[str, Any]:
        (result,) = run_script(_CPU_MODEL_PROCESS, env=env)
        return dict(result)

    first = process()  # nothing cached: CodeCarbon detects, carbonoffset remembers
    assert first["detections"] == 1 and first["kwh"] > 0
    cache = Path(first["cache"])
    assert cache.is_relative_to(tmp_path / "cache")
    (key, model), *others = json.loads(cache.read_text()).items()
    assert model == first["model"] and not others

    cache.write_text(json.dumps({key: "Test CPU 9000"}))  # tell later processes something recognisable
    second = process()
    assert second["detections"] == 0  # no py-cpuinfo subprocess: the model came from the cache
    assert second["model"] == "Test CPU 9000" and second["kwh"] > 0

    for damaged in ("{not json", "[1]", json.dumps({key: " "}), json.dumps({key: 123})):
        cache.write_text(damaged)  # unreadable or implausible: detect as usual, and write it anew
        again = process()
        assert again["detections"] == 1 and again["model"] == first["model"], damaged
        assert json.loads(cache.read_text()) == {key: first["model"]}, damaged


_FORK_AFTER_A_TIMED_OUT_WAIT = textwrap.dedent(
    """
    import json, os, time
    import cpuinfo
    from carbonoffset.core import codecarbon_startup as startup

    def slow_detection():
        time.sleep(3)
        return {"brand_raw": "Slow CPU"}

    cpuinfo.get_cpu_info = slow_detection  # a hardware detection slower than the fork's wait
    startup.FORK_WAIT_S = 0.3
    startup.warm_up_codecarbon()
    began = time.monotonic()
    pid = os.fork()
    if pid == 0:
        forks = []
        for _ in range(2):  # e.g. DataLoader workers in a ddp_fork rank
            began = time.monotonic()
            child = os.fork()
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
            forks.append(time.monotonic() - began)
        print(json.dumps({"left_over": startup.unfinished_background_starts(), "forks_s": forks}), flush=True)
        os._exit(0)
    waited = time.monotonic() - began
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"parent_waited_s": waited}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_child_forked_while_a_start_ran_does_not_wait_for_it_again(tmp_path: Path) -> None:
    env = {**subprocess_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    child, parent = run_script(_FORK_AFTER_A_TIMED_OUT_WAIT, env=env, lines=2)
    assert 0.25 < parent["parent_waited_s"] < 2.5  # waited FORK_WAIT_S, not for the whole detection
    # the start's thread does not exist in the child: nothing there waits for it
    assert child["left_over"] == 0
    assert all(seconds < 0.25 for seconds in child["forks_s"]), child


class _CountingProbe:
    """A CodeCarbon output handler counting the totals it receives (one per flush or stop)."""

    def __init__(self) -> None:
        self.count = 0

    def out(self, total: Any, delta: Any) -> None:
        self.count += 1

    def live_out(self, total: Any, delta: Any) -> None:
        pass

    def task_out(self, data: Any, experiment_name: Any) -> None:
        pass

    def exit(self) -> None:
        pass


@pytest.mark.slow
def test_read_serves_figures_refreshed_in_the_background() -> None:
    assert CodeCarbonSource().warm_up().wait(120)  # this test is about a tracker that starts at once
    probe = _CountingProbe()
    slow = CodeCarbonSource(country_iso_code="FRA", refresh_s=3600, output_handlers=[probe])
    slow.start()
    first = slow.read()  # the first read of a run may flush (no figures yet) ...
    flushes = probe.count
    readings = [slow.read() for _ in range(50)]
    assert probe.count == flushes  # ... later reads serve the cached figures without flushing
    assert all(r == first for r in readings)
    slow.stop()

    probe = _CountingProbe()
    fast = CodeCarbonSource(country_iso_code="FRA", refresh_s=0.05, output_handlers=[probe])
    fast.start()
    before = fast.read()
    seen = probe.count
    deadline = threading.Event()
    while probe.count < seen + 3:  # the background thread keeps refreshing
        assert not deadline.wait(0.05) and probe.count < seen + 1000
    after = fast.read()
    final = fast.stop()
    assert after.energy_kwh > before.energy_kwh
    assert final.energy_kwh >= after.energy_kwh
    with pytest.raises(ValueError, match="refresh_s"):
        CodeCarbonSource(refresh_s=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_background_detection_runs_at_a_lower_priority_than_training() -> None:
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def lowered() -> None:
        lower_thread_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen == [min(19, main_nice + BACKGROUND_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice  # training keeps its own


# ------------------------------------------------------------- OffsetSession
def test_a_locked_ledger_never_blocks_record_epoch_and_flush_writes_in_order(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    session = OffsetSession(source=ScriptedEmissions([0.1, 0.2, 0.3]), offsetter_options=FAST, **settings)
    run_id = session.start()
    assert session.flush(5)
    blocker = sqlite3.connect(settings["offset_ledger"], timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the ledger's write lock
    reports: list[Any] = []
    hook = threading.Thread(target=lambda: reports.extend(session.record_epoch(e) for e in range(3)))
    hook.start()
    hook.join(timeout=30)
    try:
        assert not hook.is_alive(), "record_epoch waited for the ledger"
        assert [r.emissions_kg for r in reports] == pytest.approx([0.1, 0.2, 0.3])
        assert [r.pending_kg for r in reports] == pytest.approx([0.1, 0.2, 0.3])  # from memory meanwhile
        assert not session.flush(0.2)  # the writes are still queued behind the lock
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert session.flush(30)
    with Ledger(settings["offset_ledger"]) as ledger:
        # in order, the last epoch's figures last; epochs queued meanwhile are written as one
        # record (records are cumulative), not lost: see test_short_epochs_cost_one_ledger_write_a_second
        epochs = [row[1] for row in _records(ledger, run_id)]
        assert epochs == sorted(epochs) and epochs[-1] == 2
        assert ledger.run(run_id).emissions_kg == pytest.approx(0.3)  # type: ignore[union-attr]
        assert ledger.run(run_id).epochs == 3  # type: ignore[union-attr]
    report = session.stop()
    session.close()
    assert report.emissions_kg == pytest.approx(0.3) and report.epochs == 3


def test_short_epochs_cost_one_ledger_write_a_second_and_lose_nothing(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    """Epochs far shorter than OffsetSession.RECORD_INTERVAL_S are written as one record per
    interval (the latest cumulative figures), so the ledger thread does not compete with
    training at every epoch; flush() writes the latest at once; nothing is lost. (Figures that
    reach offset_threshold are written at once: test_threshold_crossed_mid_training_... in
    tests/integrations/test_lightning.py.)"""
    figures = [0.001 * (e + 1) for e in range(200)]  # 0.2 kg in all: below the 0.5 kg threshold
    session = OffsetSession(source=ScriptedEmissions(figures), offsetter_options=FAST, **settings)
    run_id = session.start()
    assert session.flush(5)
    started = time.monotonic()
    for epoch in range(200):
        session.record_epoch(epoch)
        time.sleep(0.005)  # 200 epochs of about 5 ms: about one second
    spent = time.monotonic() - started
    assert session.flush(5)
    with Ledger(settings["offset_ledger"]) as ledger:
        epochs = [row[1] for row in _records(ledger, run_id)]
        run = ledger.run(run_id)
    assert epochs == sorted(epochs) and epochs[-1] == 199
    # one write at the first epoch, then at most one per interval started, plus flush's
    assert len(epochs) <= 2 + spent / OffsetSession.RECORD_INTERVAL_S + 1
    assert run is not None and run.epochs == 200
    assert run.emissions_kg == pytest.approx(0.2)
    report = session.stop()
    session.close()
    assert report.emissions_kg == pytest.approx(0.2) and report.epochs == 200


def _records(ledger: Ledger, run_id: str | None) -> list[tuple[Any, ...]]:
    raw = sqlite3.connect(ledger.path)
    try:
        return raw.execute(
            "SELECT emissions_kg, epoch FROM records WHERE run_id = ? ORDER BY id", (run_id,)
        ).fetchall()
    finally:
        raw.close()


def test_epoch_reports_agree_with_the_ledger_and_offsets_see_every_recorded_epoch(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    script = [0.2, 0.45, 0.7, 1.1, 1.6]
    session = OffsetSession(source=ScriptedEmissions(script), offsetter_options=FAST, **settings)
    session.start()
    for epoch in range(len(script)):
        report = session.record_epoch(epoch)
        assert session.wait(10)  # the write, the decision and any offset it triggered are done
        ledger = session.ledger
        assert ledger is not None
        balance = ledger.balance(session.config.account)
        # the same total again: its figures now come from what the ledger thread read after writing
        again = session.record(Measurement(report.emissions_kg, report.energy_kwh), epoch=epoch)
        assert again.pending_kg == pytest.approx(balance.pending_kg, abs=1e-12)
        assert again.offset_kg == pytest.approx(ledger.run_offset_kg(session.run_id or ""), abs=1e-12)
        assert report.emissions_kg == again.emissions_kg == pytest.approx(script[epoch])
    # offset_now goes behind the queued epoch figures: it buys what they make pending
    session.record(Measurement(2.5, 2.5 / 0.056), epoch=len(script))
    session.offset_now(wait=10, respect_threshold=False)
    final = session.stop()
    session.close()
    assert server.total_lb() == int(2.5 // 0.45359237) == final.confirmed_lb
    assert final.pending_kg == pytest.approx(2.5 - final.confirmed_lb * 0.45359237, abs=1e-9)


# ----------------------------------------------------------------------- Ledger
def _big_ledger(path: Path, records: int = 70_000) -> str:
    """A ledger file above Ledger.FULL_CHECK_MAX_BYTES: one run with many recorded epochs."""
    with Ledger(path) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
    raw = sqlite3.connect(path)
    raw.executemany(
        "INSERT INTO records (run_id, epoch, emissions_kg, energy_kwh, recorded_utc) VALUES (?, ?, ?, ?, ?)",
        ((run, e, e * 1e-6, e * 1e-5, "2026-01-01T00:00:00.000000Z") for e in range(records)),
    )
    raw.execute(
        "UPDATE runs SET emissions_kg = ?, epochs = ? WHERE run_id = ?", (records * 1e-6, records, run)
    )
    raw.commit()
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()
    assert path.stat().st_size > Ledger.FULL_CHECK_MAX_BYTES
    return run


def _damage(path: Path, *, page: int, pages: int = 3) -> None:
    size = 4096
    data = bytearray(path.read_bytes())
    data[page * size : (page + pages) * size] = random.Random(page).randbytes(pages * size)
    path.write_bytes(bytes(data))


def test_big_ledger_with_damaged_epoch_records_opens_then_verify_refuses_it(
    ledger_path: Path, caplog: pytest.LogCaptureFixture, server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    run = _big_ledger(ledger_path)
    pages = ledger_path.stat().st_size // 4096
    _damage(ledger_path, page=pages // 2)  # the middle of the file: epoch records, not accounting
    before = digest(ledger_path)

    with pytest.raises(LedgerError, match="(?s)corrupt.*not modified"):
        Ledger(ledger_path)  # the default full check refuses it when opening

    ledger = Ledger(ledger_path, full_check=False)  # accounting tables intact: opens at once
    assert ledger.run(run) is not None
    for _ in range(2):
        with pytest.raises(LedgerError, match="(?s)corrupt.*not modified"):
            ledger.verify()
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.record(run, emissions_kg=1.0, energy_kwh=1.0, epoch=0)  # no write after a failed check
    ledger.close()
    assert digest(ledger_path) == before

    # a session opens it the same way: training goes on, an error is logged, nothing is written
    session = OffsetSession(source=ScriptedEmissions([0.1, 0.2]), offsetter_options=FAST, **settings)
    with caplog.at_level(logging.ERROR, logger="carbonoffset"):
        session.start()
        session.record_epoch(0)
        session.record_epoch(1)
        report = session.stop()
        session.close()
    assert report.emissions_kg == pytest.approx(0.2)
    assert any("corrupt" in r.getMessage() and str(ledger_path) in r.getMessage() for r in caplog.records)
    assert server.captures == []


def test_big_ledger_with_damaged_accounting_tables_is_refused_at_open(ledger_path: Path) -> None:
    _big_ledger(ledger_path)
    raw = sqlite3.connect(ledger_path)
    (root,) = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()
    raw.close()
    _damage(ledger_path, page=root - 1, pages=1)  # the runs table's root page (pages count from 1)
    before = digest(ledger_path)
    for full_check in (True, False):
        with pytest.raises(LedgerError, match="corrupt|unreadable"):
            Ledger(ledger_path, full_check=full_check)
    assert digest(ledger_path) == before


def test_big_healthy_ledger_verifies_and_records(ledger_path: Path) -> None:
    run = _big_ledger(ledger_path, records=70_000)
    with Ledger(ledger_path, full_check=False) as ledger:
        ledger.verify()
        ledger.verify()  # once checked, free
        assert ledger.record(run, emissions_kg=1.0, energy_kwh=1.0, epoch=70_000) > 0
        balance, run_kg, run_offset_kg = ledger.position(SANDBOX, run)
        assert (balance.recorded_kg, run_kg, run_offset_kg) == (pytest.approx(1.0), pytest.approx(1.0), 0.0)
        other = uuid.uuid4().hex
        assert ledger.position(SANDBOX, other)[1:] == (0.0, 0.0)


def test_big_damaged_ledger_of_an_older_schema_is_checked_completely_before_migrating(
    ledger_path: Path, as_schema_1: Callable[[Path], None]
) -> None:
    _big_ledger(ledger_path)
    as_schema_1(ledger_path)
    _damage(ledger_path, page=ledger_path.stat().st_size // 4096 // 2)  # epoch records only
    before = digest(ledger_path)
    # a session opens big files with full_check=False; a migration would write to this one
    with pytest.raises(LedgerError, match="(?s)corrupt.*not modified"):
        Ledger(ledger_path, full_check=False)
    assert digest(ledger_path) == before
