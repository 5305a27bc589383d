"""What the ledger returns: balances, offsets and runs (plain frozen dataclasses), and small helpers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
from collections.abc import Iterable
from typing import Any, Final

DEFAULT_RESEND_GRACE_S: Final[float] = 300.0
"""Seconds after a capture was sent during which no other process may take the offset over and
look it up: a request abandoned at its deadline may still be acted on by the server for a while,
and a look-up cannot see a request the server has not processed yet."""


class OffsetState(str, enum.Enum):
    """The state of an offset in the ledger (see :mod:`carbonoffset.core.ledger`).

    A ``str`` enum, like Python 3.11's ``enum.StrEnum`` (whose ``str()`` and ``format()`` it
    keeps on 3.10 too): each member *is* its text, so it equals that text
    (``OffsetState.CONFIRMED == "confirmed"``), prints as it, and the database column and every
    JSON document hold the same text as before there was an enum.
    """

    INTENT = "intent"
    """Written before the API call, with the amount decided; in flight."""
    UNKNOWN = "unknown"
    """The call's outcome is not known yet (timeout, connection error, 5xx); in flight, looked up
    before any new capture."""
    CONFIRMED = "confirmed"
    """The API captured it; the receipt is stored."""
    FAILED = "failed"
    """Definitely refused (4xx); the amount returns to pending."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


OPEN_STATES: Final[tuple[OffsetState, ...]] = (OffsetState.INTENT, OffsetState.UNKNOWN)
"""The states of an offset still in flight (neither pending nor bought)."""


def utc_now() -> str:
    """Current UTC time as ISO 8601 with microseconds and ``Z``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_amounts(**amounts: float) -> None:
    """Raise ``ValueError`` naming the first amount that is negative, infinite or NaN."""
    for name, value in amounts.items():
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")


@dataclasses.dataclass(frozen=True)
class Balance:
    """An account's position (kg CO2eq), pooled over every run, job and host of the account.

    Attributes:
        account: ``"<environment>:<key fingerprint>"``.
        recorded_kg: emissions recorded by every run of the account.
        offset_kg: offsets confirmed by the API.
        in_flight_kg: offsets written as intent or of unknown outcome.
    """

    account: str
    recorded_kg: float
    offset_kg: float
    in_flight_kg: float

    @property
    def balance_kg(self) -> float:
        """``recorded_kg - offset_kg - in_flight_kg`` (negative means credit)."""
        return self.recorded_kg - self.offset_kg - self.in_flight_kg

    @property
    def pending_kg(self) -> float:
        """Emissions not yet offset nor in flight (>= 0)."""
        return max(self.balance_kg, 0.0)

    @property
    def credit_kg(self) -> float:
        """Overshoot of rounded-up offsets not yet used (>= 0)."""
        return max(-self.balance_kg, 0.0)


@dataclasses.dataclass(frozen=True)
class OffsetRecord:
    """One row of the ``offsets`` table; ``state`` is an :class:`OffsetState` (text read from the
    database is turned into one).

    ``owner`` is ``"<host identity>:<PID namespace>:<PID>"`` of the process holding the lease;
    ``lease_until`` and ``last_sent`` are seconds since the epoch on the ledger's clock (the
    database server's for PostgreSQL, this host's for SQLite).
    """

    offset_id: str
    account: str
    environment: str
    run_id: str | None
    amount_lb: int
    amount_kg: float
    state: OffsetState
    created_utc: str
    updated_utc: str
    attempts: int
    owner: str | None
    lease_until: float | None
    user_id: str | None
    time_utc: str | None
    carbon_captured: int | None
    last_error: str | None
    last_sent: float | None = None

    def __post_init__(self) -> None:
        # rows read from the database hold the state's text
        object.__setattr__(self, "state", OffsetState(self.state))


OFFSET_FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(OffsetRecord))


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A training run: one row of the ``runs`` table, or (from :meth:`Ledger.run` and
    :meth:`Ledger.runs`) a run with its resumed segments folded in.

    Attributes:
        run_id: the run's id (UUID4 hex unless given).
        account, environment, label: as given to :meth:`Ledger.start_run`.
        started_utc, ended_utc: ISO 8601 UTC times (``ended_utc`` ``None`` while running).
        status: ``running`` | ``finished`` | ``failed`` | ``interrupted`` (the latest segment's).
        emissions_kg: cumulative emissions, kg CO2eq: of the run with all its segments, or
            for a segment row only what that segment measured beyond its base.
        energy_kwh: the same for energy, kWh.
        epochs: epochs recorded (the most any segment reached).
        nodes: nodes that measured it.
        resumed_from: for a segment row, the run it continues; ``None`` for a run.
        base_emissions_kg, base_energy_kwh: for a segment row, the run's figures it started
            from (not included in its own ``emissions_kg``/``energy_kwh``).
        segments: ledger rows of the run (1, plus one per resume).
        details: free JSON-compatible facts about the run (:meth:`Ledger.set_run_details`);
            empty when none. For a folded run, the segments' details over the run's own.
        host: host identity of the process that started the row (``None`` in ledgers
            written before schema 3).
    """

    run_id: str
    account: str
    environment: str
    label: str | None
    started_utc: str
    ended_utc: str | None
    status: str
    emissions_kg: float
    energy_kwh: float
    epochs: int
    nodes: int
    resumed_from: str | None = None
    base_emissions_kg: float = 0.0
    base_energy_kwh: float = 0.0
    segments: int = 1
    details: dict[str, object] = dataclasses.field(default_factory=dict)
    host: str | None = None


