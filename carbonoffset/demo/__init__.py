"""``carbonoffset demo``: train a small real model on digits with the callback.

Each framework has a module here exposing::

    train(callback_settings: dict, *, epochs: int) -> DemoResult

which builds the framework's ``CarbonOffsetCallback(**callback_settings)``,
trains on :func:`carbonoffset.demo.data.load_digits_split` and returns the
result. :func:`run_demo` adds the local server, the settings and the table.
"""

from __future__ import annotations

import dataclasses
import importlib

from carbonoffset.core.session import RunReport

FRAMEWORKS = ("lightning", "huggingface", "keras")


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What a demo training returns.

    Attributes:
        epochs: epochs trained.
        accuracy: validation accuracy in [0, 1] after the last epoch.
        report: the callback's final :class:`RunReport`.
    """

    epochs: int
    accuracy: float
    report: RunReport


def trainer_module(framework: str):  # type: ignore[no-untyped-def]
    """Import ``carbonoffset.demo.<framework>`` (raises ValueError for an unknown name)."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)} (got {framework!r})")
    return importlib.import_module(f"carbonoffset.demo.{framework}")
