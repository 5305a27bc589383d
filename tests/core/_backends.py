"""Direct SQL on a test ledger of either backend (to stage states a test needs, or to read raw rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa


def raw_engine(target: Path | str) -> sa.Engine:
    if isinstance(target, Path):
        return sa.create_engine(f"sqlite:///{target}", connect_args={"timeout": 30})
    return sa.create_engine(target.replace("postgresql://", "postgresql+psycopg://", 1))


def execute(target: Path | str, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement in its own transaction; the rows it returns, if any."""
    engine = raw_engine(target)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(sql), params or {})
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()
