"""The durable ledger: runs, recorded emissions and offsets, in one SQLite file.

Accounting model (all masses in kg CO2eq):

* A **run** holds the *cumulative* emissions measured for one training run.
  Recording a cumulative total keeps the maximum seen, so recording the same
  total twice (or an older, smaller one) never double counts. A run resumed
  from a checkpoint continues in a **segment**: a row of its own that stores
  only what was measured beyond its ``base`` (the run's figures it started
  from), so that any number of segments, concurrent or not, simply add up.
* An **offset** is a purchase of ``amount_lb`` whole pounds
  (``amount_kg = amount_lb * 0.45359237``) in one of four states:
  ``intent`` (written before the API call), ``unknown`` (the call's outcome
  is not known yet), ``confirmed`` (the API captured it) or ``failed``
  (definitely refused; the amount returns to pending).
* Per **account** (environment + key fingerprint):
  ``balance = sum(run emissions) - sum(offsets not failed)``.
  ``pending_kg = max(balance, 0)``; ``credit_kg = max(-balance, 0)`` (from
  a rounded-up offset, used up by later emissions). Carried across runs and
  processes.

Concurrency: WAL mode, ``BEGIN IMMEDIATE`` for every write and a 60 s busy
timeout, so several processes can share one file; deciding an offset amount
and writing its intent happen in one transaction, so two processes never buy
the same emissions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Literal

from carbonoffset.core.errors import LedgerError
from carbonoffset.core.units import KG_PER_LB

SCHEMA_VERSION: Final[int] = 3
"""2 added ``offsets.last_sent`` and the resume links of ``runs`` (migrated in place from 1).
A resumed segment stores only what it measured, so every reader of version 2 sums runs right.
3 added ``runs.details`` (JSON text: hardware, location; migrated in place)."""
DEFAULT_RESEND_GRACE_S: Final[float] = 300.0
"""Seconds after a capture was sent during which no other process may take the offset over and
look it up: a request abandoned at its deadline may still be acted on by the server for a while,
and a look-up cannot see a request the server has not processed yet."""
APPLICATION_ID: Final[int] = 0x434F4646  # "COFF", stored in the SQLite header
OffsetState = Literal["intent", "unknown", "confirmed", "failed"]
OPEN_STATES: Final[tuple[str, ...]] = ("intent", "unknown")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    environment TEXT NOT NULL,
    label TEXT,
    started_utc TEXT NOT NULL,
    ended_utc TEXT,
    status TEXT NOT NULL DEFAULT 'running',
    emissions_kg REAL NOT NULL DEFAULT 0,
    energy_kwh REAL NOT NULL DEFAULT 0,
    epochs INTEGER NOT NULL DEFAULT 0,
    nodes INTEGER NOT NULL DEFAULT 1,
    resumed_from TEXT,
    base_emissions_kg REAL NOT NULL DEFAULT 0,
    base_energy_kwh REAL NOT NULL DEFAULT 0,
    details TEXT
);
CREATE INDEX runs_by_account ON runs(account);
CREATE INDEX runs_by_root ON runs(resumed_from);
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER,
    emissions_kg REAL NOT NULL,
    energy_kwh REAL NOT NULL,
    recorded_utc TEXT NOT NULL
);
CREATE INDEX records_by_run ON records(run_id);
CREATE TABLE offsets (
    offset_id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    environment TEXT NOT NULL,
    run_id TEXT,
    amount_lb INTEGER NOT NULL CHECK (amount_lb >= 1),
    amount_kg REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('intent', 'unknown', 'confirmed', 'failed')),
    created_utc TEXT NOT NULL,
    updated_utc TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    user_id TEXT,
    time_utc TEXT,
    carbon_captured INTEGER,
    last_error TEXT,
    last_sent REAL
);
CREATE INDEX offsets_by_account ON offsets(account, state);
"""


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _enable_wal(conn: sqlite3.Connection, timeout_s: float = 60.0) -> None:
    """Put the file in WAL mode, retrying while another connection holds it.

    Switching the journal mode needs the file to itself, and SQLite answers
    "database is locked" at once instead of waiting on the busy timeout
    (only files not yet in WAL mode switch; for the others this is a read).
    """
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


def _check_amounts(**amounts: float) -> None:
    """Raise ``ValueError`` naming the first amount that is negative, infinite or NaN."""
    for name, value in amounts.items():
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")


def utc_now() -> str:
    """Current UTC time as ISO 8601 with microseconds and ``Z``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pid_namespace() -> str:
    """Identity of this process's PID namespace (containers sharing a host name differ here)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


_PID_NS = _pid_namespace()


def _owner() -> str:
    return f"{socket.gethostname()}:{_PID_NS}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass(frozen=True)
