"""Per-epoch hook latency of the shared callback logic (``CallbackCore.epoch_end``).

Every framework callback's epoch-end hook is this call plus the framework's own
metric hand-over (see ``fit_overhead.py`` for the whole hook inside real fits).
Two scenarios, run in alternating rounds (interleaved A/B) in one process:

* ``no_offset_due``: the real CodeCarbon tracker (offline, France), a sandbox
  key against the loopback fake API; micrograms per epoch, so no offset is due.
* ``offset_in_flight``: scripted emissions of 0.3 kg CO2eq per epoch, so an
  offset is due every few epochs, against a fake API that answers after
  ``--server-delay`` seconds (2 s by default): an offset is in flight during
  most hooks. The share of hooks timed while one was in flight is reported.

Between two hooks the main thread "trains" for ``--epoch-ms`` milliseconds
(NumPy matrix products, which use every core, as training does).

Usage::

    python benchmarks/hook_latency.py --json results/hook_latency.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import fake_server, median, percentile, settings_for, table, write_json


def _train(seconds: float, a: Any) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        a @ a  # noqa: B018 -- work


def run_scenario(scenario: str, epochs: int, epoch_s: float, server_delay_s: float) -> dict[str, Any]:
    import numpy as np

    from carbonoffset.core.callback import CallbackCore
    from carbonoffset.testing import ScriptedEmissions

    a = np.random.default_rng(0).random((160, 160))
    with tempfile.TemporaryDirectory(prefix="carbonoffset-hook-") as tmp:
        delay = server_delay_s if scenario == "offset_in_flight" else 0.0
        with fake_server(delay_s=delay) as server:
            settings = settings_for(
                server,
                Path(tmp) / "ledger.sqlite3",
                offset_request_timeout=server_delay_s + 3.0,
                offset_timeout=server_delay_s * 4 + 10.0,
            )
            source = ScriptedEmissions(lambda n: 0.3 * (n + 1)) if scenario == "offset_in_flight" else None
            core = CallbackCore(source=source, label="bench", **settings)
            core.begin()
            session = core.session
            assert session is not None
            _train(epoch_s, a)
            hook_s: list[float] = []
            in_flight = 0
            for epoch in range(epochs):
                _train(epoch_s, a)
                busy = session.offsets_busy  # an offset being settled
                started = time.perf_counter()
                core.epoch_end(epoch, max_epochs=epochs)
                hook_s.append(time.perf_counter() - started)
                in_flight += busy
            started = time.perf_counter()
            report = core.end()
            end_s = time.perf_counter() - started
            captures = len(server.captures)
    return {
        "hook_s": hook_s,
        "in_flight_share": in_flight / epochs,
        "end_s": end_s,
        "captures": captures,
        "confirmed_lb": report.confirmed_lb if report else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100, help="hooks per round and scenario")
    parser.add_argument("--epoch-ms", type=float, default=50.0, help="training time between two hooks")
    parser.add_argument(
        "--server-delay", type=float, default=2.0, help="seconds the fake API takes to answer"
    )
    args = parser.parse_args()

    import logging

    logging.getLogger("carbonoffset").setLevel(logging.ERROR)
    scenarios = ("no_offset_due", "offset_in_flight")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    for round_index in range(args.rounds):
        order = scenarios if round_index % 2 == 0 else scenarios[::-1]
        for scenario in order:
            result = run_scenario(scenario, args.epochs, args.epoch_ms / 1e3, args.server_delay)
            runs[scenario].append(result)
            print(
                f"round {round_index + 1}/{args.rounds} {scenario:17s} median "
                f"{median(result['hook_s']) * 1e3:.3f} ms  p99 {percentile(result['hook_s'], 99) * 1e3:.3f} ms  "
                f"max {max(result['hook_s']) * 1e3:.3f} ms  in flight {result['in_flight_share']:.0%}",
                flush=True,
            )
    rows, summary = [], {}
    for scenario in scenarios:
        hooks = [h for r in runs[scenario] for h in r["hook_s"]]
        summary[scenario] = {
            "hooks": len(hooks),
            "median_ms": median(hooks) * 1e3,
            "p99_ms": percentile(hooks, 99) * 1e3,
            "max_ms": max(hooks) * 1e3,
            "round_medians_ms": [median(r["hook_s"]) * 1e3 for r in runs[scenario]],
            "in_flight_share": median([r["in_flight_share"] for r in runs[scenario]]),
            "end_ms": median([r["end_s"] for r in runs[scenario]]) * 1e3,
            "captures": [r["captures"] for r in runs[scenario]],
        }
        s = summary[scenario]
        rows.append(
            [scenario, s["hooks"], s["median_ms"], s["p99_ms"], s["max_ms"], f"{s['in_flight_share']:.0%}"]
        )
    print(
        table(
            f"Per-epoch hook latency, CallbackCore.epoch_end ({args.rounds} interleaved rounds x {args.epochs} "
            f"epochs, {args.epoch_ms:g} ms of training between hooks, fake API delay {args.server_delay:g} s)",
            ["scenario", "hooks", "median ms", "p99 ms", "max ms", "offset in flight"],
            rows,
        )
    )
    write_json(args.json, {"benchmark": "hook_latency", "args": vars(args), "scenarios": summary})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
