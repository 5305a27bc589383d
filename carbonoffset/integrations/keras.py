"""Keras 3 callback: measure a ``model.fit`` with CodeCarbon and offset it through 1ClickImpact.

Works with every Keras 3 backend (torch, JAX, TensorFlow): the callback only
uses :class:`keras.callbacks.Callback` hooks, ``self.params["epochs"]`` and
``self.model.stop_training``. All accounting lives in
:class:`carbonoffset.integrations._base.CallbackCore`.

Importing this module never fails: without Keras 3 (or with a Keras whose
backend cannot be imported) constructing :class:`CarbonOffsetCallback`
raises :class:`ModuleNotFoundError` saying what to install or set.

Keras has no exception hook: when ``fit`` raises, ``on_train_end`` never runs.
Wrap ``fit`` in :meth:`CarbonOffsetCallback.guard` so that the tracker stops
and what was measured is kept in the ledger; see that method.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from carbonoffset.core.session import OffsetSession
from carbonoffset.core.sources import EmissionsSource
from carbonoffset.integrations._base import CallbackCore, CallbackViews, missing_framework, move_first

logger = logging.getLogger(__name__)

__all__ = ["CarbonOffsetCallback"]

_LABEL = "keras"


def _import_keras() -> tuple[Any, str | None]:
    """Import Keras 3; return ``(keras, None)`` or ``(None, why constructing the callback fails)``."""
    missing = str(missing_framework("CarbonOffsetCallback", "Keras", "keras>=3", "keras"))
    try:
        import keras
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "keras":
            return None, missing
        # Keras is installed but its backend is not (by default Keras picks TensorFlow).
        return None, (
            f"`CarbonOffsetCallback` for Keras could not import keras ({type(exc).__name__}: {exc}). "
            "Keras 3 needs a backend: install one and select it before importing keras, e.g. "
            "`pip install carbonoffset[keras]` and `export KERAS_BACKEND=torch`"
        )
    major = str(getattr(keras, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 3:
        return None, missing
    return keras, None


_keras, _IMPORT_PROBLEM = _import_keras()


#: The base class: Keras' ``Callback`` when Keras 3 imports, else ``object`` (construction then raises).
_CallbackBase: Any = _keras.callbacks.Callback if _keras is not None else object


class CarbonOffsetCallback(CallbackViews, _CallbackBase):  # type: ignore[misc]
    """Measure the emissions of ``model.fit`` and offset them, exactly once.

    At ``on_train_begin`` a fresh tracker and a new ledger run start (every
    ``fit`` call is its own run). At each ``on_epoch_end`` the cumulative
    figures are recorded in the ledger; once the account's pending
    emissions reach ``offset_threshold`` an offset is bought on a
    background thread (the epoch never waits for the network); the
    metrics ``carbon/energy_kwh`` (kWh), ``carbon/emissions_kg``,
    ``carbon/offset_kg`` and ``carbon/pending_kg`` (kg CO2eq, cumulative
    for the run; pending is the account's) are added to ``logs``, so they
    reach the progress bar, ``History`` and every other callback: at
    ``on_train_begin`` the callback moves itself to the front of the fit's
    callbacks, so the order of ``callbacks=[...]`` does not matter
    (``EarlyStopping(monitor="carbon/emissions_kg")`` may come first). At ``on_train_end`` the final figures are recorded, the
    final offset is made (respecting the threshold, or rounding up to a
    whole pound when ``offset_round_up`` is set) and the callback waits at
    most ``offset_timeout`` seconds for offsets in flight; whatever is not
    settled by then stays in the ledger for the next run or
    ``carbonoffset reconcile``.

    An "epoch" is one Keras epoch of ``fit`` (``epoch`` is Keras' 0-based
    index, ``initial_epoch`` included).

    Args:
        session: a ready :class:`~carbonoffset.core.session.OffsetSession`
            (its settings are used); or ``None`` (default) to build one
            per ``fit`` from ``**settings``. Not both.
        max_emissions_kg: carbon budget per ``fit`` in kg CO2eq (> 0), or
            ``None`` (default, no budget). When the run's emissions pass
            it, ``self.model.stop_training`` is set after that epoch and a
            warning is logged; after the first epoch a warning is logged
            when the emissions projected over ``epochs`` pass it.
        log_metrics: add the four ``carbon/*`` metrics to the epoch
            ``logs`` (default ``True``).
        source: emissions source for the sessions built here (default:
            CodeCarbon; tests inject
            :class:`~carbonoffset.testing.ScriptedEmissions`).
        offsetter_options: passed to the offsetter (``max_attempts``,
            ``wait_initial_s``, ``wait_max_s``).
        **settings: :class:`~carbonoffset.core.config.OffsetConfig` fields
            (``offset_api_key``, ``offset_environment``,
            ``offset_threshold`` (kg, >= 0.5), ``auto_offset``,
            ``offset_ledger``, ``country_iso_code``, ``offset_timeout``
            (s), ...). Unset ones come from ``CODECARBON_*`` environment
            variables and ``.codecarbon.config``.

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
        if _IMPORT_PROBLEM is not None:
            raise ModuleNotFoundError(_IMPORT_PROBLEM)
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
        self._warned_order = False

    # ---------------------------------------------------------- keras hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # Keras calls callbacks in list order with one shared logs dict: run first, so that callbacks
        # placed before this one in callbacks=[...] (EarlyStopping(monitor="carbon/emissions_kg"),
        # ModelCheckpoint, CSVLogger, TensorBoard) see the carbon/* metrics too.
        if not move_first(self) and not self._warned_order:
            self._warned_order = True
            logger.warning(
                "carbonoffset could not move CarbonOffsetCallback to the front of this fit's callbacks: "
                "callbacks placed before it (e.g. EarlyStopping monitoring carbon/emissions_kg) will not "
                "see the carbon/* metrics. Put CarbonOffsetCallback first in callbacks=[...]"
            )
        self._close_unfinished("interrupted")
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

    # ---------------------------------------------------------- safety net
    @contextlib.contextmanager
    def guard(self) -> Iterator[CarbonOffsetCallback]:
        """Context manager around ``model.fit`` for when it raises.

        Keras calls no callback when ``fit`` raises (``on_train_end`` is
        skipped), so on its own the tracker would keep running until the
        next ``fit`` with this callback, garbage collection, or the end of
        the process. Inside ``guard`` an exception (``KeyboardInterrupt``
        included) stops the tracker at once, records what was measured in
        the ledger (run status ``failed``, or ``interrupted`` for
        ``KeyboardInterrupt``; those emissions stay pending and are offset
        by a later run, no final offset is bought), then the exception
        propagates unchanged.

        Yields:
            This callback.

        Example::

            with callback.guard():
                model.fit(x, y, epochs=10, callbacks=[callback])
        """
        with self._core.guarded(what="a Keras fit"):
            yield self

    def _close_unfinished(self, status: str) -> None:
        self._core.close_unfinished(status, what="a Keras fit")

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
