"""Keras 3 callback: measure a ``model.fit`` with CodeCarbon and offset it through 1ClickImpact.

Works with every Keras 3 backend (torch, JAX, TensorFlow): the callback only
uses :class:`keras.callbacks.Callback` hooks, ``self.params["epochs"]`` and
``self.model.stop_training``. What every callback does, and the arguments they
share, are described once in :mod:`carbonoffset.integrations`.

Importing this module never fails: without Keras 3 (or with a Keras whose
backend cannot be imported) constructing :class:`CarbonOffsetCallback`
raises :class:`ModuleNotFoundError` saying what to install or set.
"""

from __future__ import annotations

import logging
from typing import Any

from carbonoffset.core.session import OffsetSession
from carbonoffset.core.sources import EmissionsSource
from carbonoffset.integrations._base import CallbackCore, CallbackViews, GuardedFit, move_first, running_twin
from carbonoffset.integrations._imports import OptionalImport

logger = logging.getLogger(__name__)

__all__ = ["CarbonOffsetCallback"]

_LABEL = "keras"

_KERAS = OptionalImport(
    "Keras",
    "keras>=3",
    extra="keras",
    # Keras is installed but its backend is not (by default Keras picks TensorFlow)
    broken_hint="Keras 3 needs a backend: install one and select it before importing keras, e.g. "
    "`pip install carbonoffset[keras]` and `export KERAS_BACKEND=torch`",
)
with _KERAS:
    import keras

    _version = str(getattr(keras, "__version__", "0"))
    if not _version.split(".")[0].isdigit() or int(_version.split(".")[0]) < 3:
        raise ModuleNotFoundError(f"keras {_version} is installed; Keras 3 is needed", name="keras")

#: The base class: Keras' ``Callback`` when Keras 3 imports, else ``object`` (construction then raises).
_CallbackBase: Any = keras.callbacks.Callback if _KERAS.available else object

_NOT_FIRST = (
    "carbonoffset could not move CarbonOffsetCallback to the front of this fit's callbacks: "
    "callbacks placed before it (e.g. EarlyStopping monitoring carbon/emissions_kg) will not "
    "see the carbon/* metrics. Put CarbonOffsetCallback first in callbacks=[...]"
)


class CarbonOffsetCallback(CallbackViews, GuardedFit, _CallbackBase):  # type: ignore[misc]
    """Measure the emissions of ``model.fit`` and offset them, exactly once.

    The run starts at ``on_train_begin`` (every ``fit`` call is its own run),
    is recorded at each ``on_epoch_end`` and ends at ``on_train_end``, as
    described in :mod:`carbonoffset.integrations`. An "epoch" is one Keras
    epoch of ``fit`` (``epoch`` is Keras' 0-based index, ``initial_epoch``
    included).

    The ``carbon/*`` metrics (:meth:`~carbonoffset.core.session.EpochReport.metrics`;
    kWh and kg CO2eq, cumulative for the run; pending is the account's) are
    added to the epoch ``logs``, so they reach the progress bar, ``History``
    and every other callback: at ``on_train_begin`` the callback moves itself
    to the front of the fit's callbacks, so the order of ``callbacks=[...]``
    does not matter (``EarlyStopping(monitor="carbon/emissions_kg")`` may
    come first).

    Keras has no exception hook: when ``fit`` raises, ``on_train_end`` never
    runs. Wrap ``fit`` in :meth:`guard` so that the tracker stops and what was
    measured is kept in the ledger.

    Args:
        session, log_metrics, source, offsetter_options, **settings: shared by
            every callback, see :mod:`carbonoffset.integrations`.
        max_emissions_kg: carbon budget per ``fit`` in kg CO2eq (> 0), or
            ``None`` (default, no budget). When the run's emissions pass it,
            ``self.model.stop_training`` is set after that epoch; the
            projection uses ``epochs``.

    Raises:
        ValueError: invalid settings, ``max_emissions_kg <= 0``, or both
            ``session`` and settings given (raised here, before training).
        ModuleNotFoundError: Keras 3 (or its backend) is not importable.

    Example::

        import os
        os.environ.setdefault("KERAS_BACKEND", "torch")
        from carbonoffset.integrations.keras import CarbonOffsetCallback

        callback = CarbonOffsetCallback(offset_environment="sandbox", country_iso_code="FRA")
        with callback.guard():  # stops the tracker and keeps the figures if fit raises
            history = model.fit(x, y, epochs=5, callbacks=[callback])
        history.history["carbon/emissions_kg"]  # kg CO2eq after each epoch
        callback.final_report.offset_lb        # whole pounds bought for this fit
    """

    _fit_name = "a Keras fit"

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
        _KERAS.check("CarbonOffsetCallback")
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

    # ---------------------------------------------------------- keras hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # Keras calls callbacks in list order with one shared logs dict: run first, so that callbacks
        # placed before this one in callbacks=[...] (EarlyStopping(monitor="carbon/emissions_kg"),
        # ModelCheckpoint, CSVLogger, TensorBoard) see the carbon/* metrics too.
        if self._stand_down_if_twinned(running_twin(self)):
            return  # another CarbonOffsetCallback of this fit measures it
        move_first(self, warning=_NOT_FIRST, log=logger)
        self._close_unfinished()
        self._core.begin()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        report = self._core.epoch_end(epoch, max_epochs=(self.params or {}).get("epochs"))
        if report is None:
            return
        if self._core.log_metrics and logs is not None:
            logs.update(report.metrics())
        if self._core.stop_requested and self.model is not None:
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._core.end()  # the session logs the run's end line (RunReport.summary)

    # --------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Resume state (run id and cumulative figures; no key, no path), JSON-serialisable.

        Keras does not checkpoint callbacks: save this next to your model
        checkpoints (e.g. with ``json.dump``) and pass it to
        :meth:`load_state_dict` before the resumed ``fit``.
        """
        return self._core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved in ``state`` at the next ``fit``: its totals carry on
        from the saved figures (or the ledger's, if larger) and what was already
        offset is never offset again. Missing keys default."""
        self._core.load_state_dict(state)
