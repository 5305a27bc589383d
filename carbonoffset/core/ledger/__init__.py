"""The durable ledger: runs, recorded emissions and offsets, in a SQLite file or on PostgreSQL.

Accounting model (all masses in kg CO2eq):

* A **run** holds the *cumulative* emissions measured for one training run. Recording a
  cumulative total keeps the maximum seen, so recording the same total twice (or an older,
  smaller one) never double counts. A run resumed from a checkpoint continues in a
  **segment**: a row of its own that stores only what was measured beyond its ``base`` (the
  run's figures it started from), so that any number of segments, concurrent or not, add up.
* An **offset** is a purchase of ``amount_lb`` whole pounds (``amount_kg = amount_lb *
  0.45359237``) in one of four states: ``intent`` (written before the API call), ``unknown``
  (the call's outcome is not known yet), ``confirmed`` (the API captured it) or ``failed``
  (definitely refused; the amount returns to pending).
* Per **account** (environment + key fingerprint), pooled over every run, job and host:
  ``balance = sum(run emissions) - sum(offsets not failed)``. ``pending_kg = max(balance, 0)``;
  ``credit_kg = max(-balance, 0)`` (from a rounded-up offset, used up by later emissions).

Parts: :mod:`.store` (opening, checks, migrations, transactions), :mod:`.runs` (runs and
segments), :mod:`.offsets` (balances, offsets and their leases), :mod:`.spool` (figures kept on
local disk while the ledger cannot be written), :mod:`.copy` (SQLite to PostgreSQL),
:mod:`.schema`, :mod:`.records`, :mod:`.identity`, :mod:`.urls`, :mod:`.filesystems`.
"""

from __future__ import annotations

import os

from carbonoffset.core.ledger.identity import PID_NAMESPACE, host_identity, owner
from carbonoffset.core.ledger.offsets import OffsetsMixin
from carbonoffset.core.ledger.records import (
    DEFAULT_RESEND_GRACE_S,
    OPEN_STATES,
    Balance,
    OffsetRecord,
    OffsetState,
    RunRecord,
    utc_now,
)
from carbonoffset.core.ledger.schema import APPLICATION_ID, SCHEMA_VERSION
from carbonoffset.core.ledger.urls import is_database_url, mask_password

__all__ = [
    "APPLICATION_ID",
    "DEFAULT_RESEND_GRACE_S",
    "OPEN_STATES",
    "PID_NAMESPACE",
    "SCHEMA_VERSION",
    "Balance",
    "Ledger",
    "OffsetRecord",
    "OffsetState",
    "RunRecord",
    "host_identity",
    "is_database_url",
    "mask_password",
    "owner",
    "utc_now",
]


class Ledger(OffsetsMixin):
    """Durable record of runs, emissions and offsets: a SQLite file or a PostgreSQL database.

    Thread-safe (one lock per object) and process- and host-safe (see
    :mod:`carbonoffset.core.ledger.offsets`).

    Args:
        location: a SQLite file path (created with its folder when missing; ``sqlite:///path``
            too) or a PostgreSQL URL (``postgresql://user:password@host:5432/dbname``,
            ``postgresql+psycopg://...``; needs ``pip install carbonoffset[postgresql]``). An
            empty database gets the schema.
        full_check: SQLite: check every page of an existing file when opening it (read-only
            ``PRAGMA quick_check``; about 0.3 s per million recorded epochs). With ``False``
            only the accounting tables (``meta``, ``runs``, ``offsets``) are checked at once,
            and the whole file too when it is at most :attr:`FULL_CHECK_MAX_BYTES`; the rest
            is checked by :meth:`verify`, which the first write runs if nobody did: nothing is
            written to a file before it has been found sound.
        busy_timeout_s: seconds a call waits for a lock held by another connection (SQLite's
            busy timeout, PostgreSQL's ``lock_timeout``) or for a server to answer a connection
            (at most 30), > 0; then it raises :class:`~carbonoffset.LedgerUnavailableError`.
        connect: for a server, connect and check the schema now (``False``: on first use).

    Raises:
        LedgerError: the file is not a SQLite database, is corrupt, belongs to another
            application, or was written by a newer carbonoffset; a server URL that is not
            PostgreSQL. The ledger is left untouched. :class:`LedgerUnavailableError` (a
            subclass): the server cannot be reached. No message contains the password.
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        *,
        full_check: bool = True,
        busy_timeout_s: float = 60.0,
        connect: bool = True,
    ) -> None:
        super().__init__(location, full_check=full_check, busy_timeout_s=busy_timeout_s, connect=connect)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
