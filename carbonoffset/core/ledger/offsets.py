"""Balances and offsets: the account lock, intents, leases and their heartbeat, outcomes.

Across hosts the guarantees rest on the database, not on any host's clock or memory:

* an offset amount is decided and its intent written in one transaction that holds the
  account's row in ``accounts`` (``SELECT ... FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``), so no
  other writer on any host can decide from the same pending balance;
* the process settling an offset holds a lease (``owner``, ``lease_until``) that it renews
  while it works (:meth:`OffsetsMixin.renew`, the heartbeat); leases and ``last_sent`` are
  times on the ledger's clock (the PostgreSQL server's), so hosts' clocks need not agree;
* another process takes an offset over only once its lease expired, or its owner is known
  to be gone (same host identity and PID namespace), and in both cases only after the resend
  grace since the last capture was sent; the offsetter then looks the capture up before
  sending anything (:mod:`carbonoffset.core.offsetter`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import sqlalchemy as sa

from carbonoffset.core.ledger import schema
from carbonoffset.core.ledger.identity import owner, owner_gone
from carbonoffset.core.ledger.records import (
    DEFAULT_RESEND_GRACE_S,
    OFFSET_FIELDS,
    OPEN_STATES,
    Balance,
    OffsetRecord,
    OffsetState,
    utc_now,
)
from carbonoffset.core.ledger.runs import RunsMixin
from carbonoffset.core.ledger.store import dialect_insert
from carbonoffset.core.units import KG_PER_LB

offsets_t, runs_t, accounts_t = schema.offsets, schema.runs, schema.accounts

# The reads after each record write (see ``runs.py``), built once with bound parameters.
_ACCOUNT: sa.BindParameter[str] = sa.bindparam("account")
_RECORDED = sa.select(sa.func.coalesce(sa.func.sum(runs_t.c.emissions_kg), 0)).where(runs_t.c.account == _ACCOUNT)
_OFFSET_KG = sa.select(
    sa.func.coalesce(sa.func.sum(sa.case((offsets_t.c.state == OffsetState.CONFIRMED, offsets_t.c.amount_kg))), 0),
    sa.func.coalesce(sa.func.sum(sa.case((offsets_t.c.state.in_(OPEN_STATES), offsets_t.c.amount_kg))), 0),
).where(offsets_t.c.account == _ACCOUNT)
_RUN_OFFSET_KG = sa.select(sa.func.coalesce(sa.func.sum(offsets_t.c.amount_kg), 0)).where(
    offsets_t.c.run_id == sa.bindparam("run_id"), offsets_t.c.state != OffsetState.FAILED
)


def _offset(row: sa.Row[tuple[object, ...]] | None) -> OffsetRecord | None:
    return OffsetRecord(**dict(row._mapping)) if row is not None else None


class OffsetsMixin(RunsMixin):
    """Balances and offsets (part of :class:`~carbonoffset.core.ledger.Ledger`)."""

    # ----------------------------------------------------------------- balances
    def balance(self, account: str) -> Balance:
        """The account's recorded, offset, in-flight and pending kg (all its runs, on every host)."""
        with self._transaction() as conn:
            return self._balance(conn, account)

    @staticmethod
    def _balance(conn: sa.Connection, account: str) -> Balance:
        recorded = conn.execute(_RECORDED, {"account": account}).scalar_one()
        confirmed, in_flight = conn.execute(_OFFSET_KG, {"account": account}).one()
        return Balance(account, float(recorded), float(confirmed), float(in_flight))

    def accounts(self) -> list[str]:
        """Every account that has a run or an offset."""
        query = sa.union(sa.select(runs_t.c.account), sa.select(offsets_t.c.account)).order_by("account")
        with self._transaction() as conn:
            return [str(row[0]) for row in conn.execute(query)]

    def position(self, account: str, run_id: str | None) -> tuple[Balance, float, float]:
        """The account's :class:`Balance`, the run's recorded emissions (kg) and its offsets bought
        or in flight (kg), read in one transaction (a consistent view)."""
        with self._transaction() as conn:
            balance = self._balance(conn, account)
            run_kg = offset_kg = 0.0
            if run_id is not None:
                run_kg = self._run_totals(conn, run_id)[0]
                offset_kg = self._run_offset_kg(conn, run_id)
        return balance, run_kg, offset_kg

    @staticmethod
    def _run_offset_kg(conn: sa.Connection, run_id: str) -> float:
        return float(conn.execute(_RUN_OFFSET_KG, {"run_id": run_id}).scalar_one())

    def run_offset_kg(self, run_id: str) -> float:
        """kg of offsets (confirmed or in flight) triggered by ``run_id``."""
        with self._transaction() as conn:
            return self._run_offset_kg(conn, run_id)

    # ------------------------------------------------------------------ offsets
    def _lock_account(self, conn: sa.Connection, account: str, environment: str) -> None:
        """Hold the account's row until the transaction ends: one decider per account, on any host."""
        conn.execute(
            dialect_insert(self.dialect, accounts_t)
            .values(account=account, environment=environment, created_utc=utc_now())
            .on_conflict_do_nothing()
        )
        conn.execute(sa.select(accounts_t.c.account).where(accounts_t.c.account == account).with_for_update())

    def create_intent(
        self,
        *,
        account: str,
        environment: str,
        run_id: str | None,
        amount_lb_for: Callable[[float], int],
        min_pending_kg: float,
        lease_s: float,
    ) -> OffsetRecord | None:
        """Decide an amount and durably write its intent, atomically (the account locked).

        Args:
            account: the account to offset.
            environment: ``"production"`` or ``"sandbox"`` (stored for reports).
            run_id: the run that triggered the offset, if any.
            amount_lb_for: ``callable(pending_kg) -> int`` giving whole pounds to buy for the
                current pending amount (floor or ceil).
            min_pending_kg: do nothing unless pending >= this (kg).
            lease_s: seconds this process owns the offset before another process may take it
                over (renewed by :meth:`renew` and on each attempt).

        Returns:
            The new intent, or ``None`` when nothing is due.
        """
        with self._transaction(write=True, durable=True) as conn:
            self._lock_account(conn, account, environment)
            pending = self._balance(conn, account).pending_kg
            if pending <= 0 or pending < min_pending_kg:
                return None
            amount_lb = int(amount_lb_for(pending))
            if amount_lb < 1:
                return None
            now = utc_now()
            record = OffsetRecord(
                offset_id=uuid.uuid4().hex,
                account=account,
                environment=environment,
                run_id=run_id,
                amount_lb=amount_lb,
                amount_kg=amount_lb * KG_PER_LB,
                state=OffsetState.INTENT,
                created_utc=now,
                updated_utc=now,
                attempts=0,
                owner=owner(),
                lease_until=self._clock(conn) + lease_s,
                user_id=None,
                time_utc=None,
                carbon_captured=None,
                last_error=None,
            )
            conn.execute(offsets_t.insert().values({name: getattr(record, name) for name in OFFSET_FIELDS}))
        return record

    def claim(
        self, offset_id: str, *, lease_s: float, resend_grace_s: float = DEFAULT_RESEND_GRACE_S
    ) -> OffsetRecord | None:
        """Take (or renew) ownership of an open offset for ``lease_s`` seconds.

        Another process's offset can be taken over when its lease expired or its owner process
        (same host identity and PID namespace) is gone (e.g. ``kill -9``), and in both cases
        only once ``resend_grace_s`` seconds have passed since a capture for it was last sent:
        until then the server may still act on that request, and a look-up could not see it yet.

        Returns:
            The claimed offset, or ``None`` when it is closed or owned elsewhere.
        """
        me = owner()
        with self._transaction(write=True) as conn:
            record = _offset(
                conn.execute(sa.select(offsets_t).where(offsets_t.c.offset_id == offset_id).with_for_update()).first()
            )
            if record is None or record.state not in OPEN_STATES:
                return None
            now = self._clock(conn)
            if record.owner != me and not self._claimable(record, now, resend_grace_s):
                return None
            conn.execute(
                offsets_t.update()
                .where(offsets_t.c.offset_id == offset_id)
                .values(owner=me, lease_until=now + lease_s, attempts=offsets_t.c.attempts + 1, updated_utc=utc_now())
            )
            return _offset(conn.execute(sa.select(offsets_t).where(offsets_t.c.offset_id == offset_id)).first())

    @staticmethod
    def _claimable(record: OffsetRecord, now: float, resend_grace_s: float) -> bool:
        if record.last_sent is not None and now - record.last_sent < resend_grace_s:
            return False
        if record.lease_until is None or record.lease_until < now:
            return True
        return owner_gone(record.owner)

    def renew(self, offset_id: str, *, lease_s: float) -> bool:
        """The heartbeat: extend this process's lease on an open offset to ``lease_s`` from now.

        Returns:
            ``False`` when the offset is closed or no longer this process's.
        """
        with self._transaction(write=True) as conn:
            now = self._clock(conn)
            result = conn.execute(
                offsets_t.update()
                .where(
                    offsets_t.c.offset_id == offset_id,
                    offsets_t.c.owner == owner(),
                    offsets_t.c.state.in_(OPEN_STATES),
                )
                .values(lease_until=now + lease_s)
            )
            return bool(result.rowcount)

    def mark_sent(self, offset_id: str) -> None:
        """Durably note that a capture for ``offset_id`` is about to be sent (starts the resend grace)."""
        with self._transaction(write=True, durable=True) as conn:
            conn.execute(
                offsets_t.update().where(offsets_t.c.offset_id == offset_id).values(last_sent=self._clock(conn))
            )

    def release(self, offset_id: str) -> None:
        """Give up ownership of an open offset so another process may finish it at once."""
        with self._transaction(write=True) as conn:
            conn.execute(
                offsets_t.update()
                .where(offsets_t.c.offset_id == offset_id, offsets_t.c.owner == owner())
                .values(lease_until=0)
            )

    def mark_unknown(self, offset_id: str, *, error: str) -> None:
        """The outcome of the last call is unknown; the amount stays in flight."""
        self._set_state(offset_id, OffsetState.UNKNOWN, error=error)

    def mark_failed(self, offset_id: str, *, error: str) -> None:
        """The API definitely refused; the amount returns to pending."""
        self._set_state(offset_id, OffsetState.FAILED, error=error)

    def mark_confirmed(self, offset_id: str, *, user_id: str, time_utc: str, carbon_captured: int) -> None:
        """The API captured the offset; store its receipt."""
        with self._transaction(write=True, durable=True) as conn:
            conn.execute(
                offsets_t.update()
                .where(offsets_t.c.offset_id == offset_id)
                .values(
                    state=OffsetState.CONFIRMED,
                    user_id=user_id,
                    time_utc=time_utc,
                    carbon_captured=carbon_captured,
                    updated_utc=utc_now(),
                    last_error=None,
                    lease_until=None,
                )
            )

    def _set_state(self, offset_id: str, state: OffsetState, *, error: str) -> None:
        with self._transaction(write=True, durable=True) as conn:
            conn.execute(
                offsets_t.update()
                .where(offsets_t.c.offset_id == offset_id, offsets_t.c.state.in_(OPEN_STATES))
                .values(state=state, last_error=error[:500], updated_utc=utc_now())
            )

    def offset(self, offset_id: str) -> OffsetRecord | None:
        """The offset ``offset_id``, or ``None``."""
        with self._transaction() as conn:
            return _offset(conn.execute(sa.select(offsets_t).where(offsets_t.c.offset_id == offset_id)).first())

    def offsets(
        self, account: str | None = None, *, states: tuple[str, ...] | None = None, run_id: str | None = None
    ) -> list[OffsetRecord]:
        """Offsets, oldest first, filtered by account, states and/or run."""
        query = sa.select(offsets_t).order_by(offsets_t.c.created_utc, offsets_t.c.offset_id)
        if account is not None:
            query = query.where(offsets_t.c.account == account)
        if states:
            query = query.where(offsets_t.c.state.in_(states))
        if run_id is not None:
            query = query.where(offsets_t.c.run_id == run_id)
        with self._transaction() as conn:
            return [OffsetRecord(**dict(row)) for row in conn.execute(query).mappings().all()]

    def move_runs(self, *, from_account: str, to_account: str) -> int:
        """Move every run of ``from_account`` to ``to_account`` (e.g. runs recorded without a key,
        or under a mistyped key, adopted by the account that will offset them).

        Allowed only while ``from_account`` has no offset other than ``failed`` ones: its runs
        are then wholly pending, and moving them neither loses nor double counts anything.

        Returns:
            The number of runs moved.

        Raises:
            ValueError: the accounts are equal, or ``from_account`` has open or confirmed offsets.
        """
        if from_account == to_account:
            raise ValueError("from_account and to_account are the same account")
        if from_account.split(":", 1)[0] != to_account.split(":", 1)[0]:
            raise ValueError(
                f"{from_account} and {to_account} are in different environments: sandbox purchases never "
                "offset production emissions (or the other way round)"
            )
        environment = to_account.split(":", 1)[0]
        with self._transaction(write=True, durable=True) as conn:
            self._lock_account(conn, from_account, environment)
            self._lock_account(conn, to_account, environment)
            busy = conn.execute(
                sa.select(sa.func.count()).where(offsets_t.c.account == from_account, offsets_t.c.state != OffsetState.FAILED)
            ).scalar_one()
            if busy:
                raise ValueError(
                    f"account {from_account} has {busy} offset(s) bought or in flight; only an account whose "
                    "offsets all failed (or that has none) can hand its runs over"
                )
            result = conn.execute(
                runs_t.update().where(runs_t.c.account == from_account).values(account=to_account, environment=environment)
            )
            return int(result.rowcount)
