"""Detect a SQLite ledger on a network file system (where SQLite's locking is unreliable)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

logger = logging.getLogger("carbonoffset.core.ledger")

NETWORK_FILESYSTEMS: Final[frozenset[str]] = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs", "ceph",
     "glusterfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "beegfs", "orangefs", "davfs", "fuse.s3fs"}
)
"""File system types (as in ``/proc/mounts``) that are shared between hosts: SQLite's file locking is
broken on many of them ("How To Corrupt An SQLite Database File", section 2.1) and WAL mode needs
shared memory on one host."""

_warned: set[str] = set()


def filesystem_type(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The type of the file system holding ``path`` from the mount table, or ``None`` where the
    platform has no readable mount table."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as handle:
            table = [line.split() for line in handle]
    except OSError:
        return None
    target = os.path.realpath(path if path.exists() else path.parent)
    best, kind = "", None
    for fields in table:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def warn_if_network_filesystem(path: Path, mounts: str = "/proc/mounts") -> bool:
    """Log one WARNING per path when the SQLite ledger ``path`` is on a network file system.

    Returns:
        ``True`` when it is (whether or not the warning was logged before).
    """
    kind = filesystem_type(path, mounts)
    if kind is None or kind not in NETWORK_FILESYSTEMS:
        return False
    if str(path) not in _warned:
        _warned.add(str(path))
        logger.warning(
            "the ledger %s is on a network file system (%s): SQLite's locking is unreliable there and "
            "can corrupt it when several hosts write it. Point offset_ledger (CODECARBON_OFFSET_LEDGER) "
            "at a PostgreSQL URL (postgresql://user:password@host:5432/dbname) for a team ledger, or at "
            "a local path",
            path,
            kind,
        )
    return True
