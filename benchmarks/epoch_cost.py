"""What the callback costs per epoch, measured inside one fit: its parts switched on and off in turns.

Fit-time comparisons between processes (``fit_overhead.py``, ``epoch_slope.py``) need a quiet
machine: on a shared 2-core VM, fits of the same model vary by 30 % from one minute to the next.
This script compares within one Lightning fit instead (``fit_overhead.py``'s model: digits, batch 64,
epochs of about 50 ms with all cores busy). A thread switches one part of the callback on and off
every ``--window`` seconds; the mean epoch time of each window is compared with the next one's
(the other state), so that the machine's slow drifts cancel in the differences. Reported: the mean
of those paired differences (on minus off), in ms per epoch, with its standard error.

Modes (each fit is a fresh process; modes interleaved; the standard errors are taken between
fits, see :func:`mean_se_ms`, so "mean + 2 SE" is a 95 % bound only with about six fits per
mode or more, not with the default two):

* ``hook``: the callback's epoch hook runs in one window and is skipped in the next: the whole
  per-epoch cost (the hook, the records it queues, the ledger thread's coalesced writes, the logged
  metrics).
* ``meter``: the hook always runs; the measuring process is stopped (``SIGSTOP``) in every other
  window: what the measuring process and its reader thread cost the training once started.
* ``aa``: the control: nothing is switched, the windows are labelled as if it were. Its figure
  shows how far the noise alone carries the paired difference.

The first ``--skip`` seconds (the measuring process's start) are left out: ``start_end.py`` and
``fit_overhead.py`` measure what the start costs.

Where the time goes, per epoch and on minus off like the wall time: the CPU time of the whole
process, of the training (main) thread and of carbonoffset's threads (``carbonoffset-*``: the
ledger writer and its watchdog, the measuring process's reader, the offset worker), and how
often the training thread was preempted (involuntary context switches, ``/proc``). And the hook's
own wall and CPU time inside the fit (every mode runs it, ``hook`` in its on windows only).

Usage (about 4 minutes on 2 cores)::

    python benchmarks/epoch_cost.py --json benchmarks/results/epoch_cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from _common import child_env, run_child, table, write_json

MODES = ("hook", "publish", "meter", "aa")


def worker(mode: str, epochs: int, window_s: float, skip_s: float) -> dict[str, Any]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lightning.pytorch as pl
    import torch
    from _common import fake_server, settings_for

    from carbonoffset.demo.data import load_digits_split
    from carbonoffset.demo.lightning import digits_loader, digits_module
    from carbonoffset.integrations.lightning import CarbonOffsetCallback

    data = load_digits_split()
    loader = digits_loader(torch, data)
    model = digits_module(pl, torch)()
    ends: list[float] = []
    on = [True]
    windows: list[tuple[float, float, bool, dict[str, float]]] = []
    halt = threading.Event()

    class Clock(pl.Callback):  # type: ignore[misc]
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="carbonoffset-cost-") as tmp, fake_server() as server:
        callback = CarbonOffsetCallback(**settings_for(server, Path(tmp) / "ledger.sqlite3"))
        hook = callback.on_train_epoch_end

        hook_s: list[tuple[float, float, float]] = []  # (start, wall s, this thread's CPU s)

        def switched_hook(*args: Any, **kwargs: Any) -> None:
            if on[0] or mode != "hook":
                started, cpu = time.perf_counter(), time.thread_time()
                hook(*args, **kwargs)
                hook_s.append((started, time.perf_counter() - started, time.thread_time() - cpu))

        callback.on_train_epoch_end = switched_hook  # type: ignore[method-assign]
        publish = callback._publish

        def switched_publish(*args: Any, **kwargs: Any) -> None:
            if on[0] or mode != "publish":
                publish(*args, **kwargs)

        callback._publish = switched_publish  # type: ignore[method-assign]

        def meter_pid() -> int | None:
            session = callback.session
            return getattr(session.source, "meter_pid", None) if session is not None else None

        main_thread = threading.main_thread()

        def usage() -> dict[str, float]:
            """CPU seconds so far: the whole process, the training (main) thread, carbonoffset's threads;
            and the main thread's involuntary context switches (preempted by another thread or process)."""
            ours = 0.0
            for thread in threading.enumerate():
                if thread.name.startswith("carbonoffset") and thread.ident is not None:
                    with contextlib.suppress(OSError):  # ended meanwhile
                        ours += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            main_cpu = time.clock_gettime(time.pthread_getcpuclockid(main_thread.ident or 0))
            status = Path(f"/proc/self/task/{main_thread.native_id}/status").read_text()
            preempted = next(int(line.split()[1]) for line in status.splitlines()
                             if line.startswith("nonvoluntary_ctxt_switches"))
            return {"process_cpu_s": time.process_time(), "main_cpu_s": main_cpu, "ours_cpu_s": ours,
                    "main_preempted": float(preempted)}

        def switch() -> None:
            while not halt.is_set():
                started, before = time.perf_counter(), usage()
                if halt.wait(window_s):
                    break  # the fit ended inside this window: its figures hold the run's end, not epochs
                after = usage()
                windows.append((started, time.perf_counter(), on[0], {k: after[k] - before[k] for k in after}))
                on[0] = not on[0]
                pid = meter_pid()
                if mode == "meter" and pid:
                    os.kill(pid, signal.SIGCONT if on[0] else signal.SIGSTOP)

        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            callbacks=[callback, Clock()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        switcher = threading.Thread(target=switch, daemon=True)
        t0 = time.perf_counter()
        switcher.start()
        try:
            trainer.fit(model, loader)
        finally:
            halt.set()
            switcher.join()
            pid = meter_pid()
            if pid:
                os.kill(pid, signal.SIGCONT)
        fit_s = time.perf_counter() - t0
    means: list[tuple[bool, float, dict[str, float]]] = []
    for started, ended, state, used in windows:
        durations = [b - a for a, b in pairwise(ends) if started <= a and b <= ended and a - t0 >= skip_s]
        if len(durations) >= 3:
            epochs_in = sum(1 for e in ends if started <= e <= ended)
            means.append((state, statistics.fmean(durations), {k: v / max(1, epochs_in) for k, v in used.items()}))
    diffs, usage_diffs = [], []
    for (s1, m1, u1), (s2, m2, u2) in pairwise(means):
        if s1 != s2:
            sign = 1.0 if s1 else -1.0
            diffs.append(sign * (m1 - m2))
            usage_diffs.append({k: sign * (u1[k] - u2[k]) for k in u1})
    in_fit = [(wall, cpu) for started, wall, cpu in hook_s if started - t0 >= skip_s]
    return {
        "mode": mode, "fit_s": fit_s, "epochs": len(ends), "diffs_s": diffs, "usage_diffs": usage_diffs,
        "usage_on": [u for state, _, u in means if state],
        "hook_wall_s": [w for w, _ in in_fit], "hook_cpu_s": [c for _, c in in_fit],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--epochs", type=int, default=800, help="epochs per fit (about 40 s on 2 cores)")
    parser.add_argument("--fits", type=int, default=2, help="fits per mode")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per on/off window")
    parser.add_argument("--skip", type=float, default=5.0, help="seconds left out at the start")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, epochs, window, skip = args.worker
        print(json.dumps(worker(mode, int(epochs), float(window), float(skip))))
        return

    cache = tempfile.mkdtemp(prefix="carbonoffset-bench-cache-")
    env = child_env(XDG_CACHE_HOME=cache)
    diffs: dict[str, list[list[float]]] = {m: [] for m in args.modes}  # per fit: its window pairs
    usage: dict[str, list[list[dict[str, float]]]] = {m: [] for m in args.modes}
    usage_on: dict[str, list[list[dict[str, float]]]] = {m: [] for m in args.modes}
    hook_wall: dict[str, list[float]] = {m: [] for m in args.modes}
    hook_cpu: dict[str, list[float]] = {m: [] for m in args.modes}
    for fit_index in range(args.fits):
        shift = fit_index % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            result = run_child(
                [__file__, "--worker", mode, str(args.epochs), str(args.window), str(args.skip)], env=dict(env)
            )
            diffs[mode].append(result["diffs_s"])
            usage[mode].append(result["usage_diffs"])
            usage_on[mode].append(result["usage_on"])
            hook_wall[mode].extend(result["hook_wall_s"])
            hook_cpu[mode].extend(result["hook_cpu_s"])
            print(f"fit {fit_index + 1} {mode:5s} {result['fit_s']:.1f} s, {len(result['diffs_s'])} pairs", flush=True)
    rows, usage_rows, on_rows, hook_rows = [], [], [], []
    summary: dict[str, Any] = {}
    for mode, values in diffs.items():
        mean, se = mean_se_ms(values)
        pairs = sum(len(v) for v in values)
        summary[mode] = {"pairs": pairs, "ms_per_epoch": mean, "se_ms": se}
        rows.append([mode, pairs, mean, se, mean + 2 * se])
        for key in USAGE:
            key_mean, key_se = mean_se_ms([[u[key] for u in fit] for fit in usage[mode]])
            on_mean, on_se = mean_se_ms([[u[key] for u in fit] for fit in usage_on[mode]])
            summary[mode][key] = {"on_minus_off": key_mean, "se": key_se, "on_windows": on_mean, "on_se": on_se}
        usage_rows.append([mode, *(f"{summary[mode][k]['on_minus_off']:+.3g} ({summary[mode][k]['se']:.2g})" for k in USAGE)])
        on_rows.append([mode, *(f"{summary[mode][k]['on_windows']:.3g} ({summary[mode][k]['on_se']:.2g})" for k in USAGE)])
        if hook_wall[mode]:
            walls = sorted(hook_wall[mode])
            summary[mode]["hook_in_fit"] = {
                "calls": len(walls), "median_ms": statistics.median(walls) * 1e3,
                "mean_ms": statistics.fmean(walls) * 1e3, "p99_ms": walls[int(0.99 * (len(walls) - 1))] * 1e3,
                "cpu_mean_ms": statistics.fmean(hook_cpu[mode]) * 1e3,
            }
            hook_rows.append([mode, *summary[mode]["hook_in_fit"].values()])
    print(table(
        f"Per-epoch cost inside one fit (Lightning, {args.epochs} epochs, {args.window:g} s windows, "
        f"{args.fits} fits per mode, {os.cpu_count()} cores; on minus off)",
        ["mode", "pairs", "ms / epoch", "standard error ms", "upper bound ms (mean + 2 SE)"],
        rows,
    ))
    print(table(
        "Where it goes: per epoch, on minus off (standard error)",
        ["mode", *USAGE.values()],
        usage_rows,
    ))
    print(table(
        "Per epoch in the on windows (standard error)",
        ["mode", *USAGE.values()],
        on_rows,
    ))
    print(table(
        "The hook's own time inside the fit (the windows it ran in)",
        ["mode", "calls", "median ms", "mean ms", "p99 ms", "its thread's CPU, mean ms"],
        hook_rows,
    ))
    write_json(args.json, {
        "benchmark": "epoch_cost", "epochs": args.epochs, "window_s": args.window, "skip_s": args.skip,
        "fits": args.fits, "summary": summary, "diffs_s": diffs,
    })


USAGE = {  # per-window figure (seconds or a count, per epoch): its column heading, printed x 1000
    "process_cpu_s": "process CPU ms",
    "main_cpu_s": "training thread CPU ms",
    "ours_cpu_s": "carbonoffset threads CPU ms",
    "main_preempted": "training thread preemptions per 1000 epochs",
}


def mean_se_ms(per_fit: list[list[float]]) -> tuple[float, float]:
    """The mean of every fit's window pairs and its standard error, times 1000 (s to ms).

    Neighbouring pairs share a window (on-off, then off-on), so they are not independent and
    the pairs' own spread understates the error (by about 1.2-1.4 times here). The standard
    error is therefore taken between fits, from each fit's mean (fits are independent
    processes); with a single fit, from its pairs. NaN where too few.
    """
    pooled = [v for fit in per_fit for v in fit]
    mean = statistics.fmean(pooled) * 1e3 if pooled else float("nan")
    fit_means = [statistics.fmean(fit) for fit in per_fit if fit]
    spread = fit_means if len(fit_means) > 1 else pooled
    se = statistics.stdev(spread) / len(spread) ** 0.5 * 1e3 if len(spread) > 1 else float("nan")
    return mean, se


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
