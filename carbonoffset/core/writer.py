"""Global rank 0's side of a run: its row in the ledger, its writes, and the ledger's figures for it.

Every write goes through the ledger thread (:class:`~carbonoffset.core.workers.LedgerQueue`),
which keeps on local disk what the ledger does not take (:mod:`carbonoffset.core.ledger.spool`)
and, once an epoch's figures are in, lets the offset worker decide from the ledger. The figures
the reports show are the ledger's own sums (:meth:`Ledger.position`), read by that thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import LedgerUnavailableError
from carbonoffset.core.ledger import OPEN_STATES, Ledger, utc_now
from carbonoffset.core.ledger.spool import replay_left_over
from carbonoffset.core.sources import Measurement
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.core.workers import LedgerQueue, OffsetWorker, Warn

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Position:
    """The ledger as last read by a background thread (kg CO2eq): the account's balance, this
    run's recorded emissions and its offsets (bought or in flight). Epoch reports add the run's
    emissions recorded since (still queued for the ledger) to ``balance_kg``, so they need no
    ledger read."""

    balance_kg: float = 0.0
    run_kg: float = 0.0
    run_offset_kg: float = 0.0

    def pending_and_credit(self, emissions_kg: float) -> tuple[float, float]:
        """The account's pending and credit kg once the run's ``emissions_kg`` are all recorded."""
        balance_kg = self.balance_kg + max(0.0, emissions_kg - self.run_kg)
        return max(0.0, balance_kg), max(0.0, -balance_kg)


@dataclasses.dataclass(frozen=True)
class Bought:
    """A run's offsets in the ledger: ``offset_kg`` (kg CO2eq) and ``offset_lb`` (whole pounds)
    bought or in flight, ``in_flight_lb`` of them not confirmed yet; the account's
    ``pending_kg`` and ``credit_kg``."""

    pending_kg: float = 0.0
    credit_kg: float = 0.0
    offset_kg: float = 0.0
    offset_lb: int = 0
    in_flight_lb: int = 0


class RunWriter:
    """One session's ledger writes (global rank 0), in order, off the training thread.

    Args:
        config: the run's settings (account, environment, ledger path).
        ledger: an open ledger, or ``None`` to open ``config.ledger_path`` at :meth:`open`.
        warn: the session's warn-once (see :data:`~carbonoffset.core.workers.Warn`).
        offsets: the session's offset worker (told after each epoch's figures are in).
        timeout_s: seconds a ledger call waits for a lock or a server (then the spool takes it).
        write_delay_s, record_interval_s: see :class:`~carbonoffset.core.workers.LedgerQueue`.
    """

    def __init__(
        self,
        config: OffsetConfig,
        ledger: Ledger | None,
        *,
        warn: Warn,
        offsets: OffsetWorker,
        timeout_s: float,
        write_delay_s: float,
        record_interval_s: float,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.owns_ledger = ledger is None
        self._warn = warn
        self._offsets = offsets
        self._timeout_s = timeout_s
        self.queue = LedgerQueue(
            on_written=self._on_written,
            warn=warn,
            write_delay_s=write_delay_s,
            record_interval_s=record_interval_s,
            hang_s=timeout_s + 1.0,  # past one ledger call's own wait
        )
        self.position = Position()
        self._position_lock = threading.Lock()
        self.run_id: str | None = None  # the run (offsets and checkpoints use it)
        self.segment_id: str | None = None  # the ledger row written (the run's, or a segment's)

    def open(self) -> None:
        """Open the ledger (unless given) and hand it to the threads.

        The accounting tables are checked now, the whole file by the ledger thread (big files);
        a database server is first reached by the ledger thread.

        Raises:
            LedgerError: the ledger is corrupt or from a newer version.
        """
        if self.ledger is None and self.owns_ledger:
            self.ledger = Ledger(
                self.config.ledger_path, full_check=False, busy_timeout_s=self._timeout_s, connect=False
            )
        if self.ledger is not None:
            self.queue.attach(self.ledger)
            self._offsets.attach(self.ledger)

    # ------------------------------------------------------------ the run's row
    def start_new(self, *, label: str | None, nodes: int, wait_s: float) -> str:
        """A new run needs nothing from the ledger: its id is made here and the ledger thread
        writes it (or keeps it on local disk while the ledger does not answer), waiting at most
        ``wait_s`` for it so that the first epoch report shows the account's figures."""
        self.run_id = self.segment_id = uuid.uuid4().hex
        self.queue.queue(
            {
                "op": "start_run",
                "run_id": self.run_id,
                "account": self.config.account,
                "environment": self.config.offset_environment,
                "label": label,
                "nodes": nodes,
                "started_utc": utc_now(),
            },
            first=self._opening_job,
        )
        self.queue.wait(wait_s)
        return self.run_id

    def resume(
        self, run_id: str, *, label: str | None, nodes: int, base: Measurement, checkpointed_by: str | None
    ) -> tuple[Measurement, int] | None:
        """Continue ``run_id`` in a segment of its own (one transaction: concurrent resumes each
        get a segment), from ``base`` or the ledger's figures, whichever is more (see
        :meth:`Ledger.resume_run`).

        Returns:
            The figures the segment starts from and the epochs already recorded; ``None`` when
            the ledger could not be written (logged once): when it did not answer, the segment
            (from ``base``) and the fit's figures are written by the ledger thread once it does.
        """
        resumed: tuple[Measurement, int] | None = None
        if self.ledger is not None:
            try:
                segment = self.ledger.resume_run(
                    run_id,
                    account=self.config.account,
                    environment=self.config.offset_environment,
                    label=label,
                    nodes=nodes,
                    at_least_kg=base.emissions_kg,
                    at_least_kwh=base.energy_kwh,
                    checkpointed_by=checkpointed_by,
                )
                resumed = Measurement(segment.base_emissions_kg, segment.base_energy_kwh), segment.epochs
                self.run_id = segment.resumed_from or segment.run_id
                self.segment_id = segment.run_id
            except LedgerUnavailableError as exc:
                # locked, down or unreachable: the segment is made by the ledger thread when the
                # ledger answers (kept on local disk until then, like every write), and the fit
                # records from the checkpoint's figures meanwhile
                self.run_id, self.segment_id = run_id, uuid.uuid4().hex
                self.queue.queue(
                    {
                        "op": "resume_run",
                        "run_id": run_id,
                        "segment_id": self.segment_id,
                        "account": self.config.account,
                        "environment": self.config.offset_environment,
                        "label": label,
                        "nodes": nodes,
                        "at_least_kg": base.emissions_kg,
                        "at_least_kwh": base.energy_kwh,
                        "checkpointed_by": checkpointed_by,
                    }
                )
                self._warn(
                    "ledger",
                    "carbonoffset could not write its ledger (%s) as the run resumed; its figures are written "
                    "to the ledger when it answers (kept on local disk meanwhile); tracking continues",
                    exc,
                )
            except Exception as exc:  # noqa: BLE001
                self._warn("ledger", "carbonoffset could not write its ledger (%s); tracking continues", exc)
        self.refresh_quietly()
        self.queue.submit(self._verify_job)
        return resumed

    def record(
        self, figures: Measurement, *, label: str | None, epoch: int | None, final: bool = False
    ) -> None:
        """Queue the run's cumulative ``figures`` (the ledger keeps the maximum; ``final``: the
        run's last ones). See :meth:`~carbonoffset.core.workers.LedgerQueue.queue_record`: figures
        whose pending emissions reach ``offset_threshold`` are written at once, so an offset
        starts within milliseconds of the epoch that crossed it, however short the epochs."""
        pending_kg, _ = self.position.pending_and_credit(figures.emissions_kg)
        # until the ledger shows the offset in flight (pending then drops below the threshold), or
        # while the key is refused (no offset can start: no hurry)
        urgent = (
            pending_kg >= self.config.offset_threshold
            and self.config.auto_offset
            and self.config.can_offset
            and not self._offsets.auth_failed
        )
        self.queue.queue_record(
            {
                "op": "record",
                "run_id": self.segment_id,
                "account": self.config.account,
                "environment": self.config.offset_environment,
                "label": label,
                "emissions_kg": figures.emissions_kg,
                "energy_kwh": figures.energy_kwh,
                "epoch": epoch,
            },
            final=final,
            urgent=urgent,
        )

    def end(self, *, details: dict[str, Any], status: str, answered: bool, deadline: float) -> Path | None:
        """Queue the run's details and its end with ``status``; wait for them while the ledger
        ``answered`` (until ``deadline``, monotonic, or one ledger call's wait at least).

        Returns:
            The spool file where what the ledger thread had not written was kept, or ``None``.
        """
        self.queue.queue({"op": "details", "run_id": self.segment_id, "details": details})
        self.queue.queue({"op": "end_run", "run_id": self.segment_id, "status": status})
        if answered:
            self.flush_while_answering(max(time.monotonic() + self._timeout_s, deadline))
        # the ledger thread may still be waiting for the ledger: keep the rest on local disk now
        return self.queue.keep_unwritten()

    def flush_while_answering(self, deadline: float) -> bool:
        """See :meth:`LedgerQueue.flush_while_answering`."""
        return self.queue.flush_while_answering(deadline, self._timeout_s)

    # ---------------------------------------------------------------- figures
    def refresh(self) -> Position:
        """Read the ledger's figures for the epoch reports (background threads)."""
        with self._position_lock:  # one reader at a time, so an older read never replaces a newer one
            if self.ledger is None:
                return self.position
            balance, run_kg, run_offset_kg = self.ledger.position(self.config.account, self.run_id)
            self.position = Position(balance.balance_kg, run_kg, run_offset_kg)
            return self.position

    def refresh_quietly(self) -> None:
        """:meth:`refresh`, logging (once) a ledger that cannot be read."""
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001
            self._warn("ledger", "carbonoffset could not read its ledger (%s)", exc)

    def bought(self) -> Bought:
        """The ledger's figures for the run now (its sums: offsets bought or in flight).

        Raises:
            Exception: whatever the ledger raises when it cannot be read.
        """
        if self.ledger is None:
            return Bought()
        balance, _, offset_kg = self.ledger.position(self.config.account, self.run_id)
        offset_lb = round(offset_kg / KG_PER_LB)
        in_flight_lb = 0
        if offset_lb and self.run_id is not None:
            in_flight = self.ledger.offsets(run_id=self.run_id, states=OPEN_STATES)
            in_flight_lb = sum(offset.amount_lb for offset in in_flight)
        return Bought(balance.pending_kg, balance.credit_kg, offset_kg, offset_lb, in_flight_lb)

    # ----------------------------------------------------- ledger thread jobs
    def _verify_job(self) -> None:
        """The complete check of a big ledger file, before this session writes any epoch to it."""
        if self.ledger is None:
            return
        try:
            self.ledger.verify()
        except LedgerUnavailableError:
            return  # not reachable now: the writes go to the local spool and say so
        except Exception as exc:  # noqa: BLE001 -- LedgerError: nothing more is written to the file
            self._warn(
                "corrupt", "%s. carbonoffset writes nothing to it; training continues", exc, level=logging.ERROR
            )

    def _opening_job(self) -> None:
        """Before a new run is written: read the account's figures (a read, which a SQLite writer
        elsewhere does not block), then check a big file completely."""
        self.refresh_quietly()
        self._verify_job()

    def _on_written(self, op: dict[str, Any]) -> None:
        """Once ``op`` is in the ledger: a new run settles what was left open; an epoch's
        figures refresh the position and maybe trigger an offset."""
        if op["op"] == "start_run":
            self._started_job()
        elif op["op"] == "record":
            try:
                self._offsets.maybe_offset(self.refresh().balance_kg, self.run_id)
            except Exception as exc:  # noqa: BLE001 -- e.g. the ledger cannot be read
                self._warn("offset", "carbonoffset could not decide an offset (%s); training continues", exc)

    def _started_job(self) -> None:
        """Once a new run is in the ledger: write spools other processes left for it, read the
        figures, settle open offsets."""
        if self.ledger is None:
            return
        try:
            replay_left_over(self.ledger, self.ledger.path or self.ledger.location)
        except Exception as exc:  # noqa: BLE001
            self._warn("spool", "carbonoffset could not write figures kept on local disk (%s)", exc)
        self.refresh_quietly()
        if self.config.auto_offset and self.config.can_offset and self._offsets.has_open_offsets():
            self._offsets.reconcile()

    # ------------------------------------------------------------------ close
    def close(self, flush_s: float) -> None:
        """Write what is queued (at most ``flush_s``), keep the rest on local disk, and close the
        ledger if this writer opened it: after the offset worker or the ledger thread, when
        either is still busy with it."""
        self.queue.wait(flush_s)
        self.queue.close()
        if self.owns_ledger and self.ledger is not None:
            if self._offsets.busy:
                # an offset still in flight after stop() finishes with the ledger open
                self._offsets.submit(self.ledger.close)
            elif self.queue.busy:
                # the ledger thread still waits for a ledger that does not answer: closed after it
                self.queue.submit(self.ledger.close)
                self.queue.shutdown()
            else:
                self.ledger.close()
