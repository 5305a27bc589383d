"""The ``carbonoffset`` command line, against a real ledger and the loopback server."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from carbonoffset.cli import EXIT_CONFIG, EXIT_LEDGER, EXIT_UNCONFIRMED, app
from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact, Fault

SECRET = "test_cli_SECRET_9b7e"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def env(server: FakeOneClickImpact, ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "CODECARBON_OFFSET_API_KEY": SECRET,
        "CODECARBON_OFFSET_ENVIRONMENT": "sandbox",
        "CODECARBON_OFFSET_API_URL": server.url,
        "CODECARBON_OFFSET_LEDGER": str(ledger_path),
        "CODECARBON_OFFSET_REQUEST_TIMEOUT": "2",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def _record(ledger_path: Path, account: str, emissions_kg: float) -> str:
    with Ledger(ledger_path) as ledger:
        run_id = ledger.start_run(account=account, environment=account.split(":")[0])
        ledger.record(run_id, emissions_kg=emissions_kg, energy_kwh=emissions_kg * 10, epoch=0)
        ledger.end_run(run_id)
    return run_id


def _account(**overrides: Any) -> str:
    return OffsetConfig.resolve(**overrides).account


def test_report_json_table_and_plot(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, tmp_path: Path
) -> None:
    account = _account()
    _record(ledger_path, account, 0.3)
    _record(ledger_path, account, 0.2)
    result = runner.invoke(app, ["report", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (row,) = data["accounts"]
    assert row["account"] == account and row["runs"] == 2
    assert row["emissions_kg"] == pytest.approx(0.5)
    assert row["pending_kg"] == pytest.approx(0.5) and row["offset_lb"] == 0
    plot = tmp_path / "emissions.png"
    result = runner.invoke(app, ["report", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "sandbox" in result.output and "0.5" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert SECRET not in result.output


def test_offset_buys_whole_pounds_and_round_up_leaves_credit(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    account = _account()
    _record(ledger_path, account, 1.0)
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == 0, result.output
    assert server.total_lb() == 2  # floor(1.0 / 0.45359237)
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == 0 and "Nothing to offset" in result.output
    result = runner.invoke(app, ["offset", "--round-up"])
    assert result.exit_code == 0, result.output
    assert server.total_lb() == 3
    with Ledger(ledger_path) as ledger:
        balance = ledger.balance(account)
    assert balance.credit_kg == pytest.approx(3 * KG_PER_LB - 1.0)
    assert SECRET not in result.output


def test_offset_that_stays_unconfirmed_exits_1_and_reconcile_settles_it(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    account = _account()
    _record(ledger_path, account, 0.5)
    server.inject(Fault(status=503, body="<html>busy</html>", times=50))
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == EXIT_UNCONFIRMED, result.output
    assert server.total_lb() == 0
    server.clear_faults()
    result = runner.invoke(app, ["reconcile"])
    assert result.exit_code == 0, result.output
    assert "confirmed" in result.output
    assert server.total_lb() == 1
    result = runner.invoke(app, ["reconcile"])
    assert result.exit_code == 0 and "No open offsets" in result.output
    assert server.total_lb() == 1


def test_missing_key_and_unknown_environment_exit_2(
    runner: CliRunner, ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", str(ledger_path))
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == EXIT_CONFIG
    assert "offset_api_key is not set" in result.output
    result = runner.invoke(app, ["reconcile", "--environment", "staging"])
    assert result.exit_code == EXIT_CONFIG
    assert "'production' or 'sandbox'" in result.output


def test_bad_ledger_exits_3_and_is_left_untouched(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    before = bad.read_bytes()
    result = runner.invoke(app, ["report", "--ledger", str(bad)])
    assert result.exit_code == EXIT_LEDGER
    assert "not modified" in result.output.replace("\n", " ")
    assert bad.read_bytes() == before
    result = runner.invoke(app, ["report", "--ledger", str(tmp_path / "missing.sqlite3")])
    assert result.exit_code == EXIT_LEDGER
    for command in (["report"], ["ledger", "replay"]):  # a mistyped path never creates an empty ledger
        result = runner.invoke(app, [*command, "--ledger", str(tmp_path / "typo.sqlite3")])
        assert result.exit_code == EXIT_LEDGER and "no ledger at" in result.output, command
        assert not (tmp_path / "typo.sqlite3").exists()


def test_offset_reconcile_and_adopt_on_a_mistyped_ledger_path_create_nothing(
    runner: CliRunner, env: dict[str, str], tmp_path: Path
) -> None:
    typo = tmp_path / "typo.sqlite3"
    for command in (["offset"], ["reconcile"], ["adopt", "sandbox:no-key"]):
        result = runner.invoke(app, [*command, "--ledger", str(typo)])
        assert result.exit_code == EXIT_LEDGER and "no ledger at" in result.output, (command, result.output)
        assert "--ledger" in result.output and not typo.exists(), command


def test_an_unreachable_database_ledger_exits_3_naming_the_setting_and_the_fix(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A team ledger whose server is down (or a mistyped host or port): the error says which
    setting points there and what to do, not only the driver's "connection refused"."""
    pytest.importorskip("psycopg")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", f"postgresql://team:pw_SECRET_77@127.0.0.1:{port}/ledger")
    for command in (["report"], ["report", "--by", "host"], ["ledger", "replay"]):
        result = runner.invoke(app, command)
        assert result.exit_code == EXIT_LEDGER, (command, result.output)
        text = " ".join(result.output.split())
        assert "pw_SECRET_77" not in text
        assert "offset_ledger" in text and "database server" in text, (command, text)


