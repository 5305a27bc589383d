"""The Lightning callback in a distributed fit: 2 CPU processes with ``ddp_fork``, gloo, loopback only.

The policy under test lives in ``CallbackCore``: local rank 0 of each node
runs the node's tracker; each epoch the node figures are summed with the
strategy's own ``reduce``; global rank 0 records, offsets and broadcasts its
figures, so every rank logs the same numbers and stops at the same epoch.

Each test counts trackers with ``Counting``, a source wrapper that appends a
line to a file every time a tracker starts or stops (the forked processes
share the file), and records what every rank sees in ``rank<N>.jsonl``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import threading
import time
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _distributed import free_port, read_jsonl

from carbonoffset.core.ledger import Ledger
from carbonoffset.core.sources import CodeCarbonSource, EmissionsSource, Measurement
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions

if importlib.util.find_spec("lightning") is None:
    pytest.skip("lightning is not installed (pip install carbonoffset[lightning])", allow_module_level=True)

pytestmark = pytest.mark.slow

CARBON_KEYS = ("carbon/energy_kwh", "carbon/emissions_kg", "carbon/offset_kg", "carbon/pending_kg")


class Counting:
    """An emissions source wrapper that logs each start and stop (pid, time, figures) to a JSON-lines file."""

    def __init__(self, inner: EmissionsSource, log: Path) -> None:
        self.inner, self.log = inner, log

    def _write(self, **row: Any) -> None:
        with open(self.log, "a", encoding="utf-8") as file:
            file.write(json.dumps({"pid": os.getpid(), **row}) + "\n")

    def start(self) -> None:
        self.inner.start()
        self._write(event="start", t=time.time())

    def read(self) -> Measurement:
        return self.inner.read()

    def stop(self) -> Measurement:
        t = time.time()
        total = self.inner.stop()
        self._write(event="stop", t=t, emissions_kg=total.emissions_kg, energy_kwh=total.energy_kwh)
        return total


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh loopback port per fit; Lightning writes MASTER_PORT into this process's environment."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


@pytest.fixture(scope="module")
def lx() -> Iterator[types.SimpleNamespace]:
    """Lightning, the callback, the digits loader, a tiny MLP and a per-rank recorder (imported once)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from carbonoffset.demo.data import load_digits_split
    from carbonoffset.integrations.lightning import CarbonOffsetCallback

    data = load_digits_split()
    dataset = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))

    class DigitsMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    class RankRecorder(pl.Callback):
        """Placed after ours: what each rank sees (``rank<N>.jsonl``). With ``reference``, global rank 1
        (which runs no tracker of ours) measures the node over the same fit with a plain CodeCarbon tracker.
        With ``hang_at``, global rank 1 stops answering at the end of that epoch (before our hook runs)."""

        def __init__(self, ours: Any, folder: Path, *, reference: bool = False, hang_at: int | None = None):
            self.ours, self.folder, self.reference, self.hang_at = ours, folder, reference, hang_at
            self.tracker: Any = None

        def _write(self, trainer: Any, **row: Any) -> None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in CARBON_KEYS}
            with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as file:
                file.write(json.dumps({"metrics": metrics, **row}, default=str) + "\n")

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            if self.reference and trainer.global_rank == 1:
                from codecarbon import OfflineEmissionsTracker

                self.tracker = OfflineEmissionsTracker(
                    country_iso_code="FRA", output_methods=[], save_to_file=False, log_level="error"
                )
                self.tracker.start()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            report = self.ours.last_report
            self._write(
                trainer, event="epoch", epoch=trainer.current_epoch, report=dataclasses.asdict(report)
            )

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            final = dataclasses.asdict(self.ours.final_report)
            self._write(
                trainer,
                event="end",
                epoch=trainer.current_epoch,
                should_stop=trainer.should_stop,
                final=final,
            )
            if self.tracker is not None:
                self.tracker.stop()
                data = self.tracker.final_emissions_data
                with open(self.folder / "reference.json", "w", encoding="utf-8") as file:
                    json.dump({"energy_kwh": data.energy_consumed, "duration_s": data.duration}, file)

    class Hang(pl.Callback):
        """Placed before ours: global rank 1 stops answering at the end of epoch ``epoch`` (a stuck rank)."""

        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_rank == 1 and trainer.current_epoch == self.epoch:
                time.sleep(120)

    def fit(root: Path, callbacks: list[Any], *, epochs: int, strategy: Any = "ddp_fork") -> Any:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_epochs=epochs,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        trainer.fit(DigitsMLP(), loader)
        return trainer

    yield types.SimpleNamespace(
        pl=pl, Callback=CarbonOffsetCallback, Recorder=RankRecorder, Hang=Hang, fit=fit
    )


