"""The team ledger: details, migrations, secrets, network file systems, outages, reports and copies."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _scripts import subprocess_env
from typer.testing import CliRunner

from carbonoffset.cli import EXIT_LEDGER, app
from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import LedgerError, LedgerUnavailableError
from carbonoffset.core.ledger import SCHEMA_VERSION, Ledger
from carbonoffset.core.ledger.filesystems import warn_if_network_filesystem
from carbonoffset.core.session import OffsetSession
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions
from carbonoffset.testing.postgres import PostgresCluster

SANDBOX = "sandbox:aaaaaaaaaaaaaaaa"
FAST = {"wait_initial_s": 0.01, "wait_max_s": 0.05}


# --------------------------------------------------------------------- details
def test_run_details_merge_and_fold_into_the_run(ledger_target: Path | str) -> None:
    with Ledger(ledger_target) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
        assert ledger.run(run).details == {}  # type: ignore[union-attr]
        ledger.set_run_details(run, {"model": "digits", "co2_eq_emissions": 1.5})
        ledger.set_run_details(run, {"co2_eq_emissions": None, "source": "carbonoffset"})
        assert ledger.run(run).details == {  # type: ignore[union-attr]
            "model": "digits",
            "co2_eq_emissions": None,
            "source": "carbonoffset",
        }
        segment = ledger.resume_run(run, account=SANDBOX, environment="sandbox")
        ledger.set_run_details(segment.run_id, {"model": "digits-v2"})
        whole = ledger.run(run)
        assert whole is not None and whole.segments == 2
        assert whole.details["model"] == "digits-v2" and whole.details["source"] == "carbonoffset"
        with pytest.raises(KeyError):
            ledger.set_run_details("nope", {"a": 1})
        with pytest.raises(ValueError, match="JSON"):
            ledger.set_run_details(run, {"a": object()})


@pytest.mark.parametrize("schema", [1, 2])
def test_old_sqlite_ledgers_open_and_get_the_new_columns(
    tmp_path: Path, schema: int, as_schema_1: Callable[[Path], None], as_schema_2: Callable[[Path], None]
) -> None:
    path = tmp_path / f"v{schema}.sqlite3"
    with Ledger(path) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
        ledger.record(run, emissions_kg=0.7, energy_kwh=1.0, epoch=0)
    (as_schema_1 if schema == 1 else as_schema_2)(path)
    with Ledger(path) as ledger:
        assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.7)
        assert ledger.run(run).details == {}  # type: ignore[union-attr]
        ledger.set_run_details(run, {"k": 1})
        assert ledger.run(run).details == {"k": 1}  # type: ignore[union-attr]
        assert ledger.create_intent(
            account=SANDBOX, environment="sandbox", run_id=run, amount_lb_for=lambda kg: 1,
            min_pending_kg=0.5, lease_s=10,
        )
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    raw.close()


# --------------------------------------------------------------------- secrets
def test_the_database_password_never_leaks(
    postgres: PostgresCluster, postgres_url: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    password = postgres.password
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)
    with Ledger(postgres_url) as ledger:
        texts += [repr(ledger), ledger.location, str(ledger.location)]
    wrong = postgres_url.replace(password, password + "-wrong")
    refused = f"postgresql://{postgres.user}:{password}@127.0.0.1:1/none"  # nothing listens on port 1
    for url in (wrong, refused):
        with pytest.raises(LedgerUnavailableError) as info:
            Ledger(url, busy_timeout_s=2)
        texts += [str(info.value), repr(info.value), "".join(info.exconly())]
        assert "***" in str(info.value) or "127.0.0.1" in str(info.value)
    config = OffsetConfig(offset_ledger=postgres_url)
    texts += [repr(config), str(config), config.ledger_display]
    # a session on a ledger whose server refuses the password: warnings, spool file, report
    session = OffsetSession(source=ScriptedEmissions([0.3]), offset_ledger=wrong, offset_environment="sandbox")
    session.start()
    session.record_epoch(0)
    report = session.stop()
    session.close()
    texts += [repr(report), str(report.ledger_path), repr(session)]
    for record in caplog.records:
        texts += [record.getMessage(), repr(record.args)]
    assert any("kept on local disk" in record.getMessage() for record in caplog.records)
    for text in texts:
        assert password not in text, text
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert password.encode() not in path.read_bytes(), path


# -------------------------------------------------------- network file systems
def test_a_sqlite_ledger_on_nfs_is_warned_about_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(
        f"/dev/sda1 / ext4 rw 0 0\nfiler:/export {shared} nfs4 rw,relatime 0 0\nfiler:/x {tmp_path}/sharedx nfs 0 0\n"
    )
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        assert warn_if_network_filesystem(shared / "ledger.sqlite3", str(mounts))
        assert warn_if_network_filesystem(shared / "ledger.sqlite3", str(mounts))
        assert not warn_if_network_filesystem(local / "ledger.sqlite3", str(mounts))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "network file system (nfs4)" in warnings[0] and "postgresql://" in warnings[0]


# --------------------------------------------------------------------- outages
def _hold_write_lock(path: Path, seconds: float, started: threading.Event) -> threading.Thread:
    def hold() -> None:
        raw = sqlite3.connect(path, timeout=30, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        started.set()
        time.sleep(seconds)
        raw.execute("ROLLBACK")
        raw.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("hold_s", [8.0, 65.0])
@pytest.mark.parametrize("when", ["fit start", "mid-run"])
def test_a_locked_sqlite_ledger_never_delays_training_and_loses_nothing(
    when: str, hold_s: float, ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection holds the write lock for 8 s or 65 s, longer than the session's ledger
    timeout (5 s) and, for 65 s, than SQLite's own 60 s busy timeout: training goes on at full
    speed, the figures are kept on local disk, and all of them are in the ledger once the lock
    is gone."""
    Ledger(ledger_path).close()
    emissions = [0.1 * (n + 1) for n in range(6)]
    session = OffsetSession(
        source=ScriptedEmissions(emissions), offset_ledger=ledger_path, offset_environment="sandbox"
    )
    locked = threading.Event()
    holder = None
    caplog.set_level(logging.INFO, logger="carbonoffset")
    if when == "fit start":
        holder = _hold_write_lock(ledger_path, hold_s, locked)
        assert locked.wait(10)
    began = time.perf_counter()
    run_id = session.start()
    session.record_epoch(0)
    first_step_s = time.perf_counter() - began
    if when == "mid-run":
        holder = _hold_write_lock(ledger_path, hold_s, locked)
        assert locked.wait(10)
    slowest = 0.0
    for epoch in range(1, 6):
        began = time.perf_counter()
        session.record_epoch(epoch)
        slowest = max(slowest, time.perf_counter() - began)
        time.sleep(0.5)
    assert first_step_s < 0.1, first_step_s
    assert slowest < 0.1, slowest
    holder.join(hold_s + 10)
    report = session.stop()
    session.close()
    assert report.emissions_kg == pytest.approx(0.6)
    with Ledger(ledger_path) as ledger:
        run = ledger.run(run_id)  # type: ignore[arg-type]
        assert run is not None and run.status == "finished"
        assert (run.emissions_kg, run.epochs) == (pytest.approx(0.6), 6)
        assert ledger.balance(session.config.account).recorded_kg == pytest.approx(0.6)  # once
    messages = [r.getMessage() for r in caplog.records]
    assert any("database is locked" in m and "kept on local disk" in m for m in messages), messages
    assert any("answers again" in m for m in messages), messages


