"""The run object: one training run's tracker + offsetter + ledger, the one thing front ends drive.

The framework callbacks (through :class:`~carbonoffset.core.callback.CallbackCore`, which
builds one session per fit from their settings) translate their events into the same calls::

    session = OffsetSession(offset_api_key="test_...", offset_environment="sandbox")
    session.begin()                      # fit begins: new tracker, new ledger run
    report = session.epoch_end(epoch)    # each epoch: cumulative figures, maybe offset, budget
    final = session.end()                # fit ends: final record + offset, bounded wait
    # session.abort("failed")            # ... or fit raised: what was measured stays pending

:meth:`~OffsetSession.begin` takes the job's ranks and the framework's
:class:`~carbonoffset.core.ranks.Collective` (the rank policy: :mod:`carbonoffset.core.ranks`)
and a checkpoint's :meth:`~OffsetSession.state_dict`. Underneath are the single-process calls of
:class:`~carbonoffset.core.recorder.RunRecorder`: :meth:`~OffsetSession.start`,
:meth:`~OffsetSession.record_epoch` (or :meth:`~OffsetSession.record` of figures measured
elsewhere, as the CodeCarbon drop-in does) and :meth:`~OffsetSession.stop`.

Offsets run on a background worker thread and ledger writes on another
(:mod:`carbonoffset.core.workers`): ``epoch_end`` never waits for the network. Failures of
tracking or offsetting are logged once and never raised into the caller's training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from carbonoffset.core.ranks import Collective, count_nodes, sum_figures
from carbonoffset.core.recorder import RunRecorder, checked_budget, resolved_config
from carbonoffset.core.reports import METRIC_PREFIX, NOT_BOUGHT_BELOW_THRESHOLD, EpochReport, RunReport
from carbonoffset.core.sources import Measurement

__all__ = [
    "METRIC_PREFIX",
    "NOT_BOUGHT_BELOW_THRESHOLD",
    "STATE_VERSION",
    "EpochReport",
    "OffsetSession",
    "RunReport",
    "checked_budget",
    "resolved_config",
    "resumable",
    "run_state",
]

#: Version of :meth:`OffsetSession.state_dict` (saved in checkpoints).
STATE_VERSION: Final[int] = 1


def run_state(run_id: str | None, segment_id: str | None, report: EpochReport | None) -> dict[str, Any]:
    """A run's resume state, as saved in checkpoints: ``version`` (:data:`STATE_VERSION`),
    ``run_id``, ``segment_id`` and the cumulative ``emissions_kg`` (kg CO2eq) and ``energy_kwh``
    (kWh) of ``report`` (0 without one). No key, no path."""
    return {
        "version": STATE_VERSION,
        "run_id": run_id,
        "segment_id": segment_id,
        "emissions_kg": report.emissions_kg if report else 0.0,
        "energy_kwh": report.energy_kwh if report else 0.0,
    }


def resumable(state: Mapping[str, Any]) -> bool:
    """``state`` (a :meth:`OffsetSession.state_dict`) holds a run to continue."""
    return bool(state.get("run_id") or state.get("emissions_kg"))


class OffsetSession(RunRecorder):
    """The run object: tracker + offsetter + ledger for one training run at a time.

    Front ends drive :meth:`begin`, :meth:`epoch_end`, :meth:`end` or :meth:`abort`, and
    :meth:`state_dict`/:meth:`load_state_dict`; :meth:`report`, :meth:`offset_now`,
    :meth:`wait` and :meth:`close` serve every caller. The single-process calls underneath
    (:meth:`start`, :meth:`record_epoch`, :meth:`record`, :meth:`stop`) stay public.

    Args:
        config: ready settings; when omitted they are resolved from
            ``**settings``, ``CODECARBON_*`` variables and ``.codecarbon.config``
            (see :class:`~carbonoffset.core.config.OffsetConfig`).
        source: emissions source; default :class:`~carbonoffset.core.meter.MeterSource`
            with the configured ``country_iso_code``: a new CodeCarbon tracker per run,
            in a measuring process (pass a
            :class:`~carbonoffset.core.sources.CodeCarbonSource` to measure in this one).
        ledger: an open :class:`Ledger`; default opens ``config.ledger_path`` on global rank 0
            (now, so that a bad ledger raises here, or when a run begins on it).
        label: free text stored with each run (e.g. ``"lightning"``).
        max_emissions_kg: optional carbon budget per run, kg CO2eq (> 0);
            :attr:`EpochReport.over_budget` turns true once it is passed.
        global_rank, local_rank: the ranks until :meth:`begin` is given others
            (see :class:`~carbonoffset.core.ranks.Ranks`).
        offsetter_options: passed to :class:`~carbonoffset.core.offsetter.Offsetter`
            (``max_attempts``, ``wait_initial_s``, ``wait_max_s``).
        **settings: any :class:`OffsetConfig` field, overriding ``config``.

    Raises:
        ValueError: invalid settings (:class:`ConfigurationError`) or ``max_emissions_kg <= 0``.
        LedgerError: the ledger is corrupt or from a newer version.
    """

    # the front door's run state (begin/epoch_end/end/abort), set per instance as runs go
    _collective: Collective | None = None
    _follower = False  # a distributed run's process other than global rank 0
    _node_last = Measurement()  # this node's figures at the last epoch_end (frozen: shared safely)
    _job_last = Measurement()  # the job's summed figures at the last epoch_end
    _resume: dict[str, Any] | None = None
    #: :meth:`epoch_end` passed the budget (the same decision on every process of a job).
    stop_requested: bool = False
    #: Cumulative figures after the last :meth:`epoch_end` of the current (or last) run.
    last_report: EpochReport | None = None
    #: Figures of the last run once :meth:`end` or :meth:`abort` ended it; ``None`` while it goes on.
    final_report: RunReport | None = None

    @property
    def distributed(self) -> bool:
        """The current run sums node figures across processes (:meth:`begin` got a collective)."""
        return self._collective is not None

    @property
    def _budget(self) -> float | None:
        """The budget this process decides on: in a distributed run only global rank 0 decides
        (and warns); the others follow its broadcast decision."""
        return None if self._follower else self.max_emissions_kg

    # ------------------------------------------------------------ front door
    def begin(
        self,
        *,
        global_rank: int | None = None,
        local_rank: int | None = None,
        nodes: int = 1,
        world_size: int = 1,
        collective: Collective | None = None,
        resume_state: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Fit begins: a fresh run with a fresh tracker, on every process of the job.

        Args:
            global_rank, local_rank: this process's ranks (>= 0; see
                :class:`~carbonoffset.core.ranks.Ranks`); ``None`` keeps the current ones.
            nodes: number of nodes, stored in the ledger when no ``collective``
                is given (with one, the nodes are counted through it).
            world_size: number of processes in the job (>= 1).
            collective: the framework's collective operations when ``world_size > 1`` and its
                process group is initialised. Every process must then call :meth:`begin`,
                :meth:`epoch_end` and :meth:`end` at the same points. ``None`` with
                ``world_size > 1``: each process decides on its own figures.
            resume_state: a checkpoint's :meth:`state_dict` to continue (``None``: the one
                given to :meth:`load_state_dict`, if any). Global rank 0 adds its figures once.

        Returns:
            The ledger run id (``None`` on ranks that do not write).
        """
        if self.running:
            self.stop()
        self.stop_requested = False
        self.last_report = None
        self.final_report = None
        self._node_last = self._job_last = Measurement()
        if global_rank is not None:
            self.global_rank = global_rank
        if local_rank is not None:
            self.local_rank = local_rank
        self._collective = collective if world_size > 1 else None
        if self._collective is not None:
            nodes = count_nodes(self._collective, self.ranks)
        self._follower = self._collective is not None and not self.is_writer
        state = dict(resume_state) if resume_state is not None else self._resume
        self._resume = None
        if state and not resumable(state):
            state = None
        if state and self._follower:
            # the figures reached before resuming are added once, by global rank 0 (which records)
            state = {"run_id": state.get("run_id")}
        if not state:
            return self.start(nodes=nodes)
        return self.start(
            run_id=state.get("run_id"),
            resume=Measurement(float(state.get("emissions_kg", 0.0)), float(state.get("energy_kwh", 0.0))),
            nodes=nodes,
            checkpointed_by=state.get("segment_id"),
        )

    def epoch_end(self, epoch: int, *, max_epochs: int | None = None) -> EpochReport | None:
        """An epoch ended: record, maybe offset (in the background), check the budget.

        Args: as :meth:`record_epoch`.

        Returns:
            The run's cumulative :class:`EpochReport` (global rank 0's in a distributed run), or
            ``None`` when no run is active. Sets :attr:`stop_requested` when the budget is passed.
        """
        if not self.running:
            return None
        max_epochs = max_epochs if self._budget else None
        collective = self._collective
        if collective is None:
            report = self.record_epoch(epoch, max_epochs=max_epochs)
        else:
            node = self.measure()  # zeros where no tracker runs
            self._node_last = node
            total = self._job_total(collective, node)
            self._job_last = total
            # global rank 0 records, offsets, decides (and warns) for the job
            mine = self.record(total, epoch=epoch, max_epochs=max_epochs) if self.is_writer else None
            # global rank 0's figures (offset, pending, budget decision) on every process
            report = collective.broadcast(mine)
        self.last_report = report
        if report.over_budget:
            self.stop_requested = True
        return report

    def end(self) -> RunReport | None:
        """Training ended normally: final record and offset, bounded wait (see :meth:`stop`).

        Returns:
            :attr:`final_report` (global rank 0's in a distributed run); ``None`` when no run began.
        """
        if not self.running:
            return self.final_report
        collective, self._collective = self._collective, None
        if collective is None:
            self.final_report = self.stop()
        else:
            report = self.stop(total=self._job_total(collective, self.stop_tracking()))
            self.final_report = collective.broadcast(report)
        return self.final_report

    def _job_total(self, collective: Collective, node: Measurement) -> Measurement:
        """The job's figures (collective); on global rank 0, notes and names (once) nodes that do
        not measure, so that the run is not recorded as a measurement of the whole job."""
        total, unmeasured = sum_figures(collective, node, unmeasured=self.is_tracking and self._tracker.failed)
        if unmeasured and self.is_writer:
            self._unmeasured_nodes = unmeasured
            self._warn_once(
                "unmeasured-nodes",
                "the emissions tracker of %d node(s) of this job did not start (see that "
                "node's log): the job's figures leave those nodes out, and the run is recorded as "
                "'unmeasured' with what the other nodes measured",
                unmeasured,
            )
        return total

    def abort(self, status: str = "failed") -> RunReport | None:
        """Training failed or was interrupted: stop the tracker, keep what was measured, no final offset.

        Never calls a collective operation (other processes may be gone): in a
        distributed run global rank 0 records the last job total plus what its
        own node measured since; the other nodes' figures since the last epoch
        are lost.

        Args:
            status: stored in the ledger: ``failed`` or ``interrupted``.

        Returns:
            :attr:`final_report`; ``None`` when no run began.
        """
        if not self.running:
            return self.final_report
        collective, self._collective = self._collective, None
        total: Measurement | None = None
        if collective is not None and self.is_writer and self.last_report is not None:
            # the job's last total with this node's part brought up to date: its exact final
            # figures replace its figures (and estimate) of the last epoch
            node, last, job = self.stop_tracking(), self._node_last, self._job_last
            total = Measurement(
                job.emissions_kg + max(0.0, node.emissions_kg - last.emissions_kg),
                job.energy_kwh + max(0.0, node.energy_kwh - last.energy_kwh),
                max(0.0, job.estimated_kg - last.estimated_kg + node.estimated_kg),
                max(0.0, job.estimated_kwh - last.estimated_kwh + node.estimated_kwh),
            )
        self.final_report = self.stop(final_offset=False, status=status, total=total)
        return self.final_report

    def state_dict(self) -> dict[str, Any]:
        """Resume state for checkpoints (see :func:`run_state`) after the last :meth:`epoch_end`."""
        return run_state(self.run_id, self.segment_id, self.last_report)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run saved in ``state`` at the next :meth:`begin` (missing keys default)."""
        if resumable(state):
            self._resume = dict(state)

    def __enter__(self) -> OffsetSession:
        self.start()
        return self
