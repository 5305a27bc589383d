"""Copying a ledger (e.g. a SQLite file into a team's PostgreSQL database), ids kept.

Idempotent: rows already in the target with the same content are left alone, so copying twice
changes nothing. A row whose id the target holds with other content is a conflict: nothing
is copied then (one transaction), and the error names the first conflicting rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa

from carbonoffset.core.ledger import schema

_TABLES: tuple[tuple[sa.Table, str], ...] = (
    (schema.runs, "run_id"),
    (schema.records, "id"),
    (schema.offsets, "offset_id"),
    (schema.accounts, "account"),
)


@dataclasses.dataclass(frozen=True)
class CopyResult:
    """Rows copied and rows the target already had (identical), per table."""

    copied: dict[str, int]
    identical: dict[str, int]


class LedgerConflictError(ValueError):
    """The target holds rows with the same ids as the source but other content; nothing was copied."""


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal rows (floats equal to 1e-12 relative: SQLite and PostgreSQL both store doubles)."""
    for key, value in a.items():
        other = b.get(key)
        if isinstance(value, float) and isinstance(other, float):
            if abs(value - other) > 1e-12 * max(1.0, abs(value)):
                return False
        elif value != other:
            return False
    return True


def copy_ledger(source: Any, target: Any, *, batch: int = 5000) -> CopyResult:
    """Copy every run, record, offset and account of ``source`` into ``target`` (both open
    :class:`~carbonoffset.core.ledger.Ledger` objects), keeping their ids.

    Raises:
        LedgerConflictError: a row id in both with different content (nothing copied).
    """
    with source._transaction() as src:
        rows = {
            table.name: [dict(r) for r in src.execute(sa.select(table)).mappings().all()] for table, _ in _TABLES
        }
    copied: dict[str, int] = {}
    identical: dict[str, int] = {}
    with target._transaction(write=True, durable=True) as dst:
        conflicts: list[str] = []
        new_rows: dict[str, list[dict[str, Any]]] = {}
        for table, key in _TABLES:
            existing = {r[key]: dict(r) for r in dst.execute(sa.select(table)).mappings().all()}
            new_rows[table.name] = []
            identical[table.name] = 0
            for row in rows[table.name]:
                there = existing.get(row[key])
                if there is None:
                    new_rows[table.name].append(row)
                elif _same(row, there):
                    identical[table.name] += 1
                elif len(conflicts) < 5:
                    conflicts.append(f"{table.name} {key}={row[key]}")
        if conflicts:
            raise LedgerConflictError(
                f"the target ledger {target.location} holds other content under the same ids ("
                + ", ".join(conflicts)
                + "); nothing was copied. Copy into an empty database, or into the ledger it was copied to before"
            )
        for table, _ in _TABLES:
            items = new_rows[table.name]
            for start in range(0, len(items), batch):
                dst.execute(table.insert(), items[start : start + batch])
            copied[table.name] = len(items)
        if target.dialect == "postgresql":  # new records continue after the copied ids
            dst.execute(
                sa.text(
                    "SELECT setval(pg_get_serial_sequence('records', 'id'), GREATEST((SELECT MAX(id) FROM records), 1))"
                )
            )
    return CopyResult(copied, identical)
