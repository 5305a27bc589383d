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
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.ledger import Ledger
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
    """

    epoch: int | None
    energy_kwh: float
    emissions_kg: float
    offset_kg: float
    pending_kg: float
    credit_kg: float = 0.0
    over_budget: bool = False
    estimated_kg: float = 0.0

    def metrics(self) -> dict[str, float]:
        """The logged metrics: ``carbon/energy_kwh``, ``carbon/emissions_kg``,
        ``carbon/offset_kg``, ``carbon/pending_kg`` and ``carbon/estimated_kg``
        (the estimated part of ``carbon/emissions_kg``)."""
        return {
            f"{METRIC_PREFIX}energy_kwh": self.energy_kwh,
            f"{METRIC_PREFIX}emissions_kg": self.emissions_kg,
            f"{METRIC_PREFIX}offset_kg": self.offset_kg,
            f"{METRIC_PREFIX}pending_kg": self.pending_kg,
            f"{METRIC_PREFIX}estimated_kg": self.estimated_kg,
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
        ledger_path: the ledger file.
        estimated_kg: the estimated part of ``emissions_kg`` (CodeCarbon's
            late-start estimate; see :class:`EpochReport`).
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
    ledger_path: Path | None
    estimated_kg: float = 0.0

    def metrics(self) -> dict[str, float]:
        """The same metrics as :meth:`EpochReport.metrics`, for the whole run."""
        return EpochReport(
            None,
            self.energy_kwh,
            self.emissions_kg,
            self.offset_kg,
            self.pending_kg,
            estimated_kg=self.estimated_kg,
        ).metrics()


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
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._idle:
            self._outstanding += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(job)

    @property
    def busy(self) -> bool:
        with self._idle:
            return self._outstanding > 0

    def wait(self, timeout: float) -> bool:
        """Wait until every submitted job is done; ``False`` if ``timeout`` s passed first."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._outstanding:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
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
            # the accounting tables are checked now, the whole file by the ledger thread (big files)
            self._ledger = Ledger(config.ledger_path, full_check=False)
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
            self.run_id = run_id
            self._segment_id = None  # the ledger row this process records to (the run's, or a segment's)
            if self.is_writer and self._ledger is not None:
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
            if self.is_writer and self.config.auto_offset:
                if not self.config.can_offset:
                    self._warn_once(
                        "no-key",
                        "auto_offset is on but offset_api_key is not set: emissions are recorded in the "
                        "ledger %s under account %s and stay pending. Set offset_api_key (or "
                        "CODECARBON_OFFSET_API_KEY), then run `carbonoffset adopt %s` and `carbonoffset offset`",
                        self.config.ledger_path,
                        self.config.account,
                        self.config.account,
                    )
                elif self._ledger is not None and self._has_open_offsets():
                    self._worker.submit(self._reconcile_job)  # builds the offsetter off the training thread
            return self.run_id

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
                run_id, queued = self._segment_id, time.perf_counter()
                written = total if whole else total.measured
                self._writer.submit(lambda: self._write_record(run_id, written, epoch, queued))
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
        )

    # ---------------------------------------------------------------- offsets
    #: The ledger thread starts a write at least this long after it was queued (s): the rest of the
    #: training thread's hook (e.g. a framework handing metrics on) then runs without competing
    #: with it for the GIL. Jobs queued earlier (a backlog) do not wait.
    WRITE_DELAY_S = 0.005

    def _write_record(self, run_id: str, total: Measurement, epoch: int | None, queued: float) -> None:
        """Ledger thread: write one cumulative total, refresh the figures, maybe queue an offset.

        Takes no session lock (``stop()`` may wait for this thread while holding it).
        """
        if self._ledger is None:
            return
        delay = queued + self.WRITE_DELAY_S - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            self._ledger.record(
                run_id, emissions_kg=total.emissions_kg, energy_kwh=total.energy_kwh, epoch=epoch
            )
        except Exception as exc:  # noqa: BLE001
            self._warn_once("ledger", "carbonoffset could not write its ledger (%s); tracking continues", exc)
        try:
            self._maybe_offset(self._refresh_position())
        except Exception as exc:  # noqa: BLE001 -- e.g. the ledger cannot be read
            self._warn_once("offset", "carbonoffset could not decide an offset (%s); training continues", exc)

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
        outcome = offsetter.offset_pending(
            run_id=self.run_id, round_up=round_up, respect_threshold=respect_threshold
        )
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
        """Wait for background offsets, at most ``timeout`` s (default ``offset_timeout``).

        Returns:
            ``True`` when nothing is left in flight.
        """
        deadline = time.monotonic() + (self.config.offset_timeout if timeout is None else timeout)
        written = self._writer.wait(deadline - time.monotonic())
        return self._worker.wait(max(0.0, deadline - time.monotonic())) and written

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
        if self.is_writer:
            self.flush()  # the final figures are in the ledger
        if final_offset and self.is_writer and self.config.auto_offset and self._get_offsetter() is not None:
            round_up = self.config.offset_round_up
            self._worker.submit(lambda: self._offset_job(round_up=round_up, respect_threshold=not round_up))
        if self.is_writer and not self._worker.wait(max(0.0, deadline - time.monotonic())):
            logger.warning(
                "offsets still in flight after offset_timeout=%gs; they stay in the ledger and the next "
                "run (or `carbonoffset reconcile`) settles them",
                self.config.offset_timeout,
            )
        if self.is_writer and self._ledger is not None and self._segment_id is not None:
            try:
                self._ledger.end_run(self._segment_id, status=status)
            except Exception as exc:  # noqa: BLE001
                self._warn_once("ledger", "carbonoffset could not write its ledger (%s)", exc)
        self._worker.shutdown()  # nothing left running after a run: the thread ends once idle
        self._writer.shutdown()
        return self.report()

    def report(self) -> RunReport:
        """The current :class:`RunReport` (cheap; reads the ledger once the figures recorded so far
        are written to it)."""
        if self.is_writer:
            self.flush()
        total = self._last
        offset_kg = pending_kg = credit_kg = 0.0
        confirmed_lb = in_flight_lb = 0
        if self.is_writer and self._ledger is not None:
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
            ledger_path=self._ledger.path if self._ledger is not None else None,
            estimated_kg=total.estimated_kg,
        )

    def close(self) -> None:
        """Stop the run if needed (without a final offset) and close the ledger if this session opened it.

        Returns at once: an offset still in flight after :meth:`stop` finishes in the
        background, then the ledger is closed and the worker thread ends.
        """
        if self.running:
            self.stop(final_offset=False, status="interrupted")
        self.flush()  # epoch figures still queued are written first
        self._writer.shutdown()
        if self._owns_ledger and self._ledger is not None:
            if self._worker.busy:
                # an offset still in flight after stop() finishes with the ledger open
                self._worker.submit(self._ledger.close)
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
