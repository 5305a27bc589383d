"""Epoch figures against final figures: how far the last epoch's ``carbon/emissions_kg`` is from the run's
final (CodeCarbon's exact) figure, for Lightning digits fits of about 2 s, 20 s and 200 s.

Each fit runs in a fresh process with the default ``CarbonOffsetCallback`` (CodeCarbon in the
measuring process, offline for France, a temporary ledger, no offsets). Two machine states:

* ``fresh``: an empty cache folder, as on a machine where carbonoffset never ran: the first
  seconds are estimated at CodeCarbon's defaults (:mod:`carbonoffset.core.estimates`);
* ``remembered``: a cache folder in which an earlier fit left the power it measured.

Reported per fit: wall time, epochs, the first epoch's figure and its estimated share, the last
epoch's figure and its estimated share, the final figure, and the gap ``(final - last epoch) /
final`` (positive: the epoch figure is below the final one). The machine's load average
(``/proc/loadavg``) is recorded before and after every fit: figures on a shared machine are noisy.

Usage::

    python benchmarks/epoch_vs_final.py --json benchmarks/results/epoch_vs_final.json
    python benchmarks/epoch_vs_final.py --sizes 2 20 --repeats 2   # without the 200 s fit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import child_env, median, run_child, table, write_json

#: Fit lengths, s: Lightning's ``max_time`` ends each fit (so the lengths hold on a loaded machine too).
SIZES = (2, 20, 200)


def _load() -> float:
    with open("/proc/loadavg", encoding="ascii") as file:
        return float(file.read().split()[0])


def worker(seconds: int, ledger: str) -> dict[str, Any]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lightning.pytorch as pl
    import torch

    from carbonoffset.demo.data import load_digits_split
    from carbonoffset.demo.lightning import digits_loader
    from carbonoffset.integrations.lightning import CarbonOffsetCallback

    reports: list[Any] = []

    class Spy(pl.Callback):  # after carbonoffset's callback: the report it just made
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            reports.append(callback.last_report)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    # one torch thread: on a shared machine more threads than free cores make torch's parallel
    # regions spin for their slowest thread (epochs 50x slower here under load), not what users see
    torch.set_num_threads(1)
    started = time.perf_counter()
    callback = CarbonOffsetCallback(
        offset_ledger=ledger, country_iso_code="FRA", offset_environment="sandbox", auto_offset=False
    )
    data = load_digits_split()
    loader = digits_loader(torch, data)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_time={"seconds": seconds},
        callbacks=[callback, Spy()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(), loader)
    fit_s = time.perf_counter() - started
    final = callback.final_report
    assert final is not None
    first, last = reports[0], reports[-1]
    return {
        "fit_s": fit_s,
        "epochs": len(reports),
        "first_kg": first.emissions_kg,
        "first_estimated": first.estimated_kg / first.emissions_kg if first.emissions_kg else None,
        "last_kg": last.emissions_kg,
        "last_estimated": last.estimated_kg / last.emissions_kg if last.emissions_kg else None,
        "final_kg": final.emissions_kg,
        "gap": (final.emissions_kg - last.emissions_kg) / final.emissions_kg,
        "zero_epochs": sum(1 for r in reports if r.emissions_kg <= 0),
        "decreasing": sum(
            1 for a, b in zip(reports, reports[1:], strict=False) if b.emissions_kg < a.emissions_kg
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="fit lengths, s")
    parser.add_argument(
        "--repeats", type=int, default=3, help="fits per size and state (the 200 s fit runs once)"
    )
    parser.add_argument("--worker", nargs=2, metavar=("SECONDS", "LEDGER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1])))
        return

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="carbonoffset-evf-") as folder:
        remembered_cache = Path(folder) / "remembered-cache"
        # an 8 s fit leaves the power it measured in the shared cache folder
        run_child(
            [__file__, "--worker", "8", str(Path(folder) / "prime.sqlite3")],
            env=child_env(XDG_CACHE_HOME=str(remembered_cache)),
        )
        for size in args.sizes:
            repeats = 1 if size >= 200 else args.repeats
            for state in ("fresh", "remembered"):
                if size >= 200 and state == "fresh":
                    continue  # the estimate covers the first seconds only: the same as "remembered" here
                for index in range(repeats):
                    cache = (
                        remembered_cache if state == "remembered" else Path(folder) / f"fresh-{size}-{index}"
                    )
                    ledger = Path(folder) / f"{state}-{size}-{index}.sqlite3"
                    load_before = _load()
                    out = run_child(
                        [__file__, "--worker", str(size), str(ledger)],
                        env=child_env(XDG_CACHE_HOME=str(cache)),
                        timeout=1800,
                    )
                    out.update(size_s=size, state=state, load_before=load_before, load_after=_load())
                    results.append(out)
                    print(json.dumps(out), file=sys.stderr)

    rows = []
    for size in args.sizes:
        for state in ("fresh", "remembered"):
            mine = [r for r in results if r["size_s"] == size and r["state"] == state]
            if not mine:
                continue
            rows.append(
                [
                    f"~{size} s",
                    state,
                    len(mine),
                    f"{median([r['fit_s'] for r in mine]):.1f}",
                    median([r["epochs"] for r in mine]),
                    f"{100 * median([r['first_estimated'] for r in mine]):.0f} %",
                    f"{100 * median([r['last_estimated'] for r in mine]):.1f} %",
                    f"{100 * median([r['gap'] for r in mine]):+.1f} %",
                    f"{100 * min(r['gap'] for r in mine):+.1f} .. {100 * max(r['gap'] for r in mine):+.1f} %",
                    sum(r["zero_epochs"] for r in mine),
                    f"{min(r['load_before'] for r in mine):.1f}-{max(r['load_after'] for r in mine):.1f}",
                ]
            )
    print(
        table(
            "Last epoch vs final figure (Lightning digits, default callback, fresh processes)",
            [
                "fit",
                "cache",
                "n",
                "fit s",
                "epochs",
                "1st epoch estimated",
                "last epoch estimated",
                "gap (median)",
                "gap (range)",
                "zero epochs",
                "load",
            ],
            rows,
        )
    )
    write_json(
        args.json,
        {"benchmark": "epoch_vs_final", "sizes_s": args.sizes, "results": results, "cpus": os.cpu_count()},
    )


if __name__ == "__main__":
    main()
