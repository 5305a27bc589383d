"""Small JSON files kept per machine in the user cache folder (what earlier processes learnt).

Two caches use it: the CPU model CodeCarbon detected
(:data:`carbonoffset.core.codecarbon_startup.CPU_MODEL_CACHE`) and the power last measured
(:data:`carbonoffset.core.estimates.POWER_CACHE`). Both are caches only: a missing or corrupt
file reads as empty, and a write replaces the file atomically (a reader never sees half of one).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class JsonCacheFile:
    """One JSON object in a file of the user cache folder (platformdirs' ``user_cache_path``).

    Args:
        name: the file's name in ``<user cache folder>/carbonoffset`` (e.g. ``"power.json"``).

    Not locked: callers writing from several threads serialise their :meth:`write` themselves.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def path(self) -> Path:
        """Where the file is (it may not exist); honours ``XDG_CACHE_HOME`` on Linux."""
        import platformdirs

        return platformdirs.user_cache_path("carbonoffset", appauthor=False) / self.name

    def read(self) -> dict[str, Any]:
        """The file's object; empty when the file is missing, unreadable, not JSON or not an object."""
        try:
            known = json.loads(self.path.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 -- a cache only: no cache yet, or unreadable
            return {}
        return known if isinstance(known, dict) else {}

    def write(self, content: Mapping[str, Any]) -> None:
        """Replace the file's object with ``content`` (JSON values) atomically, creating the folder.

        Raises:
            OSError: the folder or the file could not be written.
            TypeError: ``content`` holds a value JSON cannot store.
        """
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(content), encoding="utf-8")
        os.replace(tmp, path)


def machine_key() -> str:
    """Identifies this machine's CPU, as the caches' key: host name, architecture, CPU count and,
    on Linux, the CPU's identity in ``/proc/cpuinfo`` (x86 vendor, family, model and model name;
    Arm implementer, architecture, variant and part). 16 hex digits."""
    parts = [platform.node(), platform.machine(), platform.processor(), str(os.cpu_count())]
    wanted = {"vendor_id", "cpu family", "model", "model name"}  # x86
    wanted |= {"CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Hardware"}  # Arm
    seen: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo_file:
            for line in cpuinfo_file:
                name, _, value = line.partition(":")
                if name.strip() in wanted:
                    seen.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    parts += [f"{name}={value}" for name, value in sorted(seen.items())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
