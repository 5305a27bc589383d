"""Shared fixtures: an isolated home/cwd/ledger for every test and a loopback 1ClickImpact server."""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from carbonoffset.testing import FakeOneClickImpact
from carbonoffset.testing.postgres import PostgresCluster, server_bindir

SANDBOX_KEY = "test_carbonoffset_SECRET_4f1d9c"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's config or writes the user's ledger."""
    for name in list(os.environ):
        if name.startswith("CODECARBON_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.chdir(work)


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """The CLI sets up the ``carbonoffset`` logger for its process (level, handler); a test that
    runs it must not change what later tests in the same process capture."""
    logger = logging.getLogger("carbonoffset")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate


@pytest.fixture
def server() -> Iterator[FakeOneClickImpact]:
    with FakeOneClickImpact(environment="sandbox") as fake:
        yield fake


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throw-away PostgreSQL cluster for the whole test run (started on first use, on a free
    loopback port, as the ``postgres`` user when the tests run as root), stopped at the end.

    Skips where PostgreSQL is not installed, unless ``CARBONOFFSET_REQUIRE_POSTGRES=1`` (set by
    ``.ci/run``): then it fails.
    """
    if server_bindir() is None:
        message = "PostgreSQL is not installed (apt-get install -y postgresql)"
        if os.environ.get("CARBONOFFSET_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with PostgresCluster() as cluster:
        yield cluster


_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    """The URL of a new, empty database on the test cluster (password included)."""
    return postgres.create_database(f"ledger_{os.getpid()}_{next(_databases)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request: pytest.FixtureRequest, ledger_path: Path) -> Path | str:
    """A fresh ledger location on each backend: a SQLite file path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return ledger_path
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def settings(server: FakeOneClickImpact, ledger_path: Path) -> dict[str, object]:
    """Settings for a sandbox account on the local server."""
    return {
        "offset_api_key": SANDBOX_KEY,
        "offset_environment": "sandbox",
        "offset_api_url": server.url,
        "offset_ledger": ledger_path,
        "offset_request_timeout": 2.0,
        "offset_timeout": 10.0,
        "country_iso_code": "FRA",
    }


@pytest.fixture(scope="session", autouse=True)
def _codecarbon_hardware_detected() -> None:
    """Detect the hardware once per test process, so a module run on its own starts its first tracker
    without the late-start estimate (tests compare the ledger with the tracker's own figures)."""
    from carbonoffset.core.sources import warm_up_codecarbon

    assert warm_up_codecarbon().wait(120)


def _downgrade_to_2(raw: sqlite3.Connection) -> None:
    raw.execute("DROP TABLE accounts")
    for column in ("details", "host"):
        raw.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    raw.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    raw.execute("DELETE FROM meta WHERE key = 'application'")


@pytest.fixture
def as_schema_2() -> Callable[[Path], None]:
    """Turn a ledger file into what carbonoffset's second schema wrote (to test migrations)."""

    def downgrade(path: Path) -> None:
        raw = sqlite3.connect(path)
        with raw:
            _downgrade_to_2(raw)
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw.close()

    return downgrade


@pytest.fixture
def as_schema_1() -> Callable[[Path], None]:
    """Turn a ledger file into what carbonoffset's first schema wrote (to test migrations)."""

    def downgrade(path: Path) -> None:
        raw = sqlite3.connect(path)
        with raw:
            _downgrade_to_2(raw)
            raw.execute("DROP INDEX runs_by_root")
            raw.execute("ALTER TABLE offsets DROP COLUMN last_sent")
            for column in ("resumed_from", "base_emissions_kg", "base_energy_kwh"):
                raw.execute(f"ALTER TABLE runs DROP COLUMN {column}")
            raw.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw.close()

    return downgrade
