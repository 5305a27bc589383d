"""A run's carbon statement: its emissions and offsets for a model card and for a paper.

Everything here is built from the ledger (:class:`~carbonoffset.core.ledger.Ledger`) alone, so it
works the same for every framework, after the fact:

* :func:`co2_eq_emissions`: the Hugging Face Hub's ``co2_eq_emissions`` model-card metadata,
  emissions in **grams** (:func:`~carbonoffset.core.units.kg_to_g`);
* :func:`card_section`: the markdown section "Carbon emissions and offsets";
* :func:`update_model_card`: both merged into a ``README.md`` (front matter kept, the section
  replaced on a rerun), with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`;
* :func:`statement`: one paragraph for a paper.

Offsets are bought per account, not per run (one purchase may cover several runs' emissions,
and a rounded-up one leaves credit for later runs). :func:`run_carbon` shares them out among
the account's runs first come, first served: runs in the order they started, offsets (not
failed) in the order they were made. So the figures of all runs add up to the account's, and a
run's offset is what actually covers it, with the receipts of the purchases that do.

Sandbox purchases are never presented as offsets: the sandbox captures no carbon.

Importing this module imports no framework and not ``huggingface_hub`` (only
:func:`update_model_card` and :func:`metadata_yaml` do, when called); the API key is never read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from carbonoffset.core.ledger import Ledger, OffsetRecord, OffsetState, RunRecord
from carbonoffset.core.units import kg_to_g

#: Title of the markdown section, and the HTML comments around it (so a rerun replaces it).
SECTION_TITLE: Final[str] = "Carbon emissions and offsets"
SECTION_BEGIN: Final[str] = "<!-- carbonoffset:carbon-statement:begin -->"
SECTION_END: Final[str] = "<!-- carbonoffset:carbon-statement:end -->"
#: The model-card metadata key the Hub reads emissions from.
METADATA_KEY: Final[str] = "co2_eq_emissions"
#: ``run`` value meaning the run that started last.
LATEST: Final[str] = "latest"
#: The status of a run whose emissions source failed to start (its figures are no measurement).
UNMEASURED: Final[str] = "unmeasured"

_EPS_KG: Final[float] = 1e-12
_SECTION_RE = re.compile(re.escape(SECTION_BEGIN) + r".*?" + re.escape(SECTION_END) + r"\n?", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Receipt:
    """One 1ClickImpact purchase that covers (part of) a run's emissions.

    Attributes:
        offset_id: the ledger's id of the purchase.
        state: ``confirmed`` (captured, with a receipt) or ``intent`` / ``unknown`` (not
            confirmed yet: ``carbonoffset reconcile`` settles it).
        amount_lb: whole pounds bought; amount_kg: the same in kg (``amount_lb * 0.45359237``).
        covered_kg: how much of this run's emissions it covers, kg CO2eq (> 0).
        user_id, time_utc: 1ClickImpact's receipt of a confirmed capture (``None`` otherwise).
    """

    offset_id: str
    state: OffsetState
    amount_lb: int
    amount_kg: float
    covered_kg: float
    user_id: str | None
    time_utc: str | None

    @property
    def confirmed(self) -> bool:
        return self.state == OffsetState.CONFIRMED


@dataclasses.dataclass(frozen=True)
class RunCarbon:
    """A run's figures, what covers them, and what they were measured on (from the ledger).

    Attributes:
        run: the ledger's run (segments folded in; ``details`` from :meth:`Ledger.set_run_details`).
        offset_kg: emissions of the run covered by confirmed purchases, kg CO2eq.
        in_flight_kg: emissions covered by purchases not confirmed yet, kg CO2eq.
        pending_kg: emissions not covered by any purchase, kg CO2eq
            (``emissions_kg = offset_kg + in_flight_kg + pending_kg``).
        receipts: the purchases covering the run, oldest first.

    In the sandbox these are test purchases: :attr:`sandbox` is true and nothing is offset.
    """

    run: RunRecord
    offset_kg: float
    in_flight_kg: float
    pending_kg: float
    receipts: tuple[Receipt, ...]

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def emissions_kg(self) -> float:
        return self.run.emissions_kg

    @property
    def energy_kwh(self) -> float:
        return self.run.energy_kwh

    @property
    def environment(self) -> str:
        return self.run.environment

    @property
    def sandbox(self) -> bool:
        """The run's account is a sandbox one: its purchases are tests, no carbon was captured."""
        return self.run.environment != "production"

    @property
    def details(self) -> Mapping[str, Any]:
        return self.run.details


