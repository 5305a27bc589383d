"""The Lightning callback, on a real tiny MLP trained by Lightning on scikit-learn digits (CPU).

Real pieces only: Lightning's Trainer, CodeCarbon's offline tracker (FRA), the
makeimpact SDK against the loopback FakeOneClickImpact, the SQLite ledger.
Deterministic emissions for threshold/budget/resume come from ScriptedEmissions.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _notebooks import run_twice

from carbonoffset.core.ledger import Ledger
from carbonoffset.core.meter import MeterSource
from carbonoffset.core.sources import CodeCarbonSource
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions

if importlib.util.find_spec("lightning") is None:
    pytest.skip("lightning is not installed (pip install carbonoffset[lightning])", allow_module_level=True)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CARBON_KEYS = ("carbon/energy_kwh", "carbon/emissions_kg", "carbon/offset_kg", "carbon/pending_kg")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lx() -> Iterator[types.SimpleNamespace]:
    """Lightning, torch, the callback classes, the digits data loader and the model class (imported once)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from carbonoffset.demo.data import load_digits_split
    from carbonoffset.integrations.lightning import CarbonOffsetCallback, PLCarbonOffsetCallback

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster and immune to a busy machine
    data = load_digits_split()
    dataset = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))

    class DigitsMLP(pl.LightningModule):
        """64 -> 32 -> 10; ``fail_at=(epoch, batch, exc)`` raises ``exc`` inside training_step."""

        def __init__(self, fail_at: tuple[int, int, BaseException] | None = None) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
            self.fail_at = fail_at

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.fail_at is not None and (self.current_epoch, batch_idx) == self.fail_at[:2]:
                raise self.fail_at[2]
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    def loader() -> Any:
        return DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

    yield types.SimpleNamespace(
        pl=pl,
        torch=torch,
        Callback=CarbonOffsetCallback,
        PLCallback=PLCarbonOffsetCallback,
        Model=DigitsMLP,
        loader=loader,
    )
    torch.set_num_threads(threads)


def _trainer(
    lx: types.SimpleNamespace, root: Path, callbacks: list[Any], *, epochs: int, **kwargs: Any
) -> Any:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("log_every_n_steps", 5)
    return lx.pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


class _Snapshots:
    """A plain Lightning callback placed after ours: what other callbacks see at each epoch end."""

    def __init__(self, lx: types.SimpleNamespace, ours: Any) -> None:
        self.ours = ours
        self.epochs: list[dict[str, Any]] = []
        base = lx.pl.Callback
        snapshots = self

        class Recorder(base):  # type: ignore[misc,valid-type]
            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                snapshots.epochs.append(
                    {
                        "epoch": trainer.current_epoch,
                        "callback": {k: float(v) for k, v in trainer.callback_metrics.items()},
                        "pbar": dict(trainer.progress_bar_metrics),
                        "report": snapshots.ours.last_report,
                    }
                )

        self.callback = Recorder()


