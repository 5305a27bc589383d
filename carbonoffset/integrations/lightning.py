"""PyTorch Lightning callback: measure a fit's emissions and offset them through 1ClickImpact.

One implementation serves both Lightning packages. The logic lives in a plain
class (no Lightning import) and is bound to each installed package's
``Callback`` base:

* :class:`CarbonOffsetCallback` subclasses ``lightning.pytorch.Callback``
  (``import lightning.pytorch as pl``; the ``lightning`` package);
* :class:`PLCarbonOffsetCallback` subclasses ``pytorch_lightning.Callback``
  (``import pytorch_lightning as pl``; the standalone package, which
  ``pip install lightning`` also installs).

Both behave identically and share one ``state_key``, so a checkpoint written
with one resumes with the other. Importing this module never fails: when a
package is missing, constructing its class raises :class:`ModuleNotFoundError`
naming the extra to install (``pip install carbonoffset[lightning]``).

The callback only translates Lightning's events into calls on
:class:`~carbonoffset.integrations._base.CallbackCore`; every figure,
threshold, offset and ledger write comes from the core. What every callback
does, and the arguments they share, are described once in
:mod:`carbonoffset.integrations`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from carbonoffset.core.session import METRIC_PREFIX, OffsetSession
from carbonoffset.core.sources import EmissionsSource
from carbonoffset.integrations._base import CallbackCore, CallbackViews, Collective, short_mass
from carbonoffset.integrations._imports import OptionalImport

logger = logging.getLogger(__name__)

__all__ = ["CarbonOffsetCallback", "PLCarbonOffsetCallback"]

_LIGHTNING = OptionalImport("Lightning", "lightning>=2.4", extra="lightning")
with _LIGHTNING:
    from lightning.pytorch import Callback as _LightningCallback
#: the standalone package, imported on first use of PLCarbonOffsetCallback
_PL = OptionalImport("PyTorch Lightning", "pytorch-lightning>=2.4", extra="lightning")

_STATE_NAME = "CarbonOffsetCallback"
_LABEL = "lightning"


def _collective(trainer: Any) -> Collective | None:
    """The strategy's own sum and broadcast, when the fit runs in several processes with a process group.

    ``None`` for a single process, and for several processes without an
    initialised ``torch.distributed`` process group (the core then warns once
    and falls back to per-process figures).
    """
    if int(trainer.world_size) <= 1:
        return None
    import torch  # present with Lightning; kept out of module import

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    strategy = trainer.strategy

    def sum_across(values: Any) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=strategy.root_device)
        return [float(v) for v in strategy.reduce(tensor, reduce_op="sum").tolist()]

    def broadcast(obj: Any) -> Any:
        return strategy.broadcast(obj, src=0)

    return Collective(world_size=int(trainer.world_size), sum=sum_across, broadcast=broadcast)


def _batches_that_stepped(trainer: Any) -> int:
    """Lightning's logging step counter: batches whose optimizer step ran, this fit so far.

    Lightning has no public name for it; its own loggers and ``LearningRateMonitor`` read
    ``trainer.fit_loop.epoch_loop._batches_that_stepped``. If a Lightning version drops it,
    ``trainer.global_step`` (the same number with one optimizer) is used instead;
    ``tests/integrations/test_lightning.py`` checks the steps in real ``CSVLogger`` and
    TensorBoard files, so such a change fails the test suite.
    """
    stepped = getattr(
        getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None
    )
    return int(stepped) if isinstance(stepped, int) else int(trainer.global_step)


#: The progress bar's one figure: the run's emissions so far.
PROGRESS_BAR_KEY = "co2"


def _progress_bar_figure(metrics: dict[str, float]) -> dict[str, Any]:
    """``{"co2": "2.14mg"}``: the run's emissions, SI-prefixed grams of CO2eq (a string, so Rich's
    ``.3f`` formatting cannot print micrograms as ``0.000``)."""
    emissions_kg = metrics.get(f"{METRIC_PREFIX}emissions_kg")
    return {} if emissions_kg is None else {PROGRESS_BAR_KEY: short_mass(emissions_kg)}


def _interrupted(exception: BaseException) -> bool:
    """Ctrl-C (``KeyboardInterrupt``) or a SIGTERM (Lightning's ``SIGTERMException``, raised by its
    loops after its signal handler, in both Lightning packages): the run was stopped, not failed."""
    return isinstance(exception, KeyboardInterrupt) or any(
        cls.__name__ == "SIGTERMException" for cls in type(exception).__mro__
    )


class _CarbonOffsetLogic(CallbackViews):
    """Measure each fit with CodeCarbon, log ``carbon/*`` metrics, offset through 1ClickImpact.

    One fit (``trainer.fit``) is one run in the ledger, measured by a fresh
    CodeCarbon tracker (the life cycle every callback shares is described in
    :mod:`carbonoffset.integrations`). An *epoch* here is one training epoch of
    the fit (``trainer.current_epoch``, 0-based); sanity-check validation is not
    an epoch but its emissions count toward the first one.

    Events:

    * ``on_fit_start``: start a run (or continue the run restored from a
      checkpoint) with a new tracker. With a strategy that restores checkpoints
      after ``on_fit_start`` (FSDP, DeepSpeed: ``restore_checkpoint_after_setup``)
      the run starts at ``load_state_dict`` when resuming, else at
      ``on_sanity_check_start`` / ``on_train_start``. In a distributed fit
      (``trainer.world_size > 1``) every epoch's node figures are summed with
      ``trainer.strategy.reduce`` and global rank 0's figures and budget
      decision are shared with ``trainer.strategy.broadcast``, so every rank
      logs the job's figures and stops at the same epoch (see
      ``docs/distributed.md``).
    * ``on_train_epoch_end``: record the epoch and publish the ``carbon/*``
      metrics to ``trainer.callback_metrics`` (as tensors, so ``EarlyStopping``
      or ``ModelCheckpoint`` can monitor them), ``trainer.logged_metrics`` and
      every logger in ``trainer.loggers``, with ``epoch``, at the step Lightning
      logs the epoch's own metrics at (``self.log(on_epoch=True)``,
      ``LearningRateMonitor``), so each logger shows them at the same step as
      ``train_loss``; plus the short ``co2`` figure on the progress bar (see
      ``progress_bar``). The hook never waits for the network and costs well
      under a millisecond. Over budget, ``trainer.should_stop`` is set on every
      rank.
    * ``on_train_end`` (or ``on_fit_end`` when no epoch ran): end the run, then
      publish its final figures the same way (to the loggers without ``epoch``,
      one step after the last epoch's, so no epoch's values are overwritten).
    * ``on_exception`` (``KeyboardInterrupt`` included): stop the tracker and
      keep everything measured (status ``"interrupted"`` for
      ``KeyboardInterrupt`` and for a SIGTERM, ``"failed"`` otherwise), no
      final offset.

    Args:
        session, log_metrics, source, offsetter_options, **settings: shared by
            every callback, see :mod:`carbonoffset.integrations`.
        max_emissions_kg: carbon budget of one run in kg CO2eq (> 0), or
            ``None`` for no budget. The run stops gracefully after the epoch
            whose cumulative emissions pass it (subject to ``min_epochs``); the
            projection uses ``max_epochs``.
        progress_bar: show one short figure on the progress bar, ``co2``: the
            run's emissions so far in SI-prefixed grams of CO2eq (``2.14mg``),
            which fits Rich's and tqdm's bars at 80 columns (default ``True``;
            needs ``log_metrics``). ``False``: nothing on the bar. The
            ``carbon/*`` metrics never go to the bar (they are long).

    Raises:
        ModuleNotFoundError: the Lightning package this class binds to is not
            installed (``pip install carbonoffset[lightning]``).
        ValueError: an invalid setting (:class:`~carbonoffset.core.ConfigurationError`,
            raised here, before training), ``max_emissions_kg <= 0``, or both
            ``session`` and ``settings`` given.
        TypeError: ``progress_bar`` is not a ``bool``.

    Example::

        import lightning.pytorch as pl
        from carbonoffset.integrations.lightning import CarbonOffsetCallback

        callback = CarbonOffsetCallback(
            offset_api_key="test_...", offset_environment="sandbox",
            country_iso_code="FRA", max_emissions_kg=1.0,
        )
        trainer = pl.Trainer(max_epochs=5, callbacks=[callback])
        trainer.fit(model, train_loader)
        print(callback.final_report)
    """

    #: the Lightning package this class binds to, and the name its error gives
    _framework: ClassVar[OptionalImport]
    _public_name: ClassVar[str]

    def __init__(
        self,
        session: OffsetSession | None = None,
        *,
        max_emissions_kg: float | None = None,
        log_metrics: bool = True,
        progress_bar: bool = True,
        source: EmissionsSource | None = None,
        offsetter_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        self._framework.check(self._public_name)
        super().__init__()
        if not isinstance(progress_bar, bool):
            raise TypeError(f"progress_bar must be True or False (got {progress_bar!r})")
        self._progress_bar = progress_bar
        self._core = CallbackCore(
            session,
            max_emissions_kg=max_emissions_kg,
            log_metrics=log_metrics,
            label=_LABEL,
            source=source,
            offsetter_options=offsetter_options,
            **settings,
        )
        # ranks saved at fit start when the strategy restores callback state after on_fit_start
        self._deferred_ranks: dict[str, Any] | None = None
        self._final_logged = True

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: unique per ledger account.

        ``CarbonOffsetCallback{'account': '<environment>:<key fingerprint>'}``
        (the fingerprint is a one-way hash, never the key). The same for
        :class:`CarbonOffsetCallback` and :class:`PLCarbonOffsetCallback`.
        """
        return f"{_STATE_NAME}{{'account': {self._core.config.account!r}}}"

    # ----------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Start a run with a new tracker (continuing a restored run when resuming)."""
        self._final_logged = False
        ranks: dict[str, Any] = {
            "global_rank": int(trainer.global_rank),
            "local_rank": int(trainer.local_rank),
            "nodes": int(trainer.num_nodes),
            "world_size": int(trainer.world_size),
            "collective": _collective(trainer),
        }
        if trainer.strategy.restore_checkpoint_after_setup:
            # This strategy (FSDP, DeepSpeed, ...) restores a checkpoint after on_fit_start: begin at
            # load_state_dict when resuming, else at on_sanity_check_start / on_train_start (both after it).
            self._deferred_ranks = ranks
            return
        self._deferred_ranks = None
        self._core.begin(**ranks)

    def _begin_deferred(self) -> None:
        ranks, self._deferred_ranks = self._deferred_ranks, None
        if ranks is not None:
            self._core.begin(**ranks)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        """Begin a run deferred at fit start (only with strategies that restore checkpoints late)."""
        self._begin_deferred()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Begin a run deferred at fit start (only with strategies that restore checkpoints late)."""
        self._begin_deferred()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Record the epoch, log the ``carbon/*`` metrics, stop the fit when over budget."""
        if trainer.sanity_checking:
            return
        max_epochs = trainer.max_epochs
        report = self._core.epoch_end(
            trainer.current_epoch,
            max_epochs=max_epochs if max_epochs is not None and max_epochs > 0 else None,
        )
        if report is not None and self._core.log_metrics:
            self._publish(trainer, report.metrics(), epoch=trainer.current_epoch)
        if self._core.stop_requested:  # the same decision on every rank (global rank 0's, broadcast)
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Final record and offset (bounded wait), then log the final figures."""
        self._finish(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Same as :meth:`on_train_end` when training itself did not run (e.g. already at ``max_epochs``)."""
        self._finish(trainer)

    def _finish(self, trainer: Any) -> None:
        self._begin_deferred()
        report = self._core.end()
        if report is None or self._final_logged:
            return
        self._final_logged = True
        if self._core.log_metrics:
            self._publish(trainer, report.metrics())

    def _publish(self, trainer: Any, metrics: dict[str, float], *, epoch: int | None = None) -> None:
        """Hand ``metrics`` to other callbacks, the progress bar and every logger.

        Epoch figures go to the loggers with ``epoch``, at the step Lightning logs that epoch's own
        metrics at (``self.log(on_epoch=True)``, ``LearningRateMonitor``: its ``fit_loop.on_advance_end``
        logs them at :func:`_batches_that_stepped` ``- 1``); the final figures at the step after it,
        without ``epoch``, so they never overwrite an epoch's values. Not ``pl_module.log``:
        measured in ``benchmarks/lightning_logging.py``, one ``log_dict`` call of four metrics
        costs 2.6-3.6 ms per epoch on a busy 2-core machine (Lightning walks its whole result
        collection on every ``log`` call, so the cost grows with the model's own metrics),
        against 0.15 ms in the hook for this.
        """
        import torch  # present with Lightning; kept out of module import

        # one tensor, unbound into one 0-d view per metric: a third of the CPU of one tensor each
        tensors = dict(zip(metrics, torch.tensor(list(metrics.values()), dtype=torch.float64).unbind(), strict=True))
        trainer.callback_metrics.update(tensors)
        if self._progress_bar:
            trainer.progress_bar_metrics.update(_progress_bar_figure(metrics))
        if trainer.loggers:
            step = _batches_that_stepped(trainer)
            if epoch is None:
                row = dict(metrics)
            else:
                row, step = {**metrics, "epoch": epoch}, max(0, step - 1)
            trainer.logged_metrics.update(tensors)  # as Lightning keeps its own: tensors, no epoch
            for lg in trainer.loggers:
                lg.log_metrics(row, step=step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Stop the tracker and keep what was measured (no final offset); nothing is left running."""
        self._deferred_ranks = None
        self._final_logged = True
        self._core.abort("interrupted" if _interrupted(exception) else "failed")

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Resume state: ledger run id and the run's cumulative figures (no key, no path)."""
        return self._core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the run saved in a checkpoint: totals continue, offsets already bought are kept."""
        self._core.load_state_dict(state_dict)
        self._begin_deferred()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_emissions_kg={self._core.max_emissions_kg!r}, "
            f"log_metrics={self._core.log_metrics!r}, progress_bar={self._progress_bar!r}, "
            f"config={self._core.config!r})"
        )


#: The base class: ``lightning.pytorch.Callback`` when it imports, else ``object`` (construction then raises).
_LightningBase: Any = _LightningCallback if _LIGHTNING.available else object


class CarbonOffsetCallback(_CarbonOffsetLogic, _LightningBase):  # type: ignore[misc]
    __doc__ = _CarbonOffsetLogic.__doc__
    _framework = _LIGHTNING
    _public_name = "CarbonOffsetCallback"


_PL_DOC = """:class:`CarbonOffsetCallback` bound to ``pytorch_lightning.Callback``, for code that
    imports the standalone ``pytorch_lightning`` package (``pip install lightning`` installs it too).

    Same arguments, hooks, metrics and checkpoint state as :class:`CarbonOffsetCallback`.

    Raises:
        ModuleNotFoundError: ``pytorch_lightning`` is not installed
            (``pip install carbonoffset[lightning]``).
        ValueError: an invalid setting (see :class:`CarbonOffsetCallback`).

    Example::

        import pytorch_lightning as pl
        from carbonoffset.integrations.lightning import PLCarbonOffsetCallback

        callback = PLCarbonOffsetCallback(offset_api_key="test_...", offset_environment="sandbox")
        trainer = pl.Trainer(max_epochs=5, callbacks=[callback])
    """


def _pl_callback_class() -> type:
    """Build :class:`PLCarbonOffsetCallback` (on first use: importing the standalone
    ``pytorch_lightning`` package costs ~0.15 s of CPU that ``lightning.pytorch`` users need not pay)."""
    with _PL:
        from pytorch_lightning import Callback as pl_callback
    base: Any = pl_callback if _PL.available else object

    class PLCarbonOffsetCallback(_CarbonOffsetLogic, base):  # type: ignore[misc]
        __doc__ = _PL_DOC
        _framework = _PL
        _public_name = "PLCarbonOffsetCallback"

    PLCarbonOffsetCallback.__qualname__ = "PLCarbonOffsetCallback"
    return PLCarbonOffsetCallback


if TYPE_CHECKING:  # built on first use by __getattr__ below
    PLCarbonOffsetCallback = CarbonOffsetCallback


def __getattr__(name: str) -> Any:
    if name == "PLCarbonOffsetCallback":
        cls = globals()["PLCarbonOffsetCallback"] = _pl_callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
