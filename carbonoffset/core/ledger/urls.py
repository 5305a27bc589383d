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
    """A short stable name for a ledger (16 hex digits), without its password (for spool files).

    A file is named by its resolved path. A database URL is named by what it connects to, however
    it is spelled: the backend without its driver (``postgresql+psycopg://`` and ``postgres://``
    are ``postgresql://``), the user, the host in lower case, the port (5432 when left out), the
    database and the query options other than ``password``, sorted (parsed by SQLAlchemy's
    :func:`~sqlalchemy.engine.make_url`). A URL it cannot parse is named by its text.
    """
    if isinstance(location, Path):
        return _digest(str(location.resolve()))
    try:
        from sqlalchemy.engine import make_url

        url = make_url(location)
    except Exception:  # noqa: BLE001 -- not a URL SQLAlchemy reads: its text (password masked)
        return legacy_location_key(location)
    backend = url.get_backend_name()
    backend = "postgresql" if backend == "postgres" else backend
    default_port = 5432 if backend == "postgresql" else None
    query = sorted((k, str(v)) for k, v in url.query.items() if k.lower() != "password")
    text = f"{backend}://{url.username or ''}@{(url.host or '').lower()}:{url.port or default_port or ''}"
    return _digest(f"{text}/{url.database or ''}?{query}")


def legacy_location_key(location: Path | str) -> str:
    """The name spool files of a URL ledger had before :func:`location_key` read URLs (its
    password-masked text): spools left by an earlier version are still found."""
    text = str(Path(location).resolve()) if isinstance(location, Path) else _PASSWORD.sub(
        lambda m: m.group("head"), location
    )
    return _digest(text)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
