"""The SQLite ledger: cumulative recording, accounts, refusal of bad files, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _backends import execute

from carbonoffset.core.errors import LedgerError
from carbonoffset.core.ledger import (
    APPLICATION_ID,
    OPEN_STATES,
    PID_NAMESPACE,
    SCHEMA_VERSION,
    Ledger,
    OffsetState,
    host_identity,
)
from carbonoffset.core.units import KG_PER_LB, whole_lb_ceil, whole_lb_floor

SANDBOX = "sandbox:aaaaaaaaaaaaaaaa"
PRODUCTION = "production:aaaaaaaaaaaaaaaa"
OTHER_KEY = "sandbox:bbbbbbbbbbbbbbbb"


@pytest.fixture
def ledger(ledger_target: Path | str) -> Ledger:
    with Ledger(ledger_target) as opened:
        yield opened  # type: ignore[misc]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_ledger_file(path: Path, *, recorded_kg: float = 0.3) -> None:
    with Ledger(path) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
        ledger.record(run, emissions_kg=recorded_kg, energy_kwh=1.0)


# ----------------------------------------------------------------- recording
def test_new_ledger_is_created_with_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "ledger.sqlite3"
    with Ledger(path) as ledger:
        assert ledger.accounts() == []
    assert path.is_file()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
            SCHEMA_VERSION
        )
    finally:
        conn.close()


def test_recording_is_cumulative_and_idempotent(ledger: Ledger) -> None:
    run = ledger.start_run(account=SANDBOX, environment="sandbox", label="unit")
    assert ledger.record(run, emissions_kg=0.3, energy_kwh=5.0, epoch=0) == pytest.approx(0.3)
    assert ledger.record(run, emissions_kg=0.3, energy_kwh=5.0, epoch=0) == 0.0  # same total twice
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.3)
    assert ledger.record(run, emissions_kg=0.2, energy_kwh=4.0) == 0.0  # an older, smaller total
    assert ledger.record(run, emissions_kg=0.5, energy_kwh=6.0, epoch=1) == pytest.approx(0.2)
    balance = ledger.balance(SANDBOX)
    assert balance.recorded_kg == pytest.approx(0.5)
    assert balance.pending_kg == pytest.approx(0.5)
    assert balance.offset_kg == balance.in_flight_kg == balance.credit_kg == 0.0
    record = ledger.run(run)
    assert record is not None
    assert (record.emissions_kg, record.energy_kwh, record.epochs, record.label) == (0.5, 6.0, 2, "unit")
    assert [kg for _, kg in ledger.history(SANDBOX)] == pytest.approx([0.3, 0.5])


def test_runs_add_up_and_a_reopened_run_does_not_double_count(ledger: Ledger) -> None:
    first = ledger.start_run(account=SANDBOX, environment="sandbox")
    ledger.record(first, emissions_kg=0.2, energy_kwh=1.0)
    ledger.end_run(first)
    second = ledger.start_run(account=SANDBOX, environment="sandbox")
    ledger.record(second, emissions_kg=0.25, energy_kwh=1.0)
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.45)
    # resume the first run: its cumulative total continues, not restarts
    assert ledger.start_run(account=SANDBOX, environment="sandbox", run_id=first) == first
    ledger.record(first, emissions_kg=0.2, energy_kwh=1.0)
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.45)
    ledger.record(first, emissions_kg=0.3, energy_kwh=1.5)
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.55)
    assert [r.run_id for r in ledger.runs(SANDBOX)] == [first, second]
    assert ledger.run(first).status == "running"  # type: ignore[union-attr]
    assert [kg for _, kg in ledger.history(SANDBOX)] == pytest.approx([0.2, 0.45, 0.55])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_record_rejects_bad_values(ledger: Ledger, bad: float) -> None:
    run = ledger.start_run(account=SANDBOX, environment="sandbox")
    with pytest.raises(ValueError, match="emissions_kg"):
        ledger.record(run, emissions_kg=bad, energy_kwh=0.0)
    with pytest.raises(ValueError, match="energy_kwh"):
        ledger.record(run, emissions_kg=0.1, energy_kwh=bad)
    assert ledger.balance(SANDBOX).recorded_kg == 0.0


def test_record_unknown_run(ledger: Ledger) -> None:
    with pytest.raises(KeyError):
        ledger.record("nope", emissions_kg=0.1, energy_kwh=0.0)


def test_accounts_are_isolated(ledger: Ledger) -> None:
    for account, environment, kg in (
        (SANDBOX, "sandbox", 0.7),
        (PRODUCTION, "production", 0.2),
        (OTHER_KEY, "sandbox", 1.0),
    ):
        run = ledger.start_run(account=account, environment=environment)
        ledger.record(run, emissions_kg=kg, energy_kwh=0.0)
    assert ledger.accounts() == sorted([SANDBOX, PRODUCTION, OTHER_KEY])
    intent = ledger.create_intent(
        account=SANDBOX,
        environment="sandbox",
        run_id=None,
        amount_lb_for=whole_lb_floor,
        min_pending_kg=0.5,
        lease_s=60,
    )
    assert intent is not None and intent.amount_lb == 1
    assert ledger.balance(SANDBOX).pending_kg == pytest.approx(0.7 - KG_PER_LB, abs=1e-12)
    assert ledger.balance(SANDBOX).in_flight_kg == pytest.approx(KG_PER_LB)
    # the production account with the same key and another sandbox key are untouched
    assert ledger.balance(PRODUCTION).pending_kg == pytest.approx(0.2)
    assert ledger.balance(PRODUCTION).in_flight_kg == 0.0
    assert ledger.balance(OTHER_KEY).pending_kg == pytest.approx(1.0)
    assert ledger.offsets(PRODUCTION) == [] and ledger.offsets(OTHER_KEY) == []
    # production below threshold: no intent; pending of another account never leaks in
    assert (
        ledger.create_intent(
            account=PRODUCTION,
            environment="production",
            run_id=None,
            amount_lb_for=whole_lb_floor,
            min_pending_kg=0.5,
            lease_s=60,
        )
        is None
    )


def test_offset_states_move_the_balance(ledger: Ledger) -> None:
    run = ledger.start_run(account=SANDBOX, environment="sandbox")
    ledger.record(run, emissions_kg=2.0, energy_kwh=0.0)

    def intent(**kw: object):  # type: ignore[no-untyped-def]
        options = {
            "account": SANDBOX,
            "environment": "sandbox",
            "run_id": run,
            "amount_lb_for": whole_lb_floor,
        }
        options.update({"min_pending_kg": 0.5, "lease_s": 60})
        options.update(kw)
        return ledger.create_intent(**options)  # type: ignore[arg-type]

    first = intent()
    assert first is not None and first.amount_lb == 4 and first.state == "intent"
    assert ledger.balance(SANDBOX).pending_kg == pytest.approx(2.0 - 4 * KG_PER_LB, abs=1e-12)
    assert intent() is None  # nothing left above the threshold
    ledger.mark_unknown(first.offset_id, error="timeout")
    assert ledger.offset(first.offset_id).state == "unknown"  # type: ignore[union-attr]
    assert ledger.balance(SANDBOX).in_flight_kg == pytest.approx(4 * KG_PER_LB)
    ledger.mark_failed(first.offset_id, error="400")
    assert ledger.balance(SANDBOX).pending_kg == pytest.approx(2.0)  # refused: pending again
    # closed offsets are not reopened by a late state change
    ledger.mark_unknown(first.offset_id, error="late")
    assert ledger.offset(first.offset_id).state == "failed"  # type: ignore[union-attr]

    second = intent()
    assert second is not None and second.amount_lb == 4
    ledger.mark_confirmed(
        second.offset_id, user_id="U1", time_utc="2024-01-01T00:00:00.000Z", carbon_captured=4
    )
    balance = ledger.balance(SANDBOX)
    assert balance.offset_kg == pytest.approx(4 * KG_PER_LB)
    assert balance.pending_kg + balance.offset_kg + balance.in_flight_kg == pytest.approx(2.0, abs=1e-9)
    assert ledger.run_offset_kg(run) == pytest.approx(4 * KG_PER_LB)

    # round-up below the threshold: the overshoot is a credit
    third = intent(amount_lb_for=whole_lb_ceil, min_pending_kg=0.0)
    assert third is not None and third.amount_lb == 1
    balance = ledger.balance(SANDBOX)
    assert balance.pending_kg == 0.0
    assert balance.credit_kg == pytest.approx(5 * KG_PER_LB - 2.0, abs=1e-12)
    assert intent(amount_lb_for=whole_lb_ceil, min_pending_kg=0.0) is None  # nothing pending: no purchase


def test_offset_states_are_an_enum_stored_and_shown_as_their_text(ledger: Ledger, ledger_target: Path | str) -> None:
    """An offset's state is an ``OffsetState`` whose text is what the database, JSON and messages hold."""
    run = ledger.start_run(account=SANDBOX, environment="sandbox")
    ledger.record(run, emissions_kg=1.0, energy_kwh=0.0)
    record = ledger.create_intent(
        account=SANDBOX, environment="sandbox", run_id=run, amount_lb_for=whole_lb_floor, min_pending_kg=0.5, lease_s=60
    )
    assert record is not None and record.state is OffsetState.INTENT
    assert execute(ledger_target, "SELECT state FROM offsets") == [("intent",)]
    ledger.mark_unknown(record.offset_id, error="timeout")
    stored = execute(ledger_target, "SELECT state FROM offsets")
    assert stored == [("unknown",)] and type(stored[0][0]) is str  # the column holds the plain text
    read = ledger.offset(record.offset_id)
    assert read is not None and read.state is OffsetState.UNKNOWN and read.state == "unknown"
    assert json.dumps({"state": read.state}) == '{"state": "unknown"}'
    assert f"{read.state}" == str(read.state) == "%s" % read.state == "unknown"  # noqa: UP031
    assert ledger.offsets(SANDBOX, states=OPEN_STATES) == [read] == ledger.offsets(SANDBOX, states=("unknown",))
    ledger.mark_confirmed(record.offset_id, user_id="U1", time_utc="2024-01-01T00:00:00.000Z", carbon_captured=2)
    assert execute(ledger_target, "SELECT state FROM offsets") == [("confirmed",)]
    assert [o.state for o in ledger.offsets()] == [OffsetState.CONFIRMED]


