"""Acceptance: offsets exactly once through the real ``makeimpact`` SDK against the loopback server.

Every test drives :class:`OffsetSession` (emissions from :class:`ScriptedEmissions`)
against :class:`FakeOneClickImpact`; nothing in the SDK or ``requests`` is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from carbonoffset.core.client import METADATA_ID_KEY, OffsetClient
from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import OffsetServiceError
from carbonoffset.core.ledger import Balance, Ledger
from carbonoffset.core.ledger.urls import mask_password
from carbonoffset.core.offsetter import Offsetter
from carbonoffset.core.session import OffsetSession, RunReport
from carbonoffset.core.sources import CodeCarbonSource, Measurement
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact, Fault, ScriptedEmissions

FAST = {"wait_initial_s": 0.01, "wait_max_s": 0.05}


def session_for(settings: dict[str, Any], emissions: list[float], **overrides: Any) -> OffsetSession:
    return OffsetSession(
        source=ScriptedEmissions(emissions), offsetter_options=FAST, **{**settings, **overrides}
    )


def run_once(settings: dict[str, Any], emissions: list[float], **overrides: Any) -> RunReport:
    """One whole run: start, one epoch per scripted value, stop (waits for offsets)."""
    session = session_for(settings, emissions, **overrides)
    try:
        session.start()
        for epoch in range(len(emissions)):
            session.record_epoch(epoch)
        return session.stop()
    finally:
        session.close()


def balance_of(settings: dict[str, Any]) -> Balance:
    config = OffsetConfig.resolve(**settings)
    with Ledger(config.ledger_path) as ledger:
        return ledger.balance(config.account)


def offsets_of(settings: dict[str, Any]) -> list[Any]:
    config = OffsetConfig.resolve(**settings)
    with Ledger(config.ledger_path) as ledger:
        return ledger.offsets(config.account)


def assert_conserved(balance: Balance, recorded_kg: float) -> None:
    """Nothing lost, nothing counted twice: pending + offset (+ in flight) == recorded."""
    assert balance.recorded_kg == pytest.approx(recorded_kg, abs=1e-9)
    assert balance.credit_kg == 0.0
    assert balance.pending_kg + balance.offset_kg + balance.in_flight_kg == pytest.approx(
        recorded_kg, abs=1e-9
    )


def assert_server_matches_ledger(server: FakeOneClickImpact, settings: dict[str, Any], owed_lb: int) -> None:
    """The server holds exactly the pounds owed, one capture per confirmed ledger offset."""
    assert server.total_lb() == owed_lb
    offsets = [o for o in offsets_of(settings) if o.state == "confirmed"]
    assert sum(o.amount_lb for o in offsets) == owed_lb
    tagged = [c.metadata[METADATA_ID_KEY] for c in server.captures if c.metadata]
    assert len(tagged) == len(server.captures), "every capture carries its offset id"
    assert sorted(tagged) == sorted(o.offset_id for o in offsets), "no duplicate or stray capture"
    for offset in offsets:
        capture = next(c for c in server.captures if c.metadata[METADATA_ID_KEY] == offset.offset_id)  # type: ignore[index]
        assert (offset.carbon_captured, offset.time_utc, offset.user_id) == (
            capture.carbon_captured,
            capture.time_utc,
            capture.user_id,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fixed_server(settings: dict[str, Any]) -> Iterator[FakeOneClickImpact]:
    """A server on a fixed port, so that it can be stopped (connection refused) and restarted."""
    fake = FakeOneClickImpact(environment="sandbox", port=free_port()).start()
    settings["offset_api_url"] = fake.url
    yield fake
    fake.stop()


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture
def settings(settings: dict[str, Any], ledger_target: Path | str) -> dict[str, Any]:
    """Every test here runs on both backends: a SQLite file, then a PostgreSQL database."""
    return {**settings, "offset_ledger": ledger_target}


# -------------------------------------------------------------------- threshold
def test_threshold_offsets_whole_pounds_and_carries_the_rest(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    assert OffsetConfig.resolve(**settings).offset_threshold == 0.5
    session = session_for(settings, [0.4, 0.7, 0.7])
    session.start()
    try:
        first = session.record_epoch(0)
        assert session.wait(5)
        assert server.captures == []
        assert (first.emissions_kg, first.pending_kg, first.offset_kg) == (
            pytest.approx(0.4),
            pytest.approx(0.4),
            0.0,
        )

        session.record_epoch(1)
        assert session.wait(5)
        assert [c.carbon_captured for c in server.captures] == [1]  # floor(0.7 / 0.45359237)
        balance = balance_of(settings)
        assert balance.pending_kg == pytest.approx(0.7 - 0.45359237, abs=1e-9)
        assert balance.offset_kg == pytest.approx(0.45359237, abs=1e-12)

        # the same cumulative total again (a repeated epoch end, a direct record) changes nothing
        again = session.record_epoch(2)
        session.record(Measurement(0.7, 0.7 / 0.056), epoch=2)
        assert session.wait(5)
        assert len(server.captures) == 1
        assert again.pending_kg == pytest.approx(0.7 - 0.45359237, abs=1e-9)
        assert again.offset_kg == pytest.approx(KG_PER_LB)
        assert balance_of(settings).recorded_kg == pytest.approx(0.7, abs=1e-12)
        report = session.stop()
    finally:
        session.close()
    assert len(server.captures) == 1
    assert (report.offset_lb, report.confirmed_lb, report.in_flight_lb, report.epochs) == (1, 1, 0, 3)
    assert report.pending_kg == pytest.approx(0.7 - 0.45359237, abs=1e-9)
    assert report.offset_kg == pytest.approx(KG_PER_LB)
    assert_conserved(balance_of(settings), 0.7)
    assert_server_matches_ledger(server, settings, 1)
    (offset,) = offsets_of(settings)
    assert offset.run_id == report.run_id
    assert server.captures[0].metadata == {
        METADATA_ID_KEY: offset.offset_id,
        "run_id": report.run_id,
        "source": "carbonoffset",
    }


def test_larger_totals_buy_several_pounds_at_once(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    report = run_once(settings, [2.0])
    assert [c.carbon_captured for c in server.captures] == [4]
    assert report.pending_kg == pytest.approx(2.0 - 4 * KG_PER_LB, abs=1e-9)
    assert_conserved(balance_of(settings), 2.0)


def test_auto_offset_off_only_records(server: FakeOneClickImpact, settings: dict[str, Any]) -> None:
    report = run_once(settings, [3.0], auto_offset=False)
    assert server.captures == []
    assert report.pending_kg == pytest.approx(3.0)
    # an explicit offset later takes it
    session = session_for(settings, [0.0], auto_offset=False)
    session.start()
    session.offset_now(wait=5)
    session.stop()
    session.close()
    assert server.total_lb() == 6
    assert_conserved(balance_of(settings), 3.0)


_ONE_RUN = textwrap.dedent(
    """
    import dataclasses, json, sys
    from carbonoffset.core.session import OffsetSession
    from carbonoffset.testing import ScriptedEmissions
    url, ledger, key, kg = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    session = OffsetSession(
        source=ScriptedEmissions([kg]), offset_api_key=key, offset_environment="sandbox", offset_api_url=url,
        offset_ledger=ledger, offset_request_timeout=2.0, offset_timeout=10.0,
        offsetter_options={"wait_initial_s": 0.01, "wait_max_s": 0.05},
    )
    session.start()
    session.record_epoch(0)
    report = session.stop()
    session.close()
    print(json.dumps(dataclasses.asdict(report), default=str))
    """
)


def run_in_process(settings: dict[str, Any], kg: float) -> dict[str, Any]:
    args = [settings["offset_api_url"], str(settings["offset_ledger"]), settings["offset_api_key"], str(kg)]
    done = subprocess.run(
        [sys.executable, "-c", _ONE_RUN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_residual_carries_across_processes(server: FakeOneClickImpact, settings: dict[str, Any]) -> None:
    first = run_in_process(settings, 0.2)
    assert server.captures == [] and first["pending_kg"] == pytest.approx(0.2)
    second = run_in_process(settings, 0.2)
    assert server.captures == [] and second["pending_kg"] == pytest.approx(0.4)
    third = run_in_process(settings, 0.2)
    assert [c.carbon_captured for c in server.captures] == [1]
    assert third["confirmed_lb"] == 1
    assert third["pending_kg"] == pytest.approx(0.6 - KG_PER_LB, abs=1e-9)
    assert len({first["run_id"], second["run_id"], third["run_id"]}) == 3
    assert_conserved(balance_of(settings), 0.6)
    assert_server_matches_ledger(server, settings, 1)


# ----------------------------------------------------------------------- faults
OWED_KG = 2.0
OWED_LB = 4  # floor(2.0 / 0.45359237)

FAULTS: dict[str, Callable[[int], Fault]] = {
    "500": lambda times: Fault(status=500, times=times),
    "503-non-json": lambda times: Fault(status=503, body="<html>503 Service Unavailable</html>", times=times),
    "timeout": lambda times: Fault(delay_s=0.6, times=times),  # the server acts, answers after the deadline
    "malformed-json": lambda times: Fault(malformed=True, times=times),
    "captured-response-dropped": lambda times: Fault(drop_after_capture=True, times=times),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_transient_fault_is_retried_without_a_duplicate(
    fault: str, server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    server.inject(FAULTS[fault](1))
    report = run_once(settings, [OWED_KG], offset_request_timeout=0.25)
    assert report.confirmed_lb == OWED_LB and report.in_flight_lb == 0
    assert_server_matches_ledger(server, settings, OWED_LB)
    assert len(server.captures) == 1
    assert_conserved(balance_of(settings), OWED_KG)
    (offset,) = offsets_of(settings)
    assert offset.attempts >= 2 and offset.last_error is None


@pytest.mark.parametrize("fault", [*sorted(FAULTS), "connection-refused"])
def test_persistent_fault_leaves_the_offset_open_and_the_next_session_settles_it(
    fault: str, fixed_server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    server = fixed_server
    if fault == "connection-refused":
        server.stop()
    else:
        server.inject(FAULTS[fault](100))
        server.inject(Fault(endpoint="records", status=503, body="down", times=100))  # look-ups fail too
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        report = run_once(settings, [OWED_KG], offset_request_timeout=0.25)
    # the training side got its report; the outcome is unknown, so the amount is in flight, not pending
    assert report.confirmed_lb == 0 and report.in_flight_lb == OWED_LB
    assert report.pending_kg == pytest.approx(OWED_KG - OWED_LB * KG_PER_LB, abs=1e-9)
    (offset,) = offsets_of(settings)
    assert offset.state == "unknown" and offset.last_error
    assert_conserved(balance_of(settings), OWED_KG)
    assert any("still unconfirmed" in r.getMessage() for r in caplog.records)
    acted = fault in {"timeout", "malformed-json", "captured-response-dropped"}
    assert server.total_lb() == (OWED_LB if acted else 0)

    # recovery: the service is back; the next session reconciles before anything else
    if fault == "connection-refused":
        server.start()
        assert server.url == settings["offset_api_url"]
    server.clear_faults()
    again = run_once(settings, [0.0])
    assert again.emissions_kg == 0.0
    assert_server_matches_ledger(server, settings, OWED_LB)
    assert len(server.captures) == 1
    balance = balance_of(settings)
    assert balance.in_flight_kg == 0.0
    assert balance.offset_kg == pytest.approx(OWED_LB * KG_PER_LB)
    assert_conserved(balance, OWED_KG)
    # running reconcile again finds nothing to do and buys nothing
    run_once(settings, [0.0])
    assert len(server.captures) == 1


@pytest.mark.slow
def test_slow_server_acting_after_the_deadline_is_not_paid_twice(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    """The request that timed out is still on its way: no second capture while it may land."""
    server.inject(Fault(stall_s=1.0))  # the server acts on the first capture only after 1 s
    report = run_once(settings, [0.7], offset_request_timeout=0.25)
    assert report.confirmed_lb == 0 and report.in_flight_lb == 1
    wait_for(lambda: len(server.captures) == 1, timeout=5)
    time.sleep(0.2)
    assert len(server.captures) == 1
    run_once(settings, [0.0])  # the next run finds the late capture instead of buying again
    assert len(server.captures) == 1
    assert_server_matches_ledger(server, settings, 1)
    assert_conserved(balance_of(settings), 0.7)


@pytest.mark.slow
def test_a_late_capture_landing_while_the_retry_looks_it_up_is_not_paid_twice(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    """A slow service, slow on every endpoint: the capture that timed out is acted on while the
    retry's look-up is on its way (the look-up was read before the capture landed, so it finds
    nothing, and is answered after the capture's own answer came back). The retry must not take
    "not found" plus "no request in flight any more" as leave to send a second capture."""
    server.inject(Fault(stall_s=3.0))  # acts on the capture 3 s after receiving it, then answers
    server.inject(Fault(endpoint="records", delay_s=1.5))  # reads the records at once, answers 1.5 s later
    # t=0 capture sent; t=2 its deadline; t~2 the retry looks up (sees nothing yet); t=3 the capture
    # lands and is answered; t~3.5 the look-up answers "not found"
    run_once(settings, [0.7], offset_request_timeout=2.0)
    wait_for(lambda: len(server.captures) >= 1, timeout=10)
    time.sleep(0.2)  # the first capture's answer is back: nothing of it is in flight any more
    assert len(server.captures) == 1, [c.metadata for c in server.captures]
    run_once(settings, [0.0])  # the next run finds the late capture instead of buying again
    assert len(server.captures) == 1
    assert_server_matches_ledger(server, settings, 1)
    assert_conserved(balance_of(settings), 0.7)


@pytest.mark.slow
def test_next_session_in_the_same_process_does_not_race_the_previous_worker(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    server.inject(Fault(stall_s=1.0))
    first = session_for(settings, [0.7], offset_request_timeout=2.0, offset_timeout=0.1)
    first.start()
    first.record_epoch(0)
    report = first.stop()  # gives up waiting; its worker is still waiting for the answer
    assert report.in_flight_lb == 1
    second = run_once(settings, [0.0], offset_timeout=0.1)  # reconciles at start while the first still works
    assert second.emissions_kg == 0.0
    assert first.wait(5)
    first.close()
    run_once(settings, [0.0])
    assert len(server.captures) == 1
    assert_server_matches_ledger(server, settings, 1)
    assert_conserved(balance_of(settings), 0.7)


def test_definite_refusal_returns_the_amount_to_pending(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    server.inject(Fault(status=400, body={"type": "invalid_request_error", "message": "nope"}, times=100))
    report = run_once(settings, [0.7])
    assert server.captures == []
    assert report.pending_kg == pytest.approx(0.7)
    assert report.offset_lb == 0
    offsets = offsets_of(settings)
    assert offsets and all(o.state == "failed" and "nope" in (o.last_error or "") for o in offsets)
    assert all(o.attempts == 1 for o in offsets)  # a definite refusal is not retried blindly
    assert_conserved(balance_of(settings), 0.7)
    # nothing lost: once the service accepts again, the next run offsets it
    server.clear_faults()
    run_once(settings, [0.0])
    assert server.total_lb() == 1
    assert_conserved(balance_of(settings), 0.7)
    assert_server_matches_ledger(server, settings, 1)


def test_a_refused_offset_is_bought_again_later_in_the_same_run(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    server.inject(Fault(status=400, body={"type": "invalid_request_error", "message": "nope"}))
    report = run_once(settings, [0.7])
    # the refused intent is failed; the final offset at stop buys the same emissions once
    assert [o.state for o in offsets_of(settings)] == ["failed", "confirmed"]
    assert report.confirmed_lb == 1
    assert_server_matches_ledger(server, settings, 1)
    assert_conserved(balance_of(settings), 0.7)


# ------------------------------------------------------------------------ 401
def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_bad_key_is_found_at_the_start_and_nothing_is_lost(
    settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    key = settings["offset_api_key"]
    with FakeOneClickImpact(environment="sandbox", api_keys=["test_a_different_key"]) as fake:
        settings["offset_api_url"] = fake.url
        fake.inject(Fault(endpoint="whoami", stall_s=1.5))  # a slow answer must not delay training
        session = session_for(settings, [0.1, 0.2, 0.3])  # a small run that never reaches the threshold
        with caplog.at_level(logging.DEBUG):
            started = time.monotonic()
            session.start()
            session.record_epoch(0)
            assert time.monotonic() - started < 1.0  # the check (1.5 s) runs in the background
            assert session.wait(5)
            session.record_epoch(1)
            session.record_epoch(2)
            report = session.stop()
            session.close()
        assert fake.requests == [("GET", "/v1/whoami", 401)]  # checked once, nothing else sent
        (error,) = _errors(caplog)
        message = error.getMessage()
        assert "refused the key set in offset_api_key" in message and "carbonoffset adopt" in message
        assert all(key not in r.getMessage() for r in caplog.records)
        assert report.not_bought is not None and "refused offset_api_key" in report.not_bought
        assert report.pending_kg == pytest.approx(0.3) and offsets_of(settings) == []
        assert_conserved(balance_of(settings), 0.3)
        (end_line,) = [r for r in caplog.records if r.name == "carbonoffset"]
        assert end_line.levelno == logging.INFO and "refused offset_api_key" in end_line.getMessage()

        # the key is accepted again (e.g. activated): the next run offsets everything pending
        fake.api_keys = {key}
        more = run_once(settings, [1.3])
        assert fake.total_lb() == 3 == more.confirmed_lb  # floor(1.6 / 0.45359237)
        assert_conserved(balance_of(settings), 1.6)
        assert_server_matches_ledger(fake, settings, 3)


def test_key_refused_at_the_capture_is_reported_once(
    settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The key passed the start check, then was revoked: the capture's 401 is the one ERROR."""
    key = settings["offset_api_key"]
    with FakeOneClickImpact(environment="sandbox") as fake:
        settings["offset_api_url"] = fake.url
        session = session_for(settings, [0.7, 1.6])
        with caplog.at_level(logging.DEBUG):
            session.start()
            assert session.wait(5) and fake.requests == [("GET", "/v1/whoami", 200)]
            fake.api_keys = {"test_a_different_key"}
            session.record_epoch(0)
            assert session.wait(5)
            session.record_epoch(1)  # no new attempt with a refused key
            report = session.stop()
            session.close()
        capture_calls = [r for r in fake.requests if r[1] == "/v1/capture_carbon"]
        assert capture_calls == [("POST", "/v1/capture_carbon", 401)] and fake.captures == []
        (error,) = _errors(caplog)
        assert "offset_api_key" in error.getMessage() and "refused" in error.getMessage()
        assert all(key not in r.getMessage() for r in caplog.records)
        (offset,) = offsets_of(settings)
        assert offset.state == "failed" and report.pending_kg == pytest.approx(1.6)
        assert_conserved(balance_of(settings), 1.6)


