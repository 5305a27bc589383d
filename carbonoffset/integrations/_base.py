"""Helpers the Lightning, Hugging Face and Keras callbacks share: the missing-framework error,
the callback-order fix and the progress-bar label.

No accounting lives in the integrations: each callback owns one
:class:`~carbonoffset.core.callback.CallbackCore` and only translates its framework's events
(fit start, epoch end, train end, exception) into its calls; the rank policy and the
:class:`~carbonoffset.core.ranks.Collective` a framework lends are :mod:`carbonoffset.core.ranks`.
``CallbackCore``, ``CallbackViews``, ``Collective`` and ``STATE_VERSION`` are re-exported here
for the integrations that import them from this module.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from carbonoffset.core.callback import CallbackCore, CallbackViews
from carbonoffset.core.ranks import Collective
from carbonoffset.core.session import STATE_VERSION

__all__ = [
    "STATE_VERSION",
    "CallbackCore",
    "CallbackViews",
    "Collective",
    "missing_framework",
    "move_first",
    "short_mass",
]


def missing_framework(callback: str, framework: str, requirement: str, extra: str) -> ModuleNotFoundError:
    """The error raised when a callback is built without its framework installed."""
    return ModuleNotFoundError(
        f"`{callback}` for {framework} requires `{requirement}`; install it with "
        f"`pip install carbonoffset[{extra}]`"
    )


def move_first(callback: Any) -> bool:
    """From inside one of ``callback``'s hooks, move it to the front of the framework's callback list.

    Hugging Face's ``CallbackHandler`` and Keras' ``CallbackList`` call each hook on their
    ``callbacks`` list in order, and hand every callback the same ``logs`` dict; neither framework
    gives a callback its list or any public way to order callbacks. The list's owner is the
    ``self`` of the dispatching method a few frames up the stack; it is found there. Moving the
    element being dispatched to the front leaves the rest of that dispatch unchanged (the elements
    after it keep their indices).

    Returns:
        ``True`` when ``callback`` is now first; ``False`` when no dispatching list holding it was
        found (a framework change: the callers warn, and their tests fail).
    """
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        callbacks = getattr(owner, "callbacks", None) if owner is not callback else None
        if isinstance(callbacks, list):
            index = next((i for i, cb in enumerate(callbacks) if cb is callback), None)
            if index is not None:
                if index:
                    callbacks.insert(0, callbacks.pop(index))
                return True
        frame = frame.f_back
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
