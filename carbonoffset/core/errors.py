"""Exceptions raised by carbonoffset. None of their messages ever contain the API key."""

from __future__ import annotations


class CarbonOffsetError(Exception):
    """Base class of every error raised by carbonoffset."""


class ConfigurationError(CarbonOffsetError, ValueError):
    """A setting is missing or invalid. The message names the setting and the fix."""


class LedgerError(CarbonOffsetError):
    """The ledger cannot be used (corrupt, newer schema, not a ledger, unreachable).

    The ledger is never modified or overwritten when this is raised. Its message never
    contains a database password.
    """


class LedgerUnavailableError(LedgerError):
    """The ledger could not be read or written just now: a SQLite file locked by another
    connection past the busy timeout, or a database server that is down, slow or unreachable.

    Nothing was written by the failed call; trying again later is safe.
    """


class OffsetServiceError(CarbonOffsetError):
    """The 1ClickImpact service failed or refused a request.

    Attributes:
        status: HTTP status code when the server answered, else ``None``.
        definite: ``True`` when the server definitely did not act on the
            request (a 4xx answer), ``False`` when the outcome is unknown
            (timeout, connection error, 5xx, unreadable answer).
    """

    def __init__(self, message: str, *, status: int | None = None, definite: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.definite = definite

    @property
    def is_auth_error(self) -> bool:
        """``True`` for 401/403: the ``offset_api_key`` was refused."""
        return self.status in (401, 403)
