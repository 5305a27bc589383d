"""What a framework callback holds: its settings and the run object of the current fit.

Each framework callback (Lightning, Hugging Face, Keras) owns one :class:`CallbackCore` and only
translates its framework's events into its calls: ``begin`` (fit start), ``epoch_end``, ``end``
(train end) and ``abort`` (exception), plus ``state_dict``/``load_state_dict`` for checkpoints.
These are :class:`~carbonoffset.core.session.OffsetSession`'s calls of the same names: the
accounting, the budget and the rank policy live there, and in :mod:`carbonoffset.core.ranks`.

A :class:`CallbackCore` adds what a callback needs around the run object: settings checked when
the callback is built (before training), a fresh session per fit when none was given (so the
callback stays picklable between fits, for spawned processes), and the closing of a run its
framework left open (:meth:`CallbackCore.guarded`).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.meter import warm_up_meter
from carbonoffset.core.ranks import Collective, local_rank_hint, warn_without_group
from carbonoffset.core.session import (
    EpochReport,
    OffsetSession,
    RunReport,
    checked_budget,
    resolved_config,
    resumable,
    run_state,
)
from carbonoffset.core.sources import EmissionsSource

logger = logging.getLogger(__name__)


class CallbackCore:
    """Settings and the run object of one callback (one :class:`OffsetSession` per fit).

    Args:
        session: a ready :class:`OffsetSession` (its settings win), used for every fit; or
            ``None`` to build one per fit from ``settings``.
        max_emissions_kg: carbon budget per run in kg CO2eq (> 0), or ``None`` (a given
            session's own budget then applies).
        log_metrics: whether the callback logs the ``carbon/*`` metrics.
        label: stored with each ledger run (e.g. ``"lightning"``).
        source: emissions source for sessions built here (tests inject one).
        offsetter_options: as :class:`OffsetSession`'s, for sessions built here.
        **settings: :class:`OffsetConfig` fields (``offset_api_key``,
            ``offset_environment``, ``offset_threshold``, ``auto_offset``,
            ``offset_ledger``, ``country_iso_code``, ``offset_timeout``, ...).
            Validated immediately: a bad value raises here, before training.

    Raises:
        ValueError: invalid settings, settings with a ready session, or ``max_emissions_kg <= 0``.
        LedgerError: the ledger is corrupt, from a newer carbonoffset, or cannot be created
            (checked when the callback is built, so the fit never starts with it).
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
        self.max_emissions_kg = checked_budget(max_emissions_kg)
        if session is not None and settings:
            raise ValueError("pass either a ready OffsetSession or settings, not both")
        self.config: OffsetConfig = session.config if session is not None else resolved_config(None, settings)
        if session is None:
            # an unusable ledger (corrupt, newer version, unwritable folder) is reported here,
            # when the callback is built, not as a crash inside the framework's fit
            Ledger(self.config.ledger_path, full_check=False, connect=False).close()
        self.log_metrics = log_metrics
        self.label = label
        self._given_session = session
        self._source = source
        self._offsetter_options = offsetter_options
        if session is None and source is None and local_rank_hint() == 0:
            # the measuring process starts now and runs CodeCarbon's imports and hardware
            # detection while the fit is set up (only local rank 0 measures)
            with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                warm_up_meter()  # otherwise the session measures in process
        #: The run object of the current (or last) fit; ``None`` before the first.
        self.session: OffsetSession | None = session
        self._resume: dict[str, Any] | None = None
        self._warned_no_group = False

    # ------------------------------------------------------------ the run's state
    @property
    def stop_requested(self) -> bool:
        """The current run passed its budget: the callback stops the fit
        (see :attr:`OffsetSession.stop_requested`)."""
        return self.session is not None and self.session.stop_requested

    @property
    def last_report(self) -> EpochReport | None:
        """See :attr:`OffsetSession.last_report`."""
        return self.session.last_report if self.session is not None else None

    @property
    def final_report(self) -> RunReport | None:
        """See :attr:`OffsetSession.final_report`."""
        return self.session.final_report if self.session is not None else None

    @property
    def distributed(self) -> bool:
        """See :attr:`OffsetSession.distributed`."""
        return self.session is not None and self.session.distributed

    # ---------------------------------------------------------------- events
    def begin(
        self,
        *,
        global_rank: int = 0,
        local_rank: int = 0,
        nodes: int = 1,
        world_size: int = 1,
        collective: Collective | None = None,
    ) -> None:
        """Fit begins: build (or reuse) the session and :meth:`OffsetSession.begin` a fresh run
        (Args: as there), continuing the state given to :meth:`load_state_dict`, if any.
        ``None`` for ``collective`` with ``world_size > 1`` falls back to per-process figures,
        with one warning per callback."""
        if world_size > 1 and collective is None and not self._warned_no_group:
            self._warned_no_group = True
            warn_without_group(global_rank, world_size)
        if self._given_session is not None:
            session = self._given_session
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
        session.begin(
            global_rank=global_rank,
            local_rank=local_rank,
            nodes=nodes,
            world_size=world_size,
            collective=collective,
            resume_state=resume,
        )

    def stand_down(self) -> None:
        """Take no part in the current fit (another callback measures it): the session of an earlier
        fit is closed (if built here) and dropped, so the hooks do nothing and :attr:`final_report`
        is ``None`` until the next :meth:`begin`."""
        if self.session is not None and self._given_session is None:
            self.session.close()
        self.session = None

    def epoch_end(self, epoch: int, *, max_epochs: int | None = None) -> EpochReport | None:
        """See :meth:`OffsetSession.epoch_end` (``None`` before the first fit)."""
        return self.session.epoch_end(epoch, max_epochs=max_epochs) if self.session is not None else None

    def end(self) -> RunReport | None:
        """See :meth:`OffsetSession.end` (``None`` before the first fit)."""
        return self.session.end() if self.session is not None else None

    def abort(self, status: str = "failed") -> RunReport | None:
        """See :meth:`OffsetSession.abort` (``None`` before the first fit)."""
        return self.session.abort(status) if self.session is not None else None

    @contextlib.contextmanager
    def guarded(self, *, what: str) -> Iterator[None]:
        """The body of the callbacks' ``guard()``: close the run if the block raises or returns
        without ``on_train_end`` (see :meth:`close_unfinished`), then let the exception go on.

        ``KeyboardInterrupt`` closes it as ``interrupted``, anything else as ``failed``.
        """
        try:
            yield
        except BaseException as exc:
            self.close_unfinished(
                "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", what=what
            )
            raise
        # the block returned but the fit was cut short (its exception caught inside the block)
        self.close_unfinished("failed", what=what)

    def close_unfinished(self, status: str, *, what: str) -> None:
        """Close a run its framework left open (``what`` ended without ``on_train_end``), keeping
        everything measured in the ledger as ``status`` (``failed`` or ``interrupted``)."""
        session = self.session
        if session is not None and session.running:
            logger.warning(
                "%s ended without on_train_end (it raised); its run %s is closed as %r "
                "with everything measured kept in the ledger",
                what,
                session.run_id,
                status,
            )
            self.abort(status)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """See :meth:`OffsetSession.state_dict` (zeros before the first fit)."""
        if self.session is not None:
            return self.session.state_dict()
        return run_state(None, None, None)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run saved in ``state`` at the next :meth:`begin` (missing keys default)."""
        if resumable(state):
            self._resume = dict(state)


class CallbackViews:
    """Read-only properties over a callback's :class:`CallbackCore` (``self._core``), the same
    for the Lightning, Hugging Face and Keras callbacks."""

    _core: CallbackCore

    @property
    def config(self) -> OffsetConfig:
        """The resolved, validated settings."""
        return self._core.config

    @property
    def max_emissions_kg(self) -> float | None:
        """The carbon budget of one run (one fit or ``train()``), kg CO2eq; ``None``: no budget."""
        return self._core.max_emissions_kg

    @property
    def log_metrics(self) -> bool:
        """Whether the ``carbon/*`` metrics are logged each epoch."""
        return self._core.log_metrics

    @property
    def session(self) -> OffsetSession | None:
        """The session of the current (or last) run; ``None`` before the first."""
        return self._core.session

    @property
    def last_report(self) -> EpochReport | None:
        """Cumulative figures after the last epoch of the current (or last) run."""
        return self._core.last_report

    @property
    def final_report(self) -> RunReport | None:
        """Figures of the last run once it ended (normally, or closed after an exception);
        ``None`` while a run is going on."""
        return self._core.final_report
