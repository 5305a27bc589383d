"""``carbonoffset demo``: train a small real model on digits with the callback.

Each framework has a module here exposing::

    train(callback_settings: dict, *, epochs: int, progress: Progress | None = None) -> DemoResult

which builds the framework's ``CarbonOffsetCallback(**callback_settings)``,
trains on :func:`carbonoffset.demo.data.load_digits_split`, calls
``progress(epochs_done, epochs)`` after every epoch and returns the result.
The ``demo`` command of :mod:`carbonoffset.cli` adds the local server, the
settings, the messages (:func:`offset_plan`, :func:`offset_outcome`) and the table.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.session import RunReport
from carbonoffset.core.units import KG_PER_LB

#: Called after every epoch with ``(epochs_done, epochs_planned)``.
Progress = Callable[[int, int], None]

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


def account_credit_kg(config: OffsetConfig) -> float:
    """The account's credit (kg CO2eq) in its ledger before the demo runs: the unused part of
    earlier rounded-up offsets. 0 when the ledger file does not exist yet (it is not created)."""
    path = config.ledger_path
    if isinstance(path, Path) and not path.exists():
        return 0.0
    from carbonoffset.core.ledger import Ledger

    with Ledger(path) as ledger:
        return float(ledger.balance(config.account).credit_kg)


def offset_plan(credit_kg: float, *, auto_offset: bool = True) -> str:
    """What the demo's final offset will do, said before training.

    Args:
        credit_kg: the account's credit before the run (:func:`account_credit_kg`), kg CO2eq.
        auto_offset: the resolved ``auto_offset`` setting (``False``: nothing is bought).
    """
    if not auto_offset:
        return "auto_offset is off: the run is recorded in the ledger and nothing is bought."
    if credit_kg > 0:
        return (
            f"The account has {credit_kg:.4f} kg of credit left from earlier rounded-up offsets; it covers "
            "this small run, so nothing is bought unless the run emits more than that (then the final "
            f"offset rounds up to the next whole pound, 1 lb = {KG_PER_LB:.4f} kg)."
        )
    return (
        f"The final offset rounds up to a whole pound: this buys 1 lb ({KG_PER_LB:.4f} kg) of carbon "
        "capture; the part the run did not emit is kept as credit for later runs."
    )


def offset_outcome(report: RunReport, credit_before_kg: float) -> str:
    """What the demo's run actually bought, and why, in one sentence (said after training)."""
    bought = report.confirmed_lb + report.in_flight_lb
    if bought:
        unconfirmed = (
            f" ({report.in_flight_lb} lb not confirmed yet: `carbonoffset reconcile` settles it)"
            if report.in_flight_lb
            else ""
        )
        return (
            f"Bought {bought} lb ({bought * KG_PER_LB:.4f} kg) of carbon capture for "
            f"{report.emissions_kg:.3g} kg CO2eq{unconfirmed}; {report.credit_kg:.4f} kg of credit is "
            "kept for later runs."
        )
    if credit_before_kg > 0 and report.pending_kg == 0:
        return (
            f"Bought nothing: the account's credit from earlier offsets covered this run's "
            f"{report.emissions_kg:.3g} kg CO2eq ({report.credit_kg:.4f} kg of credit left)."
        )
    return (
        f"Bought nothing: {report.pending_kg:.3g} kg CO2eq stays pending in the ledger "
        "(`carbonoffset offset` buys it later)."
    )
