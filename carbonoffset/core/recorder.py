"""One process's recording of one run: the single-process calls under the run object.

:class:`RunRecorder` is the base of :class:`~carbonoffset.core.session.OffsetSession` (the public
run object, which adds the front door and documents the arguments): it starts a run
(:meth:`~RunRecorder.start`), records its cumulative figures (:meth:`~RunRecorder.record_epoch`,
or :meth:`~RunRecorder.record` of figures measured elsewhere, as the CodeCarbon drop-in does),
stops it (:meth:`~RunRecorder.stop`) and reports it (:meth:`~RunRecorder.report`), with the rank
policy read at each call (:attr:`~RunRecorder.is_tracking`, :attr:`~RunRecorder.is_writer`).

Its parts, each in its own module: the tracker (:mod:`carbonoffset.core.tracking`), the ledger
writes (:mod:`carbonoffset.core.writer`), the background threads (:mod:`carbonoffset.core.workers`),
the start-of-run key check (:mod:`carbonoffset.core.keycheck`) and the reports
(:mod:`carbonoffset.core.reports`). Failures of tracking or offsetting are logged once and never
raised into the caller's training.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.keycheck import key_check_due, start_key_check
from carbonoffset.core.ledger import Ledger, OffsetState
from carbonoffset.core.offsetter import OffsetOutcome
from carbonoffset.core.ranks import Ranks
from carbonoffset.core.reports import EpochReport, RunReport, not_bought
from carbonoffset.core.sources import EmissionsSource, Measurement
from carbonoffset.core.tracking import RunTracker
from carbonoffset.core.workers import OffsetWorker
from carbonoffset.core.writer import Bought, RunWriter

logger = logging.getLogger(__name__)


def checked_budget(max_emissions_kg: float | None) -> float | None:
    """``max_emissions_kg`` (kg CO2eq, > 0, or ``None``: no budget), checked.

    Raises:
        ValueError: it is not > 0.
    """
    if max_emissions_kg is not None and not max_emissions_kg > 0:
        raise ValueError(f"max_emissions_kg must be > 0 kg CO2eq (got {max_emissions_kg!r}) or None")
    return max_emissions_kg


def resolved_config(config: OffsetConfig | None, settings: Mapping[str, Any]) -> OffsetConfig:
    """``config`` with ``settings`` (any :class:`OffsetConfig` field; ``None`` values ignored) over
    it, or, without ``config``, the settings resolved with ``CODECARBON_*`` variables and
    ``.codecarbon.config`` (see :meth:`OffsetConfig.resolve`).

    Raises:
        ValueError: invalid settings (:class:`~carbonoffset.ConfigurationError`).
    """
    if config is None:
        return OffsetConfig.resolve(**settings)
    if settings:
        return config.replace(**{k: v for k, v in settings.items() if v is not None})
    return config



class RunRecorder:
    """One process's recording of one training run at a time: tracker (local rank 0), ledger and
    offsets (global rank 0). The base of :class:`~carbonoffset.core.session.OffsetSession`, which
    documents the arguments and adds the front door (``begin``/``epoch_end``/``end``/``abort``).
    """

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
    #: second; figures whose pending emissions reach ``offset_threshold`` (an offset may start),
    #: ending the run, :meth:`flush`, :meth:`wait` and :meth:`report` write at once.
    #: Measured in ``benchmarks/epoch_slope.py``: a ledger write and read per 50 ms epoch took the
    #: ledger thread ~6.5 ms of CPU each, competing with training for the GIL and the cores.
    RECORD_INTERVAL_S = 1.0

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
        self.config = resolved_config(config, settings)
        self.max_emissions_kg = checked_budget(max_emissions_kg)
        self.label = label
        self.global_rank = global_rank
        self.local_rank = local_rank
        self._warned: set[str] = set()
        self._tracker = RunTracker(
            source, country_iso_code=self.config.country_iso_code, warn=self._warn_once
        )
        self._offsets = OffsetWorker(
            self.config,
            warn=self._warn_once,
            options=offsetter_options or {},
            on_settled=self._refresh_quietly,
        )
        # global rank 0's ledger writes, in order, off the training thread (see record())
        self._run_writer = RunWriter(
            self.config,
            ledger,
            warn=self._warn_once,
            offsets=self._offsets,
            timeout_s=self.LEDGER_TIMEOUT_S,
            write_delay_s=self.WRITE_DELAY_S,
            record_interval_s=self.RECORD_INTERVAL_S,
        )
        self._writer = self._run_writer.queue
        if self.is_writer:
            self._run_writer.open()  # now, so that a bad ledger raises here
        self._lock = threading.RLock()
        self.running = False
        self._base = Measurement()
        self._last = Measurement()
        self._epochs = 0
        self._projection_checked = False
        self._exit_finalizer: Any = None
        self._ended_status: str | None = None
        self._key_check: threading.Thread | None = None
        self._kept_path: Path | None = None  # where stop() kept the writes the ledger did not take
        # other nodes of a distributed job whose tracker did not start (set by OffsetSession)
        self._unmeasured_nodes = 0

    # ---------------------------------------------------------------- ranks
    @property
    def ranks(self) -> Ranks:
        """This process's ranks now (given to :meth:`begin`, else to the constructor)."""
        return Ranks(self.global_rank, self.local_rank)

    @property
    def is_tracking(self) -> bool:
        """This process runs a tracker (local rank 0)."""
        return self.ranks.is_tracking

    @property
    def is_writer(self) -> bool:
        """This process writes the ledger and offsets (global rank 0)."""
        return self.ranks.is_writer

    @property
    def _budget(self) -> float | None:
        """The budget this process decides on (kg CO2eq; ``None``: none)."""
        return self.max_emissions_kg

    # ---------------------------------------------------------------- reading
    @property
    def ledger(self) -> Ledger | None:
        """The ledger (``None`` on ranks other than global rank 0).

        Waits (at most ``offset_timeout`` s, normally milliseconds) until the
        figures already recorded are written to it, so reads see them.
        """
        self.flush()
        return self._run_writer.ledger

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every figure recorded so far is written to the ledger (and any offset it
        triggered is queued), at most ``timeout`` s (default ``offset_timeout``).

        Returns:
            ``True`` when nothing is left to write.
        """
        return self._writer.wait(self.config.offset_timeout if timeout is None else timeout)

    @property
    def outcomes(self) -> list[OffsetOutcome]:
        """Offsets settled by this session in the current (or last) run (oldest first)."""
        return self._offsets.outcomes

    @property
    def offsets_busy(self) -> bool:
        """An offset (or a reconciliation) is queued or being settled on the worker thread now."""
        return self._offsets.busy

    @property
    def source(self) -> EmissionsSource | None:
        """The emissions source (local rank 0 starts it at each run; built at the first when not given)."""
        return self._tracker.source

    @source.setter
    def source(self, source: EmissionsSource | None) -> None:
        self._tracker.source = source

    @property
    def run_id(self) -> str | None:
        """The ledger id of the current (or last) run (``None`` on ranks that do not write, unless
        given to :meth:`start`)."""
        return self._run_writer.run_id

    @property
    def segment_id(self) -> str | None:
        """The ledger row this session records to: :attr:`run_id` itself, or the segment of it
        that a resumed run writes (see :meth:`Ledger.resume_run`); ``None`` on ranks that do
        not write. Save it in checkpoints with the figures (``checkpointed_by`` of :meth:`start`)."""
        return self._run_writer.segment_id

    @property
    def _writes(self) -> bool:
        """This process writes the run to a ledger (global rank 0, now)."""
        return self.is_writer and self._run_writer.ledger is not None

    @property
    def _measured(self) -> bool:
        """The run's figures are a measurement: this node's source started and, in a distributed
        job, every other node's did too."""
        return not (self._tracker.failed and self.is_tracking) and not self._unmeasured_nodes

    def _warn_once(self, cause: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.log(level, message, *args)

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

        The single-process call underneath :meth:`begin`.

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
            if self.is_writer:
                self._run_writer.open()  # the rank policy as it is now, not as it was when built
            self._base = resume or Measurement()
            self._epochs = 0
            self._projection_checked = False
            self._offsets.reset()
            self._ended_status = None
            self._kept_path = None
            self._unmeasured_nodes = 0
            self._run_writer.run_id, self._run_writer.segment_id = run_id, None
            writes = self._writes
            if writes and run_id is None:
                self._run_writer.start_new(label=self.label, nodes=nodes, wait_s=self.START_WAIT_S)
            elif writes and run_id is not None:
                resumed = self._run_writer.resume(
                    run_id, label=self.label, nodes=nodes, base=self._base, checkpointed_by=checkpointed_by
                )
                if resumed is not None:
                    self._base, self._epochs = resumed
            self._last = self._base
            if self.is_tracking:
                self._tracker.start()
            else:
                self._tracker.reset()
            self.running = True
            atexit.register(self._stop_at_exit)
            # multiprocessing children (Lightning ddp_spawn/ddp_fork workers) skip atexit but run these
            from multiprocessing import util as mp_util

            self._exit_finalizer = mp_util.Finalize(None, self._stop_at_exit, exitpriority=0)
            if writes and self.config.can_offset and key_check_due(self.config):
                self._key_check = start_key_check(self.config, self._offsets.offsetter)
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
                    writes
                    and self.segment_id is not None
                    and run_id is not None  # (a new run checks on the ledger thread, _started_job)
                    and self._offsets.has_open_offsets()
                ):
                    self._offsets.reconcile()  # builds the offsetter off the training thread
            return self.run_id

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
            if not self.is_tracking:
                return Measurement()
            return self._tracker.read(self._base, self._last) if self.running else self._last

    def stop_tracking(self) -> Measurement:
        """Stop this process's tracker and return its final cumulative measurement (base + tracker).

        Records nothing and leaves the run open (:meth:`end` then sums the node figures across
        processes and calls :meth:`stop` with ``total=`` the job's total). Idempotent: later
        calls (and :meth:`stop`) reuse the first result. Ranks without a tracker get zeros.
        """
        with self._lock:
            fallback = self._last if self.is_tracking else Measurement()
            return self._tracker.stop(self._base, fallback, measuring=self.is_tracking)

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
        """Record ``total`` (cumulative figures of the whole run, all nodes summed), e.g. figures
        measured elsewhere (the CodeCarbon drop-in's tracker; :meth:`epoch_end`'s job total).
        Args ``epoch``, ``max_epochs`` and the return value: as :meth:`record_epoch`.

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
            if self._writes and self.segment_id is not None:
                written = total if whole else total.measured  # an estimate never decides an offset
                self._run_writer.record(written, label=self.label, epoch=epoch, final=whole)
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
                    self._budget,
                )
            return report

    def _check_projection(self, total: Measurement, *, done: int, max_epochs: int) -> None:
        budget = self._budget
        if budget is None or done <= 0 or max_epochs <= done:
            return
        projected = total.emissions_kg / done * max_epochs
        if projected > budget:
            self._warn_once(
                "projection",
                "projected emissions for %d epochs are %.6g kg CO2eq, above max_emissions_kg=%.6g kg: "
                "training will stop early",
                max_epochs,
                projected,
                budget,
            )

    def _epoch_report(self, epoch: int | None, total: Measurement) -> EpochReport:
        offset_kg = pending_kg = credit_kg = 0.0
        if self._writes:
            position = self._run_writer.position
            pending_kg, credit_kg = position.pending_and_credit(total.emissions_kg)
            offset_kg = position.run_offset_kg
        budget = self._budget
        return EpochReport(
            epoch,
            total.energy_kwh,
            total.emissions_kg,
            offset_kg,
            pending_kg,
            credit_kg,
            budget is not None and total.emissions_kg > budget,
            estimated_kg=total.estimated_kg,
            measured=self._measured,
        )

    def _refresh_quietly(self) -> None:
        self._run_writer.refresh_quietly()

    # ---------------------------------------------------------------- offsets
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
        if self._offsets.offsetter() is None:
            self._warn_once("no-key-now", "cannot offset: offset_api_key is not set")
            return
        respect = (not round_up) if respect_threshold is None else respect_threshold
        # queued behind the epoch figures not yet written, so the offset sees them
        self._writer.submit(
            lambda: self._offsets.offset(self.run_id, round_up=round_up, respect_threshold=respect)
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
        return self._offsets.wait(max(0.0, deadline - time.monotonic())) and written and checked

    # ------------------------------------------------------------------ end
    def stop(
        self, *, final_offset: bool = True, status: str = "finished", total: Measurement | None = None
    ) -> RunReport:
        """End the run: stop the tracker, record the final figures, offset, wait.

        The single-process call underneath :meth:`end` and :meth:`abort`. Idempotent: a second
        call returns the same report without side effects.

        Args:
            final_offset: offset what is pending (respecting ``offset_threshold``,
                or rounding up when ``offset_round_up`` is set). Pass ``False``
                when the run failed: what was measured stays pending.
            status: stored in the ledger (``finished``, ``failed``, ``interrupted``);
                ``unmeasured`` replaces it when the emissions source failed to start.
            total: the run's final cumulative figures (all nodes summed) to
                record instead of this process's own measurement (after
                :meth:`stop_tracking`). The tracker is stopped either way.

        Returns:
            The :class:`RunReport`. Offsets still unconfirmed after
            ``offset_timeout`` seconds stay in the ledger for the next run.
        """
        with self._lock:
            if not self.running:
                return self.report()
            self.running = False
        try:
            return self._end_run(final_offset=final_offset, status=status, total=total)
        except BaseException as exc:
            # cut short, e.g. Ctrl-C while the end waits for the tracker's final figures, the ledger
            # or an offset in flight: the run's end is still written (never left 'running')
            self._record_cut_short_end(exc)
            raise

    def _record_cut_short_end(self, exc: BaseException) -> None:
        """Write the end of a run whose :meth:`stop` ``exc`` cut short: its last figures and the
        status ``interrupted`` (``KeyboardInterrupt``) or ``failed``, waiting only while the ledger
        answers; what it does not take is kept on local disk. Never raises an ``Exception``."""
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        if self._tracker.failed and self.is_tracking:
            status = "unmeasured"
        self._ended_status = status
        atexit.unregister(self._stop_at_exit)
        if self._exit_finalizer is not None:
            self._exit_finalizer.cancel()
            self._exit_finalizer = None
        if not (self._writes and self.segment_id is not None):
            return
        final = self._tracker.final if self.is_tracking else None
        figures = final if final is not None and final.emissions_kg > self._last.emissions_kg else self._last
        try:
            self._record(figures, epoch=None, max_epochs=None, whole=True)  # the ledger keeps the larger
            kept = self._run_writer.end(
                details=self._tracker.details(), status=status, answered=True, deadline=time.monotonic()
            )
        except Exception:  # noqa: BLE001 -- the caller's exception goes on
            logger.debug("writing the end of an interrupted run failed", exc_info=True)
            return
        if kept is not None:
            self._kept_path = kept

    def _end_run(self, *, final_offset: bool, status: str, total: Measurement | None) -> RunReport:
        """:meth:`stop` once the run is marked stopped (arguments: as there)."""
        with self._lock:
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
        if not self._measured:
            status = "unmeasured"  # never a measured zero (nor a part of the job's nodes as the whole)
        deadline = time.monotonic() + self.config.offset_timeout
        # a busy ledger is waited for up to offset_timeout, one that does not answer (no write made
        # for a ledger call's wait) no longer: what it has not taken is kept on local disk
        answered = True
        if self.is_writer:  # the final figures are in the ledger
            answered = self._run_writer.flush_while_answering(deadline)
        if (
            final_offset
            and answered
            and self.is_writer
            and self.config.auto_offset
            and self._offsets.offsetter() is not None
        ):
            round_up = self.config.offset_round_up
            self._offsets.offset(self.run_id, round_up=round_up, respect_threshold=not round_up)
        if self._key_check is not None:  # a short run still hears about a refused key
            self._key_check.join(max(0.0, deadline - time.monotonic()))
        if self.is_writer and not final_offset and self._offsets.busy:
            # e.g. after Ctrl-C (Lightning ignores SIGINT from then on): say why nothing happens
            logger.warning(
                "the run ended (%s); waiting up to %g s (offset_timeout) for the offset in flight to be "
                "confirmed. Stopping the process now is safe: the offset stays in the ledger, is settled "
                "by the next run or `carbonoffset reconcile`, and is never bought twice",
                status,
                self.config.offset_timeout,
            )
        if self.is_writer and not self._offsets.wait(max(0.0, deadline - time.monotonic())):
            logger.warning(
                "offsets still in flight after offset_timeout=%gs; they stay in the ledger and the next "
                "run (or `carbonoffset reconcile`) settles them",
                self.config.offset_timeout,
            )
        if self._writes and self.segment_id is not None:
            kept = self._run_writer.end(
                details=self._tracker.details(), status=status, answered=answered, deadline=deadline
            )
            if kept is not None:
                self._kept_path = kept
        self._offsets.shutdown()  # nothing left running after a run: the thread ends once idle
        self._writer.shutdown()
        self._ended_status = status if final_offset else f"{status}, without a final offset"
        report = self.report()
        if self.is_writer:
            logging.getLogger("carbonoffset").info("carbonoffset: %s", report.summary)
        return report

    def report(self) -> RunReport:
        """The current :class:`RunReport` (cheap; reads the ledger once the figures recorded so far
        are written to it)."""
        if self.is_writer and not self._writer.outage:  # (figures kept on local disk: not waited for)
            self.flush()
        total = self._last
        bought = Bought()
        outage = self._writer.outage
        if outage:  # the ledger did not answer: the figures of the last read, not another timeout
            bought = Bought(*self._run_writer.position.pending_and_credit(total.emissions_kg))
        elif self._writes:
            try:
                bought = self._run_writer.bought()
            except Exception as exc:  # noqa: BLE001
                self._warn_once("ledger", "carbonoffset could not read its ledger (%s)", exc)
        ledger = self._run_writer.ledger
        return RunReport(
            run_id=self.run_id,
            account=self.config.account,
            environment=self.config.offset_environment,
            epochs=self._epochs,
            energy_kwh=total.energy_kwh,
            emissions_kg=total.emissions_kg,
            offset_kg=bought.offset_kg,
            offset_lb=bought.offset_lb,
            confirmed_lb=bought.offset_lb - bought.in_flight_lb,
            in_flight_lb=bought.in_flight_lb,
            pending_kg=bought.pending_kg,
            credit_kg=bought.credit_kg,
            ledger_path=(ledger.path or ledger.location) if ledger is not None else None,
            offset_threshold=self.config.offset_threshold,
            not_bought=self._not_bought(bought, outage=outage),
            estimated_kg=total.estimated_kg,
            measured=self._measured
            and not (self._ended_status or "").startswith("unmeasured"),
            spool_path=(self._kept_path or self._writer.spool_path) if outage else None,
        )

    def _not_bought(self, bought: Bought, *, outage: bool) -> str | None:
        """:attr:`RunReport.not_bought` (``None`` when the run bought, or on ranks that do not offset)."""
        if bought.offset_lb or not self.is_writer:
            return None
        return not_bought(
            pending_kg=bought.pending_kg,
            credit_kg=bought.credit_kg,
            offset_threshold=self.config.offset_threshold,
            can_offset=self.config.can_offset,
            key_refused=self._offsets.auth_failed,
            auto_offset=self.config.auto_offset,
            offset_refused=any(o.state == OffsetState.FAILED for o in self.outcomes),
            ended=self._ended_status,
            outage=outage,
            running=self.running,
        )

    def close(self) -> None:
        """Stop the run if needed (without a final offset) and close the ledger if this session opened it.

        Returns at once: an offset still in flight after :meth:`stop` finishes in the
        background, then the ledger is closed and the worker thread ends.
        """
        if self.running:
            self.stop(final_offset=False, status="interrupted")
        # epoch figures still queued are written first (kept on local disk at once in an outage)
        self._run_writer.close(0.0 if self._writer.outage else self.LEDGER_TIMEOUT_S)
        self._offsets.shutdown()

    def __enter__(self) -> RunRecorder:
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