def test_claim_respects_live_owners_and_takes_over_dead_ones(ledger: Ledger, ledger_target: Path | str) -> None:
    run = ledger.start_run(account=SANDBOX, environment="sandbox")
    ledger.record(run, emissions_kg=1.0, energy_kwh=0.0)
    intent = ledger.create_intent(
        account=SANDBOX,
        environment="sandbox",
        run_id=run,
        amount_lb_for=whole_lb_floor,
        min_pending_kg=0.5,
        lease_s=600,
    )
    assert intent is not None
    assert ledger.claim(intent.offset_id, lease_s=600) is not None  # our own

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = host_identity()

    def set_owner(owner: str, lease_until: float | None = None) -> None:
        execute(
            ledger_target,
            "UPDATE offsets SET owner = :owner, lease_until = COALESCE(:lease, lease_until) WHERE offset_id = :id",
            {"owner": owner, "lease": lease_until, "id": intent.offset_id},
        )

    # a live process (pid 1) on this host holds a valid lease: hands off
    set_owner(f"{host}:{PID_NAMESPACE}:1")
    assert ledger.claim(intent.offset_id, lease_s=600) is None
    # its owner died (kill -9): taken over although the lease has not expired
    set_owner(f"{host}:{PID_NAMESPACE}:{dead.pid}")
    claimed = ledger.claim(intent.offset_id, lease_s=600)
    assert claimed is not None and claimed.owner == f"{host}:{PID_NAMESPACE}:{os.getpid()}"
    # a dead PID on another host proves nothing: its valid lease is respected
    set_owner(f"elsewhere:{PID_NAMESPACE}:{dead.pid}")
    assert ledger.claim(intent.offset_id, lease_s=600) is None
    # another host's offset with an expired lease can be taken over
    set_owner("elsewhere:1:1", lease_until=time.time() - 1)
    assert ledger.claim(intent.offset_id, lease_s=600) is not None
    ledger.mark_confirmed(intent.offset_id, user_id="U", time_utc="t", carbon_captured=2)
    assert ledger.claim(intent.offset_id, lease_s=600) is None  # closed