# --------------------------------------------------------------------------- gathering
def resolve_run_id(ledger: Ledger, run: str) -> str:
    """The run id that ``run`` names: an id, a unique prefix of one, or ``"latest"`` (the run that
    started last).

    Raises:
        KeyError: no run (or no unique run) matches; the message says what to do.
    """
    if run != LATEST and ledger.run(run) is not None:
        return run
    runs = ledger.runs()
    if run == LATEST:
        if not runs:
            raise KeyError(f"the ledger {ledger.location} has no runs yet")
        return runs[-1].run_id
    matches = [r.run_id for r in runs if r.run_id.startswith(run)] if run else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeyError(f"run id prefix {run!r} matches {len(matches)} runs; give more of the id")
    raise KeyError(f"no run {run!r} in the ledger {ledger.location}; `--run latest` names the last run")


def run_carbon(ledger: Ledger, run_id: str) -> RunCarbon:
    """The carbon statement's figures for ``run_id`` (see the module notes for how offsets are shared).

    Raises:
        KeyError: the ledger has no run ``run_id``.
    """
    run = ledger.run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in the ledger {ledger.location}")
    runs = ledger.runs(run.account)
    offsets = [o for o in ledger.offsets(run.account) if o.state != OffsetState.FAILED]
    return _share_offsets(run, runs, offsets)


def _share_offsets(run: RunRecord, runs: Sequence[RunRecord], offsets: Sequence[OffsetRecord]) -> RunCarbon:
    """First come, first served: the run covers ``[start, end)`` of the account's cumulative
    emissions, each offset ``[before, after)`` of its cumulative purchases; overlaps cover."""
    start = 0.0
    for other in runs:
        if other.run_id == run.run_id:
            break
        start += other.emissions_kg
    end = start + run.emissions_kg
    receipts: list[Receipt] = []
    before = 0.0
    for offset in offsets:
        after = before + offset.amount_kg
        covered = min(end, after) - max(start, before)
        if covered > _EPS_KG:
            receipts.append(
                Receipt(
                    offset.offset_id,
                    offset.state,
                    offset.amount_lb,
                    offset.amount_kg,
                    covered,
                    offset.user_id if offset.state == OffsetState.CONFIRMED else None,
                    offset.time_utc if offset.state == OffsetState.CONFIRMED else None,
                )
            )
        before = after
        if before >= end:
            break
    confirmed = sum(r.covered_kg for r in receipts if r.confirmed)
    in_flight = sum(r.covered_kg for r in receipts if not r.confirmed)
    pending = max(0.0, run.emissions_kg - confirmed - in_flight)
    return RunCarbon(run, confirmed, in_flight, pending if pending > _EPS_KG else 0.0, tuple(receipts))


# --------------------------------------------------------------------------- formatting
_MASS_UNITS: Final = ((1e6, "t"), (1e3, "kg"), (1.0, "g"), (1e-3, "mg"), (1e-6, "µg"))
_ENERGY_UNITS: Final = ((1e9, "GWh"), (1e6, "MWh"), (1e3, "kWh"), (1.0, "Wh"), (1e-3, "mWh"))


