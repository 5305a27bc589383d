"""Opening a ledger: SQLite file or PostgreSQL URL, checks, migrations, transactions, errors.

SQLite: WAL mode, ``BEGIN IMMEDIATE`` for every write and a busy timeout, so several
processes of one host share a file; damage is looked for (read-only ``PRAGMA quick_check``)
before anything is written. PostgreSQL: ``READ COMMITTED`` transactions; the decisions that
must not interleave lock a row (``SELECT ... FOR UPDATE``), see
:mod:`carbonoffset.core.ledger.offsets`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa

from carbonoffset.core.errors import LedgerError, LedgerUnavailableError
from carbonoffset.core.ledger import schema
from carbonoffset.core.ledger.filesystems import warn_if_network_filesystem
from carbonoffset.core.ledger.records import utc_now
from carbonoffset.core.ledger.urls import mask_password, normalize_location, remember_url, scrub, url_password

logger = logging.getLogger("carbonoffset.core.ledger")

_SCHEMA_LOCK_KEY: Final[int] = 0x434F4646  # pg_advisory_xact_lock key while creating/migrating


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Put the file in WAL mode, retrying while another connection holds it (SQLite answers
    "database is locked" at once here instead of waiting on the busy timeout)."""
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        return
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            raise
    import tenacity  # only on contention: it costs ~60 ms to import

    for attempt in tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_random(0.005, 0.05),
        retry=tenacity.retry_if_exception(_is_busy),
        reraise=True,
    ):
        with attempt:
            conn.execute("PRAGMA journal_mode = WAL")


def database_url(url: str) -> sa.URL:
    """The SQLAlchemy URL for a PostgreSQL ledger URL, with the psycopg 3 driver.

    Raises:
        LedgerError: not a PostgreSQL URL (the message shows no password).
    """
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise LedgerError(
            f"offset_ledger {mask_password(url)!r} is not a valid database URL; use a file path or "
            "postgresql://user:password@host:5432/dbname"
        ) from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    raise LedgerError(
        f"offset_ledger {mask_password(url)!r}: database {backend!r} is not supported; use a file path "
        "(SQLite) or postgresql://user:password@host:5432/dbname"
    )


