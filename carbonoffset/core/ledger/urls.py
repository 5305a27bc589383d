"""Where a ledger lives: a SQLite file path or a database URL; masking its password.

Light on purpose (no SQLAlchemy import): settings and log lines use it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Final

SERVER_SCHEMES: Final[tuple[str, ...]] = ("postgresql", "postgres")
"""URL schemes (optionally ``+driver``) of the database servers the ledger supports."""

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@\s]*)(?=@)")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<head>[?&]password=)(?P<password>[^&\s]*)")


def is_database_url(value: object) -> bool:
    """``True`` for ``scheme://...`` text (a database URL), ``False`` for a file path."""
    return isinstance(value, str) and _URL.match(value.strip()) is not None


def mask_password(text: str) -> str:
    """``text`` with the password of every URL in it (``user:password@``, ``?password=``) shown as ``***``."""
    text = _PASSWORD.sub(lambda m: f"{m.group('head')}***", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group('head')}***", text)


def url_password(url: str) -> str | None:
    """The password in ``url``, or ``None`` (used only to scrub it out of driver messages)."""
    match = _PASSWORD.search(url) or _QUERY_PASSWORD.search(url)
    if match is None or not match.group("password"):
        return None
    from urllib.parse import unquote

    return unquote(match.group("password"))


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every URL password masked and each of ``secrets`` replaced by ``***``."""
    text = mask_password(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# The URLs (password included) this process opened ledgers at, by their masked form: reports show
# only the masked one, and ``update_model_card(path, report)`` opens the report's ledger again.
_OPENED_URLS: dict[str, str] = {}


def remember_url(url: str) -> None:
    """Note that a ledger was opened at ``url`` (see :func:`unmask`)."""
    _OPENED_URLS[mask_password(url)] = url


def unmask(location: Path | str) -> Path | str:
    """The URL a ledger of this process was opened at, for its masked form (a report's
    ``ledger_path``); anything else unchanged."""
    if isinstance(location, str):
        return _OPENED_URLS.get(location, location)
    return location


def normalize_location(value: str | os.PathLike[str]) -> Path | str:
    """A :class:`~pathlib.Path` for a SQLite file (``sqlite:///path`` URLs too), else the URL text."""
    if isinstance(value, str) and is_database_url(value):
        text = value.strip()
        if text.startswith("sqlite:///"):
            return Path(text[len("sqlite:///") :]).expanduser()
        return text
    return Path(value).expanduser()


def location_key(location: Path | str) -> str:
    """A short stable name for a ledger (16 hex digits), without its password (for spool files)."""
    text = str(Path(location).resolve()) if isinstance(location, Path) else _PASSWORD.sub(
        lambda m: m.group("head"), location
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]