class _Probe:
    """A CodeCarbon output handler (its public extension point): the tracker's own cumulative totals."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}  # CodeCarbon run_id -> last EmissionsData

    def out(self, total: Any, delta: Any) -> None:
        self.last[total.run_id] = total

    def live_out(self, total: Any, delta: Any) -> None:
        pass

    def task_out(self, data: Any, experiment_name: Any) -> None:
        pass

    def exit(self) -> None:
        pass


def _timed(lx: types.SimpleNamespace, **kwargs: Any) -> Any:
    """Our callback, recording how long each on_train_epoch_end took (s)."""

    class Timed(lx.Callback):  # type: ignore[misc,name-defined]
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.hook_s: list[float] = []

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            start = time.perf_counter()
            super().on_train_epoch_end(trainer, pl_module)
            self.hook_s.append(time.perf_counter() - start)

    return Timed(**kwargs)


_GRAMS = {"ng": 1e-9, "µg": 1e-6, "mg": 1e-3, "g": 1.0, "kg": 1e3, "t": 1e6}


def _bar_kg(figure: str) -> float:
    """The progress bar's ``co2`` figure (``"2.14mg"``) back in kg; fails on anything else."""
    match = re.fullmatch(r"(-?[0-9.]+(?:e[+-]?[0-9]+)?)(ng|µg|mg|g|kg|t)", figure)
    assert match, figure
    return float(match[1]) * _GRAMS[match[2]] / 1e3


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` still alive after a short grace (threads that are ending may finish)."""
    leftover = [t for t in threading.enumerate() if t not in before]
    for thread in leftover:
        thread.join(timeout=2.0)
    return [t for t in leftover if t.is_alive()]


# ----------------------------------------------------------------------------- tests
def test_metrics_each_epoch_and_ledger_equals_tracker(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
) -> None:
    probe = _Probe()
    source = CodeCarbonSource(country_iso_code="FRA", output_handlers=[probe])
    callback = lx.Callback(source=source, **settings)
    snapshots = _Snapshots(lx, callback)
    csv_logger = lx.pl.loggers.CSVLogger(tmp_path / "logs", name="run")
    trainer = _trainer(lx, tmp_path, [callback, snapshots.callback], epochs=3, logger=csv_logger)
    trainer.fit(lx.Model(), lx.loader())

    # every epoch: the four metrics reached callback_metrics and the progress bar, equal to the report
    assert [s["epoch"] for s in snapshots.epochs] == [0, 1, 2]
    previous = 0.0
    for snap in snapshots.epochs:
        report = snap["report"]
        assert report is not None and report.epoch == snap["epoch"]
        for key, value in report.metrics().items():
            assert snap["callback"][key] == pytest.approx(value, rel=1e-12)
        # the bar shows one short figure, never the long carbon/* names
        assert _bar_kg(snap["pbar"]["co2"]) == pytest.approx(report.emissions_kg, rel=5e-3, abs=1e-15)
        assert not [key for key in snap["pbar"] if key.startswith("carbon/")]
        assert snap["callback"]["carbon/emissions_kg"] >= previous
        previous = snap["callback"]["carbon/emissions_kg"]

    # the CSV logger's file: one row per epoch with the four metrics, then the final figures
    with open(Path(csv_logger.log_dir) / "metrics.csv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    carbon_rows = [r for r in rows if r.get("carbon/emissions_kg")]
    assert [r["epoch"] for r in carbon_rows[:3]] == ["0", "1", "2"]
    for row, snap in zip(carbon_rows[:3], snapshots.epochs):
        assert all(row[key] for key in CARBON_KEYS)
        assert float(row["carbon/emissions_kg"]) == pytest.approx(snap["report"].emissions_kg, rel=1e-9)
    final = callback.final_report
    assert final is not None
    assert len(carbon_rows) == 4
    assert float(carbon_rows[3]["carbon/emissions_kg"]) == pytest.approx(final.emissions_kg, rel=1e-9)
    assert int(carbon_rows[3]["step"]) == trainer.global_step
    assert float(trainer.callback_metrics["carbon/emissions_kg"]) == pytest.approx(
        final.emissions_kg, rel=1e-12
    )

    # the ledger holds one finished run whose emissions equal the tracker's own final total
    assert len(probe.last) == 1
    tracker_total = next(iter(probe.last.values()))
    with Ledger(ledger_path) as ledger:
        runs = ledger.runs()
        assert len(runs) == 1
        run = runs[0]
        assert run.run_id == final.run_id
        assert run.status == "finished" and run.epochs == 3 and run.label == "lightning"
        assert run.emissions_kg == tracker_total.emissions == final.emissions_kg > 0
        assert run.energy_kwh == tracker_total.energy_consumed == final.energy_kwh > 0
        # micrograms: far below the 0.5 kg threshold, nothing bought, all pending
        assert ledger.offsets() == []
        assert ledger.balance(final.account).pending_kg == pytest.approx(run.emissions_kg)
    assert server.captures == []


def test_carbon_figures_are_logged_at_the_step_of_the_epoch_metrics(
    lx: types.SimpleNamespace, settings: dict[str, Any], tmp_path: Path
) -> None:
    """CSVLogger and TensorBoard show an epoch's carbon figures at the step of its train_loss
    (``self.log(on_epoch=True)``); the final figures come one step later and overwrite no epoch's values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = lx.Callback(source=ScriptedEmissions([0.1, 0.2, 0.3, 0.35], advance_on_stop=True), **settings)
    csv_logger = lx.pl.loggers.CSVLogger(tmp_path / "csv", name="run")
    tb_logger = lx.pl.loggers.TensorBoardLogger(tmp_path / "tb", name="run")
    trainer = _trainer(
        lx,
        tmp_path,
        [callback],
        epochs=3,
        logger=[csv_logger, tb_logger],
        limit_train_batches=4,
        log_every_n_steps=2,
    )
    trainer.fit(lx.Model(), lx.loader())
    assert trainer.global_step == 12

    with open(Path(csv_logger.log_dir) / "metrics.csv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    loss_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    carbon = [
        (int(r["step"]), r["epoch"], float(r["carbon/emissions_kg"]))
        for r in rows
        if r.get("carbon/emissions_kg")
    ]
    assert loss_steps == [3, 7, 11]  # Lightning's own epoch metrics: the step of each epoch's last batch
    assert [step for step, _, _ in carbon[:3]] == loss_steps
    assert [epoch for _, epoch, _ in carbon[:3]] == ["0", "1", "2"]
    assert carbon[3] == (12, "", pytest.approx(0.35))  # final figures: a step of their own, no epoch

    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    tb_loss = [e.step for e in events.Scalars("train_loss")]
    tb_carbon = [(e.step, e.value) for e in events.Scalars("carbon/emissions_kg")]
    assert tb_loss == loss_steps
    assert [step for step, _ in tb_carbon] == [*loss_steps, 12]  # no step written twice
    assert [value for _, value in tb_carbon] == pytest.approx([0.1, 0.2, 0.3, 0.35])
    # trainer.logged_metrics holds the figures sent to the loggers (the final ones last)
    assert float(trainer.logged_metrics["carbon/emissions_kg"]) == pytest.approx(0.35)


class _Columns80:
    """Progress bars that draw into a buffer at 80 columns (Rich's console, tqdm's ncols)."""

    @staticmethod
    def rich(lx: types.SimpleNamespace, buffer: Any) -> Any:
        return lx.pl.callbacks.RichProgressBar(
            console_kwargs={"file": buffer, "width": 80, "force_terminal": True, "color_system": None}
        )

    @staticmethod
    def tqdm(lx: types.SimpleNamespace, buffer: Any) -> Any:
        class Bar(lx.pl.callbacks.TQDMProgressBar):  # type: ignore[misc,name-defined]
            def init_train_tqdm(self) -> Any:  # Lightning's documented override, at 80 columns
                from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

                return Tqdm(
                    desc=self.train_description,
                    disable=self.is_disabled,
                    leave=True,
                    ncols=80,
                    file=buffer,
                    smoothing=0,
                    bar_format=self.BAR_FORMAT,
                )

        return Bar()


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
@pytest.mark.parametrize("progress_bar", [True, False])
def test_progress_bar_fits_80_columns(
    lx: types.SimpleNamespace, settings: dict[str, Any], tmp_path: Path, bar: str, progress_bar: bool
) -> None:
    import io

    if bar == "rich":
        pytest.importorskip("rich")
    buffer = io.StringIO()
    callback = lx.Callback(
        source=ScriptedEmissions([2.14e-9, 4.5e-9, 6.75e-9]), progress_bar=progress_bar, **settings
    )
    trainer = lx.pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        callbacks=[callback, getattr(_Columns80, bar)(lx, buffer)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_train_batches=3,
        default_root_dir=tmp_path,
    )
    trainer.fit(lx.Model(), lx.loader())

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())  # drop terminal control sequences
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    assert lines, text
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "carbon/" not in text  # the long names never reach the bar
    figure = "co2=6.75µg" if bar == "tqdm" else "co2: 6.75µg"
    if progress_bar:
        # the last epoch's figure is shown whole, on one line, next to the model's own loss
        assert any(figure in line for line in lines), lines[-5:]
    else:
        assert "co2" not in text
    assert float(trainer.callback_metrics["carbon/emissions_kg"]) == pytest.approx(6.75e-9)


def test_threshold_crossed_mid_training_offsets_without_blocking_the_epoch(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
) -> None:
    server.delay_s = 2.0  # every API answer takes 2 s (within the 5 s request deadline set below)
    settings = {**settings, "offset_request_timeout": 5.0}
    # cumulative kg after epochs 0..4: the 0.5 kg threshold is crossed at epoch 2
    callback = _timed(lx, source=ScriptedEmissions([0.1, 0.2, 0.6, 0.7, 0.8]), **settings)
    snapshots = _Snapshots(lx, callback)
    trainer = _trainer(lx, tmp_path, [callback, snapshots.callback], epochs=5)
    started = time.perf_counter()
    trainer.fit(lx.Model(), lx.loader())
    elapsed = time.perf_counter() - started

    # no epoch hook waited for the 2 s answer (the offset was bought on the background worker)
    assert len(callback.hook_s) == 5
    assert max(callback.hook_s) < 0.5, callback.hook_s
    assert elapsed >= 2.0  # ... but the end of training did wait (bounded) for the offset to settle
    # the crossing epoch only queued the offset; two epochs later it is in flight (counted, not pending)
    # while its answer is still 2 s away
    reports = [s["report"] for s in snapshots.epochs]
    assert [r.offset_kg for r in reports[:2]] == [0.0, 0.0]
    assert reports[4].offset_kg == pytest.approx(KG_PER_LB)
    assert reports[4].pending_kg == pytest.approx(0.8 - KG_PER_LB)
    assert sum(callback.hook_s[2:]) < 2.0  # the in-flight capture could not have been answered yet

    # exactly the pounds owed: 0.8 kg allows one whole pound; the 0.346 kg left is below the threshold
    assert server.total_lb(settings["offset_api_key"]) == 1
    assert len(server.captures) == 1
    final = callback.final_report
    assert final is not None
    assert (final.confirmed_lb, final.in_flight_lb) == (1, 0)
    assert final.emissions_kg == pytest.approx(0.8)
    assert final.pending_kg == pytest.approx(0.8 - KG_PER_LB)
    with Ledger(ledger_path) as ledger:
        (offset,) = ledger.offsets()
        assert (offset.state, offset.amount_lb, offset.run_id) == ("confirmed", 1, final.run_id)
        assert server.captures[0].metadata is not None
        assert offset.offset_id in server.captures[0].metadata.values()


def test_epoch_hook_cost_is_tiny(lx: types.SimpleNamespace, settings: dict[str, Any], tmp_path: Path) -> None:
    """The hook's own work (core record + publishing 4 metrics), without CodeCarbon's measurement."""
    callback = _timed(lx, source=ScriptedEmissions(lambda n: 1e-6 * (n + 1)), **settings)
    csv_logger = lx.pl.loggers.CSVLogger(tmp_path / "logs", name="cost")
    trainer = _trainer(
        lx, tmp_path, [callback], epochs=40, logger=csv_logger, limit_train_batches=1, log_every_n_steps=1
    )
    trainer.fit(lx.Model(), lx.loader())
    assert len(callback.hook_s) == 40
    median_ms = statistics.median(callback.hook_s[1:]) * 1e3
    # ~0.5 ms on a busy 2-core machine (load 4), where four pl_module.log calls take 4-9 ms
    assert median_ms < 1.5, f"median epoch hook {median_ms:.3f} ms"


def test_budget_stops_training_at_the_right_epoch(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="carbonoffset")
    source = ScriptedEmissions([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    callback = lx.Callback(source=source, max_emissions_kg=0.25, **settings)
    trainer = _trainer(lx, tmp_path, [callback], epochs=10)
    trainer.fit(lx.Model(), lx.loader())

    # 0.1, 0.2 are within the 0.25 kg budget; 0.3 after the third epoch passes it: stop there
    assert trainer.current_epoch == 3
    assert trainer.should_stop is True
    final = callback.final_report
    assert final is not None and final.epochs == 3
    assert final.emissions_kg == pytest.approx(0.3)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # after the first epoch: 0.1 kg x 10 epochs = 1.0 kg projected, above the budget
    assert any("projected emissions for 10 epochs" in m for m in messages), messages
    assert sum("passed max_emissions_kg=0.25" in m for m in messages) == 1, messages
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
        assert (run.status, run.epochs) == ("finished", 3)
        assert run.emissions_kg == pytest.approx(0.3)


def test_exception_in_training_step_leaves_nothing_running_and_keeps_emissions(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
) -> None:
    callback = lx.Callback(**settings)  # real CodeCarbon tracker, offline, FRA
    trainer = _trainer(lx, tmp_path, [callback], epochs=5)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer.fit(lx.Model(fail_at=(2, 3, RuntimeError("boom in training_step"))), lx.loader())

    assert _new_threads(before) == []
    session = callback.session
    assert session is not None and not session.running
    assert isinstance(session.source, MeterSource) and not session.source.measuring  # the default source
    final = callback.final_report
    last = callback.last_report
    assert final is not None and last is not None and last.epoch == 1
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
        assert (run.status, run.epochs) == ("failed", 2)
        # everything measured, the unfinished third epoch included, is in the ledger and stays pending
        # (epoch figures are the measuring process's last reading: zeros until its first one)
        assert run.emissions_kg == final.emissions_kg >= last.emissions_kg
        assert final.emissions_kg > 0
        assert ledger.balance(final.account).pending_kg == pytest.approx(run.emissions_kg)
    assert server.captures == []


def test_keyboard_interrupt_is_recorded_as_interrupted_and_settles_the_offset_in_flight(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
) -> None:
    server.delay_s = 1.0
    callback = lx.Callback(source=ScriptedEmissions([0.2, 0.7, 0.75]), **settings)
    trainer = _trainer(lx, tmp_path, [callback], epochs=5)
    before = set(threading.enumerate())
    sigint = signal.getsignal(signal.SIGINT)
    try:
        # Lightning handles Ctrl+C: on_exception, teardown, then exits with status 1
        with pytest.raises(SystemExit):
            trainer.fit(lx.Model(fail_at=(2, 0, KeyboardInterrupt())), lx.loader())
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT from then on

    assert _new_threads(before) == []
    final = callback.final_report
    assert final is not None
    assert final.emissions_kg == pytest.approx(0.7)
    # the offset triggered at epoch 1 (0.7 kg >= 0.5) was settled within offset_timeout, nothing more
    assert (final.confirmed_lb, final.in_flight_lb) == (1, 0)
    assert server.total_lb(settings["offset_api_key"]) == 1
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
        assert (run.status, run.epochs) == ("interrupted", 2)
        assert ledger.balance(final.account).pending_kg == pytest.approx(0.7 - KG_PER_LB)


@pytest.fixture(scope="module")
def late_restore_strategy(lx: types.SimpleNamespace) -> type:
    """A real single-device strategy that restores callback state after on_fit_start (like FSDP/DeepSpeed)."""

    class LateRestore(lx.pl.strategies.SingleDeviceStrategy):  # type: ignore[misc,name-defined]
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    return LateRestore


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # resuming into it
@pytest.mark.parametrize("strategy", ["default", "late-restore"])
def test_resume_from_checkpoint_continues_totals_and_never_reoffsets(
    lx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    tmp_path: Path,
    late_restore_strategy: type,
    strategy: str,
) -> None:
    def make_strategy() -> dict[str, Any]:
        if strategy == "default":
            return {}
        return {"strategy": late_restore_strategy(device=lx.torch.device("cpu"))}

    ckpt_dir = tmp_path / "ckpt"
    first = lx.Callback(source=ScriptedEmissions([0.3, 0.6]), **settings)
    checkpoints = lx.pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1)
    trainer = _trainer(
        lx, tmp_path, [first, checkpoints], epochs=2, enable_checkpointing=True, **make_strategy()
    )
    trainer.fit(lx.Model(), lx.loader())
    run_id = first.final_report.run_id
    assert server.total_lb(settings["offset_api_key"]) == 1  # 0.6 kg crossed the threshold: 1 lb

    # the checkpoint holds the run id and the cumulative figures under the callback's state key
    state = lx.torch.load(ckpt_dir / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert state["run_id"] == run_id and state["emissions_kg"] == pytest.approx(0.6)

    # resume with a new callback instance: its tracker restarts from zero (0.2, 0.4 kg more)
    second = lx.Callback(source=ScriptedEmissions([0.2, 0.4]), **settings)
    snapshots = _Snapshots(lx, second)
    checkpoints = lx.pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1)
    trainer = _trainer(
        lx,
        tmp_path,
        [second, snapshots.callback, checkpoints],
        epochs=4,
        enable_checkpointing=True,
        **make_strategy(),
    )
    trainer.fit(lx.Model(), lx.loader(), ckpt_path=ckpt_dir / "last.ckpt")

    assert [s["epoch"] for s in snapshots.epochs] == [2, 3]
    assert [s["callback"]["carbon/emissions_kg"] for s in snapshots.epochs] == [
        pytest.approx(0.8),
        pytest.approx(1.0),
    ]
    final = second.final_report
    assert final is not None and final.run_id == run_id
    assert final.emissions_kg == pytest.approx(1.0)
    # 1.0 kg owes two whole pounds in all: the first one is never bought again
    assert server.total_lb(settings["offset_api_key"]) == 2
    assert len(server.captures) == 2
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
        assert (run.run_id, run.status, run.epochs) == (run_id, "finished", 4)
        assert run.emissions_kg == pytest.approx(1.0)
        assert [o.amount_lb for o in ledger.offsets()] == [1, 1]
        assert ledger.balance(final.account).pending_kg == pytest.approx(1.0 - 2 * KG_PER_LB)


def test_api_key_is_not_in_the_checkpoint_file(
    lx: types.SimpleNamespace, settings: dict[str, Any], tmp_path: Path
) -> None:
    key = settings["offset_api_key"]
    callback = lx.Callback(source=ScriptedEmissions([0.1]), **settings)
    checkpoints = lx.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(lx, tmp_path, [callback, checkpoints], epochs=1, enable_checkpointing=True)
    trainer.fit(lx.Model(), lx.loader())

    path = tmp_path / "ckpt" / "last.ckpt"
    raw = path.read_bytes()
    assert callback.state_key in str(lx.torch.load(path, weights_only=False)["callbacks"])
    assert key.encode() not in raw
    with zipfile.ZipFile(path) as archive:  # torch.save writes a zip: check every member unpacked too
        for name in archive.namelist():
            assert key.encode() not in archive.read(name), name
    assert key not in repr(callback) and key not in repr(callback.state_dict())


def test_two_fits_with_one_instance_track_two_runs_with_new_trackers(
    lx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, tmp_path: Path
) -> None:
    probe = _Probe()
    callback = lx.Callback(
        source=CodeCarbonSource(country_iso_code="FRA", output_handlers=[probe]),
        log_metrics=False,
        **settings,
    )
    reports, sessions = [], []
    for _ in range(2):
        trainer = _trainer(lx, tmp_path, [callback], epochs=2)
        trainer.fit(lx.Model(), lx.loader())
        reports.append(callback.final_report)
        sessions.append(callback.session)
        assert not any(key in trainer.callback_metrics for key in CARBON_KEYS)  # log_metrics=False

    assert sessions[0] is not sessions[1]
    assert reports[0].run_id != reports[1].run_id
    # one CodeCarbon tracker per fit (CodeCarbon gives each tracker its own run id)
    assert len(probe.last) == 2
    tracker_kg = [total.emissions for total in probe.last.values()]
    with Ledger(ledger_path) as ledger:
        runs = ledger.runs()
        assert [r.run_id for r in runs] == [r.run_id for r in reports]
        for run, report, kg in zip(runs, reports, tracker_kg):
            assert (run.status, run.epochs) == ("finished", 2)
            # each run counts its own fit only, from zero
            assert run.emissions_kg == report.emissions_kg == kg > 0


def test_pytorch_lightning_package_is_bound_too(
    lx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, tmp_path: Path
) -> None:
    import pytorch_lightning

    assert issubclass(lx.Callback, lx.pl.Callback) and not issubclass(lx.Callback, pytorch_lightning.Callback)
    assert issubclass(lx.PLCallback, pytorch_lightning.Callback)

    class Tiny(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = lx.torch.nn.Linear(64, 10)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return lx.torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self) -> Any:
            return lx.torch.optim.SGD(self.parameters(), lr=0.1)

    callback = lx.PLCallback(source=ScriptedEmissions([0.1, 0.2]), max_emissions_kg=0.15, **settings)
    assert callback.state_key == lx.Callback(**settings).state_key  # checkpoints move between packages
    trainer = pytorch_lightning.Trainer(
        accelerator="cpu",
        max_epochs=5,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), lx.loader())
    assert trainer.current_epoch == 2  # stopped by the budget after 0.2 kg
    assert float(trainer.callback_metrics["carbon/emissions_kg"]) == pytest.approx(0.2)
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
        assert (run.epochs, run.label) == (2, "lightning")


def test_invalid_settings_raise_before_training(lx: types.SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="offset_environment must be 'production' or 'sandbox'"):
        lx.Callback(offset_environment="SANDBOX")
    with pytest.raises(ValueError, match="max_emissions_kg must be > 0"):
        lx.Callback(max_emissions_kg=0)
    with pytest.raises(ValueError, match="offset_threshold must be at least 0.5"):
        lx.PLCallback(offset_threshold=0.1)


def test_without_lightning_import_works_and_construction_names_the_extra(tmp_path: Path) -> None:
    script = """
import sys
for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
    sys.modules[name] = None  # as if not installed
import carbonoffset.integrations.lightning as integration
assert "torch" not in sys.modules
for cls in (integration.CarbonOffsetCallback, integration.PLCarbonOffsetCallback):
    try:
        cls(offset_environment="not even validated")
    except ModuleNotFoundError as exc:
        print(type(exc).__name__, "|", exc)
    else:
        raise SystemExit("constructed without Lightning")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [
        "ModuleNotFoundError | `CarbonOffsetCallback` for Lightning requires `lightning>=2.4`; "
        "install it with `pip install carbonoffset[lightning]`",
        "ModuleNotFoundError | `PLCarbonOffsetCallback` for PyTorch Lightning requires "
        "`pytorch-lightning>=2.4`; install it with `pip install carbonoffset[lightning]`",
    ]


def test_without_lightning_the_error_keeps_the_import_error_as_its_cause(tmp_path: Path) -> None:
    script = """
import sys
for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
    sys.modules[name] = None  # as if not installed
import carbonoffset.integrations.lightning as integration
for cls in (integration.CarbonOffsetCallback, integration.PLCarbonOffsetCallback):
    try:
        cls()
    except ModuleNotFoundError as exc:
        print(type(exc.__cause__).__name__, "|", exc.__cause__)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first.startswith("ModuleNotFoundError | ") and "lightning" in first, first
    assert second.startswith("ModuleNotFoundError | ") and "pytorch_lightning" in second, second


def test_demo_trains_and_rounds_up_one_pound(
    settings: dict[str, Any], server: FakeOneClickImpact, ledger_path: Path
) -> None:
    from carbonoffset.demo.lightning import train

    result = train({**settings, "offset_round_up": True}, epochs=3)
    assert result.epochs == 3
    assert result.accuracy > 0.85
    report = result.report
    assert report.epochs == 3 and 0 < report.emissions_kg < 1e-3
    # micrograms, rounded up: exactly one pound bought, the overshoot kept as credit
    assert (report.confirmed_lb, report.in_flight_lb) == (1, 0)
    assert server.total_lb(settings["offset_api_key"]) == 1
    assert report.credit_kg == pytest.approx(KG_PER_LB - report.emissions_kg)
    assert report.ledger_path == ledger_path


def test_notebook_runs_twice_in_its_folder(tmp_path: Path) -> None:
    pytest.importorskip("nbclient")
    outputs = run_twice("lightning", tmp_path)
    assert "confirmed_lb=1" in outputs, outputs  # each run buys its own pound: no credit carried over


def test_docs_page_code_is_real_api() -> None:
    """Every Python block of docs/lightning.md compiles and imports only names that exist."""
    import ast
    import importlib
    import re

    text = (ROOT / "docs" / "lightning.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 4
    imported = 0
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
                    imported += 1
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "").endswith("CarbonOffsetCallback"):
                # keyword names are real parameters or settings
                from carbonoffset.core.config import CONFIG_KEYS

                params = {
                    "max_emissions_kg",
                    "log_metrics",
                    "progress_bar",
                    "source",
                    "offsetter_options",
                    *CONFIG_KEYS,
                }
                assert {kw.arg for kw in node.keywords} <= params, ast.dump(node)
    assert imported >= 2