@pytest.mark.slow
def test_a_fit_resumed_while_the_ledger_is_locked_keeps_what_it_measures(ledger_path: Path) -> None:
    """A fit resumed from a checkpoint while another connection holds the SQLite write lock for
    longer than the session's ledger timeout (5 s): like a new run's, its figures are kept on
    local disk and are in the ledger once the lock is gone. None of them may be lost."""
    first = OffsetSession(source=ScriptedEmissions([0.3]), offset_ledger=ledger_path, offset_environment="sandbox")
    run_id = first.begin()
    first.epoch_end(0)
    first.abort("interrupted")
    first.close()
    checkpoint = first.state_dict()  # what the Lightning/HF/Keras callbacks save in checkpoints

    locked = threading.Event()
    holder = _hold_write_lock(ledger_path, 8.0, locked)
    assert locked.wait(10)
    resumed = OffsetSession(
        source=ScriptedEmissions([0.1, 0.2]), offset_ledger=ledger_path, offset_environment="sandbox"
    )
    assert resumed.begin(resume_state=checkpoint) == run_id  # waits at most one ledger timeout
    resumed.epoch_end(1)
    resumed.epoch_end(2)
    holder.join(20)  # the lock is gone before the run ends
    report = resumed.end()
    resumed.close()
    assert report is not None and report.emissions_kg == pytest.approx(0.5)
    with Ledger(ledger_path) as ledger:
        run = ledger.run(run_id)
        assert run is not None
        # 0.3 kg before the checkpoint + 0.2 kg measured by the resumed fit, in a segment of the run
        assert (run.emissions_kg, run.segments, run.status) == (pytest.approx(0.5), 2, "finished")
        assert ledger.balance(resumed.config.account).recorded_kg == pytest.approx(0.5)


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, to stop and start."""
    from carbonoffset.testing.postgres import server_bindir

    if server_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    with PostgresCluster() as cluster:
        yield cluster


@pytest.mark.slow
def test_a_postgresql_server_down_at_start_and_mid_run_never_stalls_training(
    own_postgres: PostgresCluster, server: FakeOneClickImpact, caplog: pytest.LogCaptureFixture
) -> None:
    url = own_postgres.create_database("team")
    settings: dict[str, Any] = {
        "offset_api_key": "test_team_key_0001",
        "offset_environment": "sandbox",
        "offset_api_url": server.url,
        "offset_ledger": url,
        "offset_request_timeout": 2.0,
        "offset_timeout": 10.0,
    }
    Ledger(url).close()  # the schema exists; then the server goes away
    own_postgres.stop_server()
    session = OffsetSession(source=ScriptedEmissions([0.2 * (n + 1) for n in range(8)]), offsetter_options=FAST, **settings)
    caplog.set_level(logging.INFO, logger="carbonoffset")
    slowest = 0.0
    began = time.perf_counter()
    run_id = session.start()
    for epoch in range(8):
        if epoch == 3:
            own_postgres.restart()
        if epoch == 5:
            own_postgres.stop_server()
        if epoch == 7:
            own_postgres.restart()
        began = time.perf_counter() if epoch else began
        session.record_epoch(epoch)
        slowest = max(slowest, time.perf_counter() - began)
        time.sleep(0.3)
    assert slowest < 0.1, slowest
    report = session.stop()
    session.close()
    assert report.emissions_kg == pytest.approx(1.6)
    with Ledger(url) as ledger:
        run = ledger.run(run_id)  # type: ignore[arg-type]
        assert run is not None and run.status == "finished"
        assert (run.emissions_kg, run.epochs) == (pytest.approx(1.6), 8)
        balance = ledger.balance(session.config.account)
        offsets = ledger.offsets(session.config.account)
    assert balance.recorded_kg == pytest.approx(1.6)
    assert sum(o.amount_lb for o in offsets if o.state == "confirmed") == server.total_lb() == 3  # once
    assert balance.pending_kg == pytest.approx(1.6 - 3 * KG_PER_LB, abs=1e-9)
    messages = [r.getMessage() for r in caplog.records]
    assert any("kept on local disk" in m for m in messages), messages


def test_the_end_line_of_a_run_whose_ledger_never_answered_says_the_figures_are_on_local_disk(
    tmp_path: Path, server: FakeOneClickImpact, caplog: pytest.LogCaptureFixture
) -> None:
    """A team ledger whose server is down for the whole run: the end line names the spool file that
    holds the figures (not the ledger, which has none of them) and says why nothing was bought."""
    url = "postgresql://team:Pw-not-shown@127.0.0.1:1/ledger"  # nothing listens on port 1
    session = OffsetSession(
        source=ScriptedEmissions([0.4, 0.8, 1.3]),
        offset_ledger=url,
        offset_api_key="test_team_key_0002",
        offset_environment="sandbox",
        offset_api_url=server.url,
        offset_timeout=5.0,
        offsetter_options=FAST,
    )
    caplog.set_level(logging.INFO, logger="carbonoffset")
    session.start()
    for epoch in range(3):
        session.record_epoch(epoch)
    report = session.stop()
    spooled = sorted((tmp_path / "home").rglob("spool/*.jsonl"))
    assert len(spooled) == 1
    assert report.spool_path == spooled[0]
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("carbonoffset: recorded")]
    assert len(ends) == 1 and ends[0] == f"carbonoffset: {report.summary}"
    assert f"kept on local disk in {spooled[0]}" in report.summary
    assert "offset_timeout" not in report.summary  # nothing was in flight: the ledger did not answer
    assert "the ledger did not answer" in (report.not_bought or "")
    assert "Pw-not-shown" not in report.summary
    session.close()
    assert server.total_lb() == 0  # offsets are decided only from the ledger itself


@pytest.mark.slow
def test_a_ledger_server_that_never_answers_holds_the_runs_end_one_ledger_timeout_and_loses_nothing(
    tmp_path: Path, server: FakeOneClickImpact
) -> None:
    """A server that accepts connections and never answers (a hung host): stop() waits for it no
    longer than one ledger call does, not offset_timeout; close() returns at once; the run's
    figures, details and end are all on local disk, and a replay writes them once."""
    import socket

    from carbonoffset.core.ledger.spool import replay_left_over

    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        url = f"postgresql://team:Pw-not-shown@127.0.0.1:{hole.getsockname()[1]}/ledger"
        session = OffsetSession(
            source=ScriptedEmissions([0.4, 0.8, 1.3], details={"cpu_model": "EPYC"}),
            offset_ledger=url,
            offset_api_key="test_team_key_0003",
            offset_environment="sandbox",
            offset_api_url=server.url,
            offset_timeout=30.0,
            offsetter_options=FAST,
        )
        run_id = session.start()
        for epoch in range(3):
            session.record_epoch(epoch)
        began = time.perf_counter()
        report = session.stop()
        stop_s = time.perf_counter() - began
        began = time.perf_counter()
        session.close()
        close_s = time.perf_counter() - began
        assert stop_s < OffsetSession.LEDGER_TIMEOUT_S + 2.0, stop_s
        assert close_s < 1.0, close_s
        assert report.spool_path is not None and report.spool_path.exists()
        assert report.emissions_kg == pytest.approx(1.3)
        with Ledger(tmp_path / "replayed.sqlite3") as ledger:
            assert replay_left_over(ledger, report.ledger_path) > 0  # type: ignore[arg-type]
            run = ledger.run(run_id)  # type: ignore[arg-type]
            assert run is not None and run.status == "finished"
            assert (run.emissions_kg, run.epochs) == (pytest.approx(1.3), 3)
            assert run.details["cpu_model"] == "EPYC"
            assert ledger.balance(session.config.account).recorded_kg == pytest.approx(1.3)  # once
    assert server.total_lb() == 0


class _FreezableProxy:
    """A loopback TCP proxy to a database server that can be frozen: while frozen it forwards
    nothing, and the connections stay open (new ones are accepted and left waiting). To its
    clients the server then looks like a host that hangs, or a network path that silently drops
    everything (a firewall or NAT that forgot the connection): no answer, no error."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="freezable-proxy", daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._sockets.append(client)
        self._flowing.wait()
        if self._closed:
            client.close()
            return
        upstream = socket.create_connection(self._upstream)
        self._sockets.append(upstream)
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                if self._closed:
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