# ---------------------------------------------------------- refusing bad files
def assert_refused(path: Path, match: str) -> None:
    before = digest(path)
    size = path.stat().st_size
    for _ in range(2):  # trying again changes nothing either
        with pytest.raises(LedgerError, match=match) as info:
            Ledger(path)
        assert str(path) in str(info.value)
        assert "not modified" in str(info.value)
    assert digest(path) == before
    assert path.stat().st_size == size


@pytest.mark.parametrize("size", [100, 4096, 65536])
def test_random_bytes_are_refused_and_kept(ledger_path: Path, size: int) -> None:
    ledger_path.write_bytes(random.Random(size).randbytes(size))
    assert_refused(ledger_path, "not a SQLite database or is corrupt")


def test_damaged_ledger_pages_are_refused_and_kept(ledger_path: Path) -> None:
    with Ledger(ledger_path) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
        for i in range(1500):
            ledger.record(run, emissions_kg=i * 0.001, energy_kwh=0.0, epoch=i)
    data = bytearray(ledger_path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[3 * page : 6 * page] = random.Random(7).randbytes(3 * page)  # header page intact
    ledger_path.write_bytes(bytes(data))
    assert_refused(ledger_path, "corrupt|unreadable")


def test_truncated_ledger_is_refused(ledger_path: Path) -> None:
    make_ledger_file(ledger_path)
    data = ledger_path.read_bytes()
    ledger_path.write_bytes(data[:150])
    assert_refused(ledger_path, "corrupt|unreadable")


def test_newer_schema_is_refused_and_kept(ledger_path: Path) -> None:
    make_ledger_file(ledger_path)
    raw = sqlite3.connect(ledger_path)
    raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    raw.commit()
    raw.close()
    assert_refused(ledger_path, rf"schema version {SCHEMA_VERSION + 1}, newer.*pip install -U carbonoffset")


def test_other_sqlite_database_is_refused_and_kept(ledger_path: Path) -> None:
    raw = sqlite3.connect(ledger_path)
    raw.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    raw.execute("INSERT INTO users (name) VALUES ('ada')")
    raw.commit()
    raw.close()
    assert_refused(ledger_path, "not a carbonoffset ledger")
    # even one that happens to have a table named like ours
    raw = sqlite3.connect(ledger_path)
    raw.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    raw.commit()
    raw.close()
    assert_refused(ledger_path, "not a carbonoffset ledger")


def test_ledger_error_is_raised_by_a_session(ledger_path: Path) -> None:
    from carbonoffset.core.session import OffsetSession

    ledger_path.write_bytes(b"definitely not sqlite" * 100)
    before = digest(ledger_path)
    with pytest.raises(LedgerError):
        OffsetSession(offset_ledger=ledger_path)
    assert digest(ledger_path) == before


# ----------------------------------------------------------------- concurrency
_RECORDER = textwrap.dedent(
    """
    import sys, time
    from carbonoffset.core.ledger import Ledger
    path, account, go = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while time.time() < go:
        time.sleep(0.002)
    ledger = Ledger(path)                      # every process opens the fresh file at once
    run = ledger.start_run(account=account, environment="sandbox")
    for i in range(1, 51):
        ledger.record(run, emissions_kg=i * 0.01, energy_kwh=i * 0.1, epoch=i - 1)
        ledger.record(run, emissions_kg=i * 0.01, energy_kwh=i * 0.1, epoch=i - 1)  # same total twice
    ledger.close()
    print(run)
    """
)

_INTENDER = textwrap.dedent(
    """
    import sys, time
    from carbonoffset.core.ledger import Ledger
    from carbonoffset.core.units import whole_lb_floor
    path, account, go, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    ledger = Ledger(path)
    run = ledger.start_run(account=account, environment="sandbox") if mode == "record" else None
    while time.time() < go:
        time.sleep(0.002)
    made = []
    for i in range(1, 51 if mode == "record" else 2):
        if run is not None:
            ledger.record(run, emissions_kg=i * 0.01, energy_kwh=0.0, epoch=i - 1)
        intent = ledger.create_intent(
            account=account, environment="sandbox", run_id=run, amount_lb_for=whole_lb_floor,
            min_pending_kg=0.5, lease_s=60,
        )
        if intent is not None:
            made.append(f"{intent.offset_id}:{intent.amount_lb}")
    ledger.close()
    print(" ".join(made))
    """
)


def run_processes(script: str, args: list[list[str]], *, timeout: float = 120) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *a],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for a in args
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return outputs


