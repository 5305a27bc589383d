"""Runs and their resumed segments: cumulative recording, run look-ups, history and details."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping

import sqlalchemy as sa

from carbonoffset.core.ledger import schema
from carbonoffset.core.ledger.identity import host_identity
from carbonoffset.core.ledger.records import (
    RunRecord,
    check_amounts,
    decode_details,
    run_from_row,
    utc_now,
    whole_runs,
)
from carbonoffset.core.ledger.store import Store, dialect_insert

runs_t, records_t = schema.runs, schema.records

# The statements of a record write (at most one a second per run) and of the reads after it
# (``offsets.py``), built once with bound parameters. Built on every call, they took most of the
# write's CPU: 3.9 ms for a record and its read-back on SQLite, 1.1 ms built once (2026-12-01,
# 2-core VM), taken from a training that keeps every core busy. SQLAlchemy caches the compiled form.
_ROW: sa.BindParameter[str] = sa.bindparam("row_id")
_ROW_FIGURES = (
    sa.select(
        runs_t.c.emissions_kg, runs_t.c.energy_kwh, runs_t.c.epochs, runs_t.c.base_emissions_kg, runs_t.c.base_energy_kwh
    )
    .where(runs_t.c.run_id == _ROW)
    .with_for_update()
)
_RAISE_FIGURES = (
    runs_t.update()
    .where(runs_t.c.run_id == _ROW)
    .values(emissions_kg=sa.bindparam("new_kg"), energy_kwh=sa.bindparam("new_kwh"), epochs=sa.bindparam("new_epochs"))
)
_ADD_RECORD = records_t.insert()
_ROOT: sa.BindParameter[str] = sa.bindparam("root")
_RUN_TOTALS = sa.select(
    sa.func.coalesce(sa.func.sum(runs_t.c.emissions_kg), 0),
    sa.func.coalesce(sa.func.sum(runs_t.c.energy_kwh), 0),
    sa.func.coalesce(sa.func.max(runs_t.c.epochs), 0),
).where(sa.or_(runs_t.c.run_id == _ROOT, runs_t.c.resumed_from == _ROOT))


class RunsMixin(Store):
    """Runs, segments and epoch records (part of :class:`~carbonoffset.core.ledger.Ledger`)."""

    def start_run(
        self,
        *,
        account: str,
        environment: str,
        run_id: str | None = None,
        label: str | None = None,
        nodes: int = 1,
        started_utc: str | None = None,
    ) -> str:
        """Create a run (or reopen ``run_id`` when it exists: its figures then continue from the
        ledger's; to resume from a checkpoint use :meth:`resume_run`).

        Args:
            started_utc: the start time to store (ISO 8601 UTC; default now): a run written
                late from the local spool keeps its real start.

        Returns:
            The run id (a new UUID4 hex when ``run_id`` is ``None``).
        """
        run_id = run_id or uuid.uuid4().hex
        insert = dialect_insert(self.dialect, runs_t).values(
            run_id=run_id,
            account=account,
            environment=environment,
            label=label,
            started_utc=started_utc or utc_now(),
            nodes=nodes,
            host=host_identity(),
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[runs_t.c.run_id],
            set_={"status": "running", "ended_utc": None, "nodes": insert.excluded.nodes},
        )
        with self._transaction(write=True) as conn:
            conn.execute(upsert)
        return run_id

    def record(
        self, run_id: str, *, emissions_kg: float, energy_kwh: float, epoch: int | None = None
    ) -> float:
        """Record the run's **cumulative** emissions and energy.

        Args:
            run_id: a run created by :meth:`start_run`.
            emissions_kg: cumulative emissions of the run so far, kg CO2eq, >= 0
                (for a segment, its base included: the row stores what exceeds it).
            energy_kwh: cumulative energy of the run so far, kWh, >= 0.
            epoch: the epoch the figures belong to (0-based), if any.

        Returns:
            The increase in the run's emissions in kg (0.0 when the total was already recorded).

        Raises:
            ValueError: a negative or non-finite value.
            KeyError: unknown ``run_id``.
            LedgerUnavailableError: the ledger is locked or unreachable (nothing was written).
        """
        check_amounts(emissions_kg=emissions_kg, energy_kwh=energy_kwh)
        with self._transaction(write=True) as conn:
            increase = self._raise_totals(conn, run_id, emissions_kg, energy_kwh, epoch)
        if increase is None:
            raise KeyError(f"unknown run {run_id!r}")
        return increase

    @staticmethod
    def _raise_totals(
        conn: sa.Connection, row_id: str, emissions_kg: float, energy_kwh: float, epoch: int | None
    ) -> float | None:
        """In a write transaction: keep the larger of the row's figures and these cumulative ones
        (minus the row's base: 0 except for segments), noting a change in ``records``.

        Returns:
            The increase in the row's emissions (kg), or ``None`` when there is no such row.
        """
        row = conn.execute(_ROW_FIGURES, {"row_id": row_id}).first()
        if row is None:
            return None
        old_kg, old_kwh, old_epochs, base_kg, base_kwh = row
        new_kg = max(old_kg, emissions_kg - base_kg)
        new_kwh = max(old_kwh, energy_kwh - base_kwh)
        epochs = max(old_epochs, epoch + 1) if epoch is not None else old_epochs
        if new_kg == old_kg and new_kwh == old_kwh and epochs == old_epochs:
            return 0.0
        conn.execute(_RAISE_FIGURES, {"row_id": row_id, "new_kg": new_kg, "new_kwh": new_kwh, "new_epochs": epochs})
        conn.execute(
            _ADD_RECORD,
            {"run_id": row_id, "epoch": epoch, "emissions_kg": new_kg, "energy_kwh": new_kwh, "recorded_utc": utc_now()},
        )
        return float(new_kg - old_kg)

    @staticmethod
    def _root_of(conn: sa.Connection, run_id: str) -> str | None:
        """The run a row belongs to (itself, or the run a segment continues); ``None``: no such row."""
        value = conn.execute(
            sa.select(sa.func.coalesce(runs_t.c.resumed_from, runs_t.c.run_id)).where(runs_t.c.run_id == run_id)
        ).scalar()
        return str(value) if value is not None else None

    @staticmethod
    def _run_totals(conn: sa.Connection, root: str) -> tuple[float, float, int]:
        """The emissions (kg), energy (kWh) and epochs of run ``root`` over all its rows."""
        kg, kwh, epochs = conn.execute(_RUN_TOTALS, {"root": root}).one()
        return float(kg), float(kwh), int(epochs)

    def end_run(self, run_id: str, *, status: str = "finished") -> None:
        """Mark a run ended (``status``: ``finished`` | ``failed`` | ``interrupted``)."""
        with self._transaction(write=True) as conn:
            conn.execute(
                runs_t.update().where(runs_t.c.run_id == run_id).values(status=status, ended_utc=utc_now())
            )

    def set_run_details(self, run_id: str, details: Mapping[str, object]) -> None:
        """Merge ``details`` (JSON-compatible values; ``None`` allowed) into the run row's
        ``details``: given keys replace those stored, others stay.

        Raises:
            KeyError: unknown ``run_id``.
            ValueError: a value that JSON cannot hold (nothing is written).
        """
        try:  # refuse what cannot be stored before opening a transaction
            json.dumps(dict(details))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"run details must be JSON values: {exc}") from None
        with self._transaction(write=True) as conn:
            row = conn.execute(
                sa.select(runs_t.c.details).where(runs_t.c.run_id == run_id).with_for_update()
            ).first()
            if row is None:
                raise KeyError(f"unknown run {run_id!r}")
            merged = decode_details(row[0])
            merged.update(details)
            conn.execute(
                runs_t.update().where(runs_t.c.run_id == run_id).values(details=json.dumps(merged, sort_keys=True))
            )

    def run(self, run_id: str) -> RunRecord | None:
        """The run ``run_id`` with its resumed segments folded in, or ``None``.

        A segment's id gives the run it belongs to.
        """
        with self._transaction() as conn:
            root = self._root_of(conn, run_id)
            if root is None:
                return None
            rows = conn.execute(
                sa.select(runs_t)
                .where(sa.or_(runs_t.c.run_id == root, runs_t.c.resumed_from == root))
                .order_by(runs_t.c.started_utc, runs_t.c.run_id)
            ).mappings().all()
        return whole_runs(run_from_row(row) for row in rows)[0]

    def runs(self, account: str | None = None) -> list[RunRecord]:
        """All runs (of one account when given), oldest first, with their resumed segments folded
        in (:attr:`RunRecord.segments` counts a run's ledger rows)."""
        query = sa.select(runs_t).order_by(runs_t.c.started_utc, runs_t.c.run_id)
        if account:
            query = query.where(runs_t.c.account == account)
        with self._transaction() as conn:
            rows = conn.execute(query).mappings().all()
        return whole_runs(run_from_row(row) for row in rows)

    def rows(self, account: str | None = None) -> list[RunRecord]:
        """The ``runs`` table's rows as they are (segments not folded in), oldest first."""
        query = sa.select(runs_t).order_by(runs_t.c.started_utc, runs_t.c.run_id)
        if account:
            query = query.where(runs_t.c.account == account)
        with self._transaction() as conn:
            return [run_from_row(row) for row in conn.execute(query).mappings().all()]

    def resume_run(
        self,
        run_id: str,
        *,
        account: str,
        environment: str,
        label: str | None = None,
        nodes: int = 1,
        at_least_kg: float = 0.0,
        at_least_kwh: float = 0.0,
        checkpointed_by: str | None = None,
        segment_id: str | None = None,
    ) -> RunRecord:
        """Continue run ``run_id`` (e.g. from a checkpoint), in a new **segment** when it exists.

        A segment is a ledger row of its own that starts from the run's totals (its *base*) and
        stores only what is measured beyond them; the run and the account count every segment.
        So two fits resumed from the same checkpoint at the same time both count in full, and a
        fit resumed again from an older checkpoint after a crash adds what it measures to what
        the crashed attempt recorded. Record cumulative figures (base included) under the
        returned ``run_id``; offsets and checkpoints keep using the run's id. Everything
        happens in one transaction (the run's row locked), so processes resuming at the same
        moment, on any host, each get their own segment.

        Args:
            run_id: the run to continue (a segment's id means its run). When the ledger does
                not know it (a new run with a chosen id, or a checkpoint written with another
                ledger) it is created, holding ``at_least_*``, and returned itself: no segment.
            account, environment, label, nodes: as for :meth:`start_run`.
            at_least_kg: cumulative emissions the checkpoint holds, kg CO2eq, >= 0. If the row
                that wrote the checkpoint (``checkpointed_by``) holds less (its last epochs never
                reached the ledger), it is brought up to that figure; recording it again later
                changes nothing.
            at_least_kwh: the same for energy, kWh, >= 0.
            checkpointed_by: the row (run or segment id) whose process saved the checkpoint;
                ``None`` means the run's own row.
            segment_id: the id of the new segment, chosen by a session that could not reach the
                ledger when the fit resumed and recorded from the checkpoint's figures meanwhile
                (its writes kept on local disk): the segment is then always made, even for a run
                the ledger does not know, with the checkpoint's figures as its base; when it
                exists already (a replay), it is returned as it is.

        Returns:
            The row to record to: ``run_id`` (a new segment's id, or the run's when it was
            created), ``resumed_from`` (the run; ``None`` when it was created),
            ``base_emissions_kg`` / ``base_energy_kwh`` (the figures to start from: the
            checkpoint's or the run's totals, whichever is larger) and ``epochs`` (of the run so far).

        Raises:
            ValueError: a negative or non-finite ``at_least_*``.
        """
        check_amounts(at_least_kg=at_least_kg, at_least_kwh=at_least_kwh)
        now = utc_now()
        with self._transaction(write=True) as conn:
            if segment_id is not None:
                made = conn.execute(sa.select(runs_t).where(runs_t.c.run_id == segment_id)).mappings().first()
                if made is not None:
                    return run_from_row(made)
            root = self._root_of(conn, run_id)
            if root is None:
                conn.execute(
                    dialect_insert(self.dialect, runs_t)
                    .values(
                        run_id=run_id,
                        account=account,
                        environment=environment,
                        label=label,
                        started_utc=now,
                        emissions_kg=at_least_kg,
                        energy_kwh=at_least_kwh,
                        nodes=nodes,
                        host=host_identity(),
                    )
                    .on_conflict_do_nothing()
                )
                if at_least_kg > 0 or at_least_kwh > 0:
                    conn.execute(
                        records_t.insert().values(
                            run_id=run_id,
                            epoch=None,
                            emissions_kg=at_least_kg,
                            energy_kwh=at_least_kwh,
                            recorded_utc=now,
                        )
                    )
                found = conn.execute(sa.select(runs_t).where(runs_t.c.run_id == run_id)).mappings().one()
                if segment_id is None:
                    return dataclasses.replace(
                        run_from_row(found), base_emissions_kg=at_least_kg, base_energy_kwh=at_least_kwh
                    )
                root = run_id
            # the run's row is the lock that keeps concurrent resumes of it apart
            conn.execute(sa.select(runs_t.c.run_id).where(runs_t.c.run_id == root).with_for_update())
            writer = checkpointed_by or root
            if self._root_of(conn, writer) == root:
                # the checkpoint may hold more than its writer's row got (writes still queued when the
                # process died): record it there now, as that row's own late write would have
                self._raise_totals(conn, writer, at_least_kg, at_least_kwh, None)
            total_kg, total_kwh, epochs = self._run_totals(conn, root)
            base_kg, base_kwh = max(total_kg, at_least_kg), max(total_kwh, at_least_kwh)
            if segment_id is not None:  # the session's figures went on from the checkpoint's
                base_kg, base_kwh = at_least_kg, at_least_kwh
            segment = segment_id or uuid.uuid4().hex
            conn.execute(
                runs_t.insert().values(
                    run_id=segment,
                    account=account,
                    environment=environment,
                    label=label,
                    started_utc=now,
                    epochs=epochs,
                    nodes=nodes,
                    resumed_from=root,
                    base_emissions_kg=base_kg,
                    base_energy_kwh=base_kwh,
                    host=host_identity(),
                )
            )
            found = conn.execute(sa.select(runs_t).where(runs_t.c.run_id == segment)).mappings().one()
        return run_from_row(found)

    def history(self, account: str | None = None) -> list[tuple[str, float]]:
        """``(recorded_utc, cumulative emissions_kg of the account)`` rows, oldest first (for plots)."""
        query = (
            sa.select(records_t.c.recorded_utc, records_t.c.emissions_kg, records_t.c.run_id)
            .select_from(records_t.join(runs_t, records_t.c.run_id == runs_t.c.run_id))
            .order_by(records_t.c.id)
        )
        if account:
            query = query.where(runs_t.c.account == account)
        with self._transaction() as conn:
            rows = conn.execute(query).tuples().all()
        # turn per-run cumulative values into an account-wide cumulative series
        last: dict[str, float] = {}
        total = 0.0
        series: list[tuple[str, float]] = []
        for when, kg, run_id in rows:
            total += kg - last.get(run_id, 0.0)
            last[run_id] = kg
            series.append((when, total))
        return series
