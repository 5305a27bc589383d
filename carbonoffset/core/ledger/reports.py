"""Team figures from a ledger: breakdowns by account, project, label, host or run (for ``report --by``)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

from carbonoffset.core.ledger.records import OPEN_STATES, OffsetRecord, OffsetState, RunRecord
from carbonoffset.core.units import KG_PER_LB

GROUPINGS: Final[tuple[str, ...]] = ("account", "project", "label", "host", "run")
"""What ``report --by`` accepts. ``project`` is the run's ``project_name`` detail when it has one
(the CodeCarbon drop-in's), else its label."""


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text.rstrip("Z")).replace(tzinfo=dt.timezone.utc) if text else None


def group_of(run: RunRecord, by: str) -> str:
    """The group a run belongs to for ``by`` (one of :data:`GROUPINGS`)."""
    if by == "account":
        return run.account
    if by == "host":
        return run.host or "(unknown host)"
    if by == "label":
        return run.label or "(no label)"
    if by == "project":
        project = run.details.get("project_name") or run.details.get("project")
        return str(project) if project else (run.label or "(no project)")
    return run.run_id


def run_row(run: RunRecord, offsets: list[OffsetRecord]) -> dict[str, Any]:
    """One run's figures: times (ISO 8601 UTC), ``duration_s`` (``None`` while running), status,
    ``energy_kwh``, ``emissions_kg``, whole pounds bought (``offset_lb``) and in flight, and the
    receipts of its confirmed offsets (offset id, as sent to 1ClickImpact, and capture time)."""
    started, ended = _time(run.started_utc), _time(run.ended_utc)
    confirmed = [o for o in offsets if o.state == OffsetState.CONFIRMED]
    return {
        "run_id": run.run_id,
        "account": run.account,
        "label": run.label,
        "project": group_of(run, "project"),
        "host": run.host,
        "started_utc": run.started_utc,
        "ended_utc": run.ended_utc,
        "duration_s": (ended - started).total_seconds() if started and ended else None,
        "status": run.status,
        "segments": run.segments,
        "epochs": run.epochs,
        "energy_kwh": run.energy_kwh,
        "emissions_kg": run.emissions_kg,
        "offset_lb": sum(o.amount_lb for o in confirmed),
        "in_flight_lb": sum(o.amount_lb for o in offsets if o.state in OPEN_STATES),
        "receipts": [
            {"offset_id": o.offset_id, "amount_lb": o.amount_lb, "time_utc": o.time_utc} for o in confirmed
        ],
        "details": run.details,
    }


def breakdown(ledger: Any, by: str) -> list[dict[str, Any]]:
    """The ledger's figures grouped ``by`` one of :data:`GROUPINGS`, in order of first run.

    Group rows hold ``group``, ``runs``, ``energy_kwh``, ``emissions_kg``, ``offset_lb`` /
    ``offset_kg`` (confirmed) and ``in_flight_lb`` of the offsets its runs triggered; for
    ``account`` also the pooled ``pending_kg`` and ``credit_kg`` (and offsets not tied to a run).

    Raises:
        ValueError: ``by`` is not one of :data:`GROUPINGS`.
    """
    if by not in GROUPINGS:
        raise ValueError(f"--by must be one of {', '.join(GROUPINGS)} (got {by!r})")
    runs = ledger.runs()
    offsets = ledger.offsets()
    by_run: dict[str | None, list[OffsetRecord]] = {}
    for offset in offsets:
        by_run.setdefault(offset.run_id, []).append(offset)
    if by == "run":
        return [run_row(run, by_run.get(run.run_id, [])) for run in runs]
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        row = groups.setdefault(
            group_of(run, by),
            {"group": group_of(run, by), "runs": 0, "energy_kwh": 0.0, "emissions_kg": 0.0, "offset_lb": 0,
             "in_flight_lb": 0},
        )
        row["runs"] += 1
        row["energy_kwh"] += run.energy_kwh
        row["emissions_kg"] += run.emissions_kg
        if by != "account":
            for offset in by_run.get(run.run_id, []):
                row["offset_lb"] += offset.amount_lb if offset.state == OffsetState.CONFIRMED else 0
                row["in_flight_lb"] += offset.amount_lb if offset.state in OPEN_STATES else 0
    if by == "account":
        for account in ledger.accounts():
            row = groups.setdefault(
                account,
                {"group": account, "runs": 0, "energy_kwh": 0.0, "emissions_kg": 0.0, "offset_lb": 0,
                 "in_flight_lb": 0},
            )
            mine = [o for o in offsets if o.account == account]
            row["offset_lb"] = sum(o.amount_lb for o in mine if o.state == OffsetState.CONFIRMED)
            row["in_flight_lb"] = sum(o.amount_lb for o in mine if o.state in OPEN_STATES)
            balance = ledger.balance(account)
            row["pending_kg"], row["credit_kg"] = balance.pending_kg, balance.credit_kg
    for row in groups.values():
        row["offset_kg"] = row["offset_lb"] * KG_PER_LB
    return list(groups.values())
