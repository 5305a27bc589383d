"""Helpers shared by the benchmark scripts: statistics, tables, JSON output, machine description.

Not a library module: the scripts import it as ``_common`` (they run as plain
``python benchmarks/<name>.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_KEY = "test_benchmark_key_0000"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        # the fits' thread count: torch uses every core unless OMP_NUM_THREADS says otherwise
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    for name in ("torch", "lightning", "transformers", "keras", "codecarbon"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:  # noqa: BLE001 -- not installed
            info[name] = None
    return info


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [
        f"\n{title}\n",
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
    ]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine(),
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    target.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nJSON written to {target}")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a fresh benchmark process: isolated from the user's CodeCarbon config, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODECARBON_")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "KERAS_BACKEND": "torch",
            "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra)
    return env


def run_child(
    args: Sequence[str], *, timeout: float = 900, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; its last stdout line is JSON."""
    with tempfile.TemporaryDirectory(prefix="carbonoffset-bench-") as home:
        environment = env or child_env()
        environment.setdefault("KERAS_HOME", str(Path(home) / "keras"))
        environment["HOME"] = home
        done = subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            cwd=home,
        )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def fake_server(delay_s: float = 0.0):  # type: ignore[no-untyped-def]
    """The loopback 1ClickImpact fake (never the real service)."""
    from carbonoffset.testing import FakeOneClickImpact

    with FakeOneClickImpact(environment="sandbox") as server:
        server.delay_s = delay_s
        yield server


def settings_for(server: Any, ledger: Path, **extra: Any) -> dict[str, Any]:
    return {
        "offset_api_key": SANDBOX_KEY,
        "offset_environment": "sandbox",
        "offset_api_url": server.url,
        "offset_ledger": ledger,
        "country_iso_code": "FRA",
        **extra,
    }
