"""What a run reports: the figures after each epoch (:class:`EpochReport`), the whole run's
(:class:`RunReport`) and its end line (:attr:`RunReport.summary`).

Plain frozen dataclasses, picklable, so distributed front ends broadcast them from global rank 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from carbonoffset.core.units import KG_PER_LB

METRIC_PREFIX = "carbon/"


@dataclasses.dataclass(frozen=True)
class EpochReport:
    """Figures after one epoch, cumulative for the run.

    Attributes:
        epoch: 0-based epoch index (``None`` when recorded outside an epoch).
        energy_kwh: energy of the run so far, kWh.
        emissions_kg: emissions of the run so far, kg CO2eq.
        offset_kg: offsets this run bought or has in flight, kg CO2eq.
        pending_kg: the account's emissions not yet offset, kg CO2eq (all runs).
        credit_kg: the account's unused overshoot of rounded-up offsets, kg.
        over_budget: ``emissions_kg`` passed ``max_emissions_kg``.
        estimated_kg: the part of ``emissions_kg`` that is estimated, not yet
            measured by CodeCarbon, kg CO2eq (see
            :attr:`~carbonoffset.core.sources.Measurement.estimated_kg`); 0 in
            the final figures unless CodeCarbon itself started late.
        measured: ``False`` when the emissions source failed to start: ``energy_kwh`` and
            ``emissions_kg`` are then no measurement, and :meth:`metrics` leaves them out rather
            than log a false zero.
    """

    epoch: int | None
    energy_kwh: float
    emissions_kg: float
    offset_kg: float
    pending_kg: float
    credit_kg: float = 0.0
    over_budget: bool = False
    estimated_kg: float = 0.0
    measured: bool = True

    def metrics(self) -> dict[str, float]:
        """The logged metrics: ``carbon/energy_kwh``, ``carbon/emissions_kg``,
        ``carbon/offset_kg``, ``carbon/pending_kg`` and ``carbon/estimated_kg``
        (the estimated part of ``carbon/emissions_kg``). A run that is not :attr:`measured`
        logs only ``carbon/offset_kg`` and ``carbon/pending_kg``: its emissions are unknown, not 0."""
        measured = (
            {
                f"{METRIC_PREFIX}energy_kwh": self.energy_kwh,
                f"{METRIC_PREFIX}emissions_kg": self.emissions_kg,
            }
            if self.measured
            else {}
        )
        return {
            **measured,
            f"{METRIC_PREFIX}offset_kg": self.offset_kg,
            f"{METRIC_PREFIX}pending_kg": self.pending_kg,
            **({f"{METRIC_PREFIX}estimated_kg": self.estimated_kg} if self.measured else {}),
        }


@dataclasses.dataclass(frozen=True)
class RunReport:
    """Figures of a whole run (see :class:`EpochReport` for units).

    Attributes:
        run_id: ledger id of the run.
        account: ``"<environment>:<key fingerprint>"``.
        environment: ``"production"`` or ``"sandbox"``.
        epochs: epochs recorded.
        energy_kwh, emissions_kg: run totals.
        offset_kg, offset_lb: offsets the run bought or has in flight.
        confirmed_lb: pounds the API confirmed for this run.
        in_flight_lb: pounds still unconfirmed (settled by a later run or
            ``carbonoffset reconcile``).
        pending_kg, credit_kg: the account's position after the run.
        ledger_path: the ledger file, or its URL with the password shown as ``***``.
        offset_threshold: the ``offset_threshold`` in force, kg CO2eq.
        not_bought: why this run bought nothing (``None`` when it bought, or has in flight,
            at least one pound, and on ranks that do not offset), e.g.
            ``"auto_offset is off"``, ``"offset_api_key is not set"``, ``"below threshold"``.
        estimated_kg: the estimated part of ``emissions_kg`` (CodeCarbon's
            late-start estimate; see :class:`EpochReport`).
        spool_path: the local file holding the figures the ledger did not take (it did not
            answer; see :mod:`carbonoffset.core.ledger.spool`), ``None`` when they are all in it.
        measured: ``False`` when the emissions source failed to start: the figures are then no
            measurement (the ledger's status is ``unmeasured``), never a measured zero.

    :attr:`summary` is the line logged at the end of every run.
    """

    run_id: str | None
    account: str
    environment: str
    epochs: int
    energy_kwh: float
    emissions_kg: float
    offset_kg: float
    offset_lb: int
    confirmed_lb: int
    in_flight_lb: int
    pending_kg: float
    credit_kg: float
    ledger_path: Path | str | None
    offset_threshold: float = 0.5
    not_bought: str | None = None
    estimated_kg: float = 0.0
    spool_path: Path | None = None
    measured: bool = True

    def metrics(self) -> dict[str, float]:
        """The same metrics as :meth:`EpochReport.metrics`, for the whole run."""
        return EpochReport(
            None,
            self.energy_kwh,
            self.emissions_kg,
            self.offset_kg,
            self.pending_kg,
            estimated_kg=self.estimated_kg,
            measured=self.measured,
        ).metrics()

    @property
    def summary(self) -> str:
        """One line: what the run recorded, what it bought, what stays pending and why, and where
        the figures are, e.g. ``recorded 0.0123 kg CO2eq (0.0456 kWh) in 5 epochs; bought 1 lb
        (0.454 kg) this run; 0.0271 kg pending below the 0.5 kg threshold; ledger /path``."""
        epochs = f" in {self.epochs} epoch{'' if self.epochs == 1 else 's'}" if self.epochs else ""
        parts = [
            f"recorded {_fmt(self.emissions_kg)} kg CO2eq ({_fmt(self.energy_kwh)} kWh){epochs}"
            if self.measured
            else f"not measured{epochs}: emissions tracking failed to start (see the warning above), so this "
            "run's emissions are unknown, not zero (status 'unmeasured' in the ledger)"
        ]
        if self.confirmed_lb:
            parts.append(f"bought {self.confirmed_lb} lb ({_fmt(self.confirmed_lb * KG_PER_LB)} kg) this run")
        if self.in_flight_lb:
            parts.append(
                f"{self.in_flight_lb} lb ({_fmt(self.in_flight_lb * KG_PER_LB)} kg) not confirmed yet: "
                "the next run or `carbonoffset reconcile` settles it"
            )
        pending = f"{_fmt(self.pending_kg)} kg pending"
        if self.not_bought == NOT_BOUGHT_BELOW_THRESHOLD:
            parts.append(
                f"bought nothing this run: {pending} below the {self.offset_threshold:g} kg threshold"
            )
        elif self.not_bought is not None:
            parts.append(f"bought nothing this run: {self.not_bought}; {pending}")
        elif self.pending_kg > 0:
            below = self.pending_kg < self.offset_threshold
            parts.append(pending + (f" below the {self.offset_threshold:g} kg threshold" if below else ""))
        else:
            parts.append("nothing pending")
        if self.credit_kg > 0:
            parts.append(f"credit {_fmt(self.credit_kg)} kg")
        if self.spool_path is not None:  # where the figures are: not (all) in the ledger
            parts.append(
                f"the ledger {self.ledger_path} did not answer: the figures are kept on local disk in "
                f"{self.spool_path} (account {self.account}) until the next run that opens it, or "
                "`carbonoffset ledger replay`, writes them"
            )
        elif self.ledger_path is not None:
            parts.append(f"ledger {self.ledger_path} (account {self.account})")
        return "; ".join(parts)


#: :attr:`RunReport.not_bought` when the account's pending emissions are below ``offset_threshold``.
NOT_BOUGHT_BELOW_THRESHOLD = "below threshold"


def _fmt(value: float) -> str:
    """Three significant figures, so micrograms do not print as 0.000000."""
    return f"{value:.3g}"


def not_bought(
    *,
    pending_kg: float,
    credit_kg: float,
    offset_threshold: float,
    can_offset: bool,
    key_refused: bool,
    auto_offset: bool,
    offset_refused: bool,
    ended: str | None,
    outage: bool,
    running: bool,
) -> str:
    """Why a run that bought nothing (on global rank 0) bought nothing: :attr:`RunReport.not_bought`.

    Args:
        pending_kg, credit_kg: the account's position, kg CO2eq.
        offset_threshold: the ``offset_threshold`` in force, kg CO2eq.
        can_offset: ``offset_api_key`` is set.
        key_refused: 1ClickImpact refused the key.
        auto_offset: ``auto_offset`` is on.
        offset_refused: 1ClickImpact refused one of the run's offsets (state ``failed``).
        ended: how the run ended (e.g. ``"failed, without a final offset"``), ``None`` while running.
        outage: the ledger did not answer (its figures are kept on local disk).
        running: the run is still going.
    """
    if not can_offset:
        return "offset_api_key is not set"
    if key_refused:
        return "1ClickImpact refused offset_api_key (see the error above)"
    if not auto_offset:
        return "auto_offset is off (`carbonoffset offset` buys what is pending)"
    if offset_refused:
        return "1ClickImpact refused the offset (see the error above)"
    if pending_kg <= 0:
        covered = "the credit of an earlier rounded-up offset covers it"
        return covered if credit_kg > 0 else "nothing is pending"
    if ended is not None and "without a final offset" in ended:
        return f"the run ended {ended}"
    if pending_kg < offset_threshold:
        return NOT_BOUGHT_BELOW_THRESHOLD
    if outage:  # offsets are decided only from the ledger itself
        return "the ledger did not answer, and offsets are decided only from it"
    if running:
        return "the run is still going"
    return "the offset did not finish within offset_timeout (see the warning above)"