class Store:
    """The connection side of :class:`~carbonoffset.core.ledger.Ledger` (see there for the arguments)."""

    #: Files up to this size (bytes) are always checked completely when opened (a few ms).
    FULL_CHECK_MAX_BYTES: Final[int] = 4 * 1024 * 1024

    def __init__(
        self,
        location: str | os.PathLike[str],
        *,
        full_check: bool = True,
        busy_timeout_s: float = 60.0,
        connect: bool = True,
    ) -> None:
        where = normalize_location(location)
        self.path: Path | None = where if isinstance(where, Path) else None
        self._url_text = where if isinstance(where, str) else None
        self._password = url_password(self._url_text) if self._url_text else None
        self.location: str = str(where) if self.path is not None else mask_password(str(where))
        """Where the ledger is: the file path, or the URL with its password shown as ``***``."""
        self._lock = threading.RLock()
        self._full_check = full_check
        self._busy_timeout_s = busy_timeout_s
        self._verified = False
        self._corrupt: str | None = None
        self._wal = False
        self._engine: sa.Engine | None = None
        self._begin_sql = "BEGIN"
        self._closed = False
        if self._url_text is not None:
            self._sa_url = database_url(self._url_text)
            remember_url(self._url_text)
        if connect or self.path is not None:
            with self._lock:
                self._ensure_open()

    @property
    def is_sqlite(self) -> bool:
        """``True`` for a SQLite file, ``False`` for a database server."""
        return self.path is not None

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return "sqlite" if self.is_sqlite else "postgresql"

    # ------------------------------------------------------------------ errors
    def _scrub(self, text: str) -> str:
        return scrub(text, self._password)

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn driver errors into :class:`LedgerUnavailableError` whose message shows no password."""
        try:
            yield
        except sa.exc.DBAPIError as exc:
            original = exc.orig if exc.orig is not None else exc
            message = self._scrub(str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__)
            if isinstance(original, sqlite3.DatabaseError) and not isinstance(original, sqlite3.OperationalError):
                raise self._corrupt_error(message) from None
            raise LedgerUnavailableError(f"ledger {self.location}: {message}") from None
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerUnavailableError(f"ledger {self.location}: {self._scrub(type(exc).__name__)}") from None

    # ----------------------------------------------------------------- opening
    def _ensure_open(self) -> None:
        if self._engine is not None:
            return
        if self.path is not None:
            self._engine = self._open_sqlite(self.path)
        else:
            self._engine = self._open_server()

    def _sqlite_engine(self, path: Path) -> sa.Engine:
        engine = sa.create_engine(
            f"sqlite:///{path}",
            connect_args={"timeout": self._busy_timeout_s, "check_same_thread": False},
            poolclass=sa.pool.StaticPool,
        )
        busy_ms = int(self._busy_timeout_s * 1000)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # transactions are begun by _on_begin
            dbapi_connection.execute(f"PRAGMA busy_timeout = {busy_ms}")

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql(self._begin_sql)

        return engine

    def _open_sqlite(self, path: Path) -> sa.Engine:
        if not path.exists():
            self._create_file(path)
        elif path.is_dir():
            raise LedgerError(f"ledger {path} is a folder, not a file; point offset_ledger at a file")
        warn_if_network_filesystem(path)
        engine = self._sqlite_engine(path)
        try:
            raw = engine.raw_connection()
        except sa.exc.DBAPIError as exc:
            engine.dispose()
            raise LedgerError(f"cannot open ledger {path}: {exc.orig}. Check offset_ledger") from None
        try:
            conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
            self._check_existing(conn, engine)
            if self._verified:
                self._switch_to_wal(conn)
        except LedgerError:
            raw.close()
            engine.dispose()
            raise
        except sqlite3.DatabaseError as exc:
            raw.close()
            engine.dispose()
            raise LedgerError(
                f"ledger {path} is unreadable ({exc}); it was not modified. Move it aside to start a "
                "new ledger, or point offset_ledger (CODECARBON_OFFSET_LEDGER) at another file"
            ) from None
        raw.close()
        return engine

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        if not self._wal:
            _enable_wal(conn, self._busy_timeout_s)
            conn.execute("PRAGMA synchronous = NORMAL")
            self._wal = True

    def _create_file(self, path: Path) -> None:
        """Create a complete ledger (schema, WAL mode) beside ``path`` and link it into place.

        Other processes opening the same path at the same time (every rank of a job, for
        instance) then see either no file or a finished one: never a half-made file, and never
        a switch to WAL mode while they read it. Where that is not possible (no hard links, no
        room for a temporary file), the file is created in place by :meth:`_check_existing`.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(
                f"cannot create the ledger's folder {path.parent} ({exc.strerror}); point offset_ledger "
                "(CODECARBON_OFFSET_LEDGER) at a writable path"
            ) from None
        tmp = path.with_name(f".carbonoffset-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            engine = self._sqlite_engine(tmp)
            try:
                with engine.connect() as conn:
                    conn.connection.driver_connection.execute("PRAGMA journal_mode = WAL")  # type: ignore[union-attr]
                self._create_schema(engine)
            finally:
                engine.dispose()
            os.link(tmp, path)  # fails if the name exists: never replaces another process's ledger
        except (OSError, sqlite3.Error, sa.exc.SQLAlchemyError):
            pass  # another process created it first (open theirs), or create it in place
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    Path(f"{tmp}{suffix}").unlink(missing_ok=True)

    def _create_schema(self, engine: sa.Engine) -> None:
        """Create every table and the meta rows, unless another process won the race."""
        self._begin_sql = "BEGIN IMMEDIATE"
        try:
            with engine.connect() as conn, conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                if not sa.inspect(conn).has_table("meta"):
                    schema.metadata.create_all(conn)
                    conn.execute(
                        schema.meta.insert(),
                        [
                            {"key": "schema_version", "value": str(schema.SCHEMA_VERSION)},
                            {"key": "created_utc", "value": utc_now()},
                            {"key": "application", "value": schema.APPLICATION_NAME},
                        ],
                    )
                    if engine.dialect.name == "sqlite":
                        conn.exec_driver_sql(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        finally:
            self._begin_sql = "BEGIN"

    def _check_existing(self, conn: sqlite3.Connection, engine: sa.Engine) -> None:
        path = self.path
        try:
            # tables first: the schema and the application id are committed together, so once
            # the tables are visible the id is too (another process may be creating the file)
            objects = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
            tables = {name for kind, name in objects if kind == "table"}
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError:
            raise LedgerError(
                f"ledger {path} is not a SQLite database or is corrupt; it was not modified. Move it "
                "aside to start a new ledger, or point offset_ledger (CODECARBON_OFFSET_LEDGER) at "
                "another file"
            ) from None
        user_version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not objects and app_id in (0, schema.APPLICATION_ID) and user_version == 0:
            # An empty database nobody has claimed (e.g. created empty by a crash): adopt it.
            self._create_schema(engine)
            self._verified = True
            return
        if app_id != schema.APPLICATION_ID or "meta" not in tables:
            raise LedgerError(
                f"{path} is a SQLite database but not a carbonoffset ledger; it was not modified. "
                "Point offset_ledger (CODECARBON_OFFSET_LEDGER) at another file"
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else -1
        self._check_version(version, tables)
        # damage inside the file (not in its header) only shows when a page is read: check now,
        # read-only, before anything writes to it (a file about to be migrated: completely)
        assert path is not None
        if (
            self._full_check
            or version < schema.SCHEMA_VERSION
            or path.stat().st_size <= self.FULL_CHECK_MAX_BYTES
        ):
            problems = self._quick_check(conn)
            self._verified = problems == ["ok"]
        else:  # the accounting tables now; the records (one row per epoch) in verify()
            problems = [p for table in ("meta", "runs", "offsets") for p in self._quick_check(conn, table)]
            problems = [p for p in problems if p != "ok"] or ["ok"]
        if problems != ["ok"]:
            raise self._corrupt_error(problems[0])
        if version < schema.SCHEMA_VERSION:
            self._switch_to_wal(conn)
            self._migrate(engine)

    def _check_version(self, version: int, tables: set[str]) -> None:
        if version > schema.SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.location} has schema version {version}, newer than this carbonoffset "
                f"understands ({schema.SCHEMA_VERSION}); it was not modified. Upgrade carbonoffset "
                "(pip install -U carbonoffset)"
            )
        if version < 1 or not tables >= schema.REQUIRED_TABLES:
            raise LedgerError(
                f"ledger {self.location} has no valid schema (version {version}, tables {sorted(tables)}); "
                "it was not modified. Point offset_ledger (CODECARBON_OFFSET_LEDGER) at another ledger"
            )

    def _open_server(self) -> sa.Engine:
        timeout = max(1, int(min(self._busy_timeout_s, 30)))
        engine = sa.create_engine(
            self._sa_url,
            pool_pre_ping=True,
            pool_size=2,
            max_overflow=2,
            connect_args={
                "connect_timeout": timeout,
                "application_name": "carbonoffset",
                # a row lock held elsewhere for longer fails like SQLite's busy timeout
                "options": f"-c lock_timeout={int(self._busy_timeout_s * 1000)}",
            },
        )
        try:
            with self._translate(), engine.connect() as conn, conn.begin():
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                tables = set(sa.inspect(conn).get_table_names())
                if tables and "meta" not in tables:
                    raise LedgerError(
                        f"the database {self.location} holds tables but is not a carbonoffset ledger; it "
                        "was not modified. Point offset_ledger at an empty database or a ledger"
                    )
                if tables:
                    rows = dict(conn.execute(sa.select(schema.meta.c.key, schema.meta.c.value)).tuples().all())
                    if rows.get("application") != schema.APPLICATION_NAME:
                        raise LedgerError(
                            f"the database {self.location} is not a carbonoffset ledger; it was not modified"
                        )
                    version = int(rows.get("schema_version", -1))
                    self._check_version(version, tables)
                    if version < schema.SCHEMA_VERSION:
                        self._migrate_in(conn, version)
        except BaseException:
            engine.dispose()
            raise
        if not tables:
            try:
                with self._translate():
                    self._create_schema(engine)
            except BaseException:
                engine.dispose()
                raise
        self._verified = True
        return engine

    # -------------------------------------------------------------- migrations
    def _migrate(self, engine: sa.Engine) -> None:
        """Bring a ledger written by an older carbonoffset up to :data:`schema.SCHEMA_VERSION`
        (adds columns, an index and a table only)."""
        self._begin_sql = "BEGIN IMMEDIATE"
        try:
            with engine.connect() as conn, conn.begin():
                current = int(
                    conn.execute(
                        sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
                    ).scalar_one()
                )  # another process may have migrated it meanwhile
                self._migrate_in(conn, current)
        finally:
            self._begin_sql = "BEGIN"

    @staticmethod
    def _migrate_in(conn: sa.Connection, current: int) -> None:
        if current < 2:
            conn.execute(sa.text("ALTER TABLE offsets ADD COLUMN last_sent DOUBLE PRECISION"))
            conn.execute(sa.text("ALTER TABLE runs ADD COLUMN resumed_from TEXT"))
            for column in ("base_emissions_kg", "base_energy_kwh"):
                conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN {column} DOUBLE PRECISION NOT NULL DEFAULT 0"))
            conn.execute(sa.text("CREATE INDEX IF NOT EXISTS runs_by_root ON runs(resumed_from)"))
        if current < 3:
            conn.execute(sa.text("ALTER TABLE runs ADD COLUMN details TEXT"))
            conn.execute(sa.text("ALTER TABLE runs ADD COLUMN host TEXT"))
            schema.accounts.create(conn, checkfirst=True)
        if current < schema.SCHEMA_VERSION:
            conn.execute(
                schema.meta.update()
                .where(schema.meta.c.key == "schema_version")
                .values(value=str(schema.SCHEMA_VERSION))
            )

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _quick_check(conn: sqlite3.Connection, table: str | None = None) -> list[str]:
        pragma = f"PRAGMA quick_check({table})" if table else "PRAGMA quick_check(3)"
        return [str(row[0]) for row in conn.execute(pragma)]

    def _corrupt_error(self, problem: str) -> LedgerError:
        return LedgerError(
            f"ledger {self.location} is corrupt ({problem}); it was not modified. Move it aside to start a "
            "new ledger, or point offset_ledger (CODECARBON_OFFSET_LEDGER) at another file"
        )

    def verify(self) -> None:
        """Check every page of a SQLite file (read-only); a no-op once done for this object. For a
        database server: connect and check the schema if not done yet.

        Needed only after opening with ``full_check=False``; costs about 0.3 s per million
        recorded epochs.

        Raises:
            LedgerError: the file is corrupt. Every later write through this object then raises
                it too: the file is never modified.
            LedgerUnavailableError: the database server cannot be reached.
        """
        with self._lock:
            if self._corrupt is not None:
                raise self._corrupt_error(self._corrupt)
            self._ensure_open()
            if self._verified:
                return
            assert self._engine is not None
            raw = self._engine.raw_connection()
            try:
                conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
                try:
                    problems = self._quick_check(conn)
                except sqlite3.DatabaseError as exc:
                    problems = [str(exc)]
                if problems != ["ok"]:
                    self._corrupt = problems[0]
                    raise self._corrupt_error(problems[0])
                self._verified = True
            finally:
                raw.close()

    # ------------------------------------------------------------ transactions
    @contextmanager
    def _transaction(self, *, write: bool = False, durable: bool = False) -> Iterator[sa.Connection]:
        """One transaction. SQLite: ``BEGIN IMMEDIATE`` for writes (``durable`` syncs the commit
        to disk), after the whole file was found sound; reads see one snapshot."""
        with self._lock:
            if self._closed:
                raise LedgerUnavailableError(f"ledger {self.location} is closed")
            if write and self._corrupt is not None:
                raise self._corrupt_error(self._corrupt)
            with self._translate():
                self._ensure_open()
            if write and not self._verified:
                self.verify()  # nothing is written to a file before it has been found sound
            assert self._engine is not None
            with self._translate(), self._engine.connect() as conn:
                raw: Any = conn.connection.driver_connection if self.is_sqlite else None
                if raw is not None and write and not self._wal:
                    self._switch_to_wal(raw)
                if raw is not None and durable:
                    raw.execute("PRAGMA synchronous = FULL")
                self._begin_sql = "BEGIN IMMEDIATE" if write else "BEGIN"
                try:
                    with conn.begin():
                        yield conn
                finally:
                    self._begin_sql = "BEGIN"
                    if raw is not None and durable:
                        with contextlib.suppress(sqlite3.Error):
                            raw.execute("PRAGMA synchronous = NORMAL")

    def _clock(self, conn: sa.Connection) -> float:
        """Seconds since the epoch on the ledger's clock: the database server's (one clock for every
        host), or this host's for a SQLite file (one host)."""
        if self.is_sqlite:
            return time.time()
        return float(conn.execute(sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one())

    def close(self) -> None:
        """Close the connections (idempotent); later calls raise :class:`LedgerUnavailableError`."""
        with self._lock:
            self._closed = True
            if self._engine is not None:
                self._engine.dispose()

    def __repr__(self) -> str:
        return f"Ledger({self.location!r})"


def dialect_insert(dialect: str, table: sa.Table) -> Any:
    """``INSERT`` with ``on_conflict_do_nothing`` / ``on_conflict_do_update`` for ``dialect``."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)
