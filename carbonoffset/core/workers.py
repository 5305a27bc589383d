"""The session's background threads: the offset worker and the ledger thread with its queue.

Training never waits for either. Both are a :class:`Worker` (jobs in order on one daemon
thread). :class:`OffsetWorker` (``carbonoffset-worker``) decides and settles offsets through the
session's :class:`~carbonoffset.core.offsetter.Offsetter`; :class:`LedgerQueue`
(``carbonoffset-ledger``) makes the session's ledger writes in order and keeps on local disk
(:mod:`carbonoffset.core.ledger.spool`) what the ledger does not take.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import LedgerUnavailableError
from carbonoffset.core.ledger import OPEN_STATES, Ledger
from carbonoffset.core.ledger.spool import LedgerWriter
from carbonoffset.core.offsetter import OffsetOutcome, Offsetter

logger = logging.getLogger(__name__)

#: ``warn(cause, message, *args)``: log ``message`` once per ``cause`` (the session's warn-once).
Warn = Callable[..., None]


class Worker:
    """One daemon thread running jobs in order; :meth:`wait` is bounded.

    The thread starts with the first job and ends after :meth:`shutdown` once idle (a later
    :meth:`submit` starts a new one). A job that raises is logged and never kills the thread.

    Args:
        name: the thread's name (seen in thread dumps and ``threading.enumerate()``).
    """

    def __init__(self, name: str = "carbonoffset-worker") -> None:
        self._name = name
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._waiters = 0  # callers in wait(): a job's pause() ends at once for them
        self._nudged = False  # nudge() was called: the next (or current) pause() ends at once
        self.done = 0  # jobs finished so far
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the jobs already submitted."""
        with self._idle:
            self._outstanding += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._idle.notify_all()  # a job in pause() goes on: something is queued behind it
        self._queue.put(job)

    def pause(self, seconds: float) -> None:
        """In a job: sleep up to ``seconds``, ending early once another job is submitted or
        someone calls :meth:`wait` (so a paused job never delays what comes after it)."""
        deadline = time.monotonic() + seconds
        with self._idle:
            try:
                while self._outstanding <= 1 and not self._waiters and not self._nudged:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self._idle.wait(remaining)
            finally:
                self._nudged = False

    def nudge(self) -> None:
        """End the current :meth:`pause` now (or the next one, if no job is paused)."""
        with self._idle:
            self._nudged = True
            self._idle.notify_all()

    @property
    def busy(self) -> bool:
        """A submitted job is not done yet."""
        with self._idle:
            return self._outstanding > 0

    def wait(self, timeout: float) -> bool:
        """Wait until every submitted job is done; ``False`` if ``timeout`` s passed first."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._waiters += 1
            self._idle.notify_all()
            try:
                while self._outstanding:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._idle.wait(remaining)
            finally:
                self._waiters -= 1
        return True

    def shutdown(self) -> None:
        """Let the thread end once the jobs already submitted are done (a later submit starts a new one)."""
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                with self._idle:
                    if self._outstanding:  # submitted after the shutdown request: keep serving
                        continue
                    self._thread = None
                    return
            try:
                job()
            except Exception:  # a job must never kill the worker  # noqa: BLE001
                logger.warning("carbonoffset background job failed", exc_info=True)
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self.done += 1
                    self._idle.notify_all()


class LedgerQueue(Worker):
    """The ledger thread: a :class:`Worker` that makes one session's ledger writes in order.

    Each write (a ``dict`` op of :class:`~carbonoffset.core.ledger.spool.LedgerWriter`) stays
    *unwritten* until the ledger (or the spool, while the ledger does not answer) took it, so
    that what the thread never reached can be kept on local disk (:meth:`keep_unwritten`).

    Args:
        on_written: called on the ledger thread with each op the ledger took.
        warn: the session's warn-once (see :data:`Warn`).
        write_delay_s: a ``record`` write starts at least this long after it was queued (s),
            so the rest of the training thread's hook runs without competing for the GIL.
        record_interval_s: ``record`` writes of a run (:meth:`queue_record`) are made at most
            once in this many seconds (> 0), the latest cumulative figures each time.
        hang_s: a ledger call still running after this many seconds (a server that stopped
            answering on an open connection: no driver deadline ends that call) has the writes
            not yet made kept on local disk by a watchdog thread, as they would be after a
            failed call; ``None``: no watchdog.
    """

    def __init__(
        self,
        *,
        on_written: Callable[[dict[str, Any]], None],
        warn: Warn,
        write_delay_s: float,
        record_interval_s: float,
        hang_s: float | None = None,
    ) -> None:
        super().__init__("carbonoffset-ledger")
        self._on_written = on_written
        self._warn = warn
        self._write_delay_s = write_delay_s
        self._record_interval_s = record_interval_s
        self._hang_s = hang_s
        self._writing_since: float | None = None  # monotonic start of the ledger call in progress
        self._kept: dict[int, dict[str, Any]] = {}  # unwritten ops the watchdog kept (as they were)
        self._watchdog: threading.Thread | None = None  # runs while the ledger thread does
        self.writer: LedgerWriter | None = None
        self._unwritten: dict[int, dict[str, Any]] = {}  # queued, not yet made
        self._numbers = itertools.count()
        self._record_lock = threading.Lock()
        self._queued_record: int | None = None  # the record write queued and not yet taken, if any
        self._final_records: dict[int, bool] = {}  # queued record writes holding final figures
        self._next_record_at = 0.0  # perf_counter() before which the next record write waits

    def attach(self, ledger: Ledger) -> None:
        """Write to ``ledger`` from now on (once; a later call with another ledger is ignored)."""
        if self.writer is None:
            self.writer = LedgerWriter(ledger)

    def _ensure_watchdog(self) -> None:
        """Ledger thread, before a ledger call: make sure the watchdog runs (see ``hang_s``)."""
        if self._hang_s is None:
            return
        with self._idle:
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, args=(self._hang_s,), name="carbonoffset-ledger-watchdog", daemon=True
                )
                self._watchdog.start()

    def _watch(self, hang_s: float) -> None:
        """Watchdog thread: keep on local disk what waits behind a ledger call that hangs; ends
        with the ledger thread (which ends once idle after a run)."""
        while True:
            time.sleep(min(0.5, hang_s / 4))
            with self._idle:
                if self._thread is None and self._writing_since is None:
                    self._watchdog = None
                    return
            since, writer = self._writing_since, self.writer
            if since is None or writer is None or time.monotonic() - since < hang_s:
                continue
            if writer.replaying:  # a long replay to a ledger that answers is no hang (and keep() waits for it)
                continue
            fresh = [(n, op) for n, op in list(self._unwritten.items()) if self._kept.get(n) is not op]
            if not fresh:
                continue
            try:
                path = writer.keep([op for _, op in fresh])
            except Exception:  # noqa: BLE001 -- e.g. a full disk: tried again at the next wake-up
                logger.debug("keeping the ledger's writes on local disk failed", exc_info=True)
                continue
            unwritten = self._unwritten
            self._kept = {n: op for n, op in {**self._kept, **dict(fresh)}.items() if n in unwritten}
            self._warn(
                "ledger-hang",
                "carbonoffset's ledger %s has not answered for %.0f s; the figures are kept on local disk "
                "in %s and written to the ledger when it answers again; tracking continues",
                writer.ledger.location,
                time.monotonic() - since,
                path,
            )

    @property
    def outage(self) -> bool:
        """The ledger did not take the last write (it is kept on local disk)."""
        return self.writer is not None and self.writer.outage

    @property
    def spool_path(self) -> Path | None:
        """The local file holding writes the ledger did not take (``None`` without a ledger)."""
        return self.writer.spool.path if self.writer is not None else None

    def queue(self, op: dict[str, Any], *, first: Callable[[], None] | None = None) -> None:
        """Hand one write to the ledger thread, after running ``first`` there (if given)."""
        number = next(self._numbers)
        self._unwritten[number] = op
        queued = time.perf_counter()

        def job() -> None:
            if first is not None:
                first()
            try:
                self._write(op, queued)
            finally:
                self._unwritten.pop(number, None)

        self.submit(job)

    def queue_record(self, op: dict[str, Any], *, final: bool = False, urgent: bool = False) -> None:
        """Hand the run's latest cumulative figures (a ``record`` op) to the ledger thread.

        While a record is queued and not yet taken by that thread, a newer one replaces it
        (keeping the larger epoch): a record holds every earlier one, so epochs shorter than
        ``record_interval_s`` cost one ledger write (and one read of the figures) an interval,
        not one each. A ``final`` record tries the ledger even while it is being backed off from
        (like the end of a run), so that a final offset is decided on it when the ledger answers.
        An ``urgent`` record (one that may start an offset: its pending emissions reach the
        threshold) is written at once, without waiting for the interval.
        """
        with self._record_lock:
            if urgent:
                self._next_record_at = 0.0
            number = self._queued_record
            if number is not None and number in self._unwritten:
                replaced = self._unwritten[number]
                epochs = [e for e in (replaced.get("epoch"), op.get("epoch")) if e is not None]
                self._unwritten[number] = {**op, "epoch": max(epochs) if epochs else None}
                self._final_records[number] = final or self._final_records.get(number, False)
                if urgent:
                    self.nudge()
                return
            number = next(self._numbers)
            self._unwritten[number] = op
            self._final_records[number] = final
            self._queued_record = number
        queued = time.perf_counter()

        def job() -> None:
            self.pause(max(self._write_delay_s, self._next_record_at - time.perf_counter()))
            with self._record_lock:
                if self._queued_record == number:
                    self._queued_record = None  # from now on a new record queues a new write
                latest = self._unwritten[number]
                forced = self._final_records.pop(number, False)
                # (under the lock: an urgent record queued from now on resets it, and is not made to
                # wait an interval by this write setting it afterwards)
                self._next_record_at = time.perf_counter() + self._record_interval_s
            try:
                self._write(latest, queued, force=forced)
            finally:
                self._unwritten.pop(number, None)

        self.submit(job)

    def _write(self, op: dict[str, Any], queued: float, *, force: bool = False) -> None:
        """Ledger thread: make one write (or spool it), then tell the session."""
        writer = self.writer
        if writer is None:
            return
        delay = queued + self._write_delay_s - time.perf_counter()
        if delay > 0 and op["op"] == "record":
            time.sleep(delay)
        self._ensure_watchdog()
        self._writing_since = time.monotonic()  # the write and the reads after it are watched
        try:
            written = writer.write(op, force=force or op["op"] == "end_run")
        except Exception as exc:  # noqa: BLE001 -- a figure the ledger refuses
            self._writing_since = None
            self._warn("ledger", "carbonoffset could not write its ledger (%s); tracking continues", exc)
            return
        try:
            if written:
                self._on_written(op)
        finally:
            self._writing_since = None

    def flush_while_answering(self, deadline: float, ledger_timeout_s: float) -> bool:
        """Wait for the queued writes until ``deadline`` (monotonic) while the thread makes writes.

        Returns:
            ``False`` when it gave up because no write was made for a little longer than one
            ledger call waits (``ledger_timeout_s``: a ledger that hangs); ``True`` otherwise,
            done or not.
        """
        while True:
            made = self.done
            step = min(ledger_timeout_s + 1.0, deadline - time.monotonic())
            if self.wait(max(0.0, step)):
                return True
            if time.monotonic() >= deadline:
                return True  # busy, not hung: the rest is kept and the offset goes ahead
            if self.done == made:
                return False

    def keep_unwritten(self) -> Path | None:
        """Keep on local disk the writes the thread has not made (it still waits for the ledger).

        Returns:
            The spool file, or ``None`` when nothing was left.
        """
        if self._unwritten and self.writer is not None:
            return self.writer.keep(list(self._unwritten.values()))
        return None

    def close(self) -> None:
        """Keep what is unwritten and close the spool (the ledger itself is the session's)."""
        self.shutdown()
        if self.writer is not None:
            self.keep_unwritten()
            self.writer.close()


# The ledger stopped answering while an offset was decided, sent or confirmed: whether a capture
# went out is not known here, so the line says what is known (and true either way).
_LEDGER_GONE_MID_OFFSET = (
    "carbonoffset's ledger did not answer while an offset was being decided or settled (%s); an offset "
    "already sent stays open in the ledger and the next run (or `carbonoffset reconcile`) confirms it "
    "by looking it up, never by buying again; emissions not offset stay pending"
)


class OffsetWorker(Worker):
    """The offset worker: builds the session's :class:`Offsetter` when first needed and runs its
    offsets and reconciliations in order, off the training thread.

    Only the session of global rank 0 uses it (it hands it the ledger: :meth:`attach`).

    Args:
        config: the run's settings (``auto_offset``, ``offset_threshold``, the key).
        warn: the session's warn-once (see :data:`Warn`).
        options: passed to :class:`Offsetter` (``max_attempts``, ``wait_initial_s``, ``wait_max_s``).
        on_settled: called on the worker after each offset or reconciliation (the session reads
            the ledger's figures again).
    """

    def __init__(
        self, config: OffsetConfig, *, warn: Warn, options: dict[str, Any], on_settled: Callable[[], None]
    ) -> None:
        super().__init__("carbonoffset-worker")
        self.config = config
        self.ledger: Ledger | None = None
        self._warn = warn
        self._options = options
        self._on_settled = on_settled
        self._offsetter: Offsetter | None = None
        self._offsetter_lock = threading.Lock()
        self._queued = False  # an automatic offset is queued and not started yet
        self._queue_lock = threading.Lock()
        self._outcomes: list[OffsetOutcome] = []
        self._outcomes_lock = threading.Lock()

    def attach(self, ledger: Ledger) -> None:
        """Offset against ``ledger`` (the session's)."""
        self.ledger = ledger

    @property
    def outcomes(self) -> list[OffsetOutcome]:
        """Offsets settled since :meth:`reset` (oldest first)."""
        with self._outcomes_lock:
            return list(self._outcomes)

    def reset(self) -> None:
        """A new run begins: forget the last run's outcomes."""
        with self._outcomes_lock:
            self._outcomes = []

    def offsetter(self) -> Offsetter | None:
        """The :class:`Offsetter`, built by whichever thread needs it first; ``None`` without a
        key or a ledger, or when it cannot be built (logged once at ERROR, e.g. makeimpact missing)."""
        if self._offsetter is None and self.config.can_offset and self.ledger is not None:
            with self._offsetter_lock:
                if self._offsetter is None:
                    try:
                        self._offsetter = Offsetter(self.config, self.ledger, **self._options)
                    except Exception as exc:  # noqa: BLE001 -- e.g. makeimpact missing: say so loudly
                        self._warn(
                            "offsetter", "offsetting is disabled for this run: %s", exc, level=logging.ERROR
                        )
        return self._offsetter

    @property
    def auth_failed(self) -> bool:
        """1ClickImpact refused the key (an offsetter was built and told so)."""
        return self._offsetter is not None and self._offsetter.auth_failed

    def maybe_offset(self, balance_kg: float, run_id: str | None) -> None:
        """Queue one automatic offset when ``balance_kg`` (the account's, kg CO2eq) reached
        ``offset_threshold`` and none is queued yet (ledger thread)."""
        if not self.config.auto_offset or self._queued or self.ledger is None:
            return
        if balance_kg < self.config.offset_threshold:
            return
        offsetter = self.offsetter()
        if offsetter is None or offsetter.auth_failed:
            return
        with self._queue_lock:
            if self._queued:
                return
            self._queued = True
        self.offset(run_id, round_up=False, respect_threshold=True)

    def offset(self, run_id: str | None, *, round_up: bool, respect_threshold: bool) -> None:
        """Queue an offset of what is pending for ``run_id`` (see :meth:`Offsetter.offset_pending`)."""
        self.submit(lambda: self._offset_job(run_id, round_up=round_up, respect_threshold=respect_threshold))

    def _offset_job(self, run_id: str | None, *, round_up: bool, respect_threshold: bool) -> None:
        offsetter = self.offsetter()
        with self._queue_lock:
            self._queued = False
        if offsetter is None:
            return
        try:
            outcome = offsetter.offset_pending(
                run_id=run_id, round_up=round_up, respect_threshold=respect_threshold
            )
        except LedgerUnavailableError as exc:  # offsets are decided only against the ledger itself
            self._warn("offset", _LEDGER_GONE_MID_OFFSET, exc)
            return
        if outcome is not None:
            with self._outcomes_lock:
                self._outcomes.append(outcome)
        self._on_settled()

    def reconcile(self) -> None:
        """Queue the settling of the account's open offsets (see :meth:`Offsetter.reconcile`)."""
        self.submit(self._reconcile_job)

    def _reconcile_job(self) -> None:
        offsetter = self.offsetter()
        if offsetter is not None:
            try:
                outcomes = offsetter.reconcile()
            except LedgerUnavailableError as exc:
                self._warn("offset", _LEDGER_GONE_MID_OFFSET, exc)
                return
            with self._outcomes_lock:
                self._outcomes.extend(outcomes)
            self._on_settled()

    def has_open_offsets(self) -> bool:
        """The account has offsets in flight (intent or unknown) in the ledger."""
        try:
            ledger = self.ledger
            return ledger is not None and bool(ledger.offsets(self.config.account, states=OPEN_STATES))
        except Exception as exc:  # noqa: BLE001
            self._warn("ledger", "carbonoffset could not read its ledger (%s)", exc)
            return False