def test_unreachable_service_at_the_start_is_one_warning(
    settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port where nothing listens: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings["offset_api_url"] = f"http://127.0.0.1:{port}"
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        report = run_once(settings, [0.1, 0.2])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and not _errors(caplog)
    assert "could not check offset_api_key" in warnings[0].getMessage()
    assert report.not_bought == "below threshold" and report.pending_kg == pytest.approx(0.2)


def test_an_accepted_key_is_checked_once_per_process(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    for _ in range(3):
        run_once(settings, [0.1])
    assert server.requests == [("GET", "/v1/whoami", 200)]


def test_the_end_line_says_what_was_recorded_bought_and_left_pending(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    def end_line(**overrides: Any) -> tuple[RunReport, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="carbonoffset"):
            report = run_once({**settings, **overrides}, [0.2, 1.2])
        (line,) = [r.getMessage() for r in caplog.records if r.name == "carbonoffset"]
        assert line == f"carbonoffset: {report.summary}"
        return report, line

    report, line = end_line()
    assert report.confirmed_lb == 2 and report.not_bought is None
    pending = 1.2 - 2 * KG_PER_LB
    assert line.startswith("carbonoffset: recorded 1.2 kg CO2eq (")
    assert (
        f"bought 2 lb ({2 * KG_PER_LB:.3g} kg) this run; {pending:.3g} kg pending below the 0.5 kg threshold"
        in line
    )
    assert f"ledger {mask_password(str(settings['offset_ledger']))}" in line  # never the password

    report, line = end_line()  # 0.293 + 1.2 kg pending now: 3 lb
    assert report.confirmed_lb == 3

    report, line = end_line(auto_offset=False)
    assert report.not_bought is not None and report.confirmed_lb == 0
    assert "bought nothing this run: auto_offset is off" in line

    report, line = end_line(offset_threshold=5.0)
    assert f"bought nothing this run: {report.pending_kg:.3g} kg pending below the 5 kg threshold" in line

    report, line = end_line(offset_api_key=None)
    assert "bought nothing this run: offset_api_key is not set" in line
    assert "account sandbox:no-key" in line

    micro = run_once(settings, [0.0, 2.5e-6])  # a tiny run never prints as zero
    assert "recorded 2.5e-06 kg CO2eq" in micro.summary


# ------------------------------------------------------------------- kill -9
_KILLED = textwrap.dedent(
    """
    import sys, time
    from carbonoffset.core.session import OffsetSession
    from carbonoffset.testing import ScriptedEmissions
    url, ledger, key = sys.argv[1], sys.argv[2], sys.argv[3]
    session = OffsetSession(
        source=ScriptedEmissions([0.7]), offset_api_key=key, offset_environment="sandbox", offset_api_url=url,
        offset_ledger=ledger, offset_request_timeout=60.0, offset_timeout=60.0,
    )
    session.start()
    session.record_epoch(0)   # the worker writes the intent, then calls capture_carbon
    print("recorded", flush=True)
    time.sleep(120)           # killed with SIGKILL before the answer arrives
    """
)

_KILLED_ON_HOST_A = textwrap.dedent(
    """
    import os, sys, time
    os.environ["CARBONOFFSET_HOST_ID"] = "host-a"
    from carbonoffset.core.session import OffsetSession
    from carbonoffset.testing import ScriptedEmissions
    url, ledger, key = sys.argv[1], sys.argv[2], sys.argv[3]
    session = OffsetSession(
        source=ScriptedEmissions([0.7]), offset_api_key=key, offset_environment="sandbox", offset_api_url=url,
        offset_ledger=ledger, offset_request_timeout=60.0, offset_timeout=60.0,
        offsetter_options={"lease_s": 3.0},
    )
    session.start()
    session.record_epoch(0)   # the worker writes the intent, then calls capture_carbon
    time.sleep(120)           # killed with SIGKILL before the answer arrives
    """
)


@pytest.mark.slow
def test_another_host_takes_a_killed_hosts_offset_over_only_after_its_lease_and_buys_nothing_twice(
    server: FakeOneClickImpact, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    server.inject(Fault(delay_s=30))  # captured at once, answered only after 30 s
    args = [settings["offset_api_url"], str(settings["offset_ledger"]), settings["offset_api_key"]]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_ON_HOST_A, *args], env=subprocess_env())
    try:
        wait_for(lambda: len(server.captures) == 1 or child.poll() is not None)
        assert child.poll() is None
        time.sleep(1.5)  # the heartbeat renewed the 3 s lease meanwhile
        (intent,) = offsets_of(settings)
        assert intent.owner.startswith("host-a:") and intent.lease_until > time.time() + 1.0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    monkeypatch.setenv("CARBONOFFSET_HOST_ID", "host-b")  # this process is now the other host
    config = OffsetConfig.resolve(**settings)
    with Ledger(config.ledger_path) as ledger:
        # host-a's PID is gone, but on another host that proves nothing: its lease holds
        assert Offsetter(config, ledger, **FAST, resend_grace_s=0.0).reconcile() == []
        wait_for(lambda: (ledger.offset(intent.offset_id).lease_until or 0) < time.time() - 0.1, timeout=10)  # type: ignore[union-attr]
        # the lease expired; within the resend grace nothing is taken over either
        assert Offsetter(config, ledger, **FAST).reconcile() == []
        assert len(server.captures) == 1
        # after both, host-b looks the capture up and confirms it: nothing bought twice
        (outcome,) = Offsetter(config, ledger, **FAST, resend_grace_s=0.0).reconcile()
    assert outcome.state == "confirmed" and outcome.offset_id == intent.offset_id
    assert len(server.captures) == 1
    assert_server_matches_ledger(server, settings, 1)
    assert_conserved(balance_of(settings), 0.7)
    (offset,) = offsets_of(settings)
    assert offset.owner is not None and offset.owner.startswith("host-b:")


_KILLED_BEFORE_SENDING = textwrap.dedent(
    """
    import os, signal, sys
    from carbonoffset.core.ledger import Ledger
    from carbonoffset.core.config import OffsetConfig
    from carbonoffset.core.units import whole_lb_floor
    url, ledger_path, key = sys.argv[1], sys.argv[2], sys.argv[3]
    config = OffsetConfig(offset_api_key=key, offset_environment="sandbox", offset_ledger=ledger_path)
    ledger = Ledger(ledger_path)
    run = ledger.start_run(account=config.account, environment="sandbox")
    ledger.record(run, emissions_kg=0.7, energy_kwh=1.0)
    ledger.create_intent(account=config.account, environment="sandbox", run_id=run,
                         amount_lb_for=whole_lb_floor, min_pending_kg=0.5, lease_s=3600)
    os.kill(os.getpid(), signal.SIGKILL)   # dies after the intent, before any request
    """
)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_after_capture_is_reconciled_without_buying_twice(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    server.inject(Fault(delay_s=30))  # captured at once, answered only after 30 s
    args = [settings["offset_api_url"], str(settings["offset_ledger"]), settings["offset_api_key"]]
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    try:
        wait_for(lambda: len(server.captures) == 1 or child.poll() is not None)
        assert child.poll() is None, child.stderr.read()  # type: ignore[union-attr]
        (intent,) = offsets_of(settings)
        assert intent.state == "intent" and intent.owner.endswith(f":{child.pid}")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    # Within the resend grace the next run leaves the offset alone: the dead process's request
    # might still be acted on, and a look-up cannot see it yet.
    report = run_once(settings, [0.0])
    assert report.emissions_kg == 0.0
    assert len(server.captures) == 1
    (still_open,) = offsets_of(settings)
    assert still_open.state == "intent" and still_open.last_sent is not None
    assert_conserved(balance_of(settings), 0.7)

    # Once the grace has passed, the next run looks it up and confirms it without buying again.
    session = OffsetSession(
        source=ScriptedEmissions([0.0]), offsetter_options={**FAST, "resend_grace_s": 0.0}, **settings
    )
    try:
        session.start()
        session.stop()
    finally:
        session.close()
    assert len(server.captures) == 1
    assert_server_matches_ledger(server, settings, 1)
    (offset,) = offsets_of(settings)
    assert offset.state == "confirmed" and offset.offset_id == intent.offset_id
    assert_conserved(balance_of(settings), 0.7)


@pytest.mark.slow
def test_kill_9_before_sending_is_reconciled_by_buying_once(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    args = [settings["offset_api_url"], str(settings["offset_ledger"]), settings["offset_api_key"]]
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_SENDING, *args],
        capture_output=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    (intent,) = offsets_of(settings)
    assert intent.state == "intent"
    run_once(settings, [0.0])
    assert [c.carbon_captured for c in server.captures] == [1]
    assert_server_matches_ledger(server, settings, 1)
    assert_conserved(balance_of(settings), 0.7)


# ------------------------------------------------------------------ concurrency
_EPOCHS = textwrap.dedent(
    """
    import sys, time
    from carbonoffset.core.session import OffsetSession
    from carbonoffset.testing import ScriptedEmissions
    url, ledger, key, go = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    session = OffsetSession(
        source=ScriptedEmissions(lambda n: 0.02 * (n + 1)), offset_api_key=key, offset_environment="sandbox",
        offset_api_url=url, offset_ledger=ledger, offset_request_timeout=5.0, offset_timeout=30.0,
        offsetter_options={"wait_initial_s": 0.01, "wait_max_s": 0.05},
    )
    while time.time() < go:
        time.sleep(0.002)
    session.start()
    for epoch in range(50):
        session.record_epoch(epoch)
    report = session.stop()
    session.close()
    assert report.in_flight_lb == 0, report
    """
)


@pytest.mark.slow
def test_eight_processes_fifty_epochs_offset_exactly_once(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    go = str(time.time() + 2.0)
    args = [settings["offset_api_url"], str(settings["offset_ledger"]), settings["offset_api_key"], go]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _EPOCHS, *args], stderr=subprocess.PIPE, text=True, env=subprocess_env()
        )
        for _ in range(8)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    recorded = 8 * 0.02 * 50
    balance = balance_of(settings)
    assert_conserved(balance, recorded)
    assert balance.in_flight_kg == 0.0
    assert balance.pending_kg < 0.5  # everything above the threshold was offset ...
    owed = int(recorded // KG_PER_LB)
    assert owed == 17
    assert_server_matches_ledger(server, settings, owed)  # ... once: 17 lb for 8.0 kg


# ---------------------------------------------------------------------- secrets
SECRET = "test_RECOGNISABLE_SECRET_9c4e1f77"


def test_the_key_never_leaks(
    server: FakeOneClickImpact, settings: dict[str, Any], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    settings["offset_api_key"] = SECRET
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)
    for name in ("carbonoffset", "codecarbon", "urllib3", "requests", "makeimpact", "tenacity"):
        caplog.set_level(logging.DEBUG, logger=name)

    # a full flow with every kind of trouble on the way
    server.inject(Fault(status=500))
    server.inject(Fault(drop_after_capture=True))
    server.inject(Fault(endpoint="records", status=503, body="nope"))
    server.inject(Fault(malformed=True))
    session = session_for(settings, [0.6, 1.2, 2.5], offset_request_timeout=0.5)
    session.start()
    for epoch in range(3):
        texts.append(repr(session.record_epoch(epoch)))
    report = session.stop()
    texts += [repr(session), repr(report), repr(session.config), str(session.config)]
    texts += [repr(o) for o in session.outcomes]
    session.close()
    assert server.total_lb() == 5  # floor(2.5 / 0.45359237), bought once

    # a refused key, a timeout and client-side errors
    server.api_keys = {"test_somebody_else"}
    run_once(settings, [3.5])
    server.api_keys = None
    server.inject(Fault(endpoint="whoami", delay_s=1.0))
    client = OffsetClient(OffsetConfig.resolve(**{**settings, "offset_request_timeout": 0.3}))
    texts.append(repr(client))
    for call in (client.who_am_i, lambda: client.capture(amount_lb=0, offset_id="x")):
        with pytest.raises((OffsetServiceError, ValueError)) as info:
            call()
        texts += [str(info.value), repr(info.value), "".join(info.exconly())]
    server.api_keys = {"test_somebody_else"}
    with pytest.raises(OffsetServiceError) as refused:
        client.who_am_i()
    assert refused.value.is_auth_error and refused.value.definite
    texts += [
        str(refused.value),
        repr(refused.value),
        str(refused.value.__context__),
        str(refused.value.__cause__),
    ]
    server.api_keys = None

    # a run measured by the real CodeCarbon tracker (offline) on the same ledger
    measured = OffsetSession(
        source=CodeCarbonSource(country_iso_code="FRA"), offsetter_options=FAST, **settings
    )
    measured.start()
    measured.record_epoch(0)
    texts.append(repr(measured.stop()))
    measured.close()

    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
        if record.exc_text:
            texts.append(record.exc_text)
    texts += [o.last_error or "" for o in offsets_of(settings)]
    assert len(caplog.records) > 5 and any(r.name.startswith("urllib3") for r in caplog.records)
    for text in texts:
        assert SECRET not in text
        assert SECRET[5:] not in text

    # no file written anywhere under the test's folders (home, cwd, ledger and its WAL) holds it
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    if isinstance(settings["offset_ledger"], Path):
        assert Path(settings["offset_ledger"]) in files
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data, path
        assert SECRET[5:].encode() not in data, path
        assert SECRET.encode("utf-16-le") not in data, path


def test_import_pulls_in_no_framework() -> None:
    code = (
        "import carbonoffset, sys; assert not {'torch','lightning','transformers','keras'} & set(sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    deeper = (
        "import sys, carbonoffset.core, carbonoffset.testing, carbonoffset.integrations; "
        "from carbonoffset.core.session import OffsetSession; "
        "bad = {'torch','lightning','pytorch_lightning','transformers','keras','tensorflow'} & set(sys.modules); "
        "assert not bad, bad"
    )
    done = subprocess.run(
        [sys.executable, "-c", deeper], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr


_ABANDONS = textwrap.dedent(
    """
    import sys
    from carbonoffset.core.session import OffsetSession
    from carbonoffset.testing import ScriptedEmissions
    url, ledger, key = sys.argv[1], sys.argv[2], sys.argv[3]
    session = OffsetSession(
        source=ScriptedEmissions([0.95]), offset_api_key=key, offset_environment="sandbox", offset_api_url=url,
        offset_ledger=ledger, offset_request_timeout=0.5, offset_timeout=5.0,
        offsetter_options={"wait_initial_s": 0.01, "wait_max_s": 0.05, "max_attempts": 2},
    )
    session.start()
    session.record_epoch(0)
    report = session.stop()      # gives up: the server has not acted yet
    print(report.in_flight_lb, flush=True)
    """
)


@pytest.mark.slow
def test_an_abandoned_capture_is_never_bought_again_by_another_process(
    server: FakeOneClickImpact, settings: dict[str, Any]
) -> None:
    """A process gives up on a capture the server acts on only later, then ends; another process
    reconciling right away must not buy it again (the resend grace), and settles it afterwards."""
    server.inject(Fault(stall_s=3.0))  # acts on the capture 3 s after receiving it
    args = [settings["offset_api_url"], str(settings["offset_ledger"]), settings["offset_api_key"]]
    done = subprocess.run(
        [sys.executable, "-c", _ABANDONS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"  # 2 lb still unconfirmed when the process ended
    assert server.captures == []  # the server has not acted yet

    config = OffsetConfig.resolve(**settings)
    with Ledger(config.ledger_path) as ledger:
        offsetter = Offsetter(config, ledger, **FAST)  # default resend grace (300 s)
        assert offsetter.reconcile() == []  # within the grace: not taken over, nothing sent
        wait_for(lambda: len(server.captures) == 1)  # the abandoned request lands
        late = Offsetter(config, ledger, **FAST, resend_grace_s=0.0)
        (outcome,) = late.reconcile()
    assert outcome.state == "confirmed"
    assert [c.carbon_captured for c in server.captures] == [2]
    assert_server_matches_ledger(server, settings, 2)
    assert_conserved(balance_of(settings), 0.95)