RUN_COLUMNS: Final[tuple[str, ...]] = (
    "run_id",
    "account",
    "environment",
    "label",
    "started_utc",
    "ended_utc",
    "status",
    "emissions_kg",
    "energy_kwh",
    "epochs",
    "nodes",
    "resumed_from",
    "base_emissions_kg",
    "base_energy_kwh",
)


def run_from_row(row: Any) -> RunRecord:
    """A :class:`RunRecord` from a ``runs`` row mapping (``details`` JSON text decoded)."""
    values = {name: row[name] for name in RUN_COLUMNS}
    values["emissions_kg"] = float(values["emissions_kg"])
    values["energy_kwh"] = float(values["energy_kwh"])
    values["base_emissions_kg"] = float(values["base_emissions_kg"])
    values["base_energy_kwh"] = float(values["base_energy_kwh"])
    return RunRecord(**values, details=decode_details(row.get("details")), host=row.get("host"))


def decode_details(text: object) -> dict[str, object]:
    """The ``details`` column as a dict (empty for ``NULL`` or anything that is not a JSON object)."""
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return dict(value) if isinstance(value, dict) else {}


def whole_runs(records: Iterable[RunRecord]) -> list[RunRecord]:
    """Fold resumed segments (see :meth:`Ledger.resume_run`) into their runs, keeping the rows' order.

    A run's totals add up its rows (a segment stores only what it measured beyond its base);
    its status and end are those of its latest segment; its epochs and nodes the most any
    segment reached.
    """
    parts: dict[str, list[RunRecord]] = {}
    for record in records:
        parts.setdefault(record.resumed_from or record.run_id, []).append(record)
    runs = []
    for run_id, rows_of_run in parts.items():
        root = next((r for r in rows_of_run if r.resumed_from is None), None)
        if root is not None and len(rows_of_run) == 1:
            runs.append(root)
            continue
        first = root or dataclasses.replace(rows_of_run[0], run_id=run_id, resumed_from=None)
        # the latest segment; of equal start times the later row (rows come in insertion order)
        latest = max(enumerate(rows_of_run), key=lambda pair: (pair[1].started_utc, pair[0]))[1]
        details: dict[str, object] = {}
        for row in ([root] if root else []) + [r for r in rows_of_run if r is not root]:
            details.update(row.details)
        runs.append(
            dataclasses.replace(
                first,
                ended_utc=latest.ended_utc,
                status=latest.status,
                emissions_kg=sum(r.emissions_kg for r in rows_of_run),
                energy_kwh=sum(r.energy_kwh for r in rows_of_run),
                epochs=max(r.epochs for r in rows_of_run),
                nodes=max(r.nodes for r in rows_of_run),
                resumed_from=None,
                base_emissions_kg=0.0,
                base_energy_kwh=0.0,
                segments=len(rows_of_run),
                details=details,
            )
        )
    return runs
