"""Ledger scale on SQLite and PostgreSQL: record/offset cycles per second from 1, 8 and 32 processes,
``report`` on a big ledger, and the epoch hook's latency with each ledger.

PostgreSQL runs in a throw-away cluster on a loopback port
(:class:`carbonoffset.testing.postgres.PostgresCluster`; ``--backends sqlite`` skips it).

* ``cycles``: processes share one fresh ledger (same account). One
  cycle is what a run does around each offset, without the network: record the
  run's cumulative total (``Ledger.record``), decide the amount and write the
  intent in one transaction (``create_intent``, durable), store the receipt
  (``mark_confirmed``, durable); every record adds 0.5 kg so every cycle buys
  1 lb. Also reported: ``record``-only operations per second. 1-process and
  8-process rounds alternate; the median of the rounds is reported, and the
  ledger is checked to hold exactly what was bought (no double spending).
* ``report``: a ledger with ``--runs`` x ``--epochs-per-run`` recorded epochs
  (1,000,000 by default) is built once (bulk SQL into a schema made by
  ``Ledger``), then ``carbonoffset report --ledger FILE|URL --json`` is timed in
  fresh processes (interpreter start and imports included). Opening the same
  file as a training session does (``Ledger(path, full_check=False)``) and
  the complete check (``verify``) are timed too (SQLite).
* ``hook``: ``OffsetSession.record_epoch`` timed ``--hook-epochs`` times with a ledger of
  each backend (scripted emissions, no key): median and p99 in ms.

Usage::

    python benchmarks/ledger_scale.py --json results/ledger_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import ROOT, child_env, median, table, write_json

ACCOUNT = "sandbox:benchmark0000"

_CYCLER = """
import json, sys, time
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.units import whole_lb_floor
path, go, seconds, mode = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ledger = Ledger(path)
run = ledger.start_run(account="ACCOUNT", environment="sandbox")
while time.time() < go:
    time.sleep(0.001)
done, total, bought = 0, 0.0, 0
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    total += 0.5
    ledger.record(run, emissions_kg=total, energy_kwh=total * 10, epoch=done)
    if mode == "cycle":
        intent = ledger.create_intent(account="ACCOUNT", environment="sandbox", run_id=run,
                                      amount_lb_for=whole_lb_floor, min_pending_kg=0.0, lease_s=600)
        if intent is not None:
            ledger.mark_confirmed(intent.offset_id, user_id="u", time_utc="t", carbon_captured=intent.amount_lb)
            bought += intent.amount_lb
    done += 1
ledger.close()
print(json.dumps({"done": done, "recorded_kg": total, "bought_lb": bought}))
""".replace("ACCOUNT", ACCOUNT)


_HOOK = """
import json, sys, time, statistics
from carbonoffset.core.session import OffsetSession
from carbonoffset.testing import ScriptedEmissions
target, epochs = sys.argv[1], int(sys.argv[2])
session = OffsetSession(source=ScriptedEmissions(lambda n: 1e-4 * (n + 1)), offset_ledger=target,
                        offset_environment="sandbox", auto_offset=False)
session.start()
times = []
for epoch in range(epochs):
    t = time.perf_counter(); session.record_epoch(epoch); times.append(time.perf_counter() - t)
    time.sleep(0.002)