class Balance:
    """An account's position (kg CO2eq).

    Attributes:
        account: ``"<environment>:<key fingerprint>"``.
        recorded_kg: emissions recorded by every run of the account.
        offset_kg: offsets confirmed by the API.
        in_flight_kg: offsets written as intent or of unknown outcome.
        pending_kg: emissions not yet offset nor in flight (>= 0).
        credit_kg: overshoot of rounded-up offsets not yet used (>= 0).
    """

    account: str
    recorded_kg: float
    offset_kg: float
    in_flight_kg: float

    @property
    def balance_kg(self) -> float:
        """``recorded_kg - offset_kg - in_flight_kg`` (negative means credit)."""
        return self.recorded_kg - self.offset_kg - self.in_flight_kg

    @property
    def pending_kg(self) -> float:
        return max(self.balance_kg, 0.0)

    @property
    def credit_kg(self) -> float:
        return max(-self.balance_kg, 0.0)


@dataclasses.dataclass(frozen=True)
class OffsetRecord:
    """One row of the ``offsets`` table (see the module docstring for states)."""

    offset_id: str
    account: str
    environment: str
    run_id: str | None
    amount_lb: int
    amount_kg: float
    state: str
    created_utc: str
    updated_utc: str
    attempts: int
    owner: str | None
    lease_until: float | None
    user_id: str | None
    time_utc: str | None
    carbon_captured: int | None
    last_error: str | None
    last_sent: float | None = None


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A training run: one row of the ``runs`` table, or (from :meth:`Ledger.run` and
    :meth:`Ledger.runs`) a run with its resumed segments folded in.

    Attributes:
        run_id: the run's id (UUID4 hex unless given).
        account, environment, label: as given to :meth:`Ledger.start_run`.
        started_utc, ended_utc: ISO 8601 UTC times (``ended_utc`` ``None`` while running).
        status: ``running`` | ``finished`` | ``failed`` | ``interrupted`` (the latest segment's).
        emissions_kg: cumulative emissions, kg CO2eq: of the run with all its segments, or
            for a segment row only what that segment measured beyond its base.
        energy_kwh: the same for energy, kWh.
        epochs: epochs recorded (the most any segment reached).
        nodes: nodes that measured it.
        resumed_from: for a segment row, the run it continues; ``None`` for a run.
        base_emissions_kg, base_energy_kwh: for a segment row, the run's figures it started
            from (not included in its own ``emissions_kg``/``energy_kwh``).
        segments: ledger rows of the run (1, plus one per resume).
        details: what the run was measured on and where (JSON values, see
            :meth:`Ledger.set_run_details`); empty when none were stored. For a run, its rows'
            details merged in order (a later segment's keys win).
    """

    run_id: str
    account: str
    environment: str
    label: str | None
    started_utc: str
    ended_utc: str | None
    status: str
    emissions_kg: float
    energy_kwh: float
    epochs: int
    nodes: int
    resumed_from: str | None = None
    base_emissions_kg: float = 0.0
    base_energy_kwh: float = 0.0
    segments: int = 1
    details: dict[str, object] = dataclasses.field(default_factory=dict)


_RUN_COLUMNS: Final[int] = 14  # the columns of ``runs`` before ``details``, in RunRecord's order


def _run_record(row: tuple[object, ...]) -> RunRecord:
    """A ``SELECT * FROM runs`` row as a :class:`RunRecord` (``details`` parsed)."""
    text = row[_RUN_COLUMNS] if len(row) > _RUN_COLUMNS else None
    details = json.loads(text) if isinstance(text, str) and text else {}
    record = RunRecord(*row[:_RUN_COLUMNS])  # type: ignore[arg-type]
    return dataclasses.replace(record, details=details) if isinstance(details, dict) and details else record


def _whole_runs(rows: list[tuple[object, ...]]) -> list[RunRecord]:
    """Fold resumed segments (see :meth:`Ledger.resume_run`) into their runs, keeping the rows' order.

    A run's totals add up its rows (a segment stores only what it measured beyond its base);
    its status and end are those of its latest segment; its epochs and nodes the most any
    segment reached.
    """
    records = [_run_record(row) for row in rows]
    parts: dict[str, list[RunRecord]] = {}
    for record in records:
        parts.setdefault(record.resumed_from or record.run_id, []).append(record)
    runs = []
    for run_id, rows_of_run in parts.items():
        root = next((r for r in rows_of_run if r.resumed_from is None), None)
        if root is not None and len(rows_of_run) == 1:
            runs.append(root)
            continue
        first = root or dataclasses.replace(rows_of_run[0], run_id=run_id, resumed_from=None)
        # the latest segment; of equal start times the later row (rows come in rowid order)
        latest = max(enumerate(rows_of_run), key=lambda pair: (pair[1].started_utc, pair[0]))[1]
        runs.append(
            dataclasses.replace(
                first,
                ended_utc=latest.ended_utc,
                status=latest.status,
                emissions_kg=sum(r.emissions_kg for r in rows_of_run),
                energy_kwh=sum(r.energy_kwh for r in rows_of_run),
                epochs=max(r.epochs for r in rows_of_run),
                nodes=max(r.nodes for r in rows_of_run),
                resumed_from=None,
                base_emissions_kg=0.0,
                base_energy_kwh=0.0,
                segments=len(rows_of_run),
                details={k: v for r in rows_of_run for k, v in r.details.items()},
            )
        )
    return runs


class Ledger:
    """Durable record of runs, emissions and offsets in one SQLite file.

    Thread-safe (one connection behind a lock) and process-safe (WAL, busy
    timeout, ``BEGIN IMMEDIATE``). Open it with :meth:`open`.

    Args:
        path: the SQLite file; created (with its folder) when missing.
        full_check: check every page of an existing file when opening it
            (read-only ``PRAGMA quick_check``; about 0.3 s per million
            recorded epochs). With ``False`` only the accounting tables
            (``meta``, ``runs``, ``offsets``: what balances and offsets are
            computed from) are checked at once, and the whole file too when it
            is at most :attr:`FULL_CHECK_MAX_BYTES`; call :meth:`verify` for
            the rest before writing records. Sessions open their ledger this
            way and verify it on their background thread, so a big ledger never
            delays the start of training.

    Raises:
        LedgerError: the file is not a SQLite database, is corrupt, belongs
            to another application, or was written by a newer carbonoffset.
            The file is left untouched.
    """

    #: Files up to this size (bytes) are always checked completely when opened (a few ms).
    FULL_CHECK_MAX_BYTES: Final[int] = 4 * 1024 * 1024

    def __init__(self, path: str | os.PathLike[str], *, full_check: bool = True) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.RLock()
        self._full_check = full_check
        self._verified = False
        self._corrupt: str | None = None
        self._conn = self._connect()

    # ------------------------------------------------------------------ opening
    def _connect(self) -> sqlite3.Connection:
        path = self.path
        if not path.exists():
            self._create_file(path)
        try:
            conn = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {path}: {exc}. Check offset_ledger") from None
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            self._check_existing(conn)
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
        except LedgerError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise LedgerError(
                f"ledger {path} is unreadable ({exc}); it was not modified. Move it aside to start a "
                "new ledger, or point offset_ledger (CODECARBON_OFFSET_LEDGER) at another file"
            ) from None
        return conn

    def _create_file(self, path: Path) -> None:
        """Create a complete ledger (schema, WAL mode) beside ``path`` and link it into place.

        Other processes opening the same path at the same time (every rank of a
        job, for instance) then see either no file or a finished one: never a
        half-made file, and never a switch to WAL mode while they read it
        (SQLite does not wait on its busy timeout for that switch). Where that
        is not possible (no hard links, no room for a temporary file), the
        file is created in place by :meth:`_connect`, which then retries the
        switch.
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
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                self._create_schema(conn)
            finally:
                conn.close()
            os.link(tmp, path)  # fails if the name exists: never replaces another process's ledger
        except (OSError, sqlite3.Error):
            pass  # another process created it first (open theirs), or create it in place
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    Path(f"{tmp}{suffix}").unlink(missing_ok=True)

    def _check_existing(self, conn: sqlite3.Connection) -> None:
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
        if not objects and app_id in (0, APPLICATION_ID) and user_version == 0:
            # An empty database nobody has claimed (e.g. created empty by a crash): adopt it.
            self._create_schema(conn)
            return
        if app_id != APPLICATION_ID or "meta" not in tables:
            raise LedgerError(
                f"{path} is a SQLite database but not a carbonoffset ledger; it was not modified. "
                "Point offset_ledger (CODECARBON_OFFSET_LEDGER) at another file"
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else -1
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {path} has schema version {version}, newer than this carbonoffset understands "
                f"({SCHEMA_VERSION}); it was not modified. Upgrade carbonoffset (pip install -U carbonoffset)"
            )
        if version < 1 or not {"runs", "records", "offsets"} <= tables:
            raise LedgerError(
                f"ledger {path} has no valid schema (version {version}, tables {sorted(tables)}); it was not "
                "modified. Point offset_ledger (CODECARBON_OFFSET_LEDGER) at another file"
            )
        # damage inside the file (not in its header) only shows when a page is read: check now,
        # read-only, before anything writes to it (a file about to be migrated: completely)
        if self._full_check or version < SCHEMA_VERSION or path.stat().st_size <= self.FULL_CHECK_MAX_BYTES:
            problems = self._quick_check(conn)
            self._verified = True
        else:  # the accounting tables now; the records (one row per epoch) in verify()
            problems = [p for table in ("meta", "runs", "offsets") for p in self._quick_check(conn, table)]
            problems = [p for p in problems if p != "ok"] or ["ok"]
        if problems != ["ok"]:
            raise self._corrupt_error(problems[0])
        if version < SCHEMA_VERSION:
            self._migrate(conn, version)

    @staticmethod
    def _quick_check(conn: sqlite3.Connection, table: str | None = None) -> list[str]:
        pragma = f"PRAGMA quick_check({table})" if table else "PRAGMA quick_check(3)"
        return [str(row[0]) for row in conn.execute(pragma)]

    def _corrupt_error(self, problem: str) -> LedgerError:
        return LedgerError(
            f"ledger {self.path} is corrupt ({problem}); it was not modified. Move it aside to start a "
            "new ledger, or point offset_ledger (CODECARBON_OFFSET_LEDGER) at another file"
        )

    def verify(self) -> None:
        """Check every page of the file (read-only); a no-op once done for this :class:`Ledger`.

        Needed only after opening with ``full_check=False``; costs about 0.3 s
        per million recorded epochs.

        Raises:
            LedgerError: the file is corrupt. Every later write through this
                object then raises it too: the file is never modified.
        """
        with self._lock:
            if self._corrupt is not None:
                raise self._corrupt_error(self._corrupt)
            if self._verified:
                return
            try:
                problems = self._quick_check(self._conn)
            except sqlite3.DatabaseError as exc:
                problems = [str(exc)]
            if problems != ["ok"]:
                self._corrupt = problems[0]
                raise self._corrupt_error(problems[0])
            self._verified = True

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Bring a ledger written by an older carbonoffset up to :data:`SCHEMA_VERSION` (adds columns
        and an index only)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0])  # another process may have migrated it meanwhile
            if current < 2:
                conn.execute("ALTER TABLE offsets ADD COLUMN last_sent REAL")
                conn.execute("ALTER TABLE runs ADD COLUMN resumed_from TEXT")
                conn.execute("ALTER TABLE runs ADD COLUMN base_emissions_kg REAL NOT NULL DEFAULT 0")
                conn.execute("ALTER TABLE runs ADD COLUMN base_energy_kwh REAL NOT NULL DEFAULT 0")
                conn.execute("CREATE INDEX IF NOT EXISTS runs_by_root ON runs(resumed_from)")
                conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
            if current < 3:
                conn.execute("ALTER TABLE runs ADD COLUMN details TEXT")
                conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
            if not exists:  # another process may have won the race
                for statement in _SCHEMA.strip().split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?), ('created_utc', ?)",
                    (str(SCHEMA_VERSION), utc_now()),
                )
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _write(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``); ``durable`` forces an fsync at commit."""
        with self._lock:
            if self._corrupt is not None:
                raise self._corrupt_error(self._corrupt)
            conn = self._conn
            if durable:
                conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    # --------------------------------------------------------------------- runs
    def start_run(
        self,
        *,
        account: str,
        environment: str,
        run_id: str | None = None,
        label: str | None = None,
        nodes: int = 1,
    ) -> str:
        """Create a run (or reopen ``run_id`` when it exists: its figures then continue from the
        ledger's; to resume from a checkpoint use :meth:`resume_run`).

        Returns:
            The run id (a new UUID4 hex when ``run_id`` is ``None``).
        """
        run_id = run_id or uuid.uuid4().hex
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, account, environment, label, started_utc, nodes) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET status = 'running', "
                "ended_utc = NULL, nodes = excluded.nodes",
                (run_id, account, environment, label, utc_now(), nodes),
            )
        return run_id

    def record(
        self, run_id: str, *, emissions_kg: float, energy_kwh: float, epoch: int | None = None
    ) -> float:
        """Record the run's **cumulative** emissions and energy.

        Args:
            run_id: a run created by :meth:`start_run`.
            emissions_kg: cumulative emissions of the run so far, kg CO2eq, >= 0
                (for a segment, its base included: the row stores what exceeds it).
            energy_kwh: cumulative energy of the run so far, kWh, >= 0.
            epoch: the epoch the figures belong to (0-based), if any.

        Returns:
            The increase in the run's emissions in kg (0.0 when the total
            was already recorded).

        Raises:
            ValueError: a negative or non-finite value.
            KeyError: unknown ``run_id``.
        """
        _check_amounts(emissions_kg=emissions_kg, energy_kwh=energy_kwh)
        with self._write() as conn:
            increase = self._raise_totals(conn, run_id, emissions_kg, energy_kwh, epoch)
        if increase is None:
            raise KeyError(f"unknown run {run_id!r}")
        return increase

    @classmethod
    def _raise_totals(
        cls, conn: sqlite3.Connection, row_id: str, emissions_kg: float, energy_kwh: float, epoch: int | None
    ) -> float | None:
        """In a write transaction: keep the larger of the row's figures and these cumulative ones
        (minus the row's base: 0 except for segments), noting a change in ``records``.

        Returns:
            The increase in the row's emissions (kg), or ``None`` when there is no such row.
        """
        row = conn.execute(
            "SELECT emissions_kg, energy_kwh, epochs, base_emissions_kg, base_energy_kwh FROM runs "
            "WHERE run_id = ?",
            (row_id,),
        ).fetchone()
        if row is None:
            return None
        old_kg, old_kwh, old_epochs, base_kg, base_kwh = row
        new_kg = max(old_kg, emissions_kg - base_kg)
        new_kwh = max(old_kwh, energy_kwh - base_kwh)
        epochs = max(old_epochs, epoch + 1) if epoch is not None else old_epochs
        if new_kg == old_kg and new_kwh == old_kwh and epochs == old_epochs:
            return 0.0
        conn.execute(
            "UPDATE runs SET emissions_kg = ?, energy_kwh = ?, epochs = ? WHERE run_id = ?",
            (new_kg, new_kwh, epochs, row_id),
        )
        cls._insert_record(conn, row_id, epoch, new_kg, new_kwh, utc_now())
        return float(new_kg - old_kg)

    @staticmethod
    def _root_of(conn: sqlite3.Connection, run_id: str) -> str | None:
        """The run a row belongs to (itself, or the run a segment continues); ``None``: no such row."""
        row = conn.execute(
            "SELECT COALESCE(resumed_from, run_id) FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return str(row[0]) if row else None

    @staticmethod
    def _run_totals(conn: sqlite3.Connection, root: str) -> tuple[float, float, int]:
        """The emissions (kg), energy (kWh) and epochs of run ``root`` over all its rows."""
        kg, kwh, epochs = conn.execute(
            "SELECT COALESCE(SUM(emissions_kg), 0), COALESCE(SUM(energy_kwh), 0), COALESCE(MAX(epochs), 0) "
            "FROM runs WHERE run_id = ?1 OR resumed_from = ?1",
            (root,),
        ).fetchone()
        return float(kg), float(kwh), int(epochs)

    def end_run(self, run_id: str, *, status: str = "finished") -> None:
        """Mark a run ended (``status``: ``finished`` | ``failed`` | ``interrupted``)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, ended_utc = ? WHERE run_id = ?", (status, utc_now(), run_id)
            )

    def set_run_details(self, run_id: str, details: Mapping[str, object]) -> None:
        """Merge ``details`` into the run's stored details (keys given replace those stored).

        Args:
            run_id: a run or segment id (the row written is that one; :meth:`run` merges its run's rows).
            details: JSON values keyed by name, e.g. :attr:`Measurement.details
                <carbonoffset.core.sources.Measurement.details>` (hardware, location, versions).

        Raises:
            ValueError: ``details`` is not JSON-serialisable.
            KeyError: unknown ``run_id``.
        """
        try:
            json.dumps(dict(details), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"run details must be JSON values ({exc})") from None
        with self._write() as conn:
            row = conn.execute("SELECT details FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown run {run_id!r}")
            stored = json.loads(row[0]) if row[0] else {}
            merged = {**(stored if isinstance(stored, dict) else {}), **details}
            conn.execute("UPDATE runs SET details = ? WHERE run_id = ?", (json.dumps(merged), run_id))

    def run(self, run_id: str) -> RunRecord | None:
        """The run ``run_id`` with its resumed segments folded in, or ``None``.

        A segment's id gives the run it belongs to.
        """
        with self._lock:
            root = self._root_of(self._conn, run_id)
            if root is None:
                return None
            rows = self._conn.execute(
                "SELECT * FROM runs WHERE run_id = ?1 OR resumed_from = ?1 ORDER BY rowid", (root,)
            ).fetchall()
        return _whole_runs(rows)[0]

    def runs(self, account: str | None = None) -> list[RunRecord]:
        """All runs (of one account when given), oldest first, with their resumed segments folded
        in (:attr:`RunRecord.segments` counts a run's ledger rows)."""
        query = (
            "SELECT * FROM runs" + (" WHERE account = ?" if account else "") + " ORDER BY started_utc, rowid"
        )
        with self._lock:
            rows = self._conn.execute(query, (account,) if account else ()).fetchall()
        return _whole_runs(rows)

    def resume_run(
        self,
        run_id: str,
        *,
        account: str,
        environment: str,
        label: str | None = None,
        nodes: int = 1,
        at_least_kg: float = 0.0,
        at_least_kwh: float = 0.0,
        checkpointed_by: str | None = None,
    ) -> RunRecord:
        """Continue run ``run_id`` (e.g. from a checkpoint), in a new **segment** when it exists.

        A segment is a ledger row of its own that starts from the run's totals
        (its *base*) and stores only what is measured beyond them; the run and
        the account count every segment. So two fits resumed from the same
        checkpoint at the same time both count in full, and a fit resumed again
        from an older checkpoint after a crash adds what it measures to what the
        crashed attempt recorded. Record cumulative figures (base included)
        under the returned ``run_id``; offsets and checkpoints keep using the
        run's id. Everything happens in one transaction, so processes resuming
        at the same moment each get their own segment.

        Args:
            run_id: the run to continue (a segment's id means its run). When
                the ledger does not know it (a new run with a chosen id, or a
                checkpoint written with another ledger) it is created, holding
                ``at_least_*``, and returned itself: no segment.
            account, environment, label, nodes: as for :meth:`start_run`.
            at_least_kg: cumulative emissions the checkpoint holds, kg CO2eq,
                >= 0. If the row that wrote the checkpoint (``checkpointed_by``)
                holds less (its last epochs never reached the ledger), it is
                brought up to that figure; recording it again later changes
                nothing.
            at_least_kwh: the same for energy, kWh, >= 0.
            checkpointed_by: the row (run or segment id) whose process saved
                the checkpoint; ``None`` means the run's own row.

        Returns:
            The row to record to: ``run_id`` (a new segment's id, or the run's
            when it was created), ``resumed_from`` (the run; ``None`` when it
            was created), ``base_emissions_kg`` / ``base_energy_kwh`` (the
            figures to start from: the checkpoint's or the run's totals,
            whichever is larger) and ``epochs`` (of the run so far).

        Raises:
            ValueError: a negative or non-finite ``at_least_*``.
        """
        _check_amounts(at_least_kg=at_least_kg, at_least_kwh=at_least_kwh)
        now = utc_now()
        with self._write() as conn:
            root = self._root_of(conn, run_id)
            if root is None:
                conn.execute(
                    "INSERT INTO runs (run_id, account, environment, label, started_utc, emissions_kg, "
                    "energy_kwh, nodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, account, environment, label, now, at_least_kg, at_least_kwh, nodes),
                )
                if at_least_kg > 0 or at_least_kwh > 0:
                    self._insert_record(conn, run_id, None, at_least_kg, at_least_kwh, now)
                found = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                return dataclasses.replace(
                    _run_record(found), base_emissions_kg=at_least_kg, base_energy_kwh=at_least_kwh
                )
            writer = checkpointed_by or root
            if self._root_of(conn, writer) == root:
                # the checkpoint may hold more than its writer's row got (writes still queued when the
                # process died): record it there now, as that row's own late write would have
                self._raise_totals(conn, writer, at_least_kg, at_least_kwh, None)
            total_kg, total_kwh, epochs = self._run_totals(conn, root)
            base_kg, base_kwh = max(total_kg, at_least_kg), max(total_kwh, at_least_kwh)
            segment = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO runs (run_id, account, environment, label, started_utc, epochs, nodes, "
                "resumed_from, base_emissions_kg, base_energy_kwh) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (segment, account, environment, label, now, epochs, nodes, root, base_kg, base_kwh),
            )
            found = conn.execute("SELECT * FROM runs WHERE run_id = ?", (segment,)).fetchone()
        return _run_record(found)

    @staticmethod
    def _insert_record(
        conn: sqlite3.Connection, run_id: str, epoch: int | None, kg: float, kwh: float, when: str
    ) -> None:
        conn.execute(
            "INSERT INTO records (run_id, epoch, emissions_kg, energy_kwh, recorded_utc) VALUES (?, ?, ?, ?, ?)",
            (run_id, epoch, kg, kwh, when),
        )

    def history(self, account: str | None = None) -> list[tuple[str, float]]:
        """``(recorded_utc, cumulative emissions_kg of the run)`` rows, oldest first (for plots)."""
        query = (
            "SELECT r.recorded_utc, r.emissions_kg, r.run_id FROM records r JOIN runs u USING (run_id)"
            + (" WHERE u.account = ?" if account else "")
            + " ORDER BY r.id"
        )
        with self._lock:
            rows = self._conn.execute(query, (account,) if account else ()).fetchall()
        # turn per-run cumulative values into an account-wide cumulative series
        last: dict[str, float] = {}
        total = 0.0
        series: list[tuple[str, float]] = []
        for when, kg, run_id in rows:
            total += kg - last.get(run_id, 0.0)
            last[run_id] = kg
            series.append((when, total))
        return series

    # ----------------------------------------------------------------- balances
    def balance(self, account: str) -> Balance:
        """The account's recorded, offset, in-flight and pending kg."""
        with self._lock:
            return self._balance(self._conn, account)

    @staticmethod
    def _balance(conn: sqlite3.Connection, account: str) -> Balance:
        recorded = conn.execute(
            "SELECT COALESCE(SUM(emissions_kg), 0) FROM runs WHERE account = ?", (account,)
        ).fetchone()[0]
        confirmed, in_flight = conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN state = 'confirmed' THEN amount_kg END), 0), "
            "COALESCE(SUM(CASE WHEN state IN ('intent', 'unknown') THEN amount_kg END), 0) "
            "FROM offsets WHERE account = ?",
            (account,),
        ).fetchone()
        return Balance(account, float(recorded), float(confirmed), float(in_flight))

    def accounts(self) -> list[str]:
        """Every account that has a run or an offset."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT account FROM runs UNION SELECT account FROM offsets ORDER BY 1"
            ).fetchall()
        return [row[0] for row in rows]

    # ------------------------------------------------------------------ offsets
    def create_intent(
        self,
        *,
        account: str,
        environment: str,
        run_id: str | None,
        amount_lb_for: Callable[[float], int],
        min_pending_kg: float,
        lease_s: float,
    ) -> OffsetRecord | None:
        """Decide an amount and durably write its intent, atomically.

        Args:
            account: the account to offset.
            environment: ``"production"`` or ``"sandbox"`` (stored for reports).
            run_id: the run that triggered the offset, if any.
            amount_lb_for: ``callable(pending_kg) -> int`` giving whole pounds
                to buy for the current pending amount (floor or ceil).
            min_pending_kg: do nothing unless pending >= this (kg).
            lease_s: seconds this process owns the offset before another
                process may take it over (renewed on each attempt).

        Returns:
            The new intent, or ``None`` when nothing is due.
        """
        with self._write(durable=True) as conn:
            pending = self._balance(conn, account).pending_kg
            if pending <= 0 or pending < min_pending_kg:
                return None
            amount_lb = int(amount_lb_for(pending))
            if amount_lb < 1:
                return None
            now = utc_now()
            record = OffsetRecord(
                offset_id=uuid.uuid4().hex,
                account=account,
                environment=environment,
                run_id=run_id,
                amount_lb=amount_lb,
                amount_kg=amount_lb * KG_PER_LB,
                state="intent",
                created_utc=now,
                updated_utc=now,
                attempts=0,
                owner=_owner(),
                lease_until=time.time() + lease_s,
                user_id=None,
                time_utc=None,
                carbon_captured=None,
                last_error=None,
            )
            conn.execute(
                f"INSERT INTO offsets VALUES ({', '.join('?' * len(dataclasses.fields(record)))})",
                dataclasses.astuple(record),
            )
        return record

    def claim(
        self, offset_id: str, *, lease_s: float, resend_grace_s: float = DEFAULT_RESEND_GRACE_S
    ) -> OffsetRecord | None:
        """Take (or renew) ownership of an open offset for ``lease_s`` seconds.

        Another process's offset can be taken over when its lease expired or its
        owner process (same host and PID namespace) is gone (e.g. ``kill -9``),
        and in both cases only once ``resend_grace_s`` seconds have passed since
        a capture for it was last sent: until then the server may still act on
        that request, and a look-up could not see it yet.

        Returns:
            The claimed offset, or ``None`` when it is closed or owned elsewhere.
        """
        me = _owner()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM offsets WHERE offset_id = ?", (offset_id,)).fetchone()
            if row is None:
                return None
            record = OffsetRecord(*row)
            if record.state not in OPEN_STATES:
                return None
            if record.owner != me and not self._claimable(record, resend_grace_s):
                return None
            conn.execute(
                "UPDATE offsets SET owner = ?, lease_until = ?, attempts = attempts + 1, updated_utc = ? "
                "WHERE offset_id = ?",
                (me, time.time() + lease_s, utc_now(), offset_id),
            )
            row = conn.execute("SELECT * FROM offsets WHERE offset_id = ?", (offset_id,)).fetchone()
        return OffsetRecord(*row)

    @staticmethod
    def _claimable(record: OffsetRecord, resend_grace_s: float) -> bool:
        now = time.time()
        if record.last_sent is not None and now - record.last_sent < resend_grace_s:
            return False
        if record.lease_until is None or record.lease_until < now:
            return True
        host, _, rest = (record.owner or "").partition(":")
        namespace, _, pid = rest.rpartition(":")
        return (
            host == socket.gethostname()
            and namespace == _PID_NS
            and pid.isdigit()
            and not _pid_alive(int(pid))
        )

    def mark_sent(self, offset_id: str) -> None:
        """Durably note that a capture for ``offset_id`` is about to be sent (starts the resend grace)."""
        with self._write(durable=True) as conn:
            conn.execute("UPDATE offsets SET last_sent = ? WHERE offset_id = ?", (time.time(), offset_id))

    def release(self, offset_id: str) -> None:
        """Give up ownership of an open offset so another process may finish it at once."""
        with self._write() as conn:
            conn.execute(
                "UPDATE offsets SET lease_until = 0 WHERE offset_id = ? AND owner = ?",
                (offset_id, _owner()),
            )

    def mark_unknown(self, offset_id: str, *, error: str) -> None:
        """The outcome of the last call is unknown; the amount stays in flight."""
        self._set_state(offset_id, "unknown", error=error)

    def mark_failed(self, offset_id: str, *, error: str) -> None:
        """The API definitely refused; the amount returns to pending."""
        self._set_state(offset_id, "failed", error=error)

    def mark_confirmed(self, offset_id: str, *, user_id: str, time_utc: str, carbon_captured: int) -> None:
        """The API captured the offset; store its receipt."""
        with self._write(durable=True) as conn:
            conn.execute(
                "UPDATE offsets SET state = 'confirmed', user_id = ?, time_utc = ?, carbon_captured = ?, "
                "updated_utc = ?, last_error = NULL, lease_until = NULL WHERE offset_id = ?",
                (user_id, time_utc, carbon_captured, utc_now(), offset_id),
            )

    def _set_state(self, offset_id: str, state: OffsetState, *, error: str) -> None:
        with self._write(durable=True) as conn:
            conn.execute(
                "UPDATE offsets SET state = ?, last_error = ?, updated_utc = ? "
                "WHERE offset_id = ? AND state IN ('intent', 'unknown')",
                (state, error[:500], utc_now(), offset_id),
            )

    def offset(self, offset_id: str) -> OffsetRecord | None:
        """The offset ``offset_id``, or ``None``."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM offsets WHERE offset_id = ?", (offset_id,)).fetchone()
        return OffsetRecord(*row) if row else None

    def offsets(
        self, account: str | None = None, *, states: tuple[str, ...] | None = None, run_id: str | None = None
    ) -> list[OffsetRecord]:
        """Offsets, oldest first, filtered by account, states and/or run."""
        clauses, params = [], []
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        if run_id is not None:
            clauses.append("run_id = ?")
            params.append(run_id)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            rows = self._conn.execute(f"SELECT * FROM offsets{where} ORDER BY created_utc", params).fetchall()
        return [OffsetRecord(*row) for row in rows]

    def position(self, account: str, run_id: str | None) -> tuple[Balance, float, float]:
        """The account's :class:`Balance`, the run's recorded emissions (kg) and its offsets bought
        or in flight (kg), read in one transaction (a consistent view)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                balance = self._balance(conn, account)
                run_kg = offset_kg = 0.0
                if run_id is not None:
                    run_kg = self._run_totals(conn, run_id)[0]
                    offset_kg = float(
                        conn.execute(
                            "SELECT COALESCE(SUM(amount_kg), 0) FROM offsets "
                            "WHERE run_id = ? AND state != 'failed'",
                            (run_id,),
                        ).fetchone()[0]
                    )
            finally:
                conn.execute("COMMIT")
        return balance, run_kg, offset_kg

    def run_offset_kg(self, run_id: str) -> float:
        """kg of offsets (confirmed or in flight) triggered by ``run_id``."""
        with self._lock:
            value = self._conn.execute(
                "SELECT COALESCE(SUM(amount_kg), 0) FROM offsets WHERE run_id = ? AND state != 'failed'",
                (run_id,),
            ).fetchone()[0]
        return float(value)

    def move_runs(self, *, from_account: str, to_account: str) -> int:
        """Move every run of ``from_account`` to ``to_account`` (e.g. runs recorded without a key,
        or under a mistyped key, adopted by the account that will offset them).

        Allowed only while ``from_account`` has no offset other than ``failed`` ones: its runs
        are then wholly pending, and moving them neither loses nor double counts anything.

        Returns:
            The number of runs moved.

        Raises:
            ValueError: the accounts are equal, or ``from_account`` has open or confirmed offsets.
        """
        if from_account == to_account:
            raise ValueError("from_account and to_account are the same account")
        if from_account.split(":", 1)[0] != to_account.split(":", 1)[0]:
            raise ValueError(
                f"{from_account} and {to_account} are in different environments: sandbox purchases never "
                "offset production emissions (or the other way round)"
            )
        with self._write(durable=True) as conn:
            busy = conn.execute(
                "SELECT COUNT(*) FROM offsets WHERE account = ? AND state != 'failed'", (from_account,)
            ).fetchone()[0]
            if busy:
                raise ValueError(
                    f"account {from_account} has {busy} offset(s) bought or in flight; only an account whose "
                    "offsets all failed (or that has none) can hand its runs over"
                )
            environment = to_account.split(":", 1)[0]
            cursor = conn.execute(
                "UPDATE runs SET account = ?, environment = ? WHERE account = ?",
                (to_account, environment, from_account),
            )
            return int(cursor.rowcount)
