"""Helpers the Lightning, Hugging Face and Keras callbacks share: the callback-order fix, the
progress-bar label and ``guard()`` for frameworks that call no callback when training raises.

No accounting lives in the integrations: each callback owns one
:class:`~carbonoffset.core.callback.CallbackCore` and only translates its framework's events
(fit start, epoch end, train end, exception) into its calls; the rank policy and the
:class:`~carbonoffset.core.ranks.Collective` a framework lends are :mod:`carbonoffset.core.ranks`.
The missing-framework error is :mod:`carbonoffset.integrations._imports`.
``CallbackCore``, ``CallbackViews``, ``Collective`` and ``STATE_VERSION`` are re-exported here
for the integrations that import them from this module.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any, TypeVar

from carbonoffset.core.callback import CallbackCore, CallbackViews
from carbonoffset.core.ranks import Collective
from carbonoffset.core.session import STATE_VERSION

__all__ = [
    "STATE_VERSION",
    "CallbackCore",
    "CallbackViews",
    "Collective",
    "GuardedFit",
    "move_first",
    "running_twin",
    "short_mass",
]


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
    callbacks = _dispatching_list(callback, sys._getframe(1))
    if callbacks is not None:
        index = next(i for i, cb in enumerate(callbacks) if cb is callback)
        if index:
            callbacks.insert(0, callbacks.pop(index))
        return True
    if warning not in _warned_order:
        _warned_order.add(warning)
        log.warning(warning)
    return False


def _dispatching_list(callback: Any, frame: types.FrameType | None) -> list[Any] | None:
    """The framework's callback list holding ``callback``: the ``callbacks`` of the ``self`` of a
    dispatching method at most 8 frames up from ``frame`` (see :func:`move_first`), or ``None``."""
    for _ in range(8):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        callbacks = getattr(owner, "callbacks", None) if owner is not callback else None
        if isinstance(callbacks, list) and any(cb is callback for cb in callbacks):
            return callbacks
        frame = frame.f_back
    return None


def running_twin(callback: Any) -> Any | None:
    """From inside ``callback``'s train-begin hook: another carbonoffset callback of the same
    training call (the framework's callback list) whose run is already going on, or ``None``.

    Two of them in one Trainer (``report_to=["carbonoffset"]`` adds one, ``callbacks=[...]``
    another) or one fit would each measure the machine, record a run and offset it: the energy
    counted, and bought, twice.
    """
    callbacks = _dispatching_list(callback, sys._getframe(1)) or []
    mine = getattr(callback, "_core", None)
    for other in callbacks:
        core = getattr(other, "_core", None)
        if (
            other is not callback
            and isinstance(core, CallbackCore)
            and core is not mine  # (a Trainer's rebuilt instance shares the original's core)
            and core.session is not None
            and core.session.running
        ):
            return other
    return None


_TWIN = (
    "two carbonoffset callbacks are in the callbacks of this %s (report_to=[\"carbonoffset\"] adds one "
    "to a Trainer, callbacks=[...] another): the first one measures, records and offsets it, this one "
    "records nothing, so the energy is not counted and bought twice. Give it one CarbonOffsetCallback"
)
_warned_twin: set[str] = set()


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

    def _stand_down_if_twinned(self, twin: Any) -> bool:
        """``twin`` (see :func:`running_twin`) measures this training call: record nothing in it
        (warned once per process). Returns whether this callback stands down."""
        if twin is None:
            return False
        self._core.stand_down()
        if self._fit_name not in _warned_twin:
            _warned_twin.add(self._fit_name)
            logging.getLogger("carbonoffset").warning(_TWIN, self._fit_name.removeprefix("a "))
        return True

    def _close_unfinished(self) -> None:
        """Close, as ``interrupted``, a run that its training call left open (it raised outside ``guard``)."""
        self._core.close_unfinished("interrupted", what=self._fit_name)
