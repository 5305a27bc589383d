"""The exactly-once offset protocol.

For every purchase:

1. decide the amount and write an **intent** with a fresh offset id, durably,
   in the same ledger transaction (:meth:`Ledger.create_intent`);
2. call ``capture_carbon(amount=<lb>, metadata={carbonoffset_offset_id: id})``;
3. on success store the receipt (``confirmed``);
   on a definite refusal (4xx) mark ``failed``: the amount returns to pending;
   on an ambiguous failure (timeout, connection error, 5xx) mark ``unknown``
   and, **before any retry**, look the id up with ``get_records``: found means
   confirmed, absent means it is safe to try the capture again.

Retries use :mod:`tenacity` (exponential backoff, bounded attempts). An offset
still open after the last attempt stays ``unknown`` in the ledger (its amount
is neither pending nor lost) and is settled later by :meth:`Offsetter.reconcile`
(run at the start of every session and by ``carbonoffset reconcile``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable

from carbonoffset.core.client import OffsetClient, Receipt, capture_in_flight
from carbonoffset.core.config import KEY_PREFIXES, OffsetConfig
from carbonoffset.core.errors import OffsetServiceError
from carbonoffset.core.ledger import DEFAULT_RESEND_GRACE_S, OPEN_STATES, Ledger, OffsetRecord, OffsetState
from carbonoffset.core.units import whole_lb_ceil, whole_lb_floor

logger = logging.getLogger(__name__)

_HOLD_WHILE_IN_FLIGHT_S = 86_400.0

# Offsets being settled in this process. The ledger's lease keeps other processes away, but
# every session of one process has the same owner: this keeps a second session (e.g. the
# next fit while the previous one's worker still runs) from settling the same offset at once.
_SETTLING: set[str] = set()
_SETTLING_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class OffsetOutcome:
    """Result of settling one offset.

    Attributes:
        offset_id: the ledger id (also sent as capture metadata).
        amount_lb: whole pounds bought or attempted.
        state: :attr:`~OffsetState.CONFIRMED`, :attr:`~OffsetState.FAILED` or
            :attr:`~OffsetState.UNKNOWN` (still open).
        receipt: the API's receipt when confirmed.
        error: the last error message (never contains the key).
    """

    offset_id: str
    amount_lb: int
    state: OffsetState
    receipt: Receipt | None = None
    error: str | None = None


class _Ambiguous(Exception):
    """Internal: an attempt whose outcome is unknown; tenacity retries these."""


class Offsetter:
    """Buys offsets for one account, exactly once, through :class:`OffsetClient`.

    Args:
        config: settings (key, environment, timeouts, threshold).
        ledger: the ledger that holds intents and receipts.
        client: an :class:`OffsetClient`; built from ``config`` when omitted.
        max_attempts: calls per offset before it is left ``unknown`` (>= 1).
        wait_initial_s: first backoff in seconds (doubles, capped at ``wait_max_s``).
        wait_max_s: longest backoff in seconds.
        resend_grace_s: seconds after a capture was sent before another process
            may take the offset over and look it up (default 300; see
            :data:`carbonoffset.core.ledger.DEFAULT_RESEND_GRACE_S`).
        lease_s: seconds an offset this process settles stays its own without a renewal
            (> 0; default: the longest a purchase with all its attempts can take). A heartbeat
            renews it every ``lease_s / 3`` while the purchase runs, so another host takes it
            over only after this process stopped (plus the resend grace).

    Raises:
        ConfigurationError: no ``offset_api_key`` (offsetting is impossible).
    """

    def __init__(
        self,
        config: OffsetConfig,
        ledger: Ledger,
        *,
        client: OffsetClient | None = None,
        max_attempts: int = 4,
        wait_initial_s: float = 0.5,
        wait_max_s: float = 8.0,
        resend_grace_s: float = DEFAULT_RESEND_GRACE_S,
        lease_s: float | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.client = client or OffsetClient(config)
        self.max_attempts = max(1, max_attempts)
        self.wait_initial_s = wait_initial_s
        self.wait_max_s = wait_max_s
        self.resend_grace_s = resend_grace_s
        self.auth_failed = False
        self._auth_lock = threading.Lock()  # the key check and a capture may both learn it: log once
        self._lock = threading.Lock()  # one purchase at a time per Offsetter
        self._lease_s = lease_s or (
            config.offset_request_timeout * (self.max_attempts + 1) * 2 + wait_max_s * self.max_attempts
        )

    # --------------------------------------------------------------- public
    def offset_pending(
        self, *, run_id: str | None = None, round_up: bool = False, respect_threshold: bool = True
    ) -> OffsetOutcome | None:
        """Offset what the account has pending now.

        Args:
            run_id: the run to attribute the offset to (reports only).
            round_up: buy ``ceil(pending / 0.45359237)`` pounds (the overshoot
                becomes a credit) instead of rounding down.
            respect_threshold: when True, do nothing unless pending >=
                ``offset_threshold``; with ``round_up`` and False any pending
                amount > 0 is offset.

        Returns:
            The outcome, or ``None`` when nothing was due.
        """
        if self.auth_failed:
            return None
        with self._lock:
            amount_for: Callable[[float], int] = whole_lb_ceil if round_up else whole_lb_floor
            intent = self.ledger.create_intent(
                account=self.config.account,
                environment=self.config.offset_environment,
                run_id=run_id,
                amount_lb_for=amount_for,
                min_pending_kg=self.config.offset_threshold if respect_threshold else 0.0,
                lease_s=self._lease_s,
            )
            if intent is None:
                return None
            logger.info(
                "offsetting %d lb (%.6f kg CO2eq) in %s, offset id %s",
                intent.amount_lb,
                intent.amount_kg,
                intent.environment,
                intent.offset_id,
            )
            return self._settle(intent)

    def reconcile(self) -> list[OffsetOutcome]:
        """Settle this account's open offsets (``intent``/``unknown``) that no live process owns.

        Returns:
            One outcome per offset that could be claimed.
        """
        outcomes = []
        for record in self.ledger.offsets(self.config.account, states=OPEN_STATES):
            if self.auth_failed:
                break
            with _SETTLING_LOCK:
                if record.offset_id in _SETTLING:
                    continue
            with self._lock:
                claimed = self.ledger.claim(
                    record.offset_id, lease_s=self._lease_s, resend_grace_s=self.resend_grace_s
                )
                if claimed is None:
                    continue
                outcomes.append(self._settle(claimed, claimed=True))
        return outcomes

    def check_key(self) -> str:
        """Ask the service whether it accepts ``offset_api_key`` (``who_am_i``, one call under
        ``offset_request_timeout``); logs the outcome once and never raises.

        A refused key sets :attr:`auth_failed`, so this offsetter sends no capture with it (the
        emissions stay pending in the ledger).

        Returns:
            ``"accepted"``, ``"refused"`` (logged as one ERROR naming ``offset_api_key``, never
            its value) or ``"unchecked"`` (service unreachable or failing: one WARNING).
        """
        try:
            self.client.who_am_i()
        except OffsetServiceError as exc:
            environment, account = self.config.offset_environment, self.config.account
            if exc.is_auth_error:
                if not self._first_auth_failure():
                    return "refused"
                logger.error(
                    "1ClickImpact (%s, %s) refused the key set in offset_api_key (value not shown): %s. "
                    "Nothing will be bought with it; this run's emissions are recorded in the ledger under "
                    "account %s and stay pending. Set offset_api_key to your %s key (%s...) from your "
                    "1ClickImpact account, then run `carbonoffset adopt %s` and `carbonoffset offset`.",
                    environment,
                    self.client.base_url,
                    exc,
                    account,
                    environment,
                    KEY_PREFIXES[environment],
                    account,
                )
                return "refused"
            logger.warning(
                "could not check offset_api_key with 1ClickImpact (%s, %s): %s. Training and recording go "
                "on; offsets are tried as usual and stay pending in the ledger if they cannot be bought.",
                environment,
                self.client.base_url,
                exc,
            )
            return "unchecked"
        return "accepted"

    def _first_auth_failure(self) -> bool:
        """Set :attr:`auth_failed`; ``True`` for the first caller only (who logs the ERROR)."""
        with self._auth_lock:
            first, self.auth_failed = not self.auth_failed, True
        return first

    # ------------------------------------------------------------- protocol
    def _settle(self, record: OffsetRecord, *, claimed: bool = False) -> OffsetOutcome:
        """Drive one open offset to an end state, or leave it ``unknown``; one settler per process."""
        with _SETTLING_LOCK:
            if record.offset_id in _SETTLING:
                return OffsetOutcome(
                    record.offset_id, record.amount_lb, OffsetState.UNKNOWN, error="being settled by another session"
                )
            _SETTLING.add(record.offset_id)
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(record.offset_id, stop), name="carbonoffset-lease", daemon=True
        )
        heartbeat.start()
        try:
            return self._settle_once(record, claimed=claimed)
        finally:
            stop.set()
            heartbeat.join(timeout=1.0)
            with _SETTLING_LOCK:
                _SETTLING.discard(record.offset_id)

    def _heartbeat(self, offset_id: str, stop: threading.Event) -> None:
        """Renew this process's lease on ``offset_id`` every third of it until ``stop`` is set."""
        while not stop.wait(self._lease_s / 3):
            try:
                if not self.ledger.renew(offset_id, lease_s=self._lease_s):
                    return  # settled, or taken over
            except Exception:  # noqa: BLE001 -- the ledger is away: the lease may lapse, and whoever
                # takes the offset over looks it up before sending anything
                logger.debug("renewing the lease of offset %s failed", offset_id, exc_info=True)

    def _settle_once(self, record: OffsetRecord, *, claimed: bool) -> OffsetOutcome:
        offset_id = record.offset_id
        # An intent found by reconcile may have been sent by a process that died
        # before writing the outcome: treat it exactly like ``unknown``.
        state = {
            "ambiguous": record.state == OffsetState.UNKNOWN or (claimed and record.state == OffsetState.INTENT)
        }
        # a week of margin: the look-up window must hold the capture even if this host's clock
        # is ahead of the service's
        since = dt.date.fromisoformat(record.created_utc[:10]) - dt.timedelta(days=7)
        last_error: list[str] = []

        def attempt() -> Receipt:
            if not self.ledger.claim(offset_id, lease_s=self._lease_s, resend_grace_s=self.resend_grace_s):
                raise _Stop("another process took this offset over")
            # Asked before the look-up: a request answered while the look-up is on its way may have
            # landed after the look-up was read, so "not found" proves nothing about it.
            was_in_flight = capture_in_flight(offset_id)
            if state["ambiguous"]:
                try:
                    found = self.client.find_capture(offset_id, since=since)
                except OffsetServiceError as exc:
                    if exc.is_auth_error:
                        raise
                    last_error.append(str(exc))
                    raise _Ambiguous(str(exc)) from None
                if found is not None:
                    return found
            metadata = {"source": "carbonoffset"}
            if record.run_id:
                metadata["run_id"] = record.run_id
            if was_in_flight or capture_in_flight(offset_id):
                state["ambiguous"] = True
                raise _Ambiguous("an earlier capture request for this offset is still in flight")
            self.ledger.mark_sent(offset_id)
            try:
                return self.client.capture(amount_lb=record.amount_lb, offset_id=offset_id, metadata=metadata)
            except OffsetServiceError as exc:
                if exc.definite:
                    raise
                state["ambiguous"] = True
                last_error.append(str(exc))
                self.ledger.mark_unknown(offset_id, error=str(exc))
                logger.warning("offset %s: outcome unknown (%s); will check before retrying", offset_id, exc)
                raise _Ambiguous(str(exc)) from None

        import tenacity  # imported here: it pulls in tornado when present (~60 ms)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=tenacity.wait_exponential(multiplier=self.wait_initial_s, max=self.wait_max_s),
            retry=tenacity.retry_if_exception_type(_Ambiguous),
            reraise=True,
        )
        try:
            receipt = retrying(attempt)
        except _Ambiguous:
            error = last_error[-1] if last_error else "unknown outcome"
            self.ledger.mark_unknown(offset_id, error=error)
            if capture_in_flight(offset_id):
                # our abandoned request may still be acted on: keep the offset ours while this
                # process lives (after it ends, the resend grace still protects it)
                self.ledger.claim(offset_id, lease_s=_HOLD_WHILE_IN_FLIGHT_S)
            else:
                self.ledger.release(offset_id)
            logger.warning(
                "offset %s of %d lb is still unconfirmed after %d attempts; it stays in the ledger "
                "(not pending, not lost) and will be checked by the next run or `carbonoffset reconcile`",
                offset_id,
                record.amount_lb,
                self.max_attempts,
            )
            return OffsetOutcome(offset_id, record.amount_lb, OffsetState.UNKNOWN, error=error)
        except _Stop as exc:
            return OffsetOutcome(offset_id, record.amount_lb, OffsetState.UNKNOWN, error=str(exc))
        except OffsetServiceError as exc:
            if exc.is_auth_error:
                first = self._first_auth_failure()
                if state["ambiguous"]:
                    # we cannot tell whether an earlier call went through: keep it open
                    self.ledger.mark_unknown(offset_id, error=str(exc))
                    self.ledger.release(offset_id)
                    state_name = OffsetState.UNKNOWN
                else:
                    self.ledger.mark_failed(offset_id, error=str(exc))
                    state_name = OffsetState.FAILED
                logger.log(
                    logging.ERROR if first else logging.DEBUG,
                    "1ClickImpact refused the API key set in offset_api_key (value not shown): %s. "
                    "Nothing was bought; the emissions stay pending in the ledger under account %s. "
                    "Fix offset_api_key, then run `carbonoffset adopt %s` and `carbonoffset offset`.",
                    exc,
                    self.config.account,
                    self.config.account,
                )
                return OffsetOutcome(offset_id, record.amount_lb, state_name, error=str(exc))
            self.ledger.mark_failed(offset_id, error=str(exc))
            logger.error(
                "1ClickImpact refused offset %s of %d lb (%s); the amount is pending again",
                offset_id,
                record.amount_lb,
                exc,
            )
            return OffsetOutcome(offset_id, record.amount_lb, OffsetState.FAILED, error=str(exc))
        self.ledger.mark_confirmed(
            offset_id,
            user_id=receipt.user_id,
            time_utc=receipt.time_utc,
            carbon_captured=receipt.carbon_captured,
        )
        logger.info(
            "offset %s confirmed: %d lb captured at %s", offset_id, receipt.carbon_captured, receipt.time_utc
        )
        return OffsetOutcome(offset_id, record.amount_lb, OffsetState.CONFIRMED, receipt=receipt)


class _Stop(Exception):
    """Internal: the offset is no longer ours to settle."""