def test_adopt_moves_runs_recorded_without_a_key(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    orphan = OffsetConfig(offset_environment="sandbox").account  # recorded with no key configured
    _record(ledger_path, orphan, 0.6)
    result = runner.invoke(app, ["adopt", orphan])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == 0, result.output
    assert server.total_lb() == 1
    with Ledger(ledger_path) as ledger:
        assert ledger.balance(orphan).recorded_kg == 0
        assert ledger.balance(_account()).pending_kg == pytest.approx(0.6 - KG_PER_LB)
    # an account that has bought something cannot hand its runs over (that would double count)
    result = runner.invoke(app, ["adopt", _account(), "--environment", "sandbox"])
    assert result.exit_code == EXIT_CONFIG


def test_key_is_never_a_command_line_option(runner: CliRunner) -> None:
    for command in ("offset", "reconcile", "report", "adopt", "demo"):
        result = runner.invoke(app, [command, "--help"])
        assert "api-key" not in result.output and "api_key" not in result.output.replace("offset_api_key", "")


@pytest.mark.slow
def test_demo_main_job_end_to_end(tmp_path: Path) -> None:
    """The README's main job: `carbonoffset demo` trains Lightning on digits and exits 0."""
    pytest.importorskip("lightning")
    ledger = tmp_path / "demo.sqlite3"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "carbonoffset"), "demo", "--epochs", "3", "--ledger", str(ledger)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_clean_env(), "COLUMNS": "200"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "local 1ClickImpact-compatible server" in out
    assert "local sandbox captures" in out and "1 (1 lb)" in out
    assert "validation accuracy" in out
    with Ledger(ledger) as book:
        (run,) = book.runs()
        (offset,) = book.offsets()
        balance = book.balance(run.account)
    assert run.status == "finished" and run.epochs == 3 and run.emissions_kg > 0
    assert offset.state == "confirmed" and offset.amount_lb == 1
    assert balance.credit_kg == pytest.approx(KG_PER_LB - run.emissions_kg)


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CODECARBON_")}


