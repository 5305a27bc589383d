"""What the callback costs per epoch, measured inside one fit: its parts switched on and off in turns.

Fit-time comparisons between processes (``fit_overhead.py``, ``epoch_slope.py``) need a quiet
machine: on a shared 2-core VM, fits of the same model vary by 30 % from one minute to the next.
This script compares within one Lightning fit instead (``fit_overhead.py``'s model: digits, batch 64,
epochs of about 50 ms with all cores busy). A thread switches one part of the callback on and off
every ``--window`` seconds; the mean epoch time of each window is compared with the next one's
(the other state), so that the machine's slow drifts cancel in the differences. Reported: the mean
of those paired differences (on minus off), in ms per epoch, with its standard error.

Modes (each fit is a fresh process; modes interleaved):

* ``hook``: the callback's epoch hook runs in one window and is skipped in the next: the whole
  per-epoch cost (the hook, the records it queues, the ledger thread's coalesced writes, the logged
  metrics).
* ``meter``: the hook always runs; the measuring process is stopped (``SIGSTOP``) in every other
  window: what the measuring process and its reader thread cost the training once started.
* ``aa``: the control: nothing is switched, the windows are labelled as if it were. Its figure
  shows how far the noise alone carries the paired difference.

The first ``--skip`` seconds (the measuring process's start) are left out: ``start_end.py`` and
``fit_overhead.py`` measure what the start costs.

Usage (about 4 minutes on 2 cores)::

    python benchmarks/epoch_cost.py --json benchmarks/results/epoch_cost.json
"""

from __future__ import annotations

import argparse
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

MODES = ("hook", "meter", "aa")


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
    windows: list[tuple[float, float, bool]] = []
    halt = threading.Event()

    class Clock(pl.Callback):  # type: ignore[misc]
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="carbonoffset-cost-") as tmp, fake_server() as server:
        callback = CarbonOffsetCallback(**settings_for(server, Path(tmp) / "ledger.sqlite3"))
        hook = callback.on_train_epoch_end

        def switched_hook(*args: Any, **kwargs: Any) -> None:
            if on[0] or mode != "hook":
                hook(*args, **kwargs)

        callback.on_train_epoch_end = switched_hook  # type: ignore[method-assign]

        def meter_pid() -> int | None:
            session = callback.session
            return getattr(session.source, "meter_pid", None) if session is not None else None

        def switch() -> None:
            while not halt.is_set():
                started = time.perf_counter()
                halt.wait(window_s)
                windows.append((started, time.perf_counter(), on[0]))
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
    means: list[tuple[bool, float]] = []
    for started, ended, state in windows:
        durations = [b - a for a, b in pairwise(ends) if started <= a and b <= ended and a - t0 >= skip_s]
        if len(durations) >= 3:
            means.append((state, statistics.fmean(durations)))
    diffs = [
        (m1 - m2) if s1 else (m2 - m1) for (s1, m1), (s2, m2) in pairwise(means) if s1 != s2
    ]
    return {"mode": mode, "fit_s": fit_s, "epochs": len(ends), "diffs_s": diffs}


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
    diffs: dict[str, list[float]] = {m: [] for m in args.modes}
    for fit_index in range(args.fits):
        shift = fit_index % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            result = run_child(
                [__file__, "--worker", mode, str(args.epochs), str(args.window), str(args.skip)], env=dict(env)
            )
            diffs[mode].extend(result["diffs_s"])
            print(f"fit {fit_index + 1} {mode:5s} {result['fit_s']:.1f} s, {len(result['diffs_s'])} pairs", flush=True)
    rows = []
    summary: dict[str, Any] = {}
    for mode, values in diffs.items():
        mean = statistics.fmean(values) * 1e3 if values else float("nan")
        se = statistics.stdev(values) / len(values) ** 0.5 * 1e3 if len(values) > 1 else float("nan")
        summary[mode] = {"pairs": len(values), "ms_per_epoch": mean, "se_ms": se}
        rows.append([mode, len(values), mean, se, mean + 2 * se])
    print(table(
        f"Per-epoch cost inside one fit (Lightning, {args.epochs} epochs, {args.window:g} s windows, "
        f"{args.fits} fits per mode, {os.cpu_count()} cores; on minus off)",
        ["mode", "pairs", "ms / epoch", "standard error ms", "upper bound ms (mean + 2 SE)"],
        rows,
    ))
    write_json(args.json, {
        "benchmark": "epoch_cost", "epochs": args.epochs, "window_s": args.window, "skip_s": args.skip,
        "fits": args.fits, "summary": summary, "diffs_s": diffs,
    })


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
