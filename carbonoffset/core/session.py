"""The shared core: one run's tracker + offsetter + ledger.

Every front end (Lightning, Hugging Face, Keras callbacks and the CodeCarbon
drop-in) translates its events into the same four calls::

    session = OffsetSession(offset_api_key="test_...", offset_environment="sandbox")
    session.start()                      # fit begins: new tracker, new ledger run
    report = session.record_epoch(epoch) # each epoch: cumulative figures, maybe offset
    final = session.stop()               # fit ends: final record + offset, bounded wait

Offsets run on a background worker thread: ``record_epoch`` never waits for
the network. Failures of tracking or offsetting are logged once and never
raised into the caller's training.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import LedgerUnavailableError
from carbonoffset.core.ledger import Ledger, utc_now
from carbonoffset.core.ledger.spool import LedgerWriter, replay_left_over
from carbonoffset.core.meter import MeterSource
from carbonoffset.core.offsetter import OffsetOutcome, Offsetter
from carbonoffset.core.sources import EmissionsSource, Measurement
from carbonoffset.core.units import KG_PER_LB

logger = logging.getLogger(__name__)

METRIC_PREFIX = "carbon/"


@dataclasses.dataclass(frozen=True)
class EpochReport:
    """Figures after one epoch, cumulative for the run.

    Attributes:
        epoch: 0-based epoch index (``None`` when recorded outside an epoch).
        energy_kwh: energy of the run so far, kWh.
        emissions_kg: emissions of the run so far, kg CO2eq.
        offset_kg: offsets this run bought or has in flight, kg CO2eq.
        pending_kg: the account's emissions not yet offset, kg CO2eq (all runs).
        credit_kg: the account's unused overshoot of rounded-up offsets, kg.
        over_budget: ``emissions_kg`` passed ``max_emissions_kg``.
        estimated_kg: the part of ``emissions_kg`` that is estimated, not yet
            measured by CodeCarbon, kg CO2eq (see
            :attr:`~carbonoffset.core.sources.Measurement.estimated_kg`); 0 in
            the final figures unless CodeCarbon itself started late.
        measured: ``False`` when the emissions source failed to start: ``energy_kwh`` and
            ``emissions_kg`` are then no measurement, and :meth:`metrics` leaves them out rather
            than log a false zero.
    """

    epoch: int | None
    energy_kwh: float
    emissions_kg: float
    offset_kg: float
    pending_kg: float
    credit_kg: float = 0.0
    over_budget: bool = False
    estimated_kg: float = 0.0
    measured: bool = True

    def metrics(self) -> dict[str, float]:
        """The logged metrics: ``carbon/energy_kwh``, ``carbon/emissions_kg``,
        ``carbon/offset_kg``, ``carbon/pending_kg`` and ``carbon/estimated_kg``
        (the estimated part of ``carbon/emissions_kg``). A run that is not :attr:`measured`
        logs only ``carbon/offset_kg`` and ``carbon/pending_kg``: its emissions are unknown, not 0."""
        measured = (
            {
                f"{METRIC_PREFIX}energy_kwh": self.energy_kwh,
                f"{METRIC_PREFIX}emissions_kg": self.emissions_kg,
            }
            if self.measured
            else {}
        )
        return {
            **measured,
            f"{METRIC_PREFIX}offset_kg": self.offset_kg,
            f"{METRIC_PREFIX}pending_kg": self.pending_kg,
            **({f"{METRIC_PREFIX}estimated_kg": self.estimated_kg} if self.measured else {}),
        }


@dataclasses.dataclass(frozen=True)
class RunReport:
    """Figures of a whole run (see :class:`EpochReport` for units).

    Attributes:
        run_id: ledger id of the run.
        account: ``"<environment>:<key fingerprint>"``.
        environment: ``"production"`` or ``"sandbox"``.
        epochs: epochs recorded.
        energy_kwh, emissions_kg: run totals.
        offset_kg, offset_lb: offsets the run bought or has in flight.
        confirmed_lb: pounds the API confirmed for this run.
        in_flight_lb: pounds still unconfirmed (settled by a later run or
            ``carbonoffset reconcile``).
        pending_kg, credit_kg: the account's position after the run.
        ledger_path: the ledger file, or its URL with the password shown as ``***``.
        offset_threshold: the ``offset_threshold`` in force, kg CO2eq.
        not_bought: why this run bought nothing (``None`` when it bought, or has in flight,
            at least one pound, and on ranks that do not offset), e.g.
            ``"auto_offset is off"``, ``"offset_api_key is not set"``, ``"below threshold"``.
        estimated_kg: the estimated part of ``emissions_kg`` (CodeCarbon's
            late-start estimate; see :class:`EpochReport`).
        spool_path: the local file holding the figures the ledger did not take (it did not
            answer; see :mod:`carbonoffset.core.ledger.spool`), ``None`` when they are all in it.
        measured: ``False`` when the emissions source failed to start: the figures are then no
            measurement (the ledger's status is ``unmeasured``), never a measured zero.

    :attr:`summary` is the line logged at the end of every run.
    """

    run_id: str | None
    account: str
    environment: str
    epochs: int
    energy_kwh: float
    emissions_kg: float
    offset_kg: float
    offset_lb: int
    confirmed_lb: int
    in_flight_lb: int
    pending_kg: float
    credit_kg: float
    ledger_path: Path | str | None
    offset_threshold: float = 0.5
    not_bought: str | None = None
    estimated_kg: float = 0.0
    spool_path: Path | None = None
    measured: bool = True

    def metrics(self) -> dict[str, float]:
        """The same metrics as :meth:`EpochReport.metrics`, for the whole run."""
        return EpochReport(
            None,
            self.energy_kwh,
            self.emissions_kg,
            self.offset_kg,
            self.pending_kg,
            estimated_kg=self.estimated_kg,
            measured=self.measured,
        ).metrics()

    @property
    def summary(self) -> str:
        """One line: what the run recorded, what it bought, what stays pending and why, and where
        the figures are, e.g. ``recorded 0.0123 kg CO2eq (0.0456 kWh) in 5 epochs; bought 1 lb
        (0.454 kg) this run; 0.0271 kg pending below the 0.5 kg threshold; ledger /path``."""
        epochs = f" in {self.epochs} epoch{'' if self.epochs == 1 else 's'}" if self.epochs else ""
        parts = [
            f"recorded {_fmt(self.emissions_kg)} kg CO2eq ({_fmt(self.energy_kwh)} kWh){epochs}"
            if self.measured
            else f"not measured{epochs}: emissions tracking failed to start (see the warning above), so this "
            "run's emissions are unknown, not zero (status 'unmeasured' in the ledger)"
        ]
        if self.confirmed_lb:
            parts.append(f"bought {self.confirmed_lb} lb ({_fmt(self.confirmed_lb * KG_PER_LB)} kg) this run")
        if self.in_flight_lb:
            parts.append(
                f"{self.in_flight_lb} lb ({_fmt(self.in_flight_lb * KG_PER_LB)} kg) not confirmed yet: "
                "the next run or `carbonoffset reconcile` settles it"
            )
        pending = f"{_fmt(self.pending_kg)} kg pending"
        if self.not_bought == NOT_BOUGHT_BELOW_THRESHOLD:
            parts.append(
                f"bought nothing this run: {pending} below the {self.offset_threshold:g} kg threshold"
            )
        elif self.not_bought is not None:
            parts.append(f"bought nothing this run: {self.not_bought}; {pending}")
        elif self.pending_kg > 0:
            below = self.pending_kg < self.offset_threshold
            parts.append(pending + (f" below the {self.offset_threshold:g} kg threshold" if below else ""))
        else:
            parts.append("nothing pending")
        if self.credit_kg > 0:
            parts.append(f"credit {_fmt(self.credit_kg)} kg")
        if self.spool_path is not None:  # where the figures are: not (all) in the ledger
            parts.append(
                f"the ledger {self.ledger_path} did not answer: the figures are kept on local disk in "
                f"{self.spool_path} (account {self.account}) until the next run that opens it, or "
                "`carbonoffset ledger replay`, writes them"
            )
        elif self.ledger_path is not None:
            parts.append(f"ledger {self.ledger_path} (account {self.account})")
        return "; ".join(parts)


#: :attr:`RunReport.not_bought` when the account's pending emissions are below ``offset_threshold``.
NOT_BOUGHT_BELOW_THRESHOLD = "below threshold"


def _fmt(value: float) -> str:
    """Three significant figures, so micrograms do not print as 0.000000."""
    return f"{value:.3g}"


# Accounts (with the API URL) whose key the service accepted in this process: checked once per
# process, so a notebook's tenth fit makes no call. A refused or unchecked key is checked again
# at the next run's start.
_ACCEPTED_KEYS: set[tuple[str, str | None]] = set()
_ACCEPTED_KEYS_LOCK = threading.Lock()


def _key_check_id(config: OffsetConfig) -> tuple[str, str | None]:
    return config.account, config.offset_api_url


def _key_check_due(config: OffsetConfig) -> bool:
    with _ACCEPTED_KEYS_LOCK:
        return _key_check_id(config) not in _ACCEPTED_KEYS


@dataclasses.dataclass(frozen=True)
class _Position:
    """The ledger as last read by a background thread (kg CO2eq): the account's balance, this
    run's recorded emissions and its offsets. Epoch reports add the run's emissions recorded
    since (still queued for the ledger) to ``balance_kg``, so they need no ledger read."""

    balance_kg: float = 0.0
    run_kg: float = 0.0
    run_offset_kg: float = 0.0


class _Worker:
    """One daemon thread running jobs in order; :meth:`wait` is bounded."""

    def __init__(self, name: str = "carbonoffset-worker") -> None:
        self._name = name
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._waiters = 0  # callers in wait(): a job's pause() ends at once for them
        self.done = 0  # jobs finished so far
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
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
            while self._outstanding <= 1 and not self._waiters:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._idle.wait(remaining)

    @property
    def busy(self) -> bool:
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


class OffsetSession:
    """Tracker + offsetter + ledger for one training run at a time.

    Args:
        config: ready settings; when omitted they are resolved from
            ``**settings``, ``CODECARBON_*`` variables and ``.codecarbon.config``
            (see :class:`~carbonoffset.core.config.OffsetConfig`).
        source: emissions source; default :class:`~carbonoffset.core.meter.MeterSource`
            with the configured ``country_iso_code``: a new CodeCarbon tracker per run,
            in a measuring process (pass a
            :class:`~carbonoffset.core.sources.CodeCarbonSource` to measure in this one).
        ledger: an open :class:`Ledger`; default opens ``config.ledger_path``.
        label: free text stored with each run (e.g. ``"lightning"``).
        max_emissions_kg: optional carbon budget per run, kg CO2eq (> 0);
            :attr:`EpochReport.over_budget` turns true once it is passed.
        global_rank: rank of this process in the job; only rank 0 writes the
            ledger and offsets.
        local_rank: rank on this node; only local rank 0 runs a tracker.
        offsetter_options: passed to :class:`Offsetter` (``max_attempts``,
            ``wait_initial_s``, ``wait_max_s``).
        **settings: any :class:`OffsetConfig` field, overriding ``config``.

    Raises:
        ValueError: invalid settings (:class:`ConfigurationError`).
        LedgerError: the ledger is corrupt or from a newer version.
    """

    def __init__(
        self,
        config: OffsetConfig | None = None,
        *,
        source: EmissionsSource | None = None,
        ledger: Ledger | None = None,
        label: str | None = None,
        max_emissions_kg: float | None = None,
        global_rank: int = 0,
        local_rank: int = 0,
        offsetter_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        if config is None:
            config = OffsetConfig.resolve(**settings)
        elif settings:
            config = config.replace(**{k: v for k, v in settings.items() if v is not None})
        if max_emissions_kg is not None and not max_emissions_kg > 0:
            raise ValueError(f"max_emissions_kg must be > 0 kg CO2eq (got {max_emissions_kg!r}) or None")
        self.config = config
        self.label = label
        self.max_emissions_kg = max_emissions_kg
        self.global_rank = global_rank
        self.local_rank = local_rank
        self.source: EmissionsSource | None = source
        self._offsetter_options = offsetter_options or {}
        self._ledger = ledger
        self._owns_ledger = ledger is None
        if self.is_writer and self._ledger is None:
            # the accounting tables are checked now, the whole file by the ledger thread (big files);
            # a database server is first reached by the ledger thread
            self._ledger = Ledger(
                config.ledger_path, full_check=False, busy_timeout_s=self.LEDGER_TIMEOUT_S, connect=False
            )
        # ledger writes that could not be made are kept on local disk (see core.ledger.spool)
        self._ledger_writer = LedgerWriter(self._ledger) if self.is_writer and self._ledger is not None else None
        self._unwritten: dict[int, dict[str, Any]] = {}  # queued for the ledger thread, not yet made
        self._op_numbers = itertools.count()
        self._queued_record: int | None = None  # the record write queued and not yet taken, if any
        self._final_records: dict[int, bool] = {}  # queued record writes holding the final figures
        self._next_record_at = 0.0  # perf_counter time before which the next record waits
        self._offsetter: Offsetter | None = None
        self._offsetter_lock = threading.Lock()
        self._worker = _Worker()
        # Ledger writes of epoch figures, in order, off the training thread (see record()).
        self._writer = _Worker("carbonoffset-ledger")
        self._position = _Position()
        self._position_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        self._offset_queued = False
        self._outcomes: list[OffsetOutcome] = []
        self.run_id: str | None = None
        self._segment_id: str | None = None
        self.running = False
        self._base = Measurement()
        self._last = Measurement()
        self._epochs = 0
        self._projection_checked = False
        self._tracker_final: Measurement | None = None
        self._source_failed = False  # the source did not start: the run is not measured
        self._exit_finalizer: Any = None
        self._ended_status: str | None = None
        self._key_check: threading.Thread | None = None
        self._kept_path: Path | None = None  # where stop() kept the writes the ledger did not take

    # ---------------------------------------------------------------- helpers
    @property
    def is_tracking(self) -> bool:
        """This process runs a tracker (local rank 0)."""
        return self.local_rank == 0

    @property
    def is_writer(self) -> bool:
        """This process writes the ledger and offsets (global rank 0)."""
        return self.global_rank == 0

    @property
    def ledger(self) -> Ledger | None:
        """The ledger (``None`` on ranks other than global rank 0).

        Waits (at most ``offset_timeout`` s, normally milliseconds) until the
        figures already recorded are written to it, so reads see them.
        """
        self.flush()
        return self._ledger

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every figure recorded so far is written to the ledger (and any offset it
        triggered is queued), at most ``timeout`` s (default ``offset_timeout``).

        Returns:
            ``True`` when nothing is left to write.
        """
        return self._writer.wait(self.config.offset_timeout if timeout is None else timeout)

    @property
    def outcomes(self) -> list[OffsetOutcome]:
        """Offsets settled by this session so far (oldest first)."""
        with self._lock:
            return list(self._outcomes)

    def _warn_once(self, cause: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.log(level, message, *args)

    def _get_offsetter(self) -> Offsetter | None:
        if self._offsetter is None and self.is_writer and self.config.can_offset and self._ledger is not None:
            with self._offsetter_lock:  # built by whichever thread needs it first (background ones)
                if self._offsetter is None:
                    try:
                        self._offsetter = Offsetter(self.config, self._ledger, **self._offsetter_options)
                    except Exception as exc:  # noqa: BLE001 -- e.g. makeimpact missing: say so loudly
                        self._warn_once(
                            "offsetter", "offsetting is disabled for this run: %s", exc, level=logging.ERROR
                        )
        return self._offsetter

    def _refresh_position(self) -> _Position:
        """Read the ledger's figures for the epoch reports (background threads; writer only)."""
        with self._position_lock:  # one reader at a time, so an older read never replaces a newer one
            if self._ledger is None:
                return self._position
            balance, run_kg, run_offset_kg = self._ledger.position(self.config.account, self.run_id)
            self._position = _Position(balance.balance_kg, run_kg, run_offset_kg)
            return self._position

    @property
    def segment_id(self) -> str | None:
        """The ledger row this session records to: :attr:`run_id` itself, or the segment of it
        that a resumed run writes (see :meth:`Ledger.resume_run`); ``None`` on ranks that do
        not write. Save it in checkpoints with the figures (``checkpointed_by`` of :meth:`start`)."""
        return self._segment_id

    def _verify_job(self) -> None:
        """The complete check of a big ledger file, before this session writes any epoch to it."""
        if self._ledger is None:
            return
        try:
            self._ledger.verify()
        except LedgerUnavailableError:
            return  # not reachable now: the writes go to the local spool and say so
        except Exception as exc:  # noqa: BLE001 -- LedgerError: nothing more is written to the file
            self._warn_once(
                "corrupt",
                "%s. carbonoffset writes nothing to it; training continues",
                exc,
                level=logging.ERROR,
            )

    # -------------------------------------------------------------- lifecycle
    def start(
        self,
        *,
        run_id: str | None = None,
        resume: Measurement | None = None,
        nodes: int = 1,
        checkpointed_by: str | None = None,
    ) -> str | None:
        """Begin a run: a fresh tracker (local rank 0) and a ledger run (global rank 0).

        Args:
            run_id: continue this ledger run (e.g. resumed from a checkpoint),
                in a new segment of it (see :meth:`Ledger.resume_run`): fits
                resumed from one checkpoint at the same time, or again after a
                crash, each add what they measure. :attr:`run_id` stays the
                run's id (offsets and checkpoints use it).
            resume: figures the run had already reached (from a checkpoint);
                new measurements add to them. If the ledger already holds more
                for ``run_id``, the ledger's figures are used, so nothing
                measured is lost or counted twice.
            nodes: number of nodes measuring this run (stored in the ledger).
            checkpointed_by: the :attr:`segment_id` of the session that saved
                ``resume`` (from the checkpoint), so that figures it measured
                but never wrote to the ledger are added to its row, once.

        Returns:
            The ledger run id (``None`` on ranks that do not write).
        """
        if self.running:
            # outside the lock: stop() waits for the worker, whose jobs take the lock
            self.stop()
        with self._lock:
            self._base = resume or Measurement()
            self._tracker_final = None
            self._epochs = 0
            self._projection_checked = False
            self._outcomes = []
            self._ended_status = None
            self._kept_path = None
            self.run_id = run_id
            self._segment_id = None  # the ledger row this process records to (the run's, or a segment's)
            if self.is_writer and self._ledger is not None and run_id is None:
                # a new run needs nothing from the ledger: its id is made here and the ledger thread
                # writes it (or keeps it on local disk while the ledger does not answer)
                self.run_id = self._segment_id = uuid.uuid4().hex
                self._queue_write(
                    {
                        "op": "start_run",
                        "run_id": self.run_id,
                        "account": self.config.account,
                        "environment": self.config.offset_environment,
                        "label": self.label,
                        "nodes": nodes,
                        "started_utc": utc_now(),
                    },
                    first=self._opening_job,
                )
                # a few ms for the ledger thread to write the run and read the account's figures (so
                # the first epoch report shows them); a ledger that is slow or away is not waited for
                self._writer.wait(self.START_WAIT_S)
            elif self.is_writer and self._ledger is not None:
                try:
                    if run_id is not None:  # one transaction: concurrent resumes each get a segment
                        segment = self._ledger.resume_run(
                            run_id,
                            account=self.config.account,
                            environment=self.config.offset_environment,
                            label=self.label,
                            nodes=nodes,
                            at_least_kg=self._base.emissions_kg,
                            at_least_kwh=self._base.energy_kwh,
                            checkpointed_by=checkpointed_by,
                        )
                        self._base = Measurement(segment.base_emissions_kg, segment.base_energy_kwh)
                        self._epochs = segment.epochs
                        self.run_id = segment.resumed_from or segment.run_id
                        self._segment_id = segment.run_id
                    else:
                        self.run_id = self._segment_id = self._ledger.start_run(
                            account=self.config.account,
                            environment=self.config.offset_environment,
                            run_id=run_id,
                            label=self.label,
                            nodes=nodes,
                        )
                except Exception as exc:  # noqa: BLE001
                    self._warn_once(
                        "ledger", "carbonoffset could not write its ledger (%s); tracking continues", exc
                    )
                self._refresh_position_quietly()
                self._writer.submit(self._verify_job)
            self._last = self._base
            self._source_failed = False
            if self.is_tracking:
                try:
                    if self.source is None:
                        self.source = MeterSource(country_iso_code=self.config.country_iso_code)
                    self.source.start()
                except Exception as exc:  # noqa: BLE001
                    self._source_failed = True  # not read or stopped in this run: one warning
                    self._warn_once(
                        "source",
                        "emissions tracking failed to start (%s); training continues, this run is not "
                        "measured (recorded as 'unmeasured')",
                        exc,
                    )
            self.running = True
            atexit.register(self._stop_at_exit)
            # multiprocessing children (Lightning ddp_spawn/ddp_fork workers) skip atexit but run these
            from multiprocessing import util as mp_util

            self._exit_finalizer = mp_util.Finalize(None, self._stop_at_exit, exitpriority=0)
            if (
                self.is_writer
                and self.config.can_offset
                and self._ledger is not None
                and _key_check_due(self.config)
            ):
                # its own thread: an offset due meanwhile is not held up by the check's round trip
                self._key_check = threading.Thread(
                    target=self._check_key_job, name="carbonoffset-key-check", daemon=True
                )
                self._key_check.start()
            if self.is_writer and self.config.auto_offset:
                if not self.config.can_offset:
                    self._warn_once(
                        "no-key",
                        "auto_offset is on but offset_api_key is not set: emissions are recorded in the "
                        "ledger %s under account %s and stay pending. Set offset_api_key (or "
                        "CODECARBON_OFFSET_API_KEY), then run `carbonoffset adopt %s` and `carbonoffset offset`",
                        self.config.ledger_display,
                        self.config.account,
                        self.config.account,
                    )
                elif (
                    self._ledger is not None
                    and self._segment_id is not None
                    and run_id is not None  # (a new run checks on the ledger thread, _started_job)
                    and self._has_open_offsets()
                ):
                    self._worker.submit(self._reconcile_job)  # builds the offsetter off the training thread
            return self.run_id

    def _check_key_job(self) -> None:
        """Background thread: check the key once at the start of a run (see :meth:`Offsetter.check_key`)."""
        try:
            offsetter = self._get_offsetter()
            accepted = offsetter is not None and offsetter.check_key() == "accepted"
        except Exception:  # noqa: BLE001 -- never let the check disturb the run
            logger.debug("the start-of-run key check failed", exc_info=True)
            return
        if accepted:
            with _ACCEPTED_KEYS_LOCK:
                _ACCEPTED_KEYS.add(_key_check_id(self.config))

    def _opening_job(self) -> None:
        """Ledger thread, before a new run is written: read the account's figures (a read, which a
        SQLite writer elsewhere does not block), then check a big file completely."""
        self._refresh_position_quietly()
        self._verify_job()

    def _queue_write(self, op: dict[str, Any], *, first: Callable[[], None] | None = None) -> None:
        """Hand one ledger write to the ledger thread; it stays in :attr:`_unwritten` until made
        (or spooled), so :meth:`stop` can keep on local disk what that thread did not reach."""
        number = next(self._op_numbers)
        self._unwritten[number] = op
        queued = time.perf_counter()

        def job() -> None:
            if first is not None:
                first()
            try:
                self._write_op(number, op, queued)
            finally:
                self._unwritten.pop(number, None)

        self._writer.submit(job)

    def _queue_record(self, op: dict[str, Any], *, final: bool = False) -> None:
        """Queue the run's latest cumulative figures for the ledger thread (called under
        ``self._lock``). While a record is queued and not yet taken by that thread, a newer one
        replaces it: a record holds every earlier one, so short epochs cost one write a
        :attr:`RECORD_INTERVAL_S`, not one each. The run's ``final`` figures try the ledger even
        while it is being backed off from (like the end of the run), so a final offset is decided
        on them whenever the ledger answers."""
        number = self._queued_record
        if number is not None and number in self._unwritten:
            replaced = self._unwritten[number]
            epochs = [e for e in (replaced.get("epoch"), op.get("epoch")) if e is not None]
            self._unwritten[number] = {**op, "epoch": max(epochs) if epochs else None}
            self._final_records[number] = final or self._final_records.get(number, False)
            return
        number = next(self._op_numbers)
        self._unwritten[number] = op
        self._final_records[number] = final
        self._queued_record = number
        queued = time.perf_counter()

        def job() -> None:
            self._writer.pause(max(self.WRITE_DELAY_S, self._next_record_at - time.perf_counter()))
            with self._lock:
                if self._queued_record == number:
                    self._queued_record = None  # from now on a new record queues a new write
                latest = self._unwritten[number]
                forced = self._final_records.pop(number, False)
            try:
                self._next_record_at = time.perf_counter() + self.RECORD_INTERVAL_S
                self._write_op(number, latest, queued, force=forced)
            finally:
                self._unwritten.pop(number, None)

        self._writer.submit(job)

    def _write_op(self, number: int, op: dict[str, Any], queued: float, *, force: bool = False) -> None:
        """Ledger thread: make one write (or spool it), then refresh the figures and maybe offset."""
        writer = self._ledger_writer
        if writer is None:
            return
        delay = queued + self.WRITE_DELAY_S - time.perf_counter()
        if delay > 0 and op["op"] == "record":
            time.sleep(delay)
        try:
            written = writer.write(op, force=force or op["op"] == "end_run")
        except Exception as exc:  # noqa: BLE001 -- a figure the ledger refuses
            self._warn_once("ledger", "carbonoffset could not write its ledger (%s); tracking continues", exc)
            return
        if not written:
            return
        if op["op"] == "start_run":
            self._started_job()
            return
        if op["op"] != "record":
            return
        try:
            self._maybe_offset(self._refresh_position())
        except Exception as exc:  # noqa: BLE001 -- e.g. the ledger cannot be read
            self._warn_once("offset", "carbonoffset could not decide an offset (%s); training continues", exc)

    def _started_job(self) -> None:
        """Ledger thread, once a new run is in the ledger: write spools other processes left for
        it, read the figures, settle open offsets."""
        if self._ledger is None:
            return
        try:
            replay_left_over(self._ledger, self._ledger.path or self._ledger.location)
        except Exception as exc:  # noqa: BLE001
            self._warn_once("spool", "carbonoffset could not write figures kept on local disk (%s)", exc)
        self._refresh_position_quietly()
        if self.config.auto_offset and self.config.can_offset and self._has_open_offsets():
            self._worker.submit(self._reconcile_job)

    def _has_open_offsets(self) -> bool:
        try:
            return self._ledger is not None and bool(
                self._ledger.offsets(self.config.account, states=("intent", "unknown"))
            )
        except Exception as exc:  # noqa: BLE001
            self._warn_once("ledger", "carbonoffset could not read its ledger (%s)", exc)
            return False

    def _stop_at_exit(self) -> None:
        """Safety net at interpreter exit for a run nobody stopped (e.g. ``fit`` raised and the
        framework has no exception hook): stop the tracker and record what it measured, as an
        ``interrupted`` run without a final offset (the emissions stay pending)."""
        try:
            if self.running:
                logger.warning(
                    "carbonoffset: run %s was still running at exit; recording it as interrupted", self.run_id
                )
                self.stop(final_offset=False, status="interrupted")
        except Exception:  # noqa: BLE001 -- never fail interpreter shutdown
            logger.debug("stopping the run at exit failed", exc_info=True)

    def measure(self) -> Measurement:
        """This process's cumulative measurement for the run (base + tracker), without recording it."""
        with self._lock:
            if not (self.running and self.is_tracking and self.source is not None) or self._source_failed:
                return self._last if self.is_tracking else Measurement()
            try:
                return self._base + self.source.read()
            except Exception as exc:  # noqa: BLE001
                self._warn_once("source", "reading emissions failed (%s); training continues", exc)
                return self._last

    def stop_tracking(self) -> Measurement:
        """Stop this process's tracker and return its final cumulative measurement (base + tracker).

        Records nothing and leaves the run open: distributed integrations call it
        at the end of training, sum the node figures across processes, then call
        :meth:`stop` with ``total=`` the job's total. Idempotent: later calls
        (and :meth:`stop`) reuse the first result. Ranks without a tracker get
        zeros.
        """
        with self._lock:
            if self._tracker_final is None:
                node = self._last if self.is_tracking else Measurement()
                if self.is_tracking and self.source is not None and not self._source_failed:
                    try:
                        node = self._base + self.source.stop()
                    except Exception as exc:  # noqa: BLE001
                        self._warn_once("source", "stopping the tracker failed (%s)", exc)
                self._tracker_final = node
            return self._tracker_final

    def record_epoch(self, epoch: int | None = None, *, max_epochs: int | None = None) -> EpochReport:
        """Measure, record and maybe trigger an offset (never waits for the network).

        Args:
            epoch: 0-based epoch just finished.
            max_epochs: the run's planned epochs, if known: after the first
                epoch a warning is logged when the projected total passes
                ``max_emissions_kg``.

        Returns:
            The run's cumulative :class:`EpochReport`.
        """
        return self.record(self.measure(), epoch=epoch, max_epochs=max_epochs)

    def record(
        self, total: Measurement, *, epoch: int | None = None, max_epochs: int | None = None
    ) -> EpochReport:
        """Record ``total`` (cumulative figures of the whole run, all nodes summed).

        Used directly by distributed integrations after summing node figures;
        :meth:`record_epoch` is the single-process shortcut.

        The ledger write happens on a background thread (``carbonoffset-ledger``),
        in order, within milliseconds; :meth:`flush`, :meth:`wait`, :meth:`report`,
        :meth:`stop` and :attr:`ledger` wait for it. That thread also decides,
        from the ledger, whether ``offset_threshold`` is reached. The report's
        ``pending_kg``, ``credit_kg`` and ``offset_kg`` come from the ledger as
        last read by that thread plus what this run recorded since, so this call
        reads no file: offsets settled meanwhile by other processes show from
        the next epoch on.

        The ledger gets the measured part of ``total`` only
        (:attr:`Measurement.measured`): an estimate never decides an offset;
        the run's final figures (:meth:`stop`) are recorded whole.
        """
        return self._record(total, epoch=epoch, max_epochs=max_epochs, whole=False)

    def _record(
        self, total: Measurement, *, epoch: int | None, max_epochs: int | None, whole: bool
    ) -> EpochReport:
        with self._lock:
            self._last = total
            if epoch is not None:
                self._epochs = max(self._epochs, epoch + 1)
            if self.is_writer and self._ledger is not None and self._segment_id is not None:
                written = total if whole else total.measured  # an estimate never decides an offset
                self._queue_record(
                    {
                        "op": "record",
                        "run_id": self._segment_id,
                        "account": self.config.account,
                        "environment": self.config.offset_environment,
                        "label": self.label,
                        "emissions_kg": written.emissions_kg,
                        "energy_kwh": written.energy_kwh,
                        "epoch": epoch,
                    },
                    final=whole,
                )
            report = self._epoch_report(epoch, total)
            # (a tracker starting late reads zeros at first: project from the first real figures)
            if epoch is not None and max_epochs and not self._projection_checked and total.emissions_kg > 0:
                self._projection_checked = True
                self._check_projection(total, done=epoch + 1, max_epochs=max_epochs)
            if report.over_budget:
                self._warn_once(
                    "budget",
                    "the run's emissions %.6g kg CO2eq passed max_emissions_kg=%.6g kg; stopping training",
                    total.emissions_kg,
                    self.max_emissions_kg,
                )
            return report

    def _check_projection(self, total: Measurement, *, done: int, max_epochs: int) -> None:
        if self.max_emissions_kg is None or done <= 0 or max_epochs <= done:
            return
        projected = total.emissions_kg / done * max_epochs
        if projected > self.max_emissions_kg:
            self._warn_once(
                "projection",
                "projected emissions for %d epochs are %.6g kg CO2eq, above max_emissions_kg=%.6g kg: "
                "training will stop early",
                max_epochs,
                projected,
                self.max_emissions_kg,
            )

    def _epoch_report(self, epoch: int | None, total: Measurement) -> EpochReport:
        offset_kg = pending_kg = credit_kg = 0.0
        if self.is_writer and self._ledger is not None:
            position = self._position
            balance_kg = position.balance_kg + max(0.0, total.emissions_kg - position.run_kg)
            pending_kg, credit_kg = max(0.0, balance_kg), max(0.0, -balance_kg)
            offset_kg = position.run_offset_kg
        over = self.max_emissions_kg is not None and total.emissions_kg > self.max_emissions_kg
        return EpochReport(
            epoch,
            total.energy_kwh,
            total.emissions_kg,
            offset_kg,
            pending_kg,
            credit_kg,
            over,
            estimated_kg=total.estimated_kg,
            measured=not (self._source_failed and self.is_tracking),
        )

    # ---------------------------------------------------------------- offsets
    #: Seconds a session's ledger call waits for a lock or a database server before the figures go
    #: to the local spool instead (the ledger thread's wait; training never waits for it).
    LEDGER_TIMEOUT_S = 5.0

    #: Seconds :meth:`start` waits, at most, for the ledger thread to write a new run and read the
    #: account's figures (then training goes on and the figures show from a later epoch).
    START_WAIT_S = 0.02

    #: The ledger thread starts a write at least this long after it was queued (s): the rest of the
    #: training thread's hook (e.g. a framework handing metrics on) then runs without competing
    #: with it for the GIL. Jobs queued earlier (a backlog) do not wait.
    WRITE_DELAY_S = 0.005

    #: The ledger thread writes a run's figures at most once in this many seconds, however short
    #: its epochs: the latest cumulative figures (a record holds every earlier one). The measuring
    #: process reads them once a second, so no measured figure waits for more than about one more
    #: second; ending the run, :meth:`flush`, :meth:`wait` and :meth:`report` write at once.
    #: Measured in ``benchmarks/epoch_slope.py``: a ledger write and read per 50 ms epoch took the
    #: ledger thread ~6.5 ms of CPU each, competing with training for the GIL and the cores.
    RECORD_INTERVAL_S = 1.0

    def _maybe_offset(self, position: _Position) -> None:
        if not self.config.auto_offset or self._offset_queued or self._ledger is None:
            return
        if position.balance_kg < self.config.offset_threshold:
            return
        offsetter = self._get_offsetter()
        if offsetter is None or offsetter.auth_failed:
            return
        with self._queue_lock:
            if self._offset_queued:
                return
            self._offset_queued = True
        self._worker.submit(lambda: self._offset_job(round_up=False, respect_threshold=True))

    def _offset_job(self, *, round_up: bool, respect_threshold: bool) -> None:
        offsetter = self._get_offsetter()
        with self._queue_lock:
            self._offset_queued = False
        if offsetter is None:
            return
        try:
            outcome = offsetter.offset_pending(
                run_id=self.run_id, round_up=round_up, respect_threshold=respect_threshold
            )
        except LedgerUnavailableError as exc:  # offsets are decided only against the ledger itself
            self._warn_once(
                "offset", "carbonoffset could not decide an offset (%s); nothing was bought, the emissions "
                "stay pending", exc
            )
            return
        if outcome is not None:
            with self._lock:
                self._outcomes.append(outcome)
        self._refresh_position_quietly()

    def _refresh_position_quietly(self) -> None:
        try:
            self._refresh_position()
        except Exception as exc:  # noqa: BLE001
            self._warn_once("ledger", "carbonoffset could not read its ledger (%s)", exc)

    def _reconcile_job(self) -> None:
        offsetter = self._get_offsetter()
        if offsetter is not None:
            outcomes = offsetter.reconcile()
            with self._lock:
                self._outcomes.extend(outcomes)
            self._refresh_position_quietly()

    def offset_now(
        self, *, round_up: bool = False, wait: float | None = None, respect_threshold: bool | None = None
    ) -> None:
        """Queue an offset of what is pending now, even mid-run.

        Args:
            round_up: buy the next whole pound (the overshoot becomes credit);
                otherwise round down and respect ``offset_threshold``.
            wait: seconds to wait for it (``None``: do not wait).
            respect_threshold: do nothing unless pending >= ``offset_threshold``;
                ``None`` (default) means ``not round_up``. ``False`` with
                rounding down buys every whole pound pending (manual offsets).
        """
        if not self.is_writer:
            return  # only global rank 0 offsets; other ranks have nothing to do
        if self._get_offsetter() is None:
            self._warn_once("no-key-now", "cannot offset: offset_api_key is not set")
            return
        respect = (not round_up) if respect_threshold is None else respect_threshold
        # queued behind the epoch figures not yet written, so the offset sees them
        self._writer.submit(
            lambda: self._worker.submit(
                lambda: self._offset_job(round_up=round_up, respect_threshold=respect)
            )
        )
        if wait is not None:
            self.wait(wait)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for background offsets (and the start-of-run key check), at most ``timeout`` s
        (default ``offset_timeout``).

        Returns:
            ``True`` when nothing is left in flight.
        """
        deadline = time.monotonic() + (self.config.offset_timeout if timeout is None else timeout)
        written = self._writer.wait(deadline - time.monotonic())
        checked = True
        if self._key_check is not None:
            self._key_check.join(max(0.0, deadline - time.monotonic()))
            checked = not self._key_check.is_alive()
        return self._worker.wait(max(0.0, deadline - time.monotonic())) and written and checked

    def stop(
        self, *, final_offset: bool = True, status: str = "finished", total: Measurement | None = None
    ) -> RunReport:
        """End the run: stop the tracker, record the final figures, offset, wait.

        Idempotent: a second call returns the same report without side effects.

        Args:
            final_offset: offset what is pending (respecting ``offset_threshold``,
                or rounding up when ``offset_round_up`` is set). Pass ``False``
                when the run failed: what was measured stays pending.
            status: stored in the ledger (``finished``, ``failed``, ``interrupted``);
                ``unmeasured`` replaces it when the emissions source failed to start.
            total: the run's final cumulative figures (all nodes summed) to
                record instead of this process's own measurement (distributed
                integrations, after :meth:`stop_tracking`). The tracker is
                stopped either way.

        Returns:
            The :class:`RunReport`. Offsets still unconfirmed after
            ``offset_timeout`` seconds stay in the ledger for the next run.
        """
        with self._lock:
            if not self.running:
                return self.report()
            self.running = False
            given, total = total, self._last
            if self.is_tracking and self.source is not None:
                total = self.stop_tracking()
            if given is not None:
                total = given
            atexit.unregister(self._stop_at_exit)
            if self._exit_finalizer is not None:
                self._exit_finalizer.cancel()
                self._exit_finalizer = None
        self._record(total, epoch=None, max_epochs=None, whole=True)
        if self._source_failed and self.is_tracking:
            status = "unmeasured"  # never a measured zero
        deadline = time.monotonic() + self.config.offset_timeout
        # a busy ledger is waited for up to offset_timeout, one that does not answer (no write made
        # for a ledger call's wait) no longer: what it has not taken is kept on local disk
        answered = True
        if self.is_writer:
            answered = self._flush_while_answering(deadline)  # the final figures are in the ledger
        if (
            final_offset
            and answered
            and self.is_writer
            and self.config.auto_offset
            and self._get_offsetter() is not None
        ):
            round_up = self.config.offset_round_up
            self._worker.submit(lambda: self._offset_job(round_up=round_up, respect_threshold=not round_up))
        if self._key_check is not None:  # a short run still hears about a refused key
            self._key_check.join(max(0.0, deadline - time.monotonic()))
        if self.is_writer and not self._worker.wait(max(0.0, deadline - time.monotonic())):
            logger.warning(
                "offsets still in flight after offset_timeout=%gs; they stay in the ledger and the next "
                "run (or `carbonoffset reconcile`) settles them",
                self.config.offset_timeout,
            )
        if self.is_writer and self._ledger is not None and self._segment_id is not None:
            self._queue_write({"op": "details", "run_id": self._segment_id, "details": self._run_details()})
            self._queue_write({"op": "end_run", "run_id": self._segment_id, "status": status})
            if answered:
                self._flush_while_answering(max(time.monotonic() + self.LEDGER_TIMEOUT_S, deadline))
            if self._unwritten and self._ledger_writer is not None:
                # the ledger thread is still waiting for the ledger: keep the rest on local disk now
                self._kept_path = self._ledger_writer.keep(list(self._unwritten.values()))
        self._worker.shutdown()  # nothing left running after a run: the thread ends once idle
        self._writer.shutdown()
        self._ended_status = status if final_offset else f"{status}, without a final offset"
        report = self.report()
        if self.is_writer:
            logging.getLogger("carbonoffset").info("carbonoffset: %s", report.summary)
        return report

    def _flush_while_answering(self, deadline: float) -> bool:
        """:meth:`flush` until ``deadline`` (monotonic) while the ledger thread makes writes.

        Returns:
            ``False`` when it gave up because no write was made for a little longer than one
            ledger call waits (a ledger that hangs); ``True`` otherwise, done or not.
        """
        while True:
            made = self._writer.done
            step = min(self.LEDGER_TIMEOUT_S + 1.0, deadline - time.monotonic())
            if self._writer.wait(max(0.0, step)):
                return True
            if time.monotonic() >= deadline:
                return True  # busy, not hung: as before, the rest is kept and the offset goes ahead
            if self._writer.done == made:
                return False

    def _in_outage(self) -> bool:
        """The ledger did not take the last write (it is kept on local disk)."""
        return self._ledger_writer is not None and self._ledger_writer.outage

    def _run_details(self) -> dict[str, Any]:
        """What this run was measured on and where, for the ledger (see :meth:`Ledger.set_run_details`):
        the tracker's final :attr:`Measurement.details`, the carbonoffset version and, when the tracker
        started late, the seconds (``late_start_s``) and kg CO2eq (``late_start_kg``) estimated for it."""
        from carbonoffset import __version__

        final = self._tracker_final
        details: dict[str, Any] = {**(final.details if final is not None else {})}
        details["carbonoffset_version"] = __version__
        late_s = getattr(self.source, "late_start_s", 0.0)
        if isinstance(late_s, (int, float)) and late_s > 0:
            details["late_start_s"] = float(late_s)
            estimate = getattr(self.source, "late_start_estimate", None)
            details["late_start_kg"] = float(getattr(estimate, "emissions_kg", 0.0))
        return details

    def report(self) -> RunReport:
        """The current :class:`RunReport` (cheap; reads the ledger once the figures recorded so far
        are written to it)."""
        if self.is_writer and not self._in_outage():  # (figures kept on local disk: not waited for)
            self.flush()
        total = self._last
        offset_kg = pending_kg = credit_kg = 0.0
        confirmed_lb = in_flight_lb = 0
        outage = self._in_outage()
        if outage:  # the ledger did not answer: the figures of the last read, not another timeout
            position = self._position
            balance_kg = position.balance_kg + max(0.0, total.emissions_kg - position.run_kg)
            pending_kg, credit_kg = max(0.0, balance_kg), max(0.0, -balance_kg)
        if self.is_writer and self._ledger is not None and not outage:
            try:
                balance = self._ledger.balance(self.config.account)
                pending_kg, credit_kg = balance.pending_kg, balance.credit_kg
                if self.run_id is not None:
                    for offset in self._ledger.offsets(run_id=self.run_id):
                        if offset.state == "confirmed":
                            confirmed_lb += offset.amount_lb
                        elif offset.state in ("intent", "unknown"):
                            in_flight_lb += offset.amount_lb
                    offset_kg = (confirmed_lb + in_flight_lb) * KG_PER_LB
            except Exception as exc:  # noqa: BLE001
                self._warn_once("ledger", "carbonoffset could not read its ledger (%s)", exc)
        return RunReport(
            run_id=self.run_id,
            account=self.config.account,
            environment=self.config.offset_environment,
            epochs=self._epochs,
            energy_kwh=total.energy_kwh,
            emissions_kg=total.emissions_kg,
            offset_kg=offset_kg,
            offset_lb=confirmed_lb + in_flight_lb,
            confirmed_lb=confirmed_lb,
            in_flight_lb=in_flight_lb,
            pending_kg=pending_kg,
            credit_kg=credit_kg,
            ledger_path=(self._ledger.path or self._ledger.location) if self._ledger is not None else None,
            offset_threshold=self.config.offset_threshold,
            not_bought=self._not_bought(confirmed_lb + in_flight_lb, pending_kg, credit_kg, outage=outage),
            estimated_kg=total.estimated_kg,
            measured=not (self._source_failed and self.is_tracking)
            and not (self._ended_status or "").startswith("unmeasured"),
            spool_path=(self._kept_path or self._ledger_writer.spool.path)
            if outage and self._ledger_writer is not None
            else None,
        )

    def _not_bought(
        self, bought_lb: int, pending_kg: float, credit_kg: float, *, outage: bool = False
    ) -> str | None:
        """Why the run bought nothing (``None`` when it did, or on ranks that do not offset)."""
        if bought_lb or not self.is_writer:
            return None
        offsetter = self._offsetter
        if not self.config.can_offset:
            return "offset_api_key is not set"
        if offsetter is not None and offsetter.auth_failed:
            return "1ClickImpact refused offset_api_key (see the error above)"
        if not self.config.auto_offset:
            return "auto_offset is off (`carbonoffset offset` buys what is pending)"
        if any(o.state == "failed" for o in self.outcomes):
            return "1ClickImpact refused the offset (see the error above)"
        if pending_kg <= 0:
            return (
                "the credit of an earlier rounded-up offset covers it"
                if credit_kg > 0
                else "nothing is pending"
            )
        ended = self._ended_status
        if ended is not None and "without a final offset" in ended:
            return f"the run ended {ended}"
        if pending_kg < self.config.offset_threshold:
            return NOT_BOUGHT_BELOW_THRESHOLD
        if outage:  # offsets are decided only from the ledger itself
            return "the ledger did not answer, and offsets are decided only from it"
        if self.running:
            return "the run is still going"
        return "the offset did not finish within offset_timeout (see the warning above)"

    def close(self) -> None:
        """Stop the run if needed (without a final offset) and close the ledger if this session opened it.

        Returns at once: an offset still in flight after :meth:`stop` finishes in the
        background, then the ledger is closed and the worker thread ends.
        """
        if self.running:
            self.stop(final_offset=False, status="interrupted")
        # epoch figures still queued are written first (kept on local disk at once in an outage)
        self.flush(0.0 if self._in_outage() else self.LEDGER_TIMEOUT_S)
        self._writer.shutdown()
        if self._ledger_writer is not None:
            if self._unwritten:
                self._ledger_writer.keep(list(self._unwritten.values()))
            self._ledger_writer.close()
        if self._owns_ledger and self._ledger is not None:
            if self._worker.busy:
                # an offset still in flight after stop() finishes with the ledger open
                self._worker.submit(self._ledger.close)
            elif self._writer.busy:
                # the ledger thread still waits for a ledger that does not answer: closed after it
                self._writer.submit(self._ledger.close)
                self._writer.shutdown()
            else:
                self._ledger.close()
        self._worker.shutdown()

    def __enter__(self) -> OffsetSession:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.stop(final_offset=False, status="failed")

    def __repr__(self) -> str:
        return f"OffsetSession(run_id={self.run_id!r}, config={self.config!r})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "OffsetSession cannot be pickled (it holds a ledger connection and threads); pass settings "
            "to the callback instead of a session when training in spawned processes"
        )