_HANGS_MID_RUN = textwrap.dedent(
    """
    import sys, time
    from carbonoffset.core.session import OffsetSession
    from carbonoffset.testing import ScriptedEmissions
    session = OffsetSession(
        source=ScriptedEmissions([0.5, 1.0]), offset_ledger=sys.argv[1], offset_environment="sandbox",
        auto_offset=False,
    )
    run_id = session.start()
    session.record_epoch(0)
    assert session.flush(30)
    print(run_id, flush=True)
    sys.stdin.readline()  # the ledger's server hangs now
    session.record_epoch(1)
    print("recorded", flush=True)
    time.sleep(600)  # training goes on until it is killed
    """
)


@pytest.mark.slow
def test_a_ledger_server_that_hangs_mid_run_gets_the_figures_kept_on_local_disk(postgres_url: str) -> None:
    """The team ledger's server stops answering on the connection the session already holds (a
    host that hangs, a network path that drops everything). "What the ledger does not take within
    5 s ... is kept durably on local disk" (guarantees.md), so a training process killed with
    kill -9 well after that has lost at most about 2 s of figures: the next replay writes them."""
    from carbonoffset.core.ledger.spool import replay_left_over
    from carbonoffset.core.ledger.urls import mask_password

    server = urlsplit(postgres_url)
    assert server.hostname is not None and server.port is not None
    proxy = _FreezableProxy((server.hostname, server.port))
    url = postgres_url.replace(f":{server.port}/", f":{proxy.port}/")
    child = subprocess.Popen(
        [sys.executable, "-c", _HANGS_MID_RUN, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        run_id = child.stdout.readline().strip()
        assert run_id, child.stderr.read()
        proxy.freeze()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "recorded", child.stderr.read()
        # well past one ledger call's wait (5 s) plus the record interval (1 s)
        time.sleep(OffsetSession.LEDGER_TIMEOUT_S + OffsetSession.RECORD_INTERVAL_S + 3.0)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(10)
        proxy.close()
    with Ledger(postgres_url) as ledger:
        replay_left_over(ledger, mask_password(url))  # what the next run on this ledger does first
        run = ledger.run(run_id)
        assert run is not None
        assert run.emissions_kg == pytest.approx(1.0), "epoch 1's figures were lost with the process"


# ------------------------------------------------------------ reports, copies
def _fill(target: Path | str) -> tuple[str, str]:
    with Ledger(target) as ledger:
        first = ledger.start_run(account=SANDBOX, environment="sandbox", label="lightning")
        ledger.record(first, emissions_kg=0.6, energy_kwh=2.0, epoch=0)
        ledger.end_run(first)
        intent = ledger.create_intent(
            account=SANDBOX, environment="sandbox", run_id=first, amount_lb_for=lambda kg: 1,
            min_pending_kg=0.5, lease_s=10,
        )
        assert intent is not None
        ledger.mark_confirmed(intent.offset_id, user_id="U1", time_utc="2026-12-01T10:00:00Z", carbon_captured=1)
        second = ledger.start_run(account=SANDBOX, environment="sandbox", label="keras")
        ledger.set_run_details(second, {"project_name": "digits"})
        ledger.record(second, emissions_kg=0.2, energy_kwh=1.0, epoch=0)
        return first, intent.offset_id


def test_report_by_run_project_host_and_account(ledger_target: Path | str) -> None:
    first, offset_id = _fill(ledger_target)
    runner = CliRunner()
    done = runner.invoke(app, ["report", "--ledger", str(ledger_target), "--by", "run", "--json"])
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    runs = {row["run_id"]: row for row in document["groups"]}
    assert runs[first]["status"] == "finished" and runs[first]["duration_s"] >= 0
    assert runs[first]["offset_lb"] == 1 and runs[first]["receipts"][0]["offset_id"] == offset_id
    assert runs[first]["emissions_kg"] == pytest.approx(0.6) and runs[first]["energy_kwh"] == pytest.approx(2.0)
    (other,) = [row for row in runs.values() if row["run_id"] != first]
    assert other["status"] == "running" and other["duration_s"] is None and other["project"] == "digits"
    by_project = json.loads(runner.invoke(app, ["report", "--ledger", str(ledger_target), "--by", "project", "--json"]).stdout)
    assert {g["group"]: g["emissions_kg"] for g in by_project["groups"]} == {
        "lightning": pytest.approx(0.6),
        "digits": pytest.approx(0.2),
    }
    by_account = json.loads(runner.invoke(app, ["report", "--ledger", str(ledger_target), "--by", "account", "--json"]).stdout)
    (account,) = by_account["groups"]
    assert (account["runs"], account["offset_lb"]) == (2, 1)
    assert account["pending_kg"] == pytest.approx(0.8 - KG_PER_LB, abs=1e-9)
    table = runner.invoke(app, ["report", "--ledger", str(ledger_target), "--by", "host"])
    assert table.exit_code == 0 and "0.8" in table.stdout
    assert runner.invoke(app, ["report", "--ledger", str(ledger_target), "--by", "moon"]).exit_code != 0
    if isinstance(ledger_target, str):
        assert ledger_target.split(":")[2].split("@")[0] not in done.stdout  # the password


def test_report_plot_of_a_team_ledger(ledger_target: Path | str, tmp_path: Path) -> None:
    """`report --plot` (and `--plot --run`) on both backends: a PNG, the password in no output."""
    pytest.importorskip("matplotlib")
    first, _ = _fill(ledger_target)
    runner = CliRunner()
    for extra in ([], ["--run", first]):
        plot = tmp_path / f"plot{len(extra)}.png"
        done = runner.invoke(app, ["report", "--ledger", str(ledger_target), "--plot", str(plot), *extra])
        assert done.exit_code == 0, done.output
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if isinstance(ledger_target, str):
            password = ledger_target.split(":")[2].split("@")[0]
            assert password not in done.output and password.encode() not in plot.read_bytes()


def test_ledger_copy_keeps_ids_is_idempotent_and_refuses_conflicts(
    ledger_path: Path, postgres_url: str, tmp_path: Path
) -> None:
    first, offset_id = _fill(ledger_path)
    runner = CliRunner()
    for _ in range(2):
        done = runner.invoke(app, ["ledger", "copy", str(ledger_path), postgres_url])
        assert done.exit_code == 0, done.output
        assert postgres_url.split(":")[2].split("@")[0] not in done.stdout
    with Ledger(ledger_path) as source, Ledger(postgres_url) as target:
        assert source.runs() == target.runs()
        assert source.offsets() == target.offsets()
        assert source.history() == target.history()
        assert target.balance(SANDBOX) == source.balance(SANDBOX)
        # new records after a copy continue the ids
        target.record(first, emissions_kg=0.7, energy_kwh=2.0, epoch=1)
        assert target.balance(SANDBOX).recorded_kg == pytest.approx(0.9)
    # another ledger with a run under the same id but other figures: refused, nothing copied
    other = tmp_path / "other.sqlite3"
    with Ledger(other) as ledger:
        ledger.start_run(account=SANDBOX, environment="sandbox", run_id=first)
        ledger.start_run(account=SANDBOX, environment="sandbox", run_id="new-run")
    done = runner.invoke(app, ["ledger", "copy", str(other), postgres_url])
    assert done.exit_code == EXIT_LEDGER
    assert "nothing was copied" in " ".join(done.output.split())
    with Ledger(postgres_url) as target:
        assert target.run("new-run") is None


def test_an_unsupported_database_url_is_refused_naming_the_fix() -> None:
    with pytest.raises(LedgerError, match="postgresql://") as info:
        Ledger("mysql://user:hunter2@db/ledger")
    assert "hunter2" not in str(info.value)


# ------------------------------------------------------------- damaged files
def test_a_big_damaged_ledger_is_never_modified_by_a_session(
    ledger_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over 4 MiB, not in WAL mode, damaged only in its epoch records: a session finds the damage
    on its ledger thread before any write (no switch to WAL, no `running` row), and keeps the
    run's figures on local disk."""
    import hashlib
    import random

    with Ledger(ledger_path) as ledger:
        run = ledger.start_run(account=SANDBOX, environment="sandbox")
    raw = sqlite3.connect(ledger_path)
    raw.execute("PRAGMA journal_mode = DELETE")
    raw.executemany(
        "INSERT INTO records (run_id, epoch, emissions_kg, energy_kwh, recorded_utc) VALUES (?, ?, ?, ?, ?)",
        ((run, e, e * 1e-6, 0.0, "2026-01-01T00:00:00.000000Z") for e in range(70_000)),
    )
    raw.commit()
    raw.close()
    assert ledger_path.stat().st_size > Ledger.FULL_CHECK_MAX_BYTES
    data = bytearray(ledger_path.read_bytes())
    middle = len(data) // 4096 // 2 * 4096
    data[middle : middle + 3 * 4096] = random.Random(3).randbytes(3 * 4096)
    ledger_path.write_bytes(bytes(data))
    before = hashlib.sha256(ledger_path.read_bytes()).hexdigest()

    session = OffsetSession(
        source=ScriptedEmissions([0.1, 0.2]), offset_ledger=ledger_path, offset_environment="sandbox"
    )
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        new_run = session.start()
        session.record_epoch(0)
        session.record_epoch(1)
        report = session.stop()
        session.close()
    assert report.emissions_kg == pytest.approx(0.2)
    assert hashlib.sha256(ledger_path.read_bytes()).hexdigest() == before
    assert not Path(f"{ledger_path}-wal").exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any("corrupt" in m and "writes nothing to it" in m for m in messages), messages
    spooled = [
        json.loads(line)
        for path in (tmp_path / "home").rglob("spool/*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert {op["run_id"] for op in spooled} == {new_run}
    assert max(op.get("emissions_kg", 0.0) for op in spooled) == pytest.approx(0.2)
    assert spooled[-1] == {"op": "end_run", "run_id": new_run, "status": "finished"}


def test_figures_spooled_by_an_ended_process_are_written_by_ledger_replay(ledger_target: Path | str) -> None:
    from carbonoffset.core.ledger.spool import LedgerWriter

    closed = Ledger(ledger_target)
    closed.close()  # every write now fails: they go to the spool
    writer = LedgerWriter(closed)
    start = {"op": "start_run", "run_id": "r1", "account": SANDBOX, "environment": "sandbox", "nodes": 1}
    assert not writer.write(start)
    for kg in (0.1, 0.3, 0.2):  # an older, smaller total arriving late changes nothing
        assert not writer.write({**start, "op": "record", "emissions_kg": kg, "energy_kwh": kg, "epoch": None})
    assert not writer.write({"op": "end_run", "run_id": "r1", "status": "finished"})
    spooled = writer.spool.path
    writer.close()  # the process "ends": the spool stays on disk
    assert spooled.exists()
    runner = CliRunner()
    for made in ("Wrote 5", "Nothing spooled"):  # a second replay finds nothing: written once
        done = runner.invoke(app, ["ledger", "replay", "--ledger", str(ledger_target)])
        assert done.exit_code == 0 and made in done.stdout, done.output
    with Ledger(ledger_target) as ledger:
        run = ledger.run("r1")
        assert run is not None and (run.status, run.emissions_kg) == ("finished", pytest.approx(0.3))
        assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.3)


def test_a_resume_kept_on_local_disk_is_written_once_from_the_checkpoints_figures(
    ledger_target: Path | str,
) -> None:
    """A fit resumed while the ledger did not answer recorded from its checkpoint's figures; its
    segment and figures, replayed from the spool (once or again), add exactly what it measured:
    for a run the ledger holds (whose crashed attempt got past the checkpoint) and for one it
    does not know."""
    from carbonoffset.core.ledger.spool import LedgerWriter, apply, replay_left_over

    with Ledger(ledger_target) as ledger:
        known = ledger.start_run(account=SANDBOX, environment="sandbox")
        ledger.record(known, emissions_kg=0.4, energy_kwh=1.0)  # 0.1 kg beyond the checkpoint
    closed = Ledger(ledger_target)
    closed.close()  # every write now fails: they go to the spool
    writer = LedgerWriter(closed)
    common = {"account": SANDBOX, "environment": "sandbox", "nodes": 1, "checkpointed_by": None}
    ops = []
    for run_id, segment, checkpoint_kg in ((known, "s-known", 0.3), ("r-unknown", "s-unknown", 0.5)):
        ops += [
            {**common, "op": "resume_run", "run_id": run_id, "segment_id": segment,
             "at_least_kg": checkpoint_kg, "at_least_kwh": 1.0},
            {**common, "op": "record", "run_id": segment, "emissions_kg": checkpoint_kg + 0.2,
             "energy_kwh": 2.0, "epoch": 3},  # 0.2 kg measured after the checkpoint
            {"op": "end_run", "run_id": segment, "status": "finished"},
        ]
    for op in ops:
        assert not writer.write(op)
    writer.close()  # the process "ends": the spool stays on disk
    with Ledger(ledger_target) as ledger:
        assert replay_left_over(ledger, closed.path or closed.location) == len(ops)
        for op in ops:  # written again (a crash mid-replay): nothing changes
            apply(ledger, op, replay=True)
        runs = {run.run_id: run for run in ledger.runs()}
        recorded = ledger.balance(SANDBOX).recorded_kg
    assert (runs[known].segments, runs[known].emissions_kg) == (2, pytest.approx(0.4 + 0.2))
    assert (runs["r-unknown"].segments, runs["r-unknown"].emissions_kg) == (2, pytest.approx(0.5 + 0.2))
    assert runs[known].status == runs["r-unknown"].status == "finished"
    assert recorded == pytest.approx(0.6 + 0.7)


def test_a_spool_torn_by_a_crash_holds_up_no_other_spool(ledger_path: Path) -> None:
    """Two spools left by ended processes; the first ends in a line torn mid-write (power cut, full
    disk). `ledger replay` writes every whole line of both, and says nothing is left after."""
    from carbonoffset.core.ledger.spool import LedgerWriter

    closed = Ledger(ledger_path)
    closed.close()  # every write now fails: they go to the spool
    paths = []
    for run_id, kg in (("r1", 0.2), ("r2", 0.4)):
        writer = LedgerWriter(closed)
        start = {"op": "start_run", "run_id": run_id, "account": SANDBOX, "environment": "sandbox", "nodes": 1}
        assert not writer.write(start)
        assert not writer.write({**start, "op": "record", "emissions_kg": kg, "energy_kwh": kg, "epoch": 0})
        paths.append(writer.spool.path)
        writer.close()
    first = min(paths)  # replayed first (sorted names)
    with first.open("a", encoding="utf-8") as torn:
        torn.write('{"account": "sandbox:aaaa", "emissions_kg": 0.3, "energy')  # no newline: the crash
    runner = CliRunner()
    done = runner.invoke(app, ["ledger", "replay", "--ledger", str(ledger_path)])
    assert done.exit_code == 0 and "Wrote 4" in done.stdout, done.output
    with Ledger(ledger_path) as ledger:
        assert ledger.balance(SANDBOX).recorded_kg == pytest.approx(0.6)
    assert not any(p.exists() for p in paths)
    again = runner.invoke(app, ["ledger", "replay", "--ledger", str(ledger_path)])
    assert again.exit_code == 0 and "Nothing spooled" in again.stdout, again.output


def test_figures_spooled_under_one_spelling_of_a_url_are_replayed_under_another(postgres_url: str) -> None:
    """The spool of a server ledger is named by what the URL connects to, not by how it is spelled:
    figures kept while the server was down are found by the next session however its URL is written."""
    from carbonoffset.core.ledger.spool import LedgerWriter, replay_left_over

    written_as = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    read_as = postgres_url.replace("postgresql://", "postgres://", 1)
    closed = Ledger(written_as)
    closed.close()  # every write now fails: they go to the spool
    writer = LedgerWriter(closed)
    start = {"op": "start_run", "run_id": "r1", "account": SANDBOX, "environment": "sandbox", "nodes": 1}
    assert not writer.write(start)
    assert not writer.write({**start, "op": "record", "emissions_kg": 0.4, "energy_kwh": 1.0, "epoch": 0})
    writer.close()  # the process ends; its spool stays on disk
    with Ledger(read_as) as ledger:
        assert replay_left_over(ledger, read_as) == 2
        run = ledger.run("r1")
        assert run is not None and run.emissions_kg == pytest.approx(0.4)


def test_a_spool_left_by_an_earlier_version_under_its_old_name_is_still_replayed(postgres_url: str) -> None:
    import json as _json

    from carbonoffset.core.ledger.spool import replay_left_over, spool_directory
    from carbonoffset.core.ledger.urls import legacy_location_key

    folder = spool_directory()
    folder.mkdir(parents=True, exist_ok=True)
    start = {"op": "start_run", "run_id": "old", "account": SANDBOX, "environment": "sandbox", "nodes": 1}
    record = {**start, "op": "record", "emissions_kg": 0.25, "energy_kwh": 0.5, "epoch": 3}
    left = folder / f"{legacy_location_key(postgres_url)}-host-1-abcdef12.jsonl"
    left.write_text("".join(_json.dumps(op) + "\n" for op in (start, record)), encoding="utf-8")
    with Ledger(postgres_url) as ledger:
        assert replay_left_over(ledger, postgres_url) == 2
        run = ledger.run("old")
        assert run is not None and run.emissions_kg == pytest.approx(0.25)
    assert not left.exists()