@pytest.mark.slow
def test_eight_processes_record_fifty_times_on_one_fresh_file(ledger_target: Path | str) -> None:
    go = str(time.time() + 1.5)
    runs = run_processes(_RECORDER, [[str(ledger_target), SANDBOX, go] for _ in range(8)])
    assert len(set(runs)) == 8
    with Ledger(ledger_target) as ledger:
        assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(8 * 0.5, abs=1e-9)
        assert {r.run_id for r in ledger.runs(SANDBOX)} == set(runs)
        for run in ledger.runs(SANDBOX):
            assert (run.emissions_kg, run.epochs) == (pytest.approx(0.5), 50)
            assert run.energy_kwh == pytest.approx(5.0)
        assert len(ledger.history(SANDBOX)) == 8 * 50  # the repeated totals wrote nothing
        assert ledger.history(SANDBOX)[-1][1] == pytest.approx(4.0, abs=1e-9)


_FRESH_OPENERS = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, tempfile
    from carbonoffset.core.ledger import Ledger

    def open_it(path, barrier, results):
        barrier.wait()
        try:
            Ledger(path, full_check=False).close()
            results.put("ok")
        except Exception as exc:
            results.put(repr(exc))

    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        root, trials, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        for trial in range(trials):
            path = os.path.join(root, f"trial{trial}", "ledger.sqlite3")
            barrier, results = ctx.Barrier(width), ctx.Queue()
            procs = [ctx.Process(target=open_it, args=(path, barrier, results)) for _ in range(width)]
            for p in procs:
                p.start()
            outcomes = [results.get(timeout=120) for _ in procs]
            for p in procs:
                p.join()
            for outcome in outcomes:
                print(outcome)
    """
)


@pytest.mark.slow
def test_every_rank_opening_one_fresh_ledger_at_the_same_instant_succeeds(tmp_path: Path) -> None:
    # All ranks of a job build their callback at once. Switching a new file to WAL mode does not
    # wait on SQLite's busy timeout, so before ledgers were created aside and linked into place
    # about one trial in five failed here with "database is locked".
    trials, width = 30, 4
    script = tmp_path / "openers.py"
    script.write_text(_FRESH_OPENERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(trials), str(width)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    outcomes = done.stdout.split("\n")[:-1]
    assert len(outcomes) == trials * width
    assert [o for o in outcomes if o != "ok"] == []
    for trial in range(trials):
        folder = tmp_path / f"trial{trial}"
        # no temporary file left (SQLite may keep its -wal/-shm files when two closes coincide)
        assert {p.name for p in folder.iterdir()} <= {
            "ledger.sqlite3",
            "ledger.sqlite3-wal",
            "ledger.sqlite3-shm",
        }
        with Ledger(folder / "ledger.sqlite3") as ledger:
            assert ledger.runs(SANDBOX) == []


@pytest.mark.slow
def test_concurrent_intents_never_buy_the_same_emissions_twice(ledger_target: Path | str) -> None:
    with Ledger(ledger_target) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
        ledger.record(run, emissions_kg=10.0, energy_kwh=0.0)
    # eight processes race for the same 10 kg: exactly one wins
    go = str(time.time() + 1.5)
    outputs = run_processes(_INTENDER, [[str(ledger_target), SANDBOX, go, "race"] for _ in range(8)])
    made = [item for out in outputs for item in out.split()]
    assert len(made) == 1
    assert made[0].endswith(":22")  # floor(10 / 0.45359237)
    with Ledger(ledger_target) as ledger:
        balance = ledger.balance(SANDBOX)
        assert balance.in_flight_kg == pytest.approx(22 * KG_PER_LB)
        assert balance.pending_kg == pytest.approx(10.0 - 22 * KG_PER_LB, abs=1e-9)
        assert balance.credit_kg == 0.0


@pytest.mark.slow
def test_concurrent_record_and_intent_from_eight_processes(ledger_target: Path | str) -> None:
    Ledger(ledger_target).close()
    go = str(time.time() + 1.5)
    outputs = run_processes(_INTENDER, [[str(ledger_target), SANDBOX, go, "record"] for _ in range(8)])
    made = [item.split(":") for out in outputs for item in out.split()]
    with Ledger(ledger_target) as ledger:
        balance = ledger.balance(SANDBOX)
        offsets = ledger.offsets(SANDBOX)
    assert balance.recorded_kg == pytest.approx(4.0, abs=1e-9)
    assert sorted(o.offset_id for o in offsets) == sorted(offset_id for offset_id, _ in made)
    total_lb = sum(o.amount_lb for o in offsets)
    # never more than what was recorded (no credit: nothing bought twice) ...
    assert balance.credit_kg == 0.0
    assert total_lb * KG_PER_LB <= 4.0
    # ... and everything above the threshold was taken: 4.0 kg -> 8 lb, 0.37 kg left pending
    assert balance.pending_kg < 0.5
    assert total_lb == whole_lb_floor(4.0) == 8
    assert balance.pending_kg + balance.in_flight_kg == pytest.approx(4.0, abs=1e-9)


def test_a_folder_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ledger.sqlite3"
    folder.mkdir()
    with pytest.raises(LedgerError, match="ledger.sqlite3"):
        Ledger(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_version_1_ledger_is_migrated_in_place_keeping_its_data(
    tmp_path: Path, as_schema_1: Callable[[Path], None]
) -> None:
    path = tmp_path / "v1.sqlite3"
    with Ledger(path) as ledger:
        run_id = ledger.start_run(account="sandbox:abc", environment="sandbox")
        ledger.record(run_id, emissions_kg=0.7, energy_kwh=1.0, epoch=0)
    as_schema_1(path)
    with Ledger(path) as ledger:
        assert ledger.balance("sandbox:abc").pending_kg == pytest.approx(0.7)
        intent = ledger.create_intent(
            account="sandbox:abc",
            environment="sandbox",
            run_id=run_id,
            amount_lb_for=lambda kg: 1,
            min_pending_kg=0.0,
            lease_s=10.0,
        )
        assert intent is not None
        ledger.mark_sent(intent.offset_id)
        assert ledger.offset(intent.offset_id).last_sent is not None  # type: ignore[union-attr]
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    assert raw.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'runs_by_root'"
    ).fetchone()
    raw.close()


def test_a_damaged_version_1_ledger_is_refused_before_it_is_migrated(
    tmp_path: Path, as_schema_1: Callable[[Path], None]
) -> None:
    path = tmp_path / "v1.sqlite3"
    with Ledger(path) as ledger:
        run_id = ledger.start_run(account="sandbox:abc", environment="sandbox")
        for i in range(1500):
            ledger.record(run_id, emissions_kg=i * 0.001, energy_kwh=0.0, epoch=i)
    as_schema_1(path)
    data = bytearray(path.read_bytes())
    page = 4096
    # damage the records; the header and the meta table stay intact
    data[4 * page : 6 * page] = random.Random(11).randbytes(2 * page)
    path.write_bytes(bytes(data))
    # the damage is found before the migration could write its columns into the file
    assert_refused(path, "corrupt|unreadable")
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    raw.close()


@pytest.mark.parametrize(
    "statement",
    [
        "PRAGMA application_id = 1234",  # an empty database claimed by another application
        "CREATE VIEW answer AS SELECT 42 AS value",  # a database holding only a view
    ],
)
def test_a_database_that_is_not_an_empty_one_of_ours_is_not_adopted(tmp_path: Path, statement: str) -> None:
    path = tmp_path / "other.sqlite3"
    raw = sqlite3.connect(path)
    raw.execute(statement)
    raw.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="not a carbonoffset ledger"):
        Ledger(path)
    assert path.read_bytes() == before


def test_a_ledger_missing_a_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "partial.sqlite3"
    Ledger(path).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("DROP TABLE records")
    raw.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="no valid schema"):
        Ledger(path)
    assert path.read_bytes() == before


def test_an_unwritable_ledger_folder_is_a_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="cannot create the ledger's folder"):
        Ledger(blocker / "sub" / "ledger.sqlite3")


def test_move_runs_refuses_to_cross_environments(ledger_target: Path | str) -> None:
    with Ledger(ledger_target) as ledger:
        ledger.start_run(account="production:no-key", environment="production")
        with pytest.raises(ValueError, match="different environments"):
            ledger.move_runs(from_account="production:no-key", to_account="sandbox:abc")
        assert len(ledger.runs("production:no-key")) == 1


# ------------------------------------------------------------------ resumed runs
def _raw_sum(target: Path | str) -> float:
    """What any reader of schema 2, this version or an older one, counts for the runs."""
    return float(execute(target, "SELECT SUM(emissions_kg) FROM runs")[0][0])


def test_resumed_segments_add_up_for_every_reader(ledger: Ledger, ledger_target: Path | str) -> None:
    run = ledger.start_run(account=SANDBOX, environment="sandbox")
    ledger.record(run, emissions_kg=10.0, energy_kwh=20.0, epoch=4)
    # two branches resumed from the checkpoint at epoch 4 (10 kg), at the same time
    a = ledger.resume_run(run, account=SANDBOX, environment="sandbox", at_least_kg=10.0, at_least_kwh=20.0)
    b = ledger.resume_run(run, account=SANDBOX, environment="sandbox", at_least_kg=10.0, at_least_kwh=20.0)
    assert (a.resumed_from, b.resumed_from, a.base_emissions_kg, b.base_emissions_kg) == (
        run,
        run,
        10.0,
        10.0,
    )
    assert a.epochs == b.epochs == 5
    ledger.record(a.run_id, emissions_kg=15.0, energy_kwh=30.0, epoch=9)  # cumulative, base included
    ledger.record(b.run_id, emissions_kg=14.0, energy_kwh=28.0, epoch=7)
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(19.0)  # 10 + 5 + 4
    assert _raw_sum(ledger_target) == pytest.approx(19.0)  # an older carbonoffset sees the same
    whole = ledger.run(b.run_id)  # a segment's id gives its run
    assert whole is not None
    assert (whole.run_id, whole.segments, whole.epochs) == (run, 3, 10)
    assert (whole.emissions_kg, whole.energy_kwh) == (pytest.approx(19.0), pytest.approx(38.0))
    assert ledger.runs() == [whole]
    assert ledger.history()[-1][1] == pytest.approx(19.0)
    # a later resume starts from the run's total
    c = ledger.resume_run(
        run, account=SANDBOX, environment="sandbox", at_least_kg=15.0, checkpointed_by=a.run_id
    )
    assert c.base_emissions_kg == pytest.approx(19.0)


def test_a_checkpoint_ahead_of_its_writer_row_is_caught_up_on_that_row_only(ledger: Ledger) -> None:
    run = ledger.start_run(account=SANDBOX, environment="sandbox")
    ledger.record(run, emissions_kg=10.0, energy_kwh=0.0)
    a = ledger.resume_run(run, account=SANDBOX, environment="sandbox", at_least_kg=10.0)
    b = ledger.resume_run(run, account=SANDBOX, environment="sandbox", at_least_kg=10.0)
    ledger.record(a.run_id, emissions_kg=12.0, energy_kwh=0.0)  # a checkpointed 15, then died
    ledger.record(b.run_id, emissions_kg=14.0, energy_kwh=0.0)
    # a's checkpoint resumed (twice, at once): a's row gets its last 3 kg, once
    for _ in range(2):
        ledger.resume_run(
            run, account=SANDBOX, environment="sandbox", at_least_kg=15.0, checkpointed_by=a.run_id
        )
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(19.0)  # 10 + 5 + 4: nothing lost
    # a's own write of 15 arriving late changes nothing: not counted twice
    assert ledger.record(a.run_id, emissions_kg=15.0, energy_kwh=0.0) == 0.0
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(19.0)


def test_resuming_a_run_this_ledger_does_not_know_creates_it_with_the_checkpoint_figures(
    ledger: Ledger, ledger_target: Path | str
) -> None:
    first = ledger.resume_run(
        "f" * 32, account=SANDBOX, environment="sandbox", at_least_kg=0.5, at_least_kwh=2.0
    )
    assert (first.run_id, first.resumed_from, first.base_emissions_kg) == ("f" * 32, None, 0.5)
    ledger.record(first.run_id, emissions_kg=0.75, energy_kwh=3.0)
    second = ledger.resume_run("f" * 32, account=SANDBOX, environment="sandbox")  # same id, at once
    assert second.resumed_from == "f" * 32 and second.base_emissions_kg == pytest.approx(0.75)
    ledger.record(second.run_id, emissions_kg=1.0, energy_kwh=4.0)
    assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(1.0) == _raw_sum(ledger_target)


def test_a_ledger_is_created_in_place_where_hard_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    folder = tmp_path / "ledgers"
    path = folder / ("long-name-" + "x" * 220 + ".sqlite3")  # valid, near the 255-byte limit
    with Ledger(path) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
        ledger.record(run, emissions_kg=0.5, energy_kwh=1.0)
    with Ledger(path) as ledger:
        assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.5)
    assert {p.name for p in folder.iterdir()} <= {path.name, f"{path.name}-wal", f"{path.name}-shm"}
