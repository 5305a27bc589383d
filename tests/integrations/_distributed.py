"""Helpers shared by the distributed integration tests (imported by module name: pytest puts this
folder on ``sys.path`` for the test modules in it)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file written one per line by the ranks; ``[]`` when it does not exist."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def free_port() -> int:
    """A loopback TCP port free at the time of the call (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
