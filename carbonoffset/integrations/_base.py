"""Framework-independent callback logic shared by the Lightning, Hugging Face and Keras callbacks.

Each framework callback owns one :class:`CallbackCore` and only translates its
framework's events (fit start, epoch end, train end, exception) into calls on
it. No accounting lives in the integrations.

The distributed policy lives here too, once for every framework: a framework
only lends a :class:`Collective` (its own "sum across processes" and
"broadcast from global rank 0"). Local rank 0 of each node measures the node;
each epoch every process sums the node figures (zeros where no tracker runs),
so every process sees the same job total; global rank 0 records it, offsets,
and broadcasts its report, so every process logs the same figures and takes
the same budget decision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.meter import warm_up_meter
from carbonoffset.core.session import EpochReport, OffsetSession, RunReport
from carbonoffset.core.sources import EmissionsSource, Measurement

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Collective:
    """The two collective operations a framework lends :class:`CallbackCore` in a distributed job.

    Every process of the job must call each operation at the same point, in
    the same order (they are collective). They use the framework's own process
    group, so its timeout applies when a process never arrives (a dead rank):
    the operation then raises in the survivors instead of blocking forever.

    Attributes:
        world_size: number of processes in the job (>= 2).
        sum: element-wise sum over every process of a list of floats (same
            length on every process); returns the sums, identical on every
            process.
        broadcast: returns, on every process, the (picklable) object passed by
            global rank 0.
    """

    world_size: int
    sum: Callable[[Sequence[float]], Sequence[float]]
    broadcast: Callable[[Any], Any]


# ------------------------------------------------------- helpers shared by the framework callbacks
_warned_order: set[str] = set()


def move_first(callback: Any, *, warning: str, log: logging.Logger) -> bool:
    """From inside one of ``callback``'s hooks, move it to the front of the framework's callback list.

    Hugging Face's ``CallbackHandler`` and Keras' ``CallbackList`` call each hook on their
    ``callbacks`` list in order, and hand every callback the same ``logs`` dict; neither framework
    gives a callback its list or any public way to order callbacks. The list's owner is the
    ``self`` of the dispatching method a few frames up the stack; it is found there. Moving the
    element being dispatched to the front leaves the rest of that dispatch unchanged (the elements
    after it keep their indices).

    Args:
        callback: the callback whose hook is running.
        warning: logged (once per process) when it cannot be moved: what the user loses and how
            to place the callback first by hand.
        log: the integration's logger, which logs ``warning``.

    Returns:
        ``True`` when ``callback`` is now first; ``False`` when no dispatching list holding it was
        found (a framework change: ``warning`` is logged, and the integration tests fail).
    """
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        callbacks = getattr(owner, "callbacks", None) if owner is not callback else None
        if isinstance(callbacks, list):
            index = next((i for i, cb in enumerate(callbacks) if cb is callback), None)
            if index is not None:
                if index:
                    callbacks.insert(0, callbacks.pop(index))
                return True
        frame = frame.f_back
    if warning not in _warned_order:
        _warned_order.add(warning)
        log.warning(warning)
    return False


_MASS_PREFIXES = ((1e6, "t"), (1e3, "kg"), (1.0, "g"), (1e-3, "mg"), (1e-6, "µg"), (1e-9, "ng"))


def short_mass(emissions_kg: float) -> str:
    """A mass in kg as a short label with an SI-prefixed gram unit and 3 significant digits,
    for progress bars: ``2.14e-06`` -> ``"2.14mg"``, ``0.512`` -> ``"512g"``, ``1234.0`` -> ``"1.23t"``.
    Zero is ``"0g"``; below a nanogram the figure is written in ng (``"0.05ng"``)."""
    grams = float(emissions_kg) * 1e3
    if grams == 0.0 or grams != grams:  # zero or NaN
        return f"{grams:g}g"
    magnitude = abs(grams)
    factor, unit = next(((f, u) for f, u in _MASS_PREFIXES if magnitude >= f * 0.9995), _MASS_PREFIXES[-1])
    return f"{grams / factor:.3g}{unit}"


_Guarded = TypeVar("_Guarded", bound="GuardedFit")


class GuardedFit:
    """``guard()`` for the callbacks of frameworks that call no callback when training raises
    (Keras' ``model.fit``, the Hugging Face Trainer's ``train()``: ``on_train_end`` is skipped).

    A subclass sets ``_core`` (its :class:`CallbackCore`) and ``_fit_name`` (the training call in
    log lines, e.g. ``"a Keras fit"``), and calls :meth:`_close_unfinished` at the start of each
    run, so that a run an unguarded exception left open is closed before the next one starts.
    """

    _core: CallbackCore
    _fit_name: str

    @contextlib.contextmanager
    def guard(self: _Guarded) -> Iterator[_Guarded]:
        """Context manager (or decorator) around the training call (``model.fit``,
        ``trainer.train()``) for when it raises.

        On its own the tracker would keep running until the next training call with this
        callback, garbage collection, or the end of the process. Inside ``guard`` an exception
        (``KeyboardInterrupt`` included) stops the tracker at once and records what was measured
        in the ledger (run status ``failed``, or ``interrupted`` for ``KeyboardInterrupt``; those
        emissions stay pending and are offset by a later run, no final offset is bought), then
        propagates unchanged.

        Yields:
            This callback.

        Example::

            with callback.guard():
                model.fit(x, y, epochs=10, callbacks=[callback])  # or trainer.train()
        """
        with self._core.guarded(what=self._fit_name):
            yield self

    def _close_unfinished(self) -> None:
        """Close, as ``interrupted``, a run that its training call left open (it raised outside ``guard``)."""
        self._core.close_unfinished("interrupted", what=self._fit_name)


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
        if max_emissions_kg is not None and not max_emissions_kg > 0:
            raise ValueError(f"max_emissions_kg must be > 0 kg CO2eq (got {max_emissions_kg!r}) or None")
        if session is not None and settings:
            raise ValueError("pass either a ready OffsetSession or settings, not both")
        self.config: OffsetConfig = (
            session.config if session is not None else OffsetConfig.resolve(**settings)
        )
        if session is None:
            # an unusable ledger (corrupt, newer version, unwritable folder) is reported here,
            # when the callback is built, not as a crash inside the framework's fit
            Ledger(self.config.ledger_path, full_check=False, connect=False).close()
        self.max_emissions_kg = max_emissions_kg
        self.log_metrics = log_metrics
        self.label = label
        self._given_session = session
        self._source = source
        self._offsetter_options = offsetter_options
        if session is None and source is None and os.environ.get("LOCAL_RANK", "0") == "0":
            # the measuring process starts now and runs CodeCarbon's imports and hardware
            # detection while the fit is set up (only local rank 0 measures)
            with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                warm_up_meter()  # otherwise the session measures in process
        self.session: OffsetSession | None = session
        self.last_report: EpochReport | None = None
        self.final_report: RunReport | None = None
        self._resume: dict[str, Any] | None = None
        self.stop_requested = False
        self._collective: Collective | None = None
        self._node_last = Measurement()
        self._warned_no_group = False

    @property
    def distributed(self) -> bool:
        """The current run sums node figures across processes (a :class:`Collective` was given)."""
        return self._collective is not None

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
        """Fit begins: build (or reuse) the session and start a fresh run with a fresh tracker.

        Args:
            global_rank: rank of this process in the job (>= 0).
            local_rank: rank of this process on its node (>= 0).
            nodes: number of nodes, stored in the ledger when no ``collective``
                is given (with one, the nodes are counted through it).
            world_size: number of processes in the job (>= 1).
            collective: the framework's collective operations when
                ``world_size > 1`` and its process group is initialised. Every
                process must then call :meth:`begin`, :meth:`epoch_end` and
                :meth:`end` at the same points. ``None`` with ``world_size > 1``
                falls back to per-process figures, with one warning.
        """
        self.stop_requested = False
        self.last_report = None
        self.final_report = None
        self._node_last = Measurement()
        if world_size > 1 and collective is None and not self._warned_no_group:
            self._warned_no_group = True
            logger.warning(
                "carbonoffset: process %d of %d, but no torch.distributed process group is initialised: "
                "node figures are not summed across processes. Each process decides on its own figures "
                "(only local rank 0 of each node measures) and global rank 0 records and offsets only "
                "what its own node measured",
                global_rank,
                world_size,
            )
        self._collective = collective if world_size > 1 else None
        if self._collective is not None:
            # count the trackers (local rank 0 of each node): the nodes whose figures are summed
            nodes = max(1, round(self._collective.sum([1.0 if local_rank == 0 else 0.0])[0]))
        # in a distributed run the budget is global rank 0's decision, shared with the others
        follower = self._collective is not None and global_rank != 0
        budget = None if follower else self.max_emissions_kg
        if self._given_session is not None:
            session = self._given_session
            session.global_rank, session.local_rank = global_rank, local_rank
            if self.max_emissions_kg is not None or follower:
                session.max_emissions_kg = budget
        else:
            if self.session is not None:
                self.session.close()
            session = OffsetSession(
                self.config,
                source=self._source,
                label=self.label,
                max_emissions_kg=budget,
                global_rank=global_rank,
                local_rank=local_rank,
                offsetter_options=self._offsetter_options,
            )
        self.session = session
        resume, self._resume = self._resume, None
        if resume and follower:
            # the figures reached before resuming are added once, by global rank 0 (which records)
            resume = {"run_id": resume.get("run_id")}
        if resume:
            session.start(
                run_id=resume.get("run_id"),
                resume=Measurement(
                    float(resume.get("emissions_kg", 0.0)), float(resume.get("energy_kwh", 0.0))
                ),
                nodes=nodes,
                checkpointed_by=resume.get("segment_id"),
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
        max_epochs = max_epochs if self.max_emissions_kg else None
        collective = self._collective
        if collective is None:
            report = session.record_epoch(epoch, max_epochs=max_epochs)
        else:
            node = session.measure()  # zeros where no tracker runs
            self._node_last = node
            summed = collective.sum(
                [node.emissions_kg, node.energy_kwh, node.estimated_kg, node.estimated_kwh]
            )
            mine = None
            if session.is_writer:  # records, offsets, decides (and warns) for the job
                kg, kwh, estimated_kg, estimated_kwh = summed
                mine = session.record(Measurement(kg, kwh, estimated_kg, estimated_kwh), epoch=epoch, max_epochs=max_epochs)
            # global rank 0's figures (offset, pending, budget decision) on every process
            report = collective.broadcast(mine)
        self.last_report = report
        if report.over_budget:
            self.stop_requested = True
        return report

    def end(self) -> RunReport | None:
        """Training ended normally: final record and offset, bounded wait."""
        session = self.session
        if session is None or not session.running:
            return self.final_report
        collective, self._collective = self._collective, None
        if collective is None:
            self.final_report = session.stop()
        else:
            node = session.stop_tracking()
            kg, kwh, estimated_kg, estimated_kwh = collective.sum(
                [node.emissions_kg, node.energy_kwh, node.estimated_kg, node.estimated_kwh]
            )
            # the estimated part stays labelled
            report = session.stop(total=Measurement(kg, kwh, estimated_kg, estimated_kwh))
            self.final_report = collective.broadcast(report)
        return self.final_report

    def abort(self, status: str = "failed") -> RunReport | None:
        """Training failed or was interrupted: stop the tracker, keep what was measured, no final offset.

        Never calls a collective operation (other processes may be gone): in a
        distributed run global rank 0 records the last job total plus what its
        own node measured since; the other nodes' figures since the last epoch
        are lost.
        """
        session = self.session
        if session is None or not session.running:
            return self.final_report
        collective, self._collective = self._collective, None
        total: Measurement | None = None
        last = self.last_report
        if collective is not None and session.is_writer and last is not None:
            node = session.stop_tracking()
            total = Measurement(
                last.emissions_kg + max(0.0, node.emissions_kg - self._node_last.emissions_kg),
                last.energy_kwh + max(0.0, node.energy_kwh - self._node_last.energy_kwh),
            )
        self.final_report = session.stop(final_offset=False, status=status, total=total)
        return self.final_report

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
        """Resume state: run id and cumulative figures (no key, no path)."""
        session = self.session
        report = self.last_report
        return {
            "version": STATE_VERSION,
            "run_id": session.run_id if session is not None else None,
            "segment_id": session.segment_id if session is not None else None,
            "emissions_kg": report.emissions_kg if report else 0.0,
            "energy_kwh": report.energy_kwh if report else 0.0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved in ``state`` at the next :meth:`begin` (missing keys default)."""
        if state.get("run_id") or state.get("emissions_kg"):
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