def test_adopt_refuses_to_mix_environments(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    production_orphan = OffsetConfig(offset_environment="production").account
    _record(ledger_path, production_orphan, 5.0)
    result = runner.invoke(app, ["adopt", production_orphan])
    assert result.exit_code == EXIT_CONFIG
    assert "different environments" in " ".join(result.output.split())
    with Ledger(ledger_path) as ledger:
        assert ledger.balance(production_orphan).recorded_kg == pytest.approx(5.0)


def test_refused_key_exits_2_and_points_at_stranded_runs(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    orphan = OffsetConfig(offset_environment="sandbox").account
    _record(ledger_path, orphan, 1.2)
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == 0, result.output
    assert f"carbonoffset adopt {orphan}" in result.output.replace("\n", "")
    _record(ledger_path, _account(), 0.6)
    server.api_keys = {"test_some_other_key"}  # the configured key is now refused
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == EXIT_CONFIG
    assert "refused offset_api_key" in " ".join(result.output.split())
    assert SECRET not in result.output
    assert server.total_lb() == 0


def test_reconcile_leaves_a_recently_sent_capture_alone(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    config = OffsetConfig.resolve()
    _record(ledger_path, config.account, 0.5)
    with Ledger(ledger_path) as ledger:
        intent = ledger.create_intent(
            account=config.account,
            environment="sandbox",
            run_id=None,
            amount_lb_for=lambda kg: 1,
            min_pending_kg=0.0,
            lease_s=0.0,  # lease already expired: only the resend grace protects it
        )
        assert intent is not None
        ledger.mark_sent(intent.offset_id)
    raw = sqlite3.connect(ledger_path)
    with raw:  # as if another process on another host had sent it
        raw.execute("UPDATE offsets SET owner = 'elsewhere:1:4242' WHERE offset_id = ?", (intent.offset_id,))
    raw.close()
    result = runner.invoke(app, ["reconcile"])
    assert result.exit_code == EXIT_UNCONFIRMED
    assert "may still land" in " ".join(result.output.split())
    assert server.total_lb() == 0 and server.requests == []


def test_report_needs_only_the_ledger_setting_and_keeps_columns_when_piped(
    env: dict[str, str], ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _record(ledger_path, _account(), 0.3)
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "0.1")  # invalid, but irrelevant to report
    result = subprocess.run(
        [str(Path(sys.executable).parent / "carbonoffset"), "report"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "credit kg" in result.stdout and "pending kg" in result.stdout


def test_demo_refuses_to_spend_in_production_without_yes(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, ledger_path: Path
) -> None:
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", "live_would_spend_money")
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", str(ledger_path))
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == EXIT_CONFIG
    assert "--yes" in result.output
    assert not ledger_path.exists()


# ------------------------------------------------------------------------ polish
CLI = str(Path(sys.executable).parent / "carbonoffset")


def test_version_and_help_without_type_placeholders(runner: CliRunner) -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"carbonoffset {version('carbonoffset')}"
    for command in ([], ["report"], ["offset"], ["reconcile"], ["adopt"], ["fake-server"], ["demo"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output and "<str>" not in result.output, result.output
    assert "--ledger PATH" in runner.invoke(app, ["report", "--help"]).output


def test_fake_server_on_a_port_in_use_says_so_and_exits_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [CLI, "fake-server", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use: pass another --port, or --port 0 for a free one"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_fake_server_verbose_logs_each_request_without_the_key() -> None:
    from makeimpact import Environment, OneClickImpact

    process = subprocess.Popen(
        [CLI, "fake-server", "--port", "0", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_clean_env(), "NO_PROXY": "127.0.0.1"},
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        url = first.rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:"), first
        client = OneClickImpact(api_key=SECRET, environment=Environment.SANDBOX)
        client.base_url = url
        assert client.who_am_i().user_id
        client.capture_carbon(amount=2, metadata={"run_id": "r1"})
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    lines = [line for line in err.splitlines() if "/v1/" in line]
    assert lines == [
        "INFO carbonoffset.testing.server: GET /v1/whoami -> 200",
        "INFO carbonoffset.testing.server: POST /v1/capture_carbon -> 200",
    ], err
    assert SECRET not in out + err and "Stopped; it had captured 2 lb." in out


def test_errors_on_a_piped_stderr_are_not_wrapped(ledger_path: Path) -> None:
    result = subprocess.run(
        [CLI, "offset"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **_clean_env(),
            "CODECARBON_OFFSET_API_KEY": SECRET,  # a test_ key with the default environment, production
            "CODECARBON_OFFSET_LEDGER": str(ledger_path),
        },
    )
    assert result.returncode == EXIT_CONFIG
    (line,) = result.stderr.strip().splitlines()
    assert len(line) > 120 and line.startswith("error: offset_api_key starts with 'test_'")
    assert "the environment variable CODECARBON_OFFSET_API_KEY" in line and SECRET not in line


def test_offset_during_the_resend_grace_names_what_it_leaves_alone(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    config = OffsetConfig.resolve()
    _record(ledger_path, config.account, 0.5)
    with Ledger(ledger_path) as ledger:
        intent = ledger.create_intent(
            account=config.account,
            environment="sandbox",
            run_id=None,
            amount_lb_for=lambda kg: 1,
            min_pending_kg=0.0,
            lease_s=0.0,
        )
        assert intent is not None
        ledger.mark_sent(intent.offset_id)
    raw = sqlite3.connect(ledger_path)
    with raw:  # as if another process on another host had sent it
        raw.execute("UPDATE offsets SET owner = 'elsewhere:1:4242' WHERE offset_id = ?", (intent.offset_id,))
    raw.close()
    _record(ledger_path, config.account, 1.0)  # more to offset meanwhile: that part is bought
    result = runner.invoke(app, ["offset"])
    assert result.exit_code == EXIT_UNCONFIRMED, result.output
    text = " ".join(result.output.split())
    assert f"Left alone: offset {intent.offset_id} of 1 lb (intent)" in text
    assert "may still land (resend grace 5 min)" in text
    assert "run `carbonoffset reconcile` after " in text and " UTC to settle them" in text
    captures = [c.metadata for c in server.captures]
    assert server.total_lb() == 2 and all(
        m and m["carbonoffset_offset_id"] != intent.offset_id for m in captures
    )


# -------------------------------------------------------------------------- plot
def test_plot_one_panel_per_account_and_one_run(
    runner: CliRunner, env: dict[str, str], ledger_path: Path, tmp_path: Path, server: FakeOneClickImpact
) -> None:
    import matplotlib.image

    from carbonoffset.plot import mass_label, short_account

    account = _account()
    tiny = _record(ledger_path, account, 2.7e-6)  # a demo-sized run, then a rounded-up offset
    assert runner.invoke(app, ["offset", "--round-up"]).exit_code == 0
    one = tmp_path / "one.png"
    result = runner.invoke(app, ["report", "--plot", str(one)])
    assert result.exit_code == 0 and f"Plot written to {one}" in result.output

    other = OffsetConfig(offset_api_key="live_cli_other_SECRET", offset_environment="production").account
    _record(ledger_path, other, 3.0)
    two = tmp_path / "two.png"
    assert runner.invoke(app, ["report", "--plot", str(two)]).exit_code == 0
    height_one, height_two = (matplotlib.image.imread(p).shape[0] for p in (one, two))
    assert height_two > 1.5 * height_one  # a second panel, not a second line in the first

    run = tmp_path / "run.png"
    result = runner.invoke(app, ["report", "--plot", str(run), "--run", tiny[:8]])
    assert result.exit_code == 0 and run.read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["report", "--plot", str(tmp_path / "none.png"), "--run", "no-such-run"])
    assert result.exit_code == EXIT_CONFIG and "no run 'no-such-run'" in result.output
    assert not (tmp_path / "none.png").exists()
    result = runner.invoke(app, ["report", "--run", tiny[:8]])  # --run without --plot: the run's section
    assert result.exit_code == 0 and "Carbon emissions and offsets" in result.output

    assert [mass_label(v) for v in (2.7e-6, 0.4536, 1234.0, 0.0)] == ["2.7 mg", "454 g", "1.23 t", "0 kg"]
    assert short_account(account) == f"sandbox · {account.split(':')[1][:8]}"
    assert short_account("production:no-key") == "production · no key"


def test_plot_of_an_empty_ledger_writes_nothing(
    runner: CliRunner, env: dict[str, str], ledger_path: Path
) -> None:
    Ledger(ledger_path).close()
    target = ledger_path.with_name("empty.png")
    result = runner.invoke(app, ["report", "--plot", str(target)])
    assert result.exit_code == 0 and "nothing recorded yet" in " ".join(result.output.split())
    assert not target.exists()
