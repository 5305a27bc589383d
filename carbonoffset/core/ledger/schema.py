"""The ledger's tables (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Schema versions (stored in ``meta.schema_version``; migrated in place, see
:mod:`carbonoffset.core.ledger.store`):

1. runs, records, offsets.
2. ``offsets.last_sent`` (resend grace) and the resume links of ``runs``.
3. ``runs.details`` (JSON text) and ``runs.host``; the ``accounts`` table whose row a writer
   locks to decide an offset (the account lock across hosts).
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa

from carbonoffset.core.ledger.records import OffsetState

SCHEMA_VERSION: Final[int] = 3
APPLICATION_ID: Final[int] = 0x434F4646  # "COFF", stored in the SQLite header
APPLICATION_NAME: Final[str] = "carbonoffset"  # meta.application on database servers

metadata = sa.MetaData()

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("account", sa.Text, nullable=False),
    sa.Column("environment", sa.Text, nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("started_utc", sa.Text, nullable=False),
    sa.Column("ended_utc", sa.Text),
    sa.Column("status", sa.Text, nullable=False, server_default="running"),
    sa.Column("emissions_kg", sa.Double, nullable=False, server_default="0"),
    sa.Column("energy_kwh", sa.Double, nullable=False, server_default="0"),
    sa.Column("epochs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("nodes", sa.Integer, nullable=False, server_default="1"),
    sa.Column("resumed_from", sa.Text),
    sa.Column("base_emissions_kg", sa.Double, nullable=False, server_default="0"),
    sa.Column("base_energy_kwh", sa.Double, nullable=False, server_default="0"),
    sa.Column("details", sa.Text),
    sa.Column("host", sa.Text),
    sa.Index("runs_by_account", "account"),
    sa.Index("runs_by_root", "resumed_from"),
)

records = sa.Table(
    "records",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("epoch", sa.Integer),
    sa.Column("emissions_kg", sa.Double, nullable=False),
    sa.Column("energy_kwh", sa.Double, nullable=False),
    sa.Column("recorded_utc", sa.Text, nullable=False),
    sa.Index("records_by_run", "run_id"),
)

offsets = sa.Table(
    "offsets",
    metadata,
    sa.Column("offset_id", sa.Text, primary_key=True),
    sa.Column("account", sa.Text, nullable=False),
    sa.Column("environment", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text),
    sa.Column("amount_lb", sa.Integer, sa.CheckConstraint("amount_lb >= 1"), nullable=False),
    sa.Column("amount_kg", sa.Double, nullable=False),
    sa.Column(
        "state",
        sa.Text,
        # "state IN ('intent', 'unknown', 'confirmed', 'failed')": the same text as before the enum
        sa.CheckConstraint(f"state IN ({', '.join(repr(state.value) for state in OffsetState)})"),
        nullable=False,
    ),
    sa.Column("created_utc", sa.Text, nullable=False),
    sa.Column("updated_utc", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("owner", sa.Text),
    sa.Column("lease_until", sa.Double),
    sa.Column("user_id", sa.Text),
    sa.Column("time_utc", sa.Text),
    sa.Column("carbon_captured", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("last_sent", sa.Double),
    sa.Index("offsets_by_account", "account", "state"),
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("environment", sa.Text, nullable=False),
    sa.Column("created_utc", sa.Text, nullable=False),
)

REQUIRED_TABLES: Final[frozenset[str]] = frozenset({"meta", "runs", "records", "offsets"})
