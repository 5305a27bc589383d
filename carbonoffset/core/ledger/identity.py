"""Who owns an offset: a host identity, the PID namespace and the PID of the process.

The host identity is ``CARBONOFFSET_HOST_ID`` when set (e.g. to tell apart containers that
share a host name, or hosts in a test), else ``<host name>/<machine id>`` (the machine id
from ``/etc/machine-id`` where the system has one, so two hosts that share a name differ).
"""

from __future__ import annotations

import functools
import os
import socket

HOST_ID_VARIABLE = "CARBONOFFSET_HOST_ID"


@functools.lru_cache(maxsize=1)
def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as handle:
                value = handle.read().strip()
        except OSError:
            continue
        if value:
            return value[:12]
    return "-"


def host_identity() -> str:
    """This host's identity (read each time: a test may set ``CARBONOFFSET_HOST_ID``). Never contains ``:``."""
    given = os.environ.get(HOST_ID_VARIABLE, "").strip()
    value = given or f"{socket.gethostname()}/{_machine_id()}"
    return value.replace(":", "_")


def _pid_namespace() -> str:
    """Identity of this process's PID namespace (containers sharing a host differ here)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


PID_NAMESPACE = _pid_namespace()


def owner() -> str:
    """``"<host identity>:<PID namespace>:<PID>"`` of this process."""
    return f"{host_identity()}:{PID_NAMESPACE}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists in this PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(owner_text: str | None) -> bool:
    """``True`` only when ``owner_text`` names a process of this host and PID namespace that no
    longer exists (the same-host shortcut: no need to wait for its lease)."""
    parts = (owner_text or "").rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, namespace, pid = parts
    return host == host_identity() and namespace == PID_NAMESPACE and pid.isdigit() and not pid_alive(int(pid))
