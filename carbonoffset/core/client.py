"""A deadline-bounded, failure-classifying wrapper around the ``makeimpact`` SDK.

The SDK has no timeout and folds every failure into ``OneClickImpactError``
without the HTTP status. This module:

* runs every SDK call on a daemon thread and gives up waiting after
  ``request_timeout`` seconds (the stalled thread cannot block interpreter exit);
* classifies failures into *definite* (the server refused: nothing happened)
  and *ambiguous* (the request may or may not have been acted on), from the
  error the SDK chained (``__context__``):

  ==========================================  ==========  ==============
  what happened                               ``status``  ``definite``
  ==========================================  ==========  ==============
  error body ``type = "key_error"``           401         yes (auth)
  error body ``type = "invalid_request_error"`` 400       yes
  error body ``type = "api_error"``           500         no
  "Request failed with status N"              N           yes if 4xx
  connection error, unreadable body           None        no
  no answer before the deadline               None        no
  2xx body missing a field (SDK ``KeyError``)  None       no
  ==========================================  ==========  ==============

* never sends a second capture of one offset while an earlier request for it
  (abandoned at its deadline, or sent by another session of this process) may
  still be acted on: that attempt fails as *ambiguous* and is retried later,
  after a look-up;
* never lets the API key into a message (it is scrubbed defensively).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.errors import ConfigurationError, OffsetServiceError
from carbonoffset.core.units import MAX_OFFSET_LB, MIN_OFFSET_LB

T = TypeVar("T")

METADATA_ID_KEY = "carbonoffset_offset_id"
"""Metadata key under which every capture carries its ledger offset id."""

_STATUS_RE = re.compile(r"Request failed with status (\d{3})")

# Capture requests by offset id. A request abandoned at its deadline may still reach the
# server and be acted on; while its thread lives, no second capture of the same offset is
# sent from this process (a look-up cannot see a request the server has not processed yet).
_CAPTURES_IN_FLIGHT: dict[str, threading.Thread] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def capture_in_flight(offset_id: str) -> bool:
    """``True`` while a capture request for ``offset_id`` sent by this process may still be acted on."""
    with _IN_FLIGHT_LOCK:
        thread = _CAPTURES_IN_FLIGHT.get(offset_id)
        if thread is not None and not thread.is_alive():
            del _CAPTURES_IN_FLIGHT[offset_id]
            thread = None
    return thread is not None


_TYPE_STATUS = {"key_error": 401, "invalid_request_error": 400, "api_error": 500}
_MAX_LOOKUP_PAGES = 200
#: Records per ``get_records`` page: the most the API returns (its ``limit`` is 1..1000; 1ClickImpact
#: API reference, ``GET /v1/records``).
_RECORDS_PER_PAGE = 1000


@dataclasses.dataclass(frozen=True)
class Receipt:
    """What the API returned for one capture.

    Attributes:
        user_id: the 1ClickImpact account id.
        time_utc: capture time, ``YYYY-MM-DDTHH:MM:SS.mmmZ``.
        carbon_captured: pounds captured (whole pounds).
    """

    user_id: str
    time_utc: str
    carbon_captured: int


def import_sdk() -> Any:
    """The ``makeimpact`` module (imported on first use: ``import carbonoffset`` does not load it).

    Raises:
        ImportError: ``makeimpact`` is not installed; the message gives the install command.
    """
    try:
        import makeimpact
    except ImportError:
        raise ImportError(
            "offsetting needs the 1ClickImpact SDK 'makeimpact'; install it with "
            "`pip install carbonoffset` (it is a core dependency) or `pip install makeimpact>=2.0`"
        ) from None
    return makeimpact


class OffsetClient:
    """Calls the 1ClickImpact API through the real ``makeimpact`` SDK.

    Args:
        config: settings; needs ``offset_api_key``. ``offset_api_url``
            points the SDK at another server (sets the SDK's ``base_url``).

    Raises:
        ConfigurationError: no ``offset_api_key`` is configured.
        ImportError: ``makeimpact`` is not installed (message says what to install).
    """

    def __init__(self, config: OffsetConfig) -> None:
        if config.offset_api_key is None:
            raise ConfigurationError(
                "offset_api_key is not set: set it (argument, CODECARBON_OFFSET_API_KEY or "
                ".codecarbon.config) to offset emissions"
            )
        sdk = import_sdk()
        self._secret = config.offset_api_key.reveal()
        self._timeout = config.offset_request_timeout
        self._sdk = sdk.OneClickImpact(
            api_key=self._secret, environment=sdk.Environment(config.offset_environment)
        )
        if config.offset_api_url:
            self._sdk.base_url = config.offset_api_url
        self.base_url: str = self._sdk.base_url

    def __repr__(self) -> str:
        return f"OffsetClient(base_url={self.base_url!r})"

    # ------------------------------------------------------------------ calls
    def capture(self, *, amount_lb: int, offset_id: str, metadata: dict[str, str] | None = None) -> Receipt:
        """Buy ``amount_lb`` whole pounds of carbon capture, tagged with ``offset_id``.

        Raises:
            OffsetServiceError: refused (``definite``) or outcome unknown.
            ValueError: ``amount_lb`` is not an int in :data:`~carbonoffset.core.units.MIN_OFFSET_LB`
                .. :data:`~carbonoffset.core.units.MAX_OFFSET_LB` (1..10,000,000).
        """
        if not isinstance(amount_lb, int) or not MIN_OFFSET_LB <= amount_lb <= MAX_OFFSET_LB:
            raise ValueError(
                f"amount_lb must be a whole number of pounds in {MIN_OFFSET_LB}..{MAX_OFFSET_LB} (got {amount_lb!r})"
            )
        tags = {**(metadata or {}), METADATA_ID_KEY: offset_id}
        response = self._call(
            lambda: self._sdk.capture_carbon(amount=amount_lb, metadata=tags), in_flight_id=offset_id
        )
        return Receipt(str(response.user_id), str(response.time_utc), int(response.carbon_captured))

    def find_capture(self, offset_id: str, *, since: dt.date) -> Receipt | None:
        """Look up the capture tagged ``offset_id`` made on or after ``since``.

        Pages through ``get_records(filter_by="carbon_captured")``.

        Returns:
            The receipt, or ``None`` when the API has no such capture.

        Raises:
            OffsetServiceError: the look-up itself failed.
        """
        cursor: str | None = None
        start = since.isoformat()
        for _ in range(_MAX_LOOKUP_PAGES):
            page = self._call(
                lambda c=cursor: self._sdk.get_records(  # type: ignore[misc]
                    filter_by="carbon_captured", start_date=start, cursor=c, limit=_RECORDS_PER_PAGE
                )
            )
            for record in page.user_records:
                meta = getattr(record, "metadata", None) or {}
                if meta.get(METADATA_ID_KEY) == offset_id:
                    return Receipt(str(record.user_id), str(record.time_utc), int(record.carbon_captured))
            cursor = page.cursor
            if not cursor:
                return None
        raise OffsetServiceError(
            f"looking up offset {offset_id} did not finish within {_MAX_LOOKUP_PAGES} pages"
        )

    def who_am_i(self) -> str:
        """The account's ``user_id`` (checks the key). Raises :class:`OffsetServiceError`."""
        return str(self._call(self._sdk.who_am_i).user_id)

    # -------------------------------------------------------------- machinery
    def _call(self, fn: Callable[[], T], *, in_flight_id: str | None = None) -> T:
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread below
                outcome["error"] = exc

        thread = threading.Thread(target=target, name="carbonoffset-sdk-call", daemon=True)
        if in_flight_id is not None:
            with _IN_FLIGHT_LOCK:  # check and register atomically
                previous = _CAPTURES_IN_FLIGHT.get(in_flight_id)
                if previous is not None and previous.is_alive():
                    raise OffsetServiceError(
                        f"an earlier capture request for offset {in_flight_id} is still in flight; "
                        "not sending another",
                        status=None,
                        definite=False,
                    )
                _CAPTURES_IN_FLIGHT[in_flight_id] = thread
        thread.start()
        thread.join(self._timeout)
        if in_flight_id is not None and not thread.is_alive():
            with _IN_FLIGHT_LOCK:
                if _CAPTURES_IN_FLIGHT.get(in_flight_id) is thread:
                    del _CAPTURES_IN_FLIGHT[in_flight_id]
        if thread.is_alive():
            raise OffsetServiceError(
                f"1ClickImpact did not answer within {self._timeout:g} s (offset_request_timeout)",
                status=None,
                definite=False,
            )
        if "error" in outcome:
            raise self.classify(outcome["error"]) from None
        return outcome["value"]  # type: ignore[no-any-return]

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        if not self._secret:
            return text
        for form in (self._secret, repr(self._secret)[1:-1]):
            text = text.replace(form, "***")
        return text

    def classify(self, exc: BaseException) -> OffsetServiceError:
        """Turn an SDK failure into an :class:`OffsetServiceError` (see the module table)."""
        message = self.scrub(str(exc))
        inner = exc.__context__
        error_type = getattr(inner, "error_type", None)
        if error_type in _TYPE_STATUS:
            status = _TYPE_STATUS[error_type]
            return OffsetServiceError(message, status=status, definite=status < 500)
        match = _STATUS_RE.search(message)
        if match:
            status = int(match.group(1))
            return OffsetServiceError(message, status=status, definite=400 <= status < 500)
        if isinstance(exc, KeyError):
            message = f"1ClickImpact answered without the field {message}"
        return OffsetServiceError(message, status=None, definite=False)
