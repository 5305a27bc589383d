"""Framework-independent callback logic shared by the Lightning, Hugging Face and Keras callbacks.

Each framework callback owns one :class:`CallbackCore` and only translates its
framework's events (fit start, epoch end, train end, exception) into calls on
it. No accounting lives in the integrations.
"""

from __future__ import annotations

import logging
from typing import Any

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.session import EpochReport, OffsetSession, RunReport
from carbonoffset.core.sources import EmissionsSource, Measurement

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def missing_framework(callback: str, framework: str, requirement: str, extra: str) -> ModuleNotFoundError:
    """The error raised when a callback is built without its framework installed."""
    return ModuleNotFoundError(
        f"`{callback}` for {framework} requires `{requirement}`; install it with "
        f"`pip install carbonoffset[{extra}]`"
    )


class CallbackCore:
    """Settings, session lifecycle, budget and resume state for one callback.

    Args:
        session: a ready :class:`OffsetSession` (its settings win); or ``None``
            to build one per fit from ``settings``.
        max_emissions_kg: carbon budget per run in kg CO2eq (> 0), or ``None``.
        log_metrics: whether the callback logs the ``carbon/*`` metrics.
        label: stored with each ledger run (e.g. ``"lightning"``).
        source: emissions source for sessions built here (tests inject one).
        **settings: :class:`OffsetConfig` fields (``offset_api_key``,
            ``offset_environment``, ``offset_threshold``, ``auto_offset``,
            ``offset_ledger``, ``country_iso_code``, ``offset_timeout``, ...).
            Validated immediately: a bad value raises here, before training.

    Raises:
        ValueError: invalid settings or ``max_emissions_kg <= 0``.
    """

    def __init__(
        self,
        session: OffsetSession | None = None,
        *,
        max_emissions_kg: float | None = None,
        log_metrics: bool = True,
        label: str | None = None,
        source: EmissionsSource | None = None,
        offsetter_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        if max_emissions_kg is not None and not max_emissions_kg > 0:
            raise ValueError(f"max_emissions_kg must be > 0 kg CO2eq (got {max_emissions_kg!r}) or None")
        if session is not None and settings:
            raise ValueError("pass either a ready OffsetSession or settings, not both")
        self.config: OffsetConfig = session.config if session is not None else OffsetConfig.resolve(**settings)
        self.max_emissions_kg = max_emissions_kg
        self.log_metrics = log_metrics
        self.label = label
        self._given_session = session
        self._source = source
        self._offsetter_options = offsetter_options
        self.session: OffsetSession | None = session
        self.last_report: EpochReport | None = None
        self.final_report: RunReport | None = None
        self._resume: dict[str, Any] | None = None
        self.stop_requested = False

    # ---------------------------------------------------------------- events
    def begin(self, *, global_rank: int = 0, local_rank: int = 0, nodes: int = 1) -> None:
        """Fit begins: build (or reuse) the session and start a fresh run with a fresh tracker."""
        self.stop_requested = False
        self.last_report = None
        self.final_report = None
        if self._given_session is not None:
            session = self._given_session
            session.global_rank, session.local_rank = global_rank, local_rank
            if self.max_emissions_kg is not None:
                session.max_emissions_kg = self.max_emissions_kg
        else:
            if self.session is not None:
                self.session.close()
            session = OffsetSession(
                self.config,
                source=self._source,
                label=self.label,
                max_emissions_kg=self.max_emissions_kg,
                global_rank=global_rank,
                local_rank=local_rank,
                offsetter_options=self._offsetter_options,
            )
        self.session = session
        resume, self._resume = self._resume, None
        if resume:
            session.start(
                run_id=resume.get("run_id"),
                resume=Measurement(float(resume.get("emissions_kg", 0.0)), float(resume.get("energy_kwh", 0.0))),
                nodes=nodes,
            )
        else:
            session.start(nodes=nodes)

    def epoch_end(self, epoch: int, *, max_epochs: int | None = None) -> EpochReport | None:
        """An epoch ended: record, maybe offset (in the background), check the budget.

        Returns:
            The report, or ``None`` when no run is active. Sets
            :attr:`stop_requested` when the budget is passed.
        """
        session = self.session
        if session is None or not session.running:
            return None
        report = session.record_epoch(epoch, max_epochs=max_epochs if self.max_emissions_kg else None)
        self.last_report = report
        if report.over_budget:
            self.stop_requested = True
        return report

    def end(self) -> RunReport | None:
        """Training ended normally: final record and offset, bounded wait."""
        session = self.session
        if session is None or not session.running:
            return self.final_report
        self.final_report = session.stop()
        return self.final_report

    def abort(self, status: str = "failed") -> RunReport | None:
        """Training failed or was interrupted: stop the tracker, keep what was measured, no final offset."""
        session = self.session
        if session is None or not session.running:
            return self.final_report
        self.final_report = session.stop(final_offset=False, status=status)
        return self.final_report

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Resume state: run id and cumulative figures (no key, no path)."""
        session = self.session
        report = self.last_report
        return {
            "version": STATE_VERSION,
            "run_id": session.run_id if session is not None else None,
            "emissions_kg": report.emissions_kg if report else 0.0,
            "energy_kwh": report.energy_kwh if report else 0.0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved in ``state`` at the next :meth:`begin` (missing keys default)."""
        if state.get("run_id") or state.get("emissions_kg"):
            self._resume = dict(state)
