"""Marginal wall time per epoch: the slope of fit time against epoch count, with and without the callback.

A fit-overhead ratio mixes what the callback costs once (start, end, the measuring process's start-up) with
what it costs per epoch. This script separates them: it times Lightning fits of the same model at several
epoch counts (``fit_overhead.py``'s worker: digits, batch 64, epochs of about 50 ms with all cores busy),
each in a fresh process, variants interleaved in a rotating order, and fits a least-squares line
``fit_s = fixed_s + per_epoch_s * epochs`` to each variant's samples. The callback's marginal cost per
epoch is the difference of the two slopes; its fixed cost, the difference of the intercepts.

Usage (about 6 minutes on 2 cores; ``--threads 1`` leaves a core free)::

    python benchmarks/epoch_slope.py --json benchmarks/results/epoch_slope.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import child_env, median, run_child, table, write_json

_PRIME_CACHE = (
    "import json; from carbonoffset.core.sources import warm_up_codecarbon; "
    "print(json.dumps({'primed': warm_up_codecarbon().wait(300)}))"
)


def slope(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y`` on ``x``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    b = sxy / sxx
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--epochs", type=int, nargs="+", default=[40, 160, 320])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, all cores)")
    parser.add_argument("--variants", nargs="+", default=["none", "callback"])
    args = parser.parse_args()

    cache = tempfile.mkdtemp(prefix="carbonoffset-bench-cache-")
    extra = {"XDG_CACHE_HOME": cache}
    if args.threads:
        extra.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env = child_env(**extra)
    run_child(["-c", _PRIME_CACHE], env=env)
    worker = str(Path(__file__).with_name("fit_overhead.py"))
    samples: dict[str, list[tuple[int, float]]] = {v: [] for v in args.variants}
    # CPU seconds of carbonoffset's threads in the training process per fit (the ledger writer,
    # the offset worker, the measuring process's reader): free of the machine's noise
    threads: dict[str, list[tuple[int, float]]] = {v: [] for v in args.variants}
    # every fit's own figures (late start, when each epoch ended...), in the order they ran
    fits_run: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        for epochs in args.epochs:
            shift = (round_index + epochs) % len(args.variants)
            for variant in args.variants[shift:] + args.variants[:shift]:
                result = run_child([worker, "--worker", "lightning", variant, str(epochs)], env=dict(env))
                samples[variant].append((epochs, result["fit_s"]))
                fits_run.append({"round": round_index, "variant": variant, "epochs": epochs, **result})
                if result.get("threads_cpu_s") is not None:
                    threads[variant].append((epochs, result["threads_cpu_s"]))
                print(f"round {round_index + 1} {variant:9s} {epochs:4d} epochs {result['fit_s']:.2f} s", flush=True)
    fits = {v: slope(points) for v, points in samples.items()}
    # paired: the two variants of one (round, epochs) run back to back, so the machine's slow drifts
    # cancel in their difference; the slope of the differences is the marginal cost per epoch, and
    # the spread of the per-round slopes shows how far the noise carries it
    paired: dict[str, dict[str, Any]] = {}
    for variant in args.variants[1:]:
        diffs = [(e, t - b) for (e, t), (_, b) in zip(samples[variant], samples["none"], strict=True)]
        per_round = []
        for round_index in range(args.rounds):
            chunk = diffs[round_index * len(args.epochs):(round_index + 1) * len(args.epochs)]
            if len({e for e, _ in chunk}) > 1:
                per_round.append(slope(chunk)[1] * 1e3)
        per_round.sort()
        paired[variant] = {
            "ms_per_epoch": slope(diffs)[1] * 1e3,
            "per_round_median_ms": median(per_round),
            "per_round_ms": per_round,
        }
        print(f"paired {variant}: {paired[variant]['ms_per_epoch']:+.2f} ms / epoch (least squares of the "
              f"differences), per-round median {median(per_round):+.2f} ms, "
              f"range {per_round[0]:+.2f} to {per_round[-1]:+.2f} ms", flush=True)
    base_fixed, base_slope = fits["none"]
    rows: list[list[Any]] = []
    for variant, (fixed, per_epoch) in fits.items():
        own = threads[variant]
        rows.append([
            variant,
            fixed,
            per_epoch * 1e3,
            (fixed - base_fixed),
            (per_epoch - base_slope) * 1e3,
            median([t for _, t in samples[variant]]),
            slope(own)[1] * 1e3 if len({e for e, _ in own}) > 1 else "",
        ])
    print(table(
        f"Marginal wall time per epoch (Lightning, {args.rounds} rounds x epochs {args.epochs}, "
        f"torch threads {args.threads or 'default'}, {os.cpu_count()} cores)",
        ["variant", "fixed s", "ms / epoch", "fixed s added", "ms / epoch added", "median fit s",
         "own threads' CPU ms / epoch"],
        rows,
    ))
    write_json(args.json, {
        "benchmark": "epoch_slope",
        "threads": args.threads,
        "epochs": args.epochs,
        "samples": samples,
        "threads_cpu_s": threads,
        "fits": {v: {"fixed_s": f, "per_epoch_s": s} for v, (f, s) in fits.items()},
        "paired": paired,
        "runs": fits_run,
    })


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
