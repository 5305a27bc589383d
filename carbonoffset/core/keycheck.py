"""The start-of-run key check: is ``offset_api_key`` accepted by 1ClickImpact?

Run on its own thread (``carbonoffset-key-check``), so an offset due meanwhile is not held up by
its round trip, and once per account (with the API URL) per process: a notebook's tenth fit makes
no call. A refused or unchecked key is checked again at the next run's start. What a refused key
logs is :meth:`~carbonoffset.core.offsetter.Offsetter.check_key`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.offsetter import Offsetter

logger = logging.getLogger(__name__)

_ACCEPTED_KEYS: set[tuple[str, str | None]] = set()
_ACCEPTED_KEYS_LOCK = threading.Lock()


def _key_id(config: OffsetConfig) -> tuple[str, str | None]:
    return config.account, config.offset_api_url


def key_check_due(config: OffsetConfig) -> bool:
    """``config``'s key has not been accepted in this process yet."""
    with _ACCEPTED_KEYS_LOCK:
        return _key_id(config) not in _ACCEPTED_KEYS


def start_key_check(config: OffsetConfig, offsetter: Callable[[], Offsetter | None]) -> threading.Thread:
    """Check ``config``'s key on a new daemon thread and return it (started).

    Args:
        config: the run's settings (the account the check is remembered for).
        offsetter: builds (or returns) the session's offsetter, on the check's thread.
    """

    def check() -> None:
        try:
            built = offsetter()
            accepted = built is not None and built.check_key() == "accepted"
        except Exception:  # noqa: BLE001 -- never let the check disturb the run
            logger.debug("the start-of-run key check failed", exc_info=True)
            return
        if accepted:
            with _ACCEPTED_KEYS_LOCK:
                _ACCEPTED_KEYS.add(_key_id(config))

    thread = threading.Thread(target=check, name="carbonoffset-key-check", daemon=True)
    thread.start()
    return thread
