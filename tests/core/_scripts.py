"""Running a test's script in a fresh Python process (a cold CodeCarbon, a fork, a process to kill)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODECARBON_")}
    return {**env, "PYTHONPATH": os.pathsep.join(sys.path)}


def run_script(script: str, *, env: dict[str, str] | None = None, lines: int = 1) -> list[Any]:
    """Run ``script`` in a fresh Python process, fail on a non-zero exit with its stderr, and
    return the JSON of the last ``lines`` lines it printed."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-lines:]]
