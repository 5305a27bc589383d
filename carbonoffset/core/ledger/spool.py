"""Figures the ledger could not take, kept durably on local disk until it can.

While a ledger is locked past its busy timeout, or its database server is down, slow or
unreachable, a session appends each ledger write it could not make to a **spool file**
(JSON lines, each ``fsync``-ed) under ``<user data dir>/carbonoffset/spool/``, and writes them
to the ledger, in order, once it answers again. Records are cumulative maxima and a run's
start is an upsert, so writing a spool twice (e.g. after a crash mid-replay) changes nothing.
A spool left by a process that ended before its ledger came back is written by the next
session (or ``carbonoffset ledger replay``) that opens the same ledger.

Offsets are never decided from a spool: only from the ledger itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from carbonoffset.core.ledger.identity import host_identity
from carbonoffset.core.ledger.urls import legacy_location_key, location_key

logger = logging.getLogger("carbonoffset.core.ledger")


def spool_directory() -> Path:
    """``<user data dir>/carbonoffset/spool`` (:func:`platformdirs.user_data_path`)."""
    import platformdirs

    return platformdirs.user_data_path("carbonoffset", appauthor=False) / "spool"


def _ops(text: str, path: Path) -> list[dict[str, Any]]:
    """The writes in a spool file's text. A line that is not JSON (the last one, torn by a crash or a
    full disk before its ``fsync``) is skipped with a warning, so it cannot hold up the others."""
    ops = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except ValueError:
            op = None
        if isinstance(op, dict) and "op" in op:
            ops.append(op)
        else:
            logger.warning("skipping a damaged line of the spool file %s (%d characters)", path, len(line))
    return ops


def _start(ledger: Any, op: dict[str, Any]) -> None:
    ledger.start_run(
        account=op["account"],
        environment=op["environment"],
        run_id=op["run_id"],
        label=op.get("label"),
        nodes=int(op.get("nodes", 1)),
        started_utc=op.get("started_utc"),
    )


def apply(ledger: Any, op: dict[str, Any], *, replay: bool = False) -> None:
    """Make one write (``start_run``, ``resume_run``, ``record``, ``end_run`` or ``details``) of a session.

    A record of a run the ledger does not know yet (its start was spooled elsewhere, or lost)
    creates the run first. In a ``replay``, a start of a run the ledger has leaves it as it is
    (its status may already be the end's).
    """
    kind = op["op"]
    if kind == "start_run":
        if not (replay and ledger.run(op["run_id"]) is not None):
            _start(ledger, op)
    elif kind == "record":
        try:
            ledger.record(
                op["run_id"], emissions_kg=op["emissions_kg"], energy_kwh=op["energy_kwh"], epoch=op.get("epoch")
            )
        except KeyError:
            _start(ledger, op)
            ledger.record(
                op["run_id"], emissions_kg=op["emissions_kg"], energy_kwh=op["energy_kwh"], epoch=op.get("epoch")
            )
    elif kind == "resume_run":  # the segment of a fit resumed while the ledger did not answer
        ledger.resume_run(
            op["run_id"],
            account=op["account"],
            environment=op["environment"],
            label=op.get("label"),
            nodes=int(op.get("nodes", 1)),
            at_least_kg=op["at_least_kg"],
            at_least_kwh=op["at_least_kwh"],
            checkpointed_by=op.get("checkpointed_by"),
            segment_id=op["segment_id"],
        )
    elif kind == "end_run":
        ledger.end_run(op["run_id"], status=op["status"])
    elif kind == "details":
        ledger.set_run_details(op["run_id"], op["details"])


class Spool:
    """This process's spool for one ledger (see the module docstring).

    Args:
        location: the ledger (path or URL; the file name uses a hash of it, without password).
        directory: where spool files live (default :func:`spool_directory`).
    """

    def __init__(self, location: Path | str, directory: Path | None = None) -> None:
        self.key = location_key(location)
        self.directory = directory or spool_directory()
        self.path = self._new_path()
        self._handle: IO[str] | None = None
        self.pending = 0

    def _new_path(self) -> Path:
        host = host_identity().replace("/", "_")
        return self.directory / f"{self.key}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"

    def append(self, op: dict[str, Any]) -> None:
        """Add one write, durably (``fsync``); the file is locked while this process has it open."""
        if self._handle is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            # locked under a name no replay looks at, then given its name: never read (and removed)
            # by another process's replay between its creation and its lock
            hidden = self.path.with_suffix(".new")
            self._handle = open(hidden, "a+", encoding="utf-8")  # noqa: SIM115 -- kept open, locked
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(hidden, self.path)
        self._handle.write(json.dumps(op, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.pending += 1

    def replay(self, ledger: Any) -> int:
        """Write every spooled write to ``ledger`` in order, then empty the spool.

        Returns:
            The number of writes made.

        Raises:
            Exception: whatever the ledger raised; the spool then keeps everything.
        """
        if self._handle is None or not self.pending:
            return 0
        self._handle.seek(0)
        ops = _ops(self._handle.read(), self.path)
        for op in ops:
            apply(ledger, op, replay=True)
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.pending = 0
        return len(ops)

    def close(self) -> None:
        """Close (and remove, when empty) the spool file."""
        if self._handle is not None:
            if not self.pending:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._handle.close()
            self._handle = None
            self.pending = 0
            self.path = self._new_path()  # a late write starts a file of its own: this one stays as it is


def replay_left_over(ledger: Any, location: Path | str, directory: Path | None = None) -> int:
    """Write the spools that ended processes left for this ledger, then remove them.

    A spool whose process still runs is locked and skipped (that process writes it).

    Returns:
        The number of writes made.
    """
    folder = directory or spool_directory()
    made = 0
    keys = dict.fromkeys([location_key(location), legacy_location_key(location)])
    found = sorted({p for key in keys for p in folder.glob(f"{key}-*.jsonl")}) if folder.is_dir() else []
    for path in found:
        try:
            handle = open(path, "r+", encoding="utf-8")  # noqa: SIM115
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its process is alive and writes it itself
            ops = _ops(handle.read(), path)
            for op in ops:
                apply(ledger, op, replay=True)
            made += len(ops)
            path.unlink()
    if made:
        logger.info("carbonoffset wrote %d figures kept on local disk (spool) to the ledger %s", made, ledger.location)
    return made


class LedgerWriter:
    """A session's ledger writes, made on its ledger thread: to the ledger when it answers, else
    to the :class:`Spool` (then to the ledger once it is back, in order).

    After a failed write the ledger is tried again no sooner than ``RETRY_INITIAL_S`` seconds
    later (doubling up to ``RETRY_MAX_S``); meanwhile writes go straight to the spool, so a
    ledger that is down costs each write a local append, not a timeout.

    Args:
        ledger: the session's :class:`~carbonoffset.core.ledger.Ledger`.
        directory: spool folder (default :func:`spool_directory`).
    """

    RETRY_INITIAL_S = 1.0
    RETRY_MAX_S = 30.0

    def __init__(self, ledger: Any, directory: Path | None = None) -> None:
        self.ledger = ledger
        self.spool = Spool(ledger.path if ledger.path is not None else ledger.location, directory)
        self._spool_lock = threading.Lock()
        self._next_try = 0.0
        self._wait = self.RETRY_INITIAL_S
        self.last_error: str | None = None
        self._warned = False
        #: spool files :meth:`keep` wrote while the spool was being replayed
        self.kept_paths: list[Path] = []

    @property
    def replaying(self) -> bool:
        """The spool is being written to the ledger now (or appended to)."""
        return self._spool_lock.locked()

    @property
    def outage(self) -> bool:
        """Writes are being kept in the spool (the ledger did not answer the last time)."""
        return self.spool.pending > 0

    def write(self, op: dict[str, Any], *, force: bool = False) -> bool:
        """Write ``op`` (see :func:`apply`) after anything spooled before it.

        Args:
            force: try the ledger even while backing off (the end of a run).

        Returns:
            ``True`` when it is in the ledger, ``False`` when it was spooled.

        Raises:
            ValueError: a figure the ledger refuses (nothing is spooled).
        """
        if self.spool.pending:
            if not force and time.monotonic() < self._next_try:
                self._keep([op])
                return False
            try:
                with self._spool_lock:
                    made = self.spool.replay(self.ledger)
            except Exception as exc:  # noqa: BLE001 -- still unavailable (or damaged): keep it all
                self._failed(exc)
                self._keep([op])
                return False
            logger.info(
                "the ledger %s answers again: %d figures kept on local disk (%s) were written to it",
                self.ledger.location,
                made,
                self.spool.path,
            )
        try:
            apply(self.ledger, op)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            self._keep([op])
            return False
        self._wait = self.RETRY_INITIAL_S
        self.last_error = None
        return True

    #: Longest :meth:`keep` waits for the spool while the ledger thread replays it (s).
    KEEP_WAIT_S = 0.05

    def keep(self, ops: list[dict[str, Any]]) -> Path | None:
        """Spool ``ops`` at once, without trying the ledger (writes a run could not wait for).

        While the ledger thread replays the spool to a ledger that is slow to answer, they go
        to a spool file of their own instead (closed at once, so the next replay writes it).

        Returns:
            The file that holds them (``None`` for no ops).
        """
        if not ops:
            return None
        if self._spool_lock.acquire(timeout=self.KEEP_WAIT_S):
            try:
                for op in ops:
                    self.spool.append(op)
            finally:
                self._spool_lock.release()
            return self.spool.path
        own = Spool(self.ledger.path if self.ledger.path is not None else self.ledger.location, self.spool.directory)
        for op in ops:
            own.append(op)
        path = own.path
        own.close()  # not empty: it stays, unlocked, for the next replay
        self.kept_paths.append(path)
        return path

    def _keep(self, ops: list[dict[str, Any]]) -> None:
        with self._spool_lock:
            for op in ops:
                self.spool.append(op)

    def _failed(self, exc: BaseException) -> None:
        self.last_error = str(exc) or type(exc).__name__
        self._next_try = time.monotonic() + self._wait
        self._wait = min(self._wait * 2, self.RETRY_MAX_S)
        if not self._warned:
            self._warned = True
            logger.warning(
                "carbonoffset could not write its ledger (%s); the figures are kept on local disk in %s "
                "and written to the ledger when it answers again; tracking continues",
                self.last_error,
                self.spool.path,
            )

    def close(self) -> None:
        """Close the spool; say where the figures are if some never reached the ledger."""
        for path in self.kept_paths:
            logger.warning(
                "the run's last figures were kept on local disk in %s while the ledger %s did not answer (%s); "
                "the next run that opens this ledger writes them (or `carbonoffset ledger replay`)",
                path,
                self.ledger.location,
                self.last_error,
            )
        self.kept_paths = []
        if self.spool.pending:
            logger.warning(
                "the run's last figures are not in the ledger %s (%s): %d writes are kept on local disk in "
                "%s; the next run that opens this ledger writes them (or `carbonoffset ledger replay`)",
                self.ledger.location,
                self.last_error,
                self.spool.pending,
                self.spool.path,
            )
        self.spool.close()