session.stop(); session.close()
times.sort()
print(json.dumps({"median_ms": statistics.median(times) * 1e3, "p99_ms": times[int(len(times) * 0.99)] * 1e3}))
"""

_databases = iter(range(10**6))


def fresh_target(backend: str, tmp: str, cluster: Any) -> str:
    if backend == "sqlite":
        return str(Path(tmp) / f"ledger-{uuid.uuid4().hex[:8]}.sqlite3")
    return str(cluster.create_database(f"bench_{next(_databases)}"))


def cycles(processes: int, seconds: float, mode: str, target: str) -> dict[str, Any]:
    if True:
        path = target
        go = time.time() + 2.0 + 0.2 * processes
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CYCLER, str(path), str(go), str(seconds), mode],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
            )
            for _ in range(processes)
        ]
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(err)
            outs.append(json.loads(out.strip().splitlines()[-1]))
        from carbonoffset.core.ledger import Ledger

        with Ledger(path) as ledger:
            balance = ledger.balance(ACCOUNT)
            offsets = ledger.offsets(ACCOUNT)
    done = sum(o["done"] for o in outs)
    recorded = sum(o["recorded_kg"] for o in outs)
    bought = sum(o["bought_lb"] for o in outs)
    return {
        "per_second": done / seconds,
        "operations": done,
        "recorded_kg": recorded,
        "bought_lb": bought,
        "ledger_recorded_kg": balance.recorded_kg,
        "ledger_offset_lb": sum(o.amount_lb for o in offsets),
        # every kg recorded once; every pound bought once and nothing left unbought above 1 lb
        "exactly_once": abs(balance.recorded_kg - recorded) < 1e-6
        and sum(o.amount_lb for o in offsets) == bought
        and (mode == "record" or balance.pending_kg < 0.45359237 + 1e-9),
    }


def build_postgresql(url: str, runs: int, per_run: int) -> float:
    import psycopg

    from carbonoffset.core.ledger import Ledger

    started = time.perf_counter()
    Ledger(url).close()
    stamp = "2026-01-01T00:00:00.000000Z"
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY runs (run_id, account, environment, label, started_utc, ended_utc, status, emissions_kg, "
            "energy_kwh, epochs) FROM STDIN"
        ) as copy:
            run_ids = [uuid.uuid4().hex for _ in range(runs)]
            for run in run_ids:
                copy.write_row(
                    (run, ACCOUNT, "sandbox", "bench", stamp, stamp, "finished", per_run * 1e-3, per_run * 1e-2, per_run)
                )
        with cur.copy("COPY records (run_id, epoch, emissions_kg, energy_kwh, recorded_utc) FROM STDIN") as copy:
            for run in run_ids:
                for e in range(per_run):
                    copy.write_row((run, e, (e + 1) * 1e-3, (e + 1) * 1e-2, stamp))
        conn.commit()
    return time.perf_counter() - started


def build(path: Path, runs: int, per_run: int) -> float:
    from carbonoffset.core.ledger import Ledger

    started = time.perf_counter()
    Ledger(path).close()
    raw = sqlite3.connect(path)
    raw.execute("BEGIN")
    stamp = "2026-01-01T00:00:00.000000Z"
    for _ in range(runs):
        run = uuid.uuid4().hex
        raw.execute(
            "INSERT INTO runs (run_id, account, environment, label, started_utc, ended_utc, status, "
            "emissions_kg, energy_kwh, epochs) VALUES (?, ?, 'sandbox', 'bench', ?, ?, 'finished', ?, ?, ?)",
            (run, ACCOUNT, stamp, stamp, per_run * 1e-3, per_run * 1e-2, per_run),
        )
        raw.executemany(
            "INSERT INTO records (run_id, epoch, emissions_kg, energy_kwh, recorded_utc) VALUES (?, ?, ?, ?, ?)",
            ((run, e, (e + 1) * 1e-3, (e + 1) * 1e-2, stamp) for e in range(per_run)),
        )
    raw.execute("COMMIT")
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()
    return time.perf_counter() - started


def time_report(path: Path | str) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "carbonoffset.cli", "report", "--ledger", str(path), "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    data = json.loads(done.stdout)
    return {"wall_s": wall, "runs": data["accounts"][0]["runs"]}


_OPEN = """
import json, sys, time
from carbonoffset.core.ledger import Ledger
path = sys.argv[1]
t = time.perf_counter(); ledger = Ledger(path, full_check=False); open_s = time.perf_counter() - t
t = time.perf_counter(); ledger.verify(); verify_s = time.perf_counter() - t
ledger.close()
t = time.perf_counter(); Ledger(path).close(); full_s = time.perf_counter() - t
print(json.dumps({"session_open_s": open_s, "verify_s": verify_s, "full_open_s": full_s}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of one cycles measurement")
    parser.add_argument("--processes", default="1,8,32", help="comma-separated process counts")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--epochs-per-run", type=int, default=100)
    parser.add_argument("--hook-epochs", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    counts = [int(n) for n in args.processes.split(",")]
    backends = args.backends.split(",")

    results: dict[str, Any] = {"args": vars(args)}
    rows = []
    cluster = None
    if "postgresql" in backends:
        from carbonoffset.testing.postgres import PostgresCluster

        cluster = PostgresCluster().start()
    try:
        with tempfile.TemporaryDirectory(prefix="carbonoffset-ledger-") as tmp:
            for backend in backends:
                for mode in ("cycle", "record"):
                    by: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
                    for round_index in range(args.rounds):
                        for processes in counts if round_index % 2 == 0 else counts[::-1]:
                            target = fresh_target(backend, tmp, cluster)
                            by[processes].append(cycles(processes, args.seconds, mode, target))
                        print(
                            f"{backend} {mode} round {round_index + 1}/{args.rounds}: "
                            + ", ".join(f"{n} proc {by[n][-1]['per_second']:.0f}/s" for n in counts),
                            flush=True,
                        )
                    for processes, runs in by.items():
                        rate = median([r["per_second"] for r in runs])
                        ok = all(r["exactly_once"] for r in runs)
                        results[f"{backend}_{mode}_{processes}"] = {
                            "median_per_second": rate, "exactly_once": ok, "rounds": runs
                        }
                        rows.append([f"{backend}: {mode}s/s, {processes} process{'es' if processes > 1 else ''}", rate, ok])

                epochs = args.runs * args.epochs_per_run
                target = fresh_target(backend, tmp, cluster)
                print(f"{backend}: building a ledger of {epochs:,} recorded epochs ...", flush=True)
                if backend == "sqlite":
                    results[f"{backend}_build_s"] = build(Path(target), args.runs, args.epochs_per_run)
                else:
                    results[f"{backend}_build_s"] = build_postgresql(target, args.runs, args.epochs_per_run)
                reports = [time_report(Path(target) if backend == "sqlite" else target) for _ in range(args.rounds)]
                report = {"epochs": epochs, "median_wall_s": median([r["wall_s"] for r in reports]), "rounds": reports}
                rows.append([f"{backend}: `carbonoffset report` on {epochs:,} epochs, s", report["median_wall_s"], ""])
                if backend == "sqlite":
                    opens = []
                    for _ in range(args.rounds):
                        done = subprocess.run(
                            [sys.executable, "-c", _OPEN, target], capture_output=True, text=True, env=child_env()
                        )
                        opens.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    report["session_open_ms"] = median([o["session_open_s"] for o in opens]) * 1e3
                    report["verify_ms"] = median([o["verify_s"] for o in opens]) * 1e3
                    report["full_open_ms"] = median([o["full_open_s"] for o in opens]) * 1e3
                    rows.append(["  Ledger(path) open with the full check, ms", report["full_open_ms"], ""])
                    rows.append(["  Ledger(path, full_check=False) open (sessions), ms", report["session_open_ms"], ""])
                    rows.append(["  verify() (sessions: on the ledger thread), ms", report["verify_ms"], ""])
                results[f"{backend}_report"] = report

                done = subprocess.run(
                    [sys.executable, "-c", _HOOK, fresh_target(backend, tmp, cluster), str(args.hook_epochs)],
                    capture_output=True, text=True, env=child_env(), timeout=600,
                )
                if done.returncode != 0:
                    raise RuntimeError(done.stderr)
                hook = json.loads(done.stdout.strip().splitlines()[-1])
                results[f"{backend}_hook"] = hook
                rows.append([f"{backend}: epoch hook median, ms (target <= 0.5)", hook["median_ms"], ""])
                rows.append([f"{backend}: epoch hook p99, ms (target <= 5)", hook["p99_ms"], ""])
    finally:
        if cluster is not None:
            cluster.close()
    print(
        table(
            f"Ledger scale (median of {args.rounds} rounds; {args.seconds:g} s per rate measurement)",
            ["measure", "median", "exactly once"],
            rows,
        )
    )
    write_json(args.json, {"benchmark": "ledger_scale", **results})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
