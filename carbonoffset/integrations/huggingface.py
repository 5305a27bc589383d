"""Hugging Face ``Trainer`` callback: measure training with CodeCarbon and offset it through 1ClickImpact.

All accounting lives in :class:`carbonoffset.integrations._base.CallbackCore`;
this module only translates ``Trainer`` events into calls on it. What every
callback does, and the arguments they share, are described once in
:mod:`carbonoffset.integrations`.

Importing this module never fails: without transformers, constructing
:class:`CarbonOffsetCallback` raises :class:`ModuleNotFoundError` naming the
extra to install. With transformers, importing it also registers the name
``"carbonoffset"`` for ``TrainingArguments(report_to=[...])``, so the Trainer
can build the callback itself from configuration (``CODECARBON_*``
environment variables and ``.codecarbon.config``). transformers' own
``"codecarbon"`` integration is left untouched.

The Trainer has no exception hook: when ``train()`` raises, ``on_train_end``
never runs. Wrap ``train()`` in :meth:`CarbonOffsetCallback.guard` so that the
tracker stops at once and what was measured is kept in the ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import weakref
from pathlib import Path
from typing import Any

from carbonoffset.core.config import OffsetConfig, SecretKey
from carbonoffset.core.session import OffsetSession
from carbonoffset.core.sources import EmissionsSource
from carbonoffset.integrations._base import (
    CallbackCore,
    CallbackViews,
    Collective,
    GuardedFit,
    move_first,
    running_twin,
)
from carbonoffset.integrations._imports import OptionalImport

logger = logging.getLogger(__name__)

__all__ = ["REPORT_TO_NAME", "CarbonOffsetCallback", "add_to_model_card"]

#: The name to use in ``TrainingArguments(report_to=[...])``.
REPORT_TO_NAME = "carbonoffset"

_LABEL = "huggingface"
_STATE_ATTRIBUTE = "resume_state"


_TRANSFORMERS = OptionalImport("Hugging Face Transformers", "transformers>=4.45", extra="transformers")
with _TRANSFORMERS:
    from transformers.trainer_callback import ExportableState as _ExportableState
    from transformers.trainer_callback import TrainerCallback as _TrainerCallback

# id(TrainingArguments) -> (weakref to it, weakref to the callback the Trainer was built with); see
# CarbonOffsetCallback._adopt_original.
_OWNERS: dict[int, tuple[Any, Any]] = {}


def _rebuild_settings(config: OffsetConfig, explicit: dict[str, Any] | None) -> dict[str, Any]:
    """Non-secret settings to store in a checkpoint so the Trainer can rebuild the callback.

    ``explicit``: the settings the user passed (``None`` when a ready session
    was given: then the session's non-default settings are used). The API key
    is never included; paths become strings so the state stays JSON.
    """
    if explicit is None:
        defaults = OffsetConfig()
        explicit = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(defaults, f.name)
        }
    out: dict[str, Any] = {}
    for name, value in explicit.items():
        if name == "offset_api_key" or value is None or isinstance(value, SecretKey):
            continue
        if isinstance(value, Path) or not isinstance(value, (str, int, float, bool)):
            value = str(value)
        out[name] = value
    return out


def _training_type(model: Any) -> str | None:
    """``"fine-tuning"`` for a model loaded with weights (``from_pretrained`` sets its public
    ``name_or_path``), ``"pre-training"`` for one built from a config (empty ``name_or_path``),
    ``None`` when the model does not say."""
    name = getattr(model, "name_or_path", None)
    if not isinstance(name, str):
        name = getattr(getattr(model, "config", None), "name_or_path", None)
    if not isinstance(name, str):
        return None
    return "fine-tuning" if name.strip() else "pre-training"


def _nodes(args: Any) -> int:
    """Number of nodes of the job (stored in the ledger): world size / processes per node."""
    world = int(getattr(args, "world_size", 1) or 1)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return max(1, world // max(1, per_node))


def _collective(args: Any) -> Collective | None:
    """``torch.distributed``'s sum and broadcast on the Trainer's process group, in a multi-process job.

    ``None`` for a single process, and for several processes without an
    initialised process group (the core then warns once and falls back to
    per-process figures). The sum runs on ``args.device`` (a CUDA device with
    NCCL, the CPU with gloo).
    """
    world = int(getattr(args, "world_size", 1) or 1)
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    device = getattr(args, "device", None)

    def sum_across(values: Any) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.tolist()]

    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Collective(world_size=world, sum=sum_across, broadcast=broadcast)


#: logged when the callback cannot run first (see move_first)
_NOT_FIRST = (
    "carbonoffset could not move CarbonOffsetCallback before the Trainer's reporting "
    "integrations: integrations listed before it in report_to, and callbacks placed before "
    "it, will not see the carbon/* metrics. Put it first: "
    "trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))"
)


if _TRANSFORMERS.available:

    class CarbonOffsetCallback(_TrainerCallback, _ExportableState, CallbackViews, GuardedFit):
        """Measure the emissions of ``Trainer.train()`` and offset them, exactly once.

        The run starts at ``on_train_begin`` (every ``train()`` call is its own
        run, unless it resumes one, see below), is recorded at each
        ``on_epoch_end`` and ends with the Trainer's end-of-training summary (or
        ``on_train_end``), as described in :mod:`carbonoffset.integrations`. An
        "epoch" is one Trainer epoch (``epoch`` in the ledger is 0-based:
        ``ceil(state.epoch) - 1``).

        **Metrics.** With ``log_metrics`` the callback asks the Trainer to log
        at the end of every epoch (``control.should_log``) and adds the
        ``carbon/*`` metrics (:meth:`~carbonoffset.core.session.EpochReport.metrics`;
        kWh and kg CO2eq, cumulative for the run; pending is the account's) to
        that log entry: to ``state.log_history`` and to the ``logs`` every
        ``on_log`` receives. The Trainer runs the ``report_to`` integrations
        (TensorBoard, W&B, MLflow, ...) before the callbacks given in
        ``callbacks=[...]``, so the callback moves itself to the front of the
        Trainer's callbacks when the Trainer is built (and again at
        ``on_train_begin``): every integration and every other callback,
        wherever placed, sees the metrics. The Trainer's end-of-training summary
        (the log entry with ``train_runtime``, logged just before
        ``on_train_end``) ends the run: its final figures (same names) go into
        that entry, so they reach every integration and ``state.log_history``
        too, at the last global step.

        **Ranks.** Only the local main process of each node runs a tracker
        (``args.local_process_index == 0``) and only the main process
        (``args.process_index == 0``) writes the ledger and offsets. In a
        distributed job each epoch's node figures are summed across processes
        (``torch.distributed.all_reduce``) and the main process's figures and
        budget decision are broadcast, so every process logs the job's
        figures and stops at the same epoch; the ledger run records the node
        count. Without an initialised process group each process falls back
        to its own figures, with one warning (see ``docs/distributed.md``).

        **Resume.** The callback is an ``ExportableState``: its run id and
        cumulative figures are saved in every checkpoint's
        ``trainer_state.json`` (never the API key). With
        ``TrainingArguments(restore_callback_states_from_checkpoint=True)``
        and ``trainer.train(resume_from_checkpoint=...)`` the resumed
        training continues the same ledger run and its totals, and never
        offsets again what was already offset. The Trainer then replaces this
        instance with one it rebuilds from the checkpoint; the rebuilt one
        adopts this instance's settings (API key, source, session), so
        :attr:`final_report` here still describes the run. Without that
        option a resumed training is recorded as a new run.

        Args:
            session, log_metrics, source, offsetter_options, **settings: shared
                by every callback, see :mod:`carbonoffset.integrations`.
            max_emissions_kg: carbon budget per run in kg CO2eq (> 0), or
                ``None`` (default, no budget). When the run's emissions pass
                it, ``control.should_training_stop`` is set at that epoch's
                end; the projection uses ``num_train_epochs``.

        Raises:
            ValueError: invalid settings, ``max_emissions_kg <= 0``, or both
                ``session`` and settings given (raised here, before training).
            ModuleNotFoundError: transformers is not installed.

        Example::

            from transformers import Trainer, TrainingArguments
            from carbonoffset.integrations.huggingface import CarbonOffsetCallback

            callback = CarbonOffsetCallback(offset_environment="sandbox", country_iso_code="FRA")
            trainer = Trainer(model=model, args=TrainingArguments("out", num_train_epochs=3),
                              train_dataset=train_set, callbacks=[callback])
            with callback.guard():  # stops the tracker and keeps the figures if train() raises
                trainer.train()
            [e["carbon/emissions_kg"] for e in trainer.state.log_history if "carbon/emissions_kg" in e]
            callback.final_report.offset_lb  # whole pounds bought for this run
        """

        _fit_name = "a training run"

        def __init__(
            self,
            session: OffsetSession | None = None,
            *,
            max_emissions_kg: float | None = None,
            log_metrics: bool = True,
            source: EmissionsSource | None = None,
            offsetter_options: dict[str, Any] | None = None,
            **settings: Any,
        ) -> None:
            super().__init__()
            self._core = CallbackCore(
                session,
                max_emissions_kg=max_emissions_kg,
                log_metrics=log_metrics,
                label=_LABEL,
                source=source,
                offsetter_options=offsetter_options,
                **settings,
            )
            self._settings_to_save = _rebuild_settings(
                self._core.config, None if session is not None else settings
            )
            self._pending_metrics: dict[str, float] | None = None
            self._restored: dict[str, Any] | None = None

        # ------------------------------------------------------ trainer hooks
        def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Remember which callback this Trainer was built with, so that an instance the
            # Trainer rebuilds from a checkpoint can adopt its settings (key, source, session).
            owners = _OWNERS
            for key, (args_ref, _) in list(owners.items()):
                if args_ref() is None:
                    del owners[key]
            with contextlib.suppress(TypeError):  # arguments without weak references: nothing to adopt later
                owners[id(args)] = (weakref.ref(args), weakref.ref(self))
            # The Trainer runs the report_to integrations before the callbacks given in callbacks=[...]
            # and hands every on_log the same logs dict: run first, so that all of them see carbon/*.
            move_first(self, warning=_NOT_FIRST, log=logger)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._stand_down_if_twinned(running_twin(self)):
                return  # another CarbonOffsetCallback of this Trainer measures this training
            # again, for an instance the Trainer rebuilt from a checkpoint (appended last)
            move_first(self, warning=_NOT_FIRST, log=logger)
            if self._restored is not None:
                self._adopt_original(args)
            elif getattr(state, "global_step", 0) and not getattr(
                args, "restore_callback_states_from_checkpoint", False
            ):
                logger.info(
                    "training resumes from a checkpoint without restore_callback_states_from_checkpoint=True: "
                    "carbonoffset records it as a new run"
                )
            self._pending_metrics = None
            self._close_unfinished()
            self._core.begin(
                global_rank=int(getattr(args, "process_index", 0) or 0),
                local_rank=int(getattr(args, "local_process_index", 0) or 0),
                nodes=_nodes(args),
                world_size=int(getattr(args, "world_size", 1) or 1),
                collective=_collective(args),
            )

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            epoch = max(0, math.ceil((state.epoch or 0.0) - 1e-6) - 1)
            max_epochs = getattr(state, "num_train_epochs", None) or None
            report = self._core.epoch_end(epoch, max_epochs=int(max_epochs) if max_epochs else None)
            if report is not None and self._core.log_metrics:
                self._pending_metrics = report.metrics()
                control.should_log = True
            if self._core.stop_requested:  # the same decision in every process (the main process's)
                control.should_training_stop = True

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            metrics, self._pending_metrics = self._pending_metrics, None
            if logs is None:
                return
            if "train_runtime" in logs and self._core.log_metrics:
                # The Trainer's end-of-training summary, logged just before on_train_end: end the run
                # here so that its final figures reach every integration and log_history with it.
                report = self._core.end()
                metrics = report.metrics() if report is not None else None
            if not metrics:
                return
            history = getattr(state, "log_history", None)
            if history:
                entry = history[-1]  # Trainer.log appended {**logs, "step": global_step} just before on_log
                if entry.get("step") == state.global_step and all(
                    k in logs and (logs[k] is v or logs[k] == v) for k, v in entry.items() if k != "step"
                ):
                    entry.update(metrics)
            logs.update(metrics)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            report = self._core.end()
            if report is None:
                return
            if self._core.log_metrics and state.log_history and "train_runtime" in state.log_history[-1]:
                state.log_history[-1].update(report.metrics())
            # the session logs the run's end line (RunReport.summary)

        # ---------------------------------------------------------- model card
        def add_to_model_card(self, trainer: Any, *, training_type: str | None = None) -> None:
            """Make the model cards ``trainer`` writes carry this callback's run: emissions and offsets.

            The Trainer writes its card (``README.md`` in ``output_dir``) in ``create_model_card()``,
            which ``push_to_hub()`` calls just before uploading (``save_model()`` writes none), and
            rewrites it whole each time; no callback event follows. So this wraps that public method of
            this ``trainer`` instance: once it has written the card, the card's front matter gets
            ``co2_eq_emissions`` (**grams**, with source, training type, location, hardware) and its
            text the section "Carbon emissions and offsets" (energy, emissions, what is offset and
            pending, the 1ClickImpact receipts, sandbox stated plainly), from the ledger's figures of
            the last run (see :mod:`carbonoffset.core.card`). Only the main process writes. A card
            that cannot be completed (no run yet, ledger unreadable) is left as the Trainer wrote
            it, with a warning: it never fails the push.

            Args:
                trainer: the ``transformers.Trainer`` this callback was given to.
                training_type: the card's ``training_type``; default ``"fine-tuning"`` when the model
                    was loaded with weights (``from_pretrained``: it has a ``name_or_path``),
                    ``"pre-training"`` when it was built from a config, else left out.

            Raises:
                ModuleNotFoundError: ``huggingface_hub`` is missing (transformers installs it).
            """
            hub = OptionalImport("model cards", "huggingface_hub>=0.24", extra="card")
            with hub:  # fail here, not at push time, if huggingface_hub is missing
                import huggingface_hub  # noqa: F401
            hub.check("add_to_model_card")
            write_card = trainer.create_model_card
            callback = weakref.ref(self)

            @functools.wraps(write_card)
            def create_model_card(*args: Any, **kwargs: Any) -> Any:
                result = write_card(*args, **kwargs)
                # the Trainer may have replaced this instance by one rebuilt from a checkpoint
                this = _callback_of(trainer) or callback()
                if this is not None and trainer.is_world_process_zero():
                    this._complete_card(trainer, training_type)
                return result

            trainer.create_model_card = create_model_card

        def _complete_card(self, trainer: Any, training_type: str | None) -> None:
            from carbonoffset.core import card

            report = self._core.final_report
            session = self._core.session
            run_id = (
                report.run_id if report is not None else (session.run_id if session is not None else None)
            )
            # the session's own setting: a report shows a team ledger's URL with its password masked
            ledger = (
                session.config.ledger_path
                if session is not None
                else (report.ledger_path if report is not None else None)
            )
            if run_id is None:
                logger.warning("model card written without carbon figures: no training run was recorded yet")
                return
            path = Path(trainer.args.output_dir) / "README.md"
            try:
                card.update_model_card(
                    path, run_id, ledger=ledger, training_type=training_type or _training_type(trainer.model)
                )
            except Exception as exc:  # noqa: BLE001 -- never fail the Trainer's card or push
                logger.warning("could not add the carbon figures to the model card %s: %s", path, exc)

        # --------------------------------------------------------------- resume
        def state(self) -> dict[str, Any]:
            """``ExportableState``: what the Trainer saves in ``trainer_state.json`` at each checkpoint.

            ``"args"`` rebuild the callback (``max_emissions_kg``,
            ``log_metrics`` and the non-secret settings; never the API key,
            which the rebuilt callback takes from the instance given to the
            Trainer or from configuration); ``"attributes"`` hold the run id
            and cumulative figures (see :meth:`CallbackCore.state_dict`).
            """
            return {
                "args": {
                    "max_emissions_kg": self._core.max_emissions_kg,
                    "log_metrics": self._core.log_metrics,
                    **self._settings_to_save,
                },
                "attributes": {_STATE_ATTRIBUTE: self._core.state_dict()},
            }

        @property
        def resume_state(self) -> dict[str, Any]:
            """The resume state (run id, cumulative figures); setting it continues that run at the next
            ``train()`` (this is what the Trainer does when restoring from a checkpoint)."""
            return self._core.state_dict()

        @resume_state.setter
        def resume_state(self, value: dict[str, Any]) -> None:
            self._restored = dict(value or {})
            self._core.load_state_dict(self._restored)

        def state_dict(self) -> dict[str, Any]:
            """Resume state (run id and cumulative figures; no key, no path), JSON-serialisable."""
            return self._core.state_dict()

        def load_state_dict(self, state: dict[str, Any]) -> None:
            """Continue the run saved in ``state`` at the next ``train()`` (missing keys default)."""
            self._core.load_state_dict(state)

        def _adopt_original(self, args: Any) -> None:
            """This instance was rebuilt by the Trainer from a checkpoint: share the core of the callback
            the Trainer was built with (its key, source and session), then continue the saved run."""
            restored, self._restored = self._restored, None
            entry = _OWNERS.get(id(args))
            original = entry[1]() if entry is not None and entry[0]() is args else None
            if isinstance(original, CarbonOffsetCallback) and original is not self:
                self._core = original._core
                self._settings_to_save = original._settings_to_save
                _OWNERS[id(args)] = (weakref.ref(args), weakref.ref(self))
            elif original is None:
                logger.info(
                    "restored from a checkpoint with the settings saved there and CODECARBON_* configuration "
                    "(no callback instance given to this Trainer)"
                )
            if restored:
                self._core.load_state_dict(restored)

    def _callback_of(trainer: Any) -> CarbonOffsetCallback | None:
        """The :class:`CarbonOffsetCallback` among ``trainer.callback_handler.callbacks``, if any."""
        handler = getattr(trainer, "callback_handler", None)
        for candidate in getattr(handler, "callbacks", None) or ():
            if isinstance(candidate, CarbonOffsetCallback):
                return candidate
        return None

    def add_to_model_card(trainer: Any, *, training_type: str | None = None) -> None:
        """:meth:`CarbonOffsetCallback.add_to_model_card` for the callback ``trainer`` holds (e.g. built by
        the Trainer from ``report_to=["carbonoffset"]``).

        Raises:
            ValueError: ``trainer`` has no :class:`CarbonOffsetCallback`.
        """
        callback = _callback_of(trainer)
        if callback is None:
            raise ValueError(
                "this Trainer has no CarbonOffsetCallback: pass callbacks=[CarbonOffsetCallback(...)] or "
                'report_to=["carbonoffset"] when building it'
            )
        callback.add_to_model_card(trainer, training_type=training_type)

    def _register_report_to() -> None:
        """Make ``TrainingArguments(report_to=["carbonoffset"])`` build :class:`CarbonOffsetCallback`."""
        try:
            from transformers.integrations import integration_utils
        except ImportError:  # pragma: no cover - transformers without the integrations module
            logger.debug("transformers has no integration_utils; report_to=['carbonoffset'] is unavailable")
            return
        registry = getattr(integration_utils, "INTEGRATION_TO_CALLBACK", None)
        if not isinstance(registry, dict):  # pragma: no cover - a future transformers
            logger.debug(
                "transformers has no INTEGRATION_TO_CALLBACK; report_to=['carbonoffset'] is unavailable"
            )
            return
        current = registry.get(REPORT_TO_NAME)
        if current is None or getattr(current, "__module__", None) == __name__:
            registry[REPORT_TO_NAME] = CarbonOffsetCallback
        else:
            logger.warning(
                "report_to name %r is already taken by %r; not registering carbonoffset's callback",
                REPORT_TO_NAME,
                current,
            )

    _register_report_to()

else:

    class CarbonOffsetCallback:  # type: ignore[no-redef]
        """Placeholder: transformers is not importable here (constructing raises ModuleNotFoundError,
        its cause the import error)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _TRANSFORMERS.check("CarbonOffsetCallback")

    def add_to_model_card(trainer: Any, *, training_type: str | None = None) -> None:
        """Placeholder: transformers is not importable here (raises ModuleNotFoundError)."""
        _TRANSFORMERS.check("add_to_model_card")