def significant(value: float, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` significant figures, without an exponent (``"1.20"``, ``"123"``,
    ``"1230"``)."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    text = f"{value:#.{digits}g}"
    if "e" in text:  # large or small: write the digits out
        exponent = math.floor(math.log10(abs(float(text))))
        text = f"{float(text):.{max(0, digits - 1 - exponent)}f}"
    return text.rstrip(".")


def _with_prefix(value: float, units: Sequence[tuple[float, str]]) -> str:
    if value == 0:
        return f"0 {next(unit for factor, unit in units if factor == 1.0)}"
    rounded = float(f"{value:.3g}")
    for factor, unit in units:
        if abs(rounded) >= factor:
            return f"{significant(rounded / factor)} {unit}"
    factor, unit = units[-1]
    return f"{significant(value / factor)} {unit}"


def format_mass(emissions_kg: float) -> str:
    """A mass of CO2eq with an SI prefix and 3 significant figures: ``0.00123`` -> ``"1.23 g"``
    (units t, kg, g, mg, µg)."""
    return _with_prefix(kg_to_g(emissions_kg), _MASS_UNITS)


def format_energy(energy_kwh: float) -> str:
    """Energy with an SI prefix and 3 significant figures: ``0.0221`` -> ``"22.1 Wh"`` (GWh .. mWh)."""
    return _with_prefix(energy_kwh * 1000.0, _ENERGY_UNITS)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{significant(seconds)} s"
    if seconds < 7200:
        return f"{significant(seconds / 60)} min"
    return f"{significant(seconds / 3600)} h"


def _number(details: Mapping[str, Any], key: str) -> float:
    """``details[key]`` when it is a number > 0, else 0."""
    value = details.get(key)
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0.0
    )


def _text(details: Mapping[str, Any], key: str) -> str | None:
    value = details.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def location(carbon: RunCarbon) -> str | None:
    """Where CodeCarbon placed the run (region, country; cloud provider and region), or ``None``."""
    details = carbon.details
    parts = [p for p in (_text(details, "region"), _text(details, "country_name")) if p]
    if not parts and _text(details, "country_iso_code"):
        parts = [str(_text(details, "country_iso_code"))]
    cloud = [p for p in (_text(details, "cloud_provider"), _text(details, "cloud_region")) if p]
    if str(details.get("on_cloud", "N")).upper() == "Y" and cloud:
        parts.append(f"cloud {' '.join(cloud)}")
    return ", ".join(dict.fromkeys(parts)) or None


def hardware(carbon: RunCarbon) -> str | None:
    """What CodeCarbon measured (GPUs, CPU, RAM; per node when several), or ``None``."""
    details = carbon.details
    parts = []
    gpu_model = _text(details, "gpu_model")
    if gpu_model:  # CodeCarbon writes "<count> x <name>" already
        parts.append(
            gpu_model if re.match(r"^\d+ x ", gpu_model) else f"{details.get('gpu_count') or 1} x {gpu_model}"
        )
    cpu_model = _text(details, "cpu_model")
    if cpu_model:
        count = details.get("cpu_count")
        parts.append(
            f"{cpu_model} ({int(count)} CPU threads)"
            if isinstance(count, (int, float)) and count
            else cpu_model
        )
    ram = details.get("ram_total_size")
    if isinstance(ram, (int, float)) and ram > 0:
        parts.append(f"{significant(float(ram))} GB RAM")
    if not parts:
        return None
    text = ", ".join(parts)
    nodes = carbon.run.nodes
    return f"{nodes} nodes, the first of them: {text}" if nodes > 1 else text


def source(carbon: RunCarbon) -> str:
    """What measured the run: ``"CodeCarbon 3.3.2 via carbonoffset 0.1.0"``, or carbonoffset alone
    when CodeCarbon left no details (an injected emissions source)."""
    details = carbon.details
    ours = (
        f"carbonoffset {details['carbonoffset_version']}"
        if details.get("carbonoffset_version")
        else "carbonoffset"
    )
    codecarbon = _text(details, "codecarbon_version")
    return f"CodeCarbon {codecarbon} via {ours}" if codecarbon else ours


# --------------------------------------------------------------------------- model card
def co2_eq_emissions(carbon: RunCarbon, *, training_type: str | None = None) -> dict[str, Any]:
    """The ``co2_eq_emissions`` model-card metadata of the run (the fields the Hub reads).

    Args:
        carbon: from :func:`run_carbon`.
        training_type: e.g. ``"pre-training"`` or ``"fine-tuning"``; left out when ``None``.

    Returns:
        ``emissions`` in **grams** CO2eq (``kg_to_g`` of the ledger's figure, exact), ``source``,
        and, when known, ``training_type``, ``geographical_location`` and ``hardware_used``.

    Raises:
        ValueError: the run was not measured (status ``unmeasured``): its emissions are unknown,
            and a figure of 0 g would claim they were measured as zero.
    """
    if carbon.run.status == UNMEASURED:
        raise ValueError(
            f"run {carbon.run_id} was not measured (emissions tracking failed to start): its emissions "
            "are unknown, so it has no co2_eq_emissions for a model card"
        )
    data: dict[str, Any] = {"emissions": kg_to_g(carbon.emissions_kg), "source": source(carbon)}
    if training_type:
        data["training_type"] = training_type
    place, machine = location(carbon), hardware(carbon)
    if place:
        data["geographical_location"] = place
    if machine:
        data["hardware_used"] = machine
    return data


def _receipt_rows(carbon: RunCarbon) -> list[str]:
    rows = [
        "| Purchase | Amount | Covers of this run | State | Receipt `user_id` | Receipt `time_utc` |",
        "|---|---|---|---|---|---|",
    ]
    for r in carbon.receipts:
        state = r.state if r.confirmed else f"{r.state} (not confirmed yet)"
        rows.append(
            f"| `{r.offset_id}` | {r.amount_lb} lb ({format_mass(r.amount_kg)}) | {format_mass(r.covered_kg)} | "
            f"{state} | {f'`{r.user_id}`' if r.user_id else '-'} | {r.time_utc or '-'} |"
        )
    return rows


def card_section(carbon: RunCarbon) -> str:
    """The markdown section "Carbon emissions and offsets" (between :data:`SECTION_BEGIN` and
    :data:`SECTION_END`), ending with a newline."""
    run = carbon.run
    if run.status == UNMEASURED:  # its figures are no measurement: none is shown
        return (
            "\n".join(
                [
                    SECTION_BEGIN,
                    f"## {SECTION_TITLE}",
                    "",
                    f"> **Not measured:** emissions tracking failed to start for carbonoffset run "
                    f"`{run.run_id}`, so its energy and emissions are unknown (not zero).",
                    "",
                    SECTION_END,
                ]
            )
            + "\n"
        )
    rows = [
        ("Energy", format_energy(carbon.energy_kwh)),
        ("Emissions", f"{format_mass(carbon.emissions_kg)} CO2eq ({kg_to_g(carbon.emissions_kg)!r} g)"),
    ]
    if carbon.energy_kwh > 0:
        intensity = carbon.emissions_kg / carbon.energy_kwh * 1000
        rows.append(("Carbon intensity", f"{significant(intensity)} g CO2eq/kWh"))
    late_kg, late_s = _number(run.details, "late_start_kg"), _number(run.details, "late_start_s")
    if late_kg > 0:
        rows.append(
            (
                "Estimated",
                f"{format_mass(late_kg)} of it, the first {_duration(late_s)}, before CodeCarbon started",
            )
        )
    for label, value in (("Location", location(carbon)), ("Hardware", hardware(carbon))):
        if value:
            rows.append((label, value))
    mode = _text(run.details, "tracking_mode")
    if mode:
        rows.append(("Measured", f"CodeCarbon tracking mode `{mode}`"))
    rows.append(("Epochs", str(run.epochs)))
    if carbon.sandbox:
        bought = carbon.offset_kg + carbon.in_flight_kg
        rows.append(("Offset", "**none**: 1ClickImpact sandbox (test mode), no carbon was captured"))
        if bought:
            rows.append(("Sandbox test purchases", f"{format_mass(bought)} CO2eq of the run's emissions"))
        rows.append(("Not offset", f"{format_mass(carbon.emissions_kg)} CO2eq (all of it)"))
    else:
        rows.append(("Offset (1ClickImpact carbon capture)", f"{format_mass(carbon.offset_kg)} CO2eq"))
        if carbon.in_flight_kg:
            rows.append(("Offset bought, confirmation pending", f"{format_mass(carbon.in_flight_kg)} CO2eq"))
        rows.append(("Not yet offset", f"{format_mass(carbon.pending_kg)} CO2eq"))
    lines = [SECTION_BEGIN, f"## {SECTION_TITLE}", ""]
    if run.status == "running":
        lines += ["> **The run is still in progress:** these are its figures so far.", ""]
    elif run.status in ("failed", "interrupted"):
        lines += [f"> The training run {run.status} before its end: these are its figures up to then.", ""]
    if carbon.sandbox:
        lines += [
            "> **Sandbox:** this run's account uses 1ClickImpact's sandbox (test mode), whose purchases "
            "capture no carbon: none of these emissions is offset.",
            "",
        ]
    lines += [
        f"Training emitted **{format_mass(carbon.emissions_kg)} CO2eq** and used "
        f"**{format_energy(carbon.energy_kwh)}** of electricity, measured by {source(carbon)} "
        f"(carbonoffset run `{run.run_id}`).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in rows),
    ]
    if carbon.receipts:
        lines += [
            "",
            "Purchases covering this run"
            + (" (sandbox: test purchases, not offsets):" if carbon.sandbox else " (1ClickImpact receipts):"),
            "",
            *_receipt_rows(carbon),
        ]
    lines += ["", SECTION_END]
    return "\n".join(lines) + "\n"


def merge_section(text: str, section: str) -> str:
    """``text`` (a model card's markdown body) with our section replaced, or appended when absent."""
    if _SECTION_RE.search(text):
        return _SECTION_RE.sub(lambda _: section, text, count=1)
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section


def update_model_card(
    card_path: str | Path,
    run: Any,
    *,
    ledger: Ledger | str | Path | None = None,
    training_type: str | None = None,
) -> Path:
    """Write the run's ``co2_eq_emissions`` and section into a model card (``README.md``).

    An existing card keeps its front matter (other keys untouched) and its text; our section
    replaces the one a previous call wrote, or is appended. A missing card is created.

    Args:
        card_path: the card, e.g. ``"my-model/README.md"``.
        run: a :class:`~carbonoffset.core.session.RunReport` (e.g. a callback's ``final_report``,
            whose ledger is used), or a run id (prefix, or ``"latest"``).
        ledger: the ledger (object or file); default the report's, else the configured one.
        training_type: see :func:`co2_eq_emissions`.

    Returns:
        The card's path.

    Raises:
        ModuleNotFoundError: ``huggingface_hub`` is missing (``pip install carbonoffset[card]``).
        KeyError: the ledger has no such run.
        ValueError: the existing card's front matter is not a mapping.
    """
    run_id = getattr(run, "run_id", run)
    if not isinstance(run_id, str):
        raise ValueError(f"run must be a RunReport or a run id (got {run!r})")
    if ledger is None:
        ledger = getattr(run, "ledger_path", None)
    with _ledger(ledger) as book:
        carbon = run_carbon(book, resolve_run_id(book, run_id))
    return write_card(card_path, carbon, training_type=training_type)


def write_card(card_path: str | Path, carbon: RunCarbon, *, training_type: str | None = None) -> Path:
    """:func:`update_model_card` for figures already gathered."""
    model_card, card_data = _hub()
    path = Path(card_path)
    block = co2_eq_emissions(carbon, training_type=training_type)
    if path.is_file():
        card = model_card.load(path)
        card.data[METADATA_KEY] = block
    else:
        card = model_card(f"---\n{card_data(**{METADATA_KEY: block}).to_yaml()}\n---\n")
    card.text = merge_section(card.text, card_section(carbon))
    card.save(path)
    return path


def new_card(carbon: RunCarbon, *, training_type: str | None = None) -> str:
    """A model card holding only the run's metadata and section (``carbonoffset card``'s markdown)."""
    model_card, card_data = _hub()
    data = card_data(**{METADATA_KEY: co2_eq_emissions(carbon, training_type=training_type)})
    card = model_card(f"---\n{data.to_yaml()}\n---\n")
    card.text = "\n" + card_section(carbon)
    return str(card)


def metadata_yaml(carbon: RunCarbon, *, training_type: str | None = None) -> str:
    """The metadata block as YAML (``carbonoffset card --format yaml``), via ``ModelCardData``."""
    _, card_data = _hub()
    return (
        str(card_data(**{METADATA_KEY: co2_eq_emissions(carbon, training_type=training_type)}).to_yaml())
        + "\n"
    )


def as_json(carbon: RunCarbon, *, training_type: str | None = None) -> dict[str, Any]:
    """Everything as JSON values: the metadata block (``None`` for a run that was not measured),
    the section, the figures and receipts (kg, kWh)."""
    run = carbon.run
    return {
        METADATA_KEY: None if run.status == UNMEASURED else co2_eq_emissions(carbon, training_type=training_type),
        "section": card_section(carbon),
        "statement": statement(carbon),
        "run": {
            "run_id": run.run_id,
            "label": run.label,
            "status": run.status,
            "environment": run.environment,
            "started_utc": run.started_utc,
            "ended_utc": run.ended_utc,
            "epochs": run.epochs,
            "nodes": run.nodes,
            "energy_kwh": run.energy_kwh,
            "emissions_kg": run.emissions_kg,
            "offset_kg": 0.0 if carbon.sandbox else carbon.offset_kg,
            "in_flight_kg": 0.0 if carbon.sandbox else carbon.in_flight_kg,
            "pending_kg": run.emissions_kg if carbon.sandbox else carbon.pending_kg,
            "sandbox_purchases_kg": carbon.offset_kg + carbon.in_flight_kg if carbon.sandbox else 0.0,
            "details": dict(run.details),
        },
        "receipts": [dataclasses.asdict(r) for r in carbon.receipts],
    }


# --------------------------------------------------------------------------- statement
def _measured_by(carbon: RunCarbon) -> str:
    details = carbon.details
    codecarbon = _text(details, "codecarbon_version")
    if not codecarbon:
        return "measured by the emissions source given to carbonoffset (no CodeCarbon details were recorded)"
    text = f"measured with CodeCarbon {codecarbon}"
    mode = _text(details, "tracking_mode")
    if mode == "machine":
        text += " for the whole machine"
    elif mode:
        text += f" (tracking mode {mode})"
    machine = hardware(carbon)
    if machine:
        text += f", on {machine},"
    place = location(carbon)
    if place and carbon.energy_kwh > 0:
        text += (
            f" at the carbon intensity of {place} "
            f"({significant(carbon.emissions_kg / carbon.energy_kwh * 1000)} g CO2eq/kWh)"
        )
    return text.rstrip(",")


def _run_time(run: RunRecord) -> str | None:
    if run.segments != 1 or not run.ended_utc:
        return None
    try:
        started = dt.datetime.fromisoformat(run.started_utc.rstrip("Z"))
        ended = dt.datetime.fromisoformat(run.ended_utc.rstrip("Z"))
    except ValueError:
        return None
    seconds = (ended - started).total_seconds()
    return _duration(seconds) if seconds > 0 else None


def _receipt_list(receipts: Sequence[Receipt]) -> str:
    return "; ".join(f"user_id {r.user_id}, time_utc {r.time_utc}" for r in receipts)


def statement(carbon: RunCarbon) -> str:
    """One paragraph for a paper: the run's energy, emissions, how they were measured, and what
    offsets them (with receipts); figures with SI prefixes and 3 significant figures."""
    run = carbon.run
    took = _run_time(run)
    epochs = f"{run.epochs} epoch{'s' if run.epochs != 1 else ''}"
    if run.status == UNMEASURED:
        return (
            f"Training this model (carbonoffset run {run.run_id[:8]}, {epochs}) was not measured: emissions "
            "tracking failed to start, so its energy use and emissions are unknown."
        )
    head = (
        f"Training this model (carbonoffset run {run.run_id[:8]}, {epochs}"
        + (f", {took}" if took else "")
        + (", still running: figures so far" if run.status == "running" else "")
        + (f", {run.status} before its end" if run.status in ("failed", "interrupted") else "")
        + f") used {format_energy(carbon.energy_kwh)} of electricity and emitted "
        f"{format_mass(carbon.emissions_kg)} CO2eq, {_measured_by(carbon)}."
    )
    late_kg = _number(run.details, "late_start_kg")
    if late_kg > 0:
        head += (
            f" Of these emissions, {format_mass(late_kg)} CO2eq are an estimate for the first "
            f"{_duration(_number(run.details, 'late_start_s'))}, before CodeCarbon started measuring."
        )
    if carbon.sandbox:
        if carbon.receipts:
            tail = (
                f" Offsets for them were bought only in 1ClickImpact's sandbox (test mode; "
                f"{format_mass(carbon.offset_kg + carbon.in_flight_kg)} CO2eq): the sandbox captures no carbon, "
                "so these emissions are not offset."
            )
        else:
            tail = " These emissions are not offset."
        return head + tail
    confirmed = [r for r in carbon.receipts if r.confirmed]
    parts = []
    if carbon.offset_kg > 0:
        parts.append(
            f"{format_mass(carbon.offset_kg)} CO2eq were offset through 1ClickImpact's carbon capture "
            f"(receipt{'s' if len(confirmed) != 1 else ''}: {_receipt_list(confirmed)})"
        )
    if carbon.in_flight_kg > 0:
        parts.append(
            f"{format_mass(carbon.in_flight_kg)} CO2eq are covered by a 1ClickImpact purchase not confirmed yet"
        )
    if not parts:
        return head + " These emissions have not been offset."
    rest = (
        f"{format_mass(carbon.pending_kg)} CO2eq remain to be offset"
        if carbon.pending_kg > 0
        else "none remain"
    )
    return head + " Of these emissions, " + "; ".join(parts) + f"; {rest}."


# --------------------------------------------------------------------------- helpers
def _hub() -> tuple[Any, Any]:
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:
        raise ModuleNotFoundError(
            "model cards need huggingface_hub: pip install carbonoffset[card] (transformers installs it too)"
        ) from None
    return ModelCard, ModelCardData


class _ledger:
    """``with _ledger(x) as book``: ``x`` itself when a Ledger (left open), else the file opened."""

    def __init__(self, ledger: Ledger | str | Path | None) -> None:
        self._given = ledger if isinstance(ledger, Ledger) else None
        self._path = None if isinstance(ledger, Ledger) else ledger
        self._opened: Ledger | None = None

    def __enter__(self) -> Ledger:
        if self._given is not None:
            return self._given
        from carbonoffset.core.ledger.urls import normalize_location, unmask

        path = self._path
        if path is None:
            from carbonoffset.core.config import default_ledger_path, read_external_settings

            value = read_external_settings().get("offset_ledger")
            path = value if value else default_ledger_path()
        location = unmask(normalize_location(path))  # a report's URL has its password masked
        if isinstance(location, Path) and not location.exists():
            raise KeyError(f"no ledger at {location}; pass the ledger the run was recorded in")
        self._opened = Ledger(location)
        return self._opened

    def __exit__(self, *exc: object) -> None:
        if self._opened is not None:
            self._opened.close()