def _ranks(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rank0, rank1 = read_jsonl(folder / "rank0.jsonl"), read_jsonl(folder / "rank1.jsonl")
    assert rank0 and rank1
    return rank0, rank1


def _only_run(ledger_path: Path) -> Any:
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
        return run


# ----------------------------------------------------------------------------- tests
def test_one_tracker_measures_the_node_and_every_rank_logs_the_job_figures(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
) -> None:
    trackers = tmp_path / "trackers.jsonl"
    callback = lx.Callback(source=Counting(CodeCarbonSource(country_iso_code="FRA"), trackers), **settings)
    recorder = lx.Recorder(callback, tmp_path, reference=True)
    lx.fit(tmp_path, [callback, recorder], epochs=15)

    # exactly one tracker, started and stopped in a worker (local rank 0), none in this process
    events = read_jsonl(trackers)
    assert [e["event"] for e in events] == ["start", "stop"]
    assert events[0]["pid"] == events[1]["pid"] != os.getpid()
    start, stop = events

    # one run, one node; its total is exactly that one tracker's figure (rank 1 added zeros), not twice it
    run = _only_run(ledger_path)
    assert (run.status, run.epochs, run.nodes, run.label) == ("finished", 15, 1, "lightning")
    assert run.emissions_kg == pytest.approx(stop["emissions_kg"], rel=1e-12) and run.emissions_kg > 0
    assert run.energy_kwh == pytest.approx(stop["energy_kwh"], rel=1e-12)

    # ... and equal to one process measuring the node over the same fit (a plain CodeCarbon tracker on
    # rank 1): same average power within sampling noise (two trackers counting the node would give 2x)
    reference = json.loads((tmp_path / "reference.json").read_text())
    job_power_w = run.energy_kwh * 3.6e6 / (stop["t"] - start["t"])
    reference_power_w = reference["energy_kwh"] * 3.6e6 / reference["duration_s"]
    assert 0.75 < job_power_w / reference_power_w < 1.33, (job_power_w, reference_power_w)

    # both ranks logged the same figures every epoch and at the end, and they are the ledger's
    rank0, rank1 = _ranks(tmp_path)
    assert rank0 == rank1
    assert [r["epoch"] for r in rank0 if r["event"] == "epoch"] == list(range(15))
    end = rank0[-1]
    assert end["event"] == "end"
    assert end["final"]["run_id"] == run.run_id and end["final"]["emissions_kg"] == run.emissions_kg
    assert end["metrics"]["carbon/emissions_kg"] == pytest.approx(run.emissions_kg, rel=1e-12)
    assert server.captures == []  # micrograms: nothing to offset


def test_threshold_offsets_once_and_the_budget_stops_every_rank_at_the_same_epoch(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
) -> None:
    trackers = tmp_path / "trackers.jsonl"
    # node figures after epochs 0, 1, 2, ...: the 0.5 kg threshold is crossed at epoch 1 and the
    # 0.65 kg budget passed at epoch 2. Global rank 1 never starts its copy of the source.
    source = Counting(ScriptedEmissions([0.2, 0.6, 0.7, 0.8, 0.9, 1.0]), trackers)
    callback = lx.Callback(source=source, max_emissions_kg=0.65, **settings)
    lx.fit(tmp_path, [callback, lx.Recorder(callback, tmp_path)], epochs=10)

    assert [e["event"] for e in read_jsonl(trackers)] == ["start", "stop"]
    # exactly one offset at the server: 1 lb when 0.6 kg was pending; 0.7 - 0.4536 kg left is below 0.5 kg
    assert [c.carbon_captured for c in server.captures] == [1]
    run = _only_run(ledger_path)
    assert (run.status, run.epochs, run.nodes) == ("finished", 3, 1)
    assert run.emissions_kg == pytest.approx(0.7)
    with Ledger(ledger_path) as ledger:
        (offset,) = ledger.offsets()
        assert (offset.state, offset.amount_lb, offset.run_id) == ("confirmed", 1, run.run_id)

    # both ranks: the same figures, the budget decision at epoch 2, and the fit stopped after it
    rank0, rank1 = _ranks(tmp_path)
    assert rank0 == rank1
    epochs = [r for r in rank0 if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert [r["report"]["over_budget"] for r in epochs] == [False, False, True]
    assert [r["metrics"]["carbon/emissions_kg"] for r in epochs] == pytest.approx([0.2, 0.6, 0.7])
    end = rank0[-1]
    assert (end["event"], end["epoch"], end["should_stop"]) == ("end", 3, True)
    assert (end["final"]["offset_lb"], end["final"]["confirmed_lb"]) == (1, 1)
    assert end["final"]["pending_kg"] == pytest.approx(0.7 - KG_PER_LB)


def test_default_settings_under_ddp_fork_finish_with_one_run(
    lx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, tmp_path: Path
) -> None:
    """The plain user flow: callback built (CodeCarbon's hardware detection starts in the background),
    then an immediate ``ddp_fork`` fit. The fork must not inherit a lock held by that detection."""
    callback = lx.Callback(**settings)
    finished = threading.Event()

    def fit() -> None:
        lx.fit(tmp_path, [callback, lx.Recorder(callback, tmp_path)], epochs=3)
        finished.set()

    import psutil  # a CodeCarbon dependency

    before = {p.pid for p in psutil.Process().children()}
    worker = threading.Thread(target=fit, daemon=True)
    worker.start()
    worker.join(timeout=90)
    if not finished.is_set():
        for child in psutil.Process().children():  # the fit's deadlocked workers: do not leave them behind
            if child.pid not in before:
                child.kill()
        pytest.fail("the ddp_fork fit did not finish within 90 s (a forked worker deadlocked)")
    run = _only_run(ledger_path)
    assert (run.status, run.epochs, run.nodes) == ("finished", 3, 1)
    assert run.emissions_kg > 0
    rank0, rank1 = _ranks(tmp_path)
    assert rank0 == rank1


def test_a_stuck_rank_fails_the_fit_at_the_process_group_timeout_instead_of_blocking_forever(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    callback = lx.Callback(source=ScriptedEmissions([0.1, 0.2, 0.3]), **settings)
    strategy = DDPStrategy(start_method="fork", timeout=timedelta(seconds=5))
    started = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed out|timeout|closed|terminated"):
        # global rank 1 stops answering at the end of epoch 1; rank 0 waits in our sum, then gloo gives up
        lx.fit(tmp_path, [lx.Hang(1), callback], epochs=5, strategy=strategy)
    assert time.monotonic() - started < 60

    # rank 0 closed the run on its way out: what was measured is kept (pending), nothing offset
    run = _only_run(ledger_path)
    assert run.status == "interrupted"
    assert run.emissions_kg == pytest.approx(0.2)  # epoch 0 recorded; epoch 1 measured before the sum
    assert server.captures == []


def test_without_a_process_group_it_warns_once_and_never_waits(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two processes announced (world_size=2) but torch.distributed is not initialised: the callback
    falls back to per-process figures with one warning, and no hook waits for another process."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    caplog.set_level(logging.WARNING, logger="carbonoffset")
    callback = lx.Callback(source=ScriptedEmissions([0.1, 0.2, 0.3]), max_emissions_kg=0.25, **settings)

    def trainer(epoch: int) -> Any:
        return types.SimpleNamespace(
            global_rank=0,
            local_rank=0,
            num_nodes=1,
            world_size=2,
            strategy=types.SimpleNamespace(restore_checkpoint_after_setup=False),
            sanity_checking=False,
            current_epoch=epoch,
            max_epochs=5,
            should_stop=False,
            callback_metrics={},
            progress_bar_metrics={},
            loggers=[],
            global_step=epoch * 10,
        )

    stops: list[bool] = []

    def two_fits() -> None:
        for _ in range(2):
            callback.on_fit_start(trainer(0), None)
            for epoch in range(3):
                t = trainer(epoch)
                callback.on_train_epoch_end(t, None)
                stops.append(t.should_stop)
            callback.on_train_end(trainer(3), None)

    worker = threading.Thread(target=two_fits, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "a hook waited for a process that does not exist"

    warnings = [
        r.getMessage() for r in caplog.records if "no torch.distributed process group" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "process 0 of 2" in warnings[0]
    # per-process behaviour: this process's own figures and its own budget decision (0.3 > 0.25)
    assert stops == [False, False, True, False, False, True]
    with Ledger(ledger_path) as ledger:
        runs = ledger.runs()
    assert [(r.nodes, r.epochs) for r in runs] == [(1, 3), (1, 3)]
    assert [r.emissions_kg for r in runs] == pytest.approx([0.3, 0.3])
