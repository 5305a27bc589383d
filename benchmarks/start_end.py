"""Start and end latency: what the callback adds before the first training step and at train end.

Two measurements, each in fresh processes (a user's script starts cold: the
first CodeCarbon tracker of a process has to detect the hardware, 1-2 s):

* ``hooks``: the shared callback logic alone (``CallbackCore``): constructing
  it, ``begin()`` (fit start: ledger run, tracker start), three epochs of
  ``--epoch-s`` seconds of CPU work, ``end()`` (final record, no offset due:
  micrograms). Also reported: how late the tracker started (``late_start_s``)
  and the share of the run's energy that is the estimate for that gap
  (so no energy goes unmeasured).
* ``lightning_first_step``: time from ``trainer.fit()`` to the first
  ``training_step``, with and without the callback, in interleaved fresh
  processes (order alternating), so the difference is what the callback adds.

Usage::

    python benchmarks/start_end.py --json results/start_end.json
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


def _busy(seconds: float) -> None:
    until = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < until:
        x += 1


def hooks_worker(epoch_s: float, build_s: float) -> dict[str, Any]:
    import logging

    from _common import fake_server, settings_for

    logging.getLogger("carbonoffset").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="carbonoffset-start-") as tmp, fake_server() as server:
        from carbonoffset.core.ledger import Ledger

        started = time.perf_counter()
        Ledger(Path(tmp) / "new.sqlite3").close()
        new_ledger_s = time.perf_counter() - started
        settings = settings_for(server, Path(tmp) / "ledger.sqlite3")
        Ledger(settings["offset_ledger"]).close()  # an existing ledger, as for every run but the first
        started = time.perf_counter()
        from carbonoffset.core.callback import CallbackCore

        import_s = time.perf_counter() - started
        started = time.perf_counter()
        core = CallbackCore(label="bench", **settings)
        construct_s = time.perf_counter() - started
        _busy(build_s)  # the user builds the model and the trainer
        started = time.perf_counter()
        core.begin()
        begin_s = time.perf_counter() - started
        for epoch in range(3):
            _busy(epoch_s)
            core.epoch_end(epoch)
        started = time.perf_counter()
        report = core.end()
        end_s = time.perf_counter() - started
        source = core.session.source if core.session is not None else None
        late = float(getattr(source, "late_start_s", 0.0))
        estimate = getattr(source, "late_start_estimate", None)
        assert report is not None
        gap_share = (
            estimate.energy_kwh / report.energy_kwh if estimate is not None and report.energy_kwh else 0.0
        )
    return {
        "import_s": import_s,
        "new_ledger_s": new_ledger_s,
        "construct_s": construct_s,
        "begin_s": begin_s,
        "end_s": end_s,
        "late_start_s": late,
        "gap_share": gap_share,
        "emissions_kg": report.emissions_kg,
        "energy_kwh": report.energy_kwh,
        "confirmed_lb": report.confirmed_lb,
    }


def lightning_worker(with_callback: bool) -> dict[str, Any]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "codecarbon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lightning.pytorch as pl
    import torch
    from _common import fake_server, settings_for
    from torch.utils.data import DataLoader, TensorDataset

    from carbonoffset.demo.data import load_digits_split

    first_step: list[float] = []

    class Model(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if not first_step:
                first_step.append(time.perf_counter())
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    with tempfile.TemporaryDirectory(prefix="carbonoffset-first-step-") as tmp, fake_server() as server:
        callbacks = []
        if with_callback:
            from carbonoffset.integrations.lightning import CarbonOffsetCallback

            callbacks.append(CarbonOffsetCallback(**settings_for(server, Path(tmp) / "ledger.sqlite3")))
        data = load_digits_split()
        torch.manual_seed(0)
        loader = DataLoader(
            TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)), batch_size=64
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=3,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        started = time.perf_counter()
        trainer.fit(Model(), loader)
        total_s = time.perf_counter() - started
    return {"to_first_step_s": first_step[0] - started, "fit_s": total_s}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epoch-s", type=float, default=3.0, help="CPU work per epoch in the hooks test")
    parser.add_argument(
        "--build-s", type=float, default=0.5, help="CPU work between constructing the callback and fit start"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "hooks":
        print(json.dumps(hooks_worker(args.epoch_s, args.build_s)))
        return
    if args.worker in ("lightning-with", "lightning-without"):
        print(json.dumps(lightning_worker(args.worker == "lightning-with")))
        return

    hooks: list[dict[str, Any]] = []
    first: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for round_index in range(args.rounds):
        hooks.append(
            run_child(
                [
                    __file__,
                    "--worker",
                    "hooks",
                    "--epoch-s",
                    str(args.epoch_s),
                    "--build-s",
                    str(args.build_s),
                ],
                env=child_env(),
            )
        )
        order = ("without", "with") if round_index % 2 == 0 else ("with", "without")
        for variant in order:
            first[variant].append(run_child([__file__, "--worker", f"lightning-{variant}"], env=child_env()))
        print(
            f"round {round_index + 1}/{args.rounds}: begin {hooks[-1]['begin_s'] * 1e3:.1f} ms, "
            f"end {hooks[-1]['end_s'] * 1e3:.1f} ms, late start {hooks[-1]['late_start_s']:.2f} s; first step "
            f"without {first['without'][-1]['to_first_step_s'] * 1e3:.0f} ms, "
            f"with {first['with'][-1]['to_first_step_s'] * 1e3:.0f} ms",
            flush=True,
        )

    def m(key: str, runs: list[dict[str, Any]], scale: float = 1e3) -> float:
        return median([r[key] for r in runs]) * scale

    added = [
        w["to_first_step_s"] - o["to_first_step_s"]
        for w, o in zip(first["with"], first["without"], strict=True)
    ]
    summary = {
        "hooks": {
            "construct_ms": m("construct_s", hooks),
            "begin_ms": m("begin_s", hooks),
            "new_ledger_ms": m("new_ledger_s", hooks),
            "end_ms": m("end_s", hooks),
            "late_start_s": m("late_start_s", hooks, 1.0),
            "gap_share_of_energy": m("gap_share", hooks, 1.0),
            "runs": hooks,
        },
        "lightning_first_step": {
            "without_ms": m("to_first_step_s", first["without"]),
            "with_ms": m("to_first_step_s", first["with"]),
            "added_ms_median_of_pairs": median(added) * 1e3,
            "runs": first,
        },
    }
    h, f = summary["hooks"], summary["lightning_first_step"]
    print(
        table(
            f"Start and end latency (median of {args.rounds} fresh processes)",
            ["measure", "median"],
            [
                ["CallbackCore(...) construction, ms", h["construct_ms"]],
                ["begin() at fit start (existing ledger), ms", h["begin_ms"]],
                ["(once per user: creating the ledger file), ms", h["new_ledger_ms"]],
                ["end() at train end, no offset due, ms", h["end_ms"]],
                ["tracker started late by, s (first tracker of the process)", h["late_start_s"]],
                ["share of the run's energy estimated for that gap", h["gap_share_of_energy"]],
                ["Lightning fit() -> first training_step without callback, ms", f["without_ms"]],
                ["Lightning fit() -> first training_step with callback, ms", f["with_ms"]],
                ["added before the first step (median of pairs), ms", f["added_ms_median_of_pairs"]],
            ],
        )
    )
    write_json(args.json, {"benchmark": "start_end", "args": vars(args), **summary})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
