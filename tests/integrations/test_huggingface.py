"""Hugging Face Trainer integration: a tiny real BERT trained on digits with the real Trainer.

Emissions come from the real CodeCarbon tracker (offline, France) or, where a
threshold or budget must be crossed, from ``ScriptedEmissions``; offsets go
through the real makeimpact SDK to the loopback ``FakeOneClickImpact``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install carbonoffset[transformers])"
)
pytest.importorskip(
    "accelerate", reason="the Trainer needs accelerate (pip install carbonoffset[transformers])"
)

import torch  # noqa: E402
from _notebooks import run_twice  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.integrations import integration_utils  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from carbonoffset.core.config import SecretKey  # noqa: E402
from carbonoffset.core.ledger import Ledger  # noqa: E402
from carbonoffset.core.sources import CodeCarbonSource  # noqa: E402
from carbonoffset.core.units import KG_PER_LB  # noqa: E402
from carbonoffset.demo import huggingface as demo  # noqa: E402
from carbonoffset.integrations.huggingface import REPORT_TO_NAME, CarbonOffsetCallback  # noqa: E402
from carbonoffset.testing import ScriptedEmissions  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")]

REPO = Path(__file__).resolve().parents[2]
SECRET_KEY = "test_hf_secret_key_7c1e0b"  # a sandbox key for the tests that set their own
TRAIN_SAMPLES = 256  # 8 steps of 32 per epoch: a fraction of a second


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    """Tiny models train faster (and far more steadily on a busy 2-core machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def datasets() -> tuple[Any, Any]:
    return demo.build_datasets(limit=TRAIN_SAMPLES)


def make_trainer(
    datasets: tuple[Any, Any], output_dir: Path, callbacks: list[Any] | None, *, epochs: int, **overrides: Any
) -> Trainer:
    train_set, val_set = datasets
    return Trainer(
        model=demo.build_model(),
        args=demo.training_arguments(str(output_dir), epochs=epochs, **overrides),
        train_dataset=train_set,
        eval_dataset=val_set,
        compute_metrics=demo.accuracy,
        callbacks=callbacks,
    )


CARBON_KEYS = ("carbon/energy_kwh", "carbon/emissions_kg", "carbon/offset_kg", "carbon/pending_kg")


def carbon_entries(trainer: Trainer) -> list[dict[str, Any]]:
    """log_history entries logged at an epoch end that carry the carbon metrics (train summary excluded)."""
    return [e for e in trainer.state.log_history if "carbon/emissions_kg" in e and "train_runtime" not in e]


def tracker_timers(grace_s: float = 3.0) -> list[threading.Thread]:
    """CodeCarbon samples power on threading.Timer threads (re-armed every 15 s while a tracker runs).

    A stopped tracker's timer may take a moment to exit, so wait up to ``grace_s``;
    a running tracker always keeps one alive.
    """
    deadline = time.monotonic() + grace_s
    while True:
        alive = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


class Probe(TrainerCallback):
    """Placed after CarbonOffsetCallback: keeps its tracker, the logs it passes on, and timing."""

    def __init__(self, callback: CarbonOffsetCallback) -> None:
        self.callback = callback
        self.tracker: Any = None
        self.logs: list[dict[str, Any]] = []
        self.times: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session = self.callback.session
        self.tracker = getattr(session.source, "tracker", None) if session is not None else None

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


class Clock(TrainerCallback):
    """Placed before CarbonOffsetCallback: the time each epoch-end hook chain starts."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


class FailAtEpoch(TrainerCallback):
    """Raises ``exc`` when epoch ``index`` (0-based) begins."""

    def __init__(self, index: int, exc: BaseException) -> None:
        self.index, self.exc = index, exc

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if round(state.epoch or 0) == self.index:
            raise self.exc


def only_run(ledger_path: Path) -> Any:
    ledger = Ledger(ledger_path)
    try:
        runs = ledger.runs()
        assert len(runs) == 1, runs
        return runs[0]
    finally:
        ledger.close()


# ------------------------------------------------------------------- tests
def test_metrics_reach_log_history_and_ledger_equals_tracker(
    datasets: Any,
    settings: dict[str, Any],
    ledger_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # CodeCarbon in this process: the ledger is compared with the tracker's own final figures
    callback = CarbonOffsetCallback(**settings, source=CodeCarbonSource(country_iso_code="FRA"))
    early, probe = Probe(callback), Probe(callback)
    trainer = make_trainer(datasets, tmp_path / "out", [early, callback, probe], epochs=3)
    assert trainer.callback_handler.callbacks[0] is callback  # it moved itself first
    trainer.train()

    entries = carbon_entries(trainer)
    assert [e["epoch"] for e in entries] == [1.0, 2.0, 3.0]
    for entry in entries:
        assert set(CARBON_KEYS) <= set(entry)
        assert "loss" in entry  # the epoch-end log the callback asked for
    emissions = [e["carbon/emissions_kg"] for e in entries]
    assert 0 < emissions[0] <= emissions[1] <= emissions[2]
    assert [e["carbon/pending_kg"] for e in entries] == pytest.approx(
        emissions
    )  # below threshold: all pending
    # later callbacks and the progress output (PrinterCallback, disable_tqdm=True) get them too
    for seen in (early, probe):  # three epochs, then the final figures in the train summary
        assert sum("carbon/emissions_kg" in logs for logs in seen.logs) == 4
        assert "train_runtime" in seen.logs[-1] and "carbon/emissions_kg" in seen.logs[-1]
    assert "carbon/emissions_kg" in capsys.readouterr().out

    tracker = probe.tracker
    assert type(tracker).__name__ == "OfflineEmissionsTracker"
    final = callback.final_report
    assert final is not None and final.epochs == 3
    run = only_run(ledger_path)
    assert (run.label, run.status, run.epochs, run.run_id) == ("huggingface", "finished", 3, final.run_id)
    assert run.emissions_kg == pytest.approx(tracker.final_emissions, rel=1e-9)
    assert run.energy_kwh == pytest.approx(tracker.final_emissions_data.energy_consumed, rel=1e-9)
    assert final.emissions_kg == pytest.approx(run.emissions_kg, rel=1e-12)
    assert run.emissions_kg >= emissions[-1]
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and summary["carbon/emissions_kg"] == final.emissions_kg
    assert not tracker_timers()


def _tensorboard_scalars(log_root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a real TensorBoard SummaryWriter wrote under ``log_root``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = log_root.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("placement", ["report_to", "callbacks-before", "callbacks-after"])
def test_carbon_figures_reach_every_integration_in_any_order(
    datasets: Any, settings: dict[str, Any], tmp_path: Path, placement: str
) -> None:
    """The README's form, Trainer(callbacks=[CarbonOffsetCallback()]), with a real TensorBoardCallback
    (from report_to, or given before / after ours) and on_log recorders before and after ours: all of
    them get every epoch's figures and the final ones, and so does log_history."""
    pytest.importorskip("tensorboard")
    from transformers.integrations import TensorBoardCallback

    callback = CarbonOffsetCallback(
        **settings, source=ScriptedEmissions([1e-6, 2e-6, 3e-6, 3.5e-6], advance_on_stop=True)
    )
    before, after = Probe(callback), Probe(callback)
    overrides: dict[str, Any] = {}
    if placement == "report_to":
        callbacks = [before, callback, after]
        overrides["report_to"] = ["tensorboard"]
    elif placement == "callbacks-before":
        callbacks = [TensorBoardCallback(), before, callback, after]
    else:
        callbacks = [before, callback, after, TensorBoardCallback()]
    trainer = make_trainer(datasets, tmp_path / "out", callbacks, epochs=3, **overrides)
    trainer.train()

    steps = [e["step"] for e in carbon_entries(trainer)]
    assert len(steps) == 3
    expected = [1e-6, 2e-6, 3e-6]
    for recorder in (before, after):
        epoch_logs = [
            logs for logs in recorder.logs if "carbon/emissions_kg" in logs and "train_runtime" not in logs
        ]
        assert [logs["carbon/emissions_kg"] for logs in epoch_logs] == pytest.approx(expected)
        (summary,) = [logs for logs in recorder.logs if "train_runtime" in logs]
        assert summary["carbon/emissions_kg"] == pytest.approx(3.5e-6)  # the final figures
    assert [e["carbon/emissions_kg"] for e in carbon_entries(trainer)] == pytest.approx(expected)
    assert trainer.state.log_history[-1]["carbon/emissions_kg"] == pytest.approx(3.5e-6)
    assert callback.final_report is not None and callback.final_report.emissions_kg == pytest.approx(3.5e-6)

    scalars = _tensorboard_scalars(tmp_path / "out")
    carbon = scalars["train/carbon/emissions_kg"]  # TensorBoardCallback prefixes train metrics
    assert [step for step, _ in carbon] == [*steps, steps[-1]]  # every epoch, then the final figures
    assert [value for _, value in carbon] == pytest.approx([*expected, 3.5e-6], rel=1e-6)
    assert [step for step, _ in scalars["train/loss"]] == steps  # the same steps as the model's loss
    for name in CARBON_KEYS:
        assert len(scalars[f"train/{name}"]) == 4, name


def test_report_to_registration_still_works_with_this_transformers() -> None:
    """report_to=["carbonoffset"] rests on transformers' INTEGRATION_TO_CALLBACK dict (no public way to
    register exists in 4.45 to 5.x): this fails loudly when a transformers release changes it."""
    registry = getattr(integration_utils, "INTEGRATION_TO_CALLBACK", None)
    assert isinstance(registry, dict), (
        "transformers no longer has integration_utils.INTEGRATION_TO_CALLBACK: "
        "report_to=['carbonoffset'] is broken; see _register_report_to in carbonoffset/integrations/huggingface.py"
    )
    assert registry.get(REPORT_TO_NAME) is CarbonOffsetCallback
    assert integration_utils.get_reporting_integration_callbacks([REPORT_TO_NAME, "tensorboard"]) == [
        CarbonOffsetCallback,
        integration_utils.TensorBoardCallback,
    ]


def test_threshold_offset_is_exact_and_never_blocks_the_epoch(
    datasets: Any, settings: dict[str, Any], server: Any, ledger_path: Path, tmp_path: Path
) -> None:
    server.delay_s = 2.0  # every API answer takes 2 s
    script = [0.2, 0.6, 1.3]  # kg CO2eq after epochs 1, 2, 3; threshold 0.5 is crossed after epoch 2
    callback = CarbonOffsetCallback(
        **{**settings, "offset_request_timeout": 5.0, "offset_timeout": 15.0},
        source=ScriptedEmissions(script),
    )
    clock, probe = Clock(), Probe(callback)
    trainer = make_trainer(datasets, tmp_path / "out", [clock, callback, probe], epochs=3)
    trainer.train()

    hook_s = [after - before for before, after in zip(clock.times, probe.times, strict=True)]
    assert len(hook_s) == 3 and max(hook_s) < 0.5, hook_s  # the 2 s API calls ran in the background
    owed_lb = math.floor(script[-1] / KG_PER_LB)
    assert owed_lb == 2
    assert server.total_lb() == owed_lb
    final = callback.final_report
    assert final is not None
    assert (final.confirmed_lb, final.in_flight_lb) == (owed_lb, 0)
    assert final.pending_kg == pytest.approx(script[-1] - owed_lb * KG_PER_LB)
    assert [e["carbon/emissions_kg"] for e in carbon_entries(trainer)] == pytest.approx(script)
    assert only_run(ledger_path).emissions_kg == pytest.approx(script[-1])


def test_budget_stops_training_at_the_epoch_that_passes_it(
    datasets: Any,
    settings: dict[str, Any],
    ledger_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="carbonoffset")
    callback = CarbonOffsetCallback(
        **settings, max_emissions_kg=0.25, source=ScriptedEmissions([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    )
    trainer = make_trainer(datasets, tmp_path / "out", [callback], epochs=6)
    trainer.train()

    assert trainer.state.epoch == pytest.approx(3.0)  # stopped after the third epoch (0.3 > 0.25)
    assert [e["carbon/emissions_kg"] for e in carbon_entries(trainer)] == pytest.approx([0.1, 0.2, 0.3])
    run = only_run(ledger_path)
    assert (run.epochs, run.status) == (3, "finished")
    assert run.emissions_kg == pytest.approx(0.3)
    messages = [r.getMessage() for r in caplog.records]
    assert any("projected emissions for 6 epochs" in m for m in messages)  # after epoch 1: 0.1 x 6 > 0.25
    assert any("max_emissions_kg=0.25" in m and "stopping training" in m for m in messages)


def test_exception_in_forward_stops_the_tracker_and_keeps_the_measurement(
    datasets: Any, settings: dict[str, Any], ledger_path: Path, tmp_path: Path
) -> None:
    callback = CarbonOffsetCallback(**settings, source=CodeCarbonSource(country_iso_code="FRA"))
    probe = Probe(callback)
    trainer = make_trainer(datasets, tmp_path / "out", [callback, probe], epochs=4)
    model, forward = trainer.model, trainer.model.forward
    steps_per_epoch = TRAIN_SAMPLES // 32
    calls = {"train": 0}

    @functools.wraps(forward)  # the Trainer reads forward's signature to pick input columns
    def failing_forward(*args: Any, **kwargs: Any) -> Any:
        if model.training:
            calls["train"] += 1
            if calls["train"] > steps_per_epoch + 2:  # in the middle of the second epoch
                raise RuntimeError("boom in forward")
        return forward(*args, **kwargs)

    model.forward = failing_forward
    with pytest.raises(RuntimeError, match="boom in forward"), callback.guard():
        trainer.train()

    assert not tracker_timers()
    session = callback.session
    assert session is not None and not session.running
    tracker = probe.tracker
    run = only_run(ledger_path)
    assert (run.status, run.epochs) == ("failed", 1)
    assert run.emissions_kg == pytest.approx(tracker.final_emissions, rel=1e-9)  # measured until the failure
    assert run.emissions_kg > carbon_entries(trainer)[0]["carbon/emissions_kg"] > 0
    final = callback.final_report
    assert final is not None and final.emissions_kg == pytest.approx(run.emissions_kg, rel=1e-12)
    assert final.offset_lb == 0  # a failed run buys no final offset: what it emitted stays pending
    assert final.pending_kg == pytest.approx(run.emissions_kg)


def test_interrupt_from_a_callback_and_a_run_left_open_without_guard(
    datasets: Any, settings: dict[str, Any], ledger_path: Path, tmp_path: Path
) -> None:
    callback = CarbonOffsetCallback(**settings, source=ScriptedEmissions([0.1, 0.2, 0.3]))
    failing = FailAtEpoch(1, KeyboardInterrupt())
    trainer = make_trainer(datasets, tmp_path / "out", [callback, failing], epochs=3)
    with pytest.raises(KeyboardInterrupt), callback.guard():
        trainer.train()
    run = only_run(ledger_path)
    assert (run.status, run.epochs, run.emissions_kg) == ("interrupted", 1, pytest.approx(0.1))

    # without guard the run stays open until the next train() with this callback closes it
    callback2 = CarbonOffsetCallback(**settings, source=ScriptedEmissions([0.1, 0.2, 0.3]))
    failing.exc = RuntimeError("boom in a callback")
    trainer2 = make_trainer(datasets, tmp_path / "out2", [callback2, failing], epochs=3)
    with pytest.raises(RuntimeError, match="boom in a callback"):
        trainer2.train()
    assert callback2.session is not None and callback2.session.running
    failing.index = -1
    trainer2.train()
    ledger = Ledger(ledger_path)
    try:
        statuses = [(r.status, r.emissions_kg) for r in ledger.runs()]
    finally:
        ledger.close()
    assert statuses == [("interrupted", 0.1), ("interrupted", 0.1), ("finished", 0.3)]


def test_resume_from_a_real_checkpoint_continues_totals_without_offsetting_again(
    datasets: Any,
    settings: dict[str, Any],
    server: Any,
    ledger_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    output_dir = tmp_path / "out"
    # run A: 0.3 then 0.7 kg after epochs 1 and 2 (1 lb offset), then fails as epoch 3 begins
    callback_a = CarbonOffsetCallback(**settings, source=ScriptedEmissions([0.3, 0.7]))
    trainer_a = make_trainer(
        datasets,
        output_dir,
        [callback_a, FailAtEpoch(2, RuntimeError("node lost"))],
        epochs=4,
        save_strategy="epoch",
    )
    with pytest.raises(RuntimeError, match="node lost"), callback_a.guard():
        trainer_a.train()
    run_a = only_run(ledger_path)
    assert (run_a.status, run_a.emissions_kg) == ("failed", pytest.approx(0.7))
    assert server.total_lb() == 1

    checkpoint = get_last_checkpoint(str(output_dir))
    assert checkpoint is not None
    saved = json.loads(Path(checkpoint, "trainer_state.json").read_text())["stateful_callbacks"][
        "CarbonOffsetCallback"
    ]
    assert saved["attributes"]["resume_state"]["run_id"] == run_a.run_id
    assert saved["attributes"]["resume_state"]["emissions_kg"] == pytest.approx(0.7)
    assert "offset_api_key" not in saved["args"]

    # run B: a new process would build the same objects; +0.25 and +0.5 kg over epochs 3 and 4
    callback_b = CarbonOffsetCallback(**settings, source=ScriptedEmissions([0.25, 0.5]))
    trainer_b = make_trainer(
        datasets,
        output_dir,
        [callback_b],
        epochs=4,
        save_strategy="epoch",
        restore_callback_states_from_checkpoint=True,
    )
    trainer_b.train(resume_from_checkpoint=checkpoint)

    active = [cb for cb in trainer_b.callback_handler.callbacks if isinstance(cb, CarbonOffsetCallback)]
    assert len(active) == 1 and active[0] is not callback_b  # the Trainer rebuilt it from the checkpoint...
    final = callback_b.final_report  # ...and it shares the given instance's settings and results
    assert final is not None and final.run_id == run_a.run_id
    assert [e["carbon/emissions_kg"] for e in carbon_entries(trainer_b)][-2:] == pytest.approx([0.95, 1.2])
    run = only_run(ledger_path)
    assert (run.run_id, run.status, run.epochs) == (run_a.run_id, "finished", 4)
    assert run.emissions_kg == pytest.approx(1.2)
    assert final.emissions_kg == pytest.approx(1.2)
    owed_lb = math.floor(1.2 / KG_PER_LB)
    assert server.total_lb() == owed_lb == 2  # one more pound, nothing bought twice
    assert len(server.captures) == 2

    # the API key is in no file the Trainer wrote
    secret = str(settings["offset_api_key"]).encode()
    files = [p for p in output_dir.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in files)
    assert not [p for p in files if secret in p.read_bytes()]
    assert secret.decode() not in caplog.text and caplog.records  # nor in any log record


def test_state_rebuilds_without_the_key_and_takes_it_from_configuration(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    callback = CarbonOffsetCallback(
        offset_api_key=SECRET_KEY,
        offset_environment="sandbox",
        offset_ledger=ledger_path,
        offset_threshold=0.75,
        max_emissions_kg=2.0,
        log_metrics=False,
    )
    state = json.loads(json.dumps(callback.state()))  # what trainer_state.json holds
    assert SECRET_KEY not in json.dumps(state)
    assert set(state) == {"args", "attributes"}

    env_key = "test_from_environment_0001"
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", env_key)
    rebuilt = CarbonOffsetCallback.from_state(state)  # what the Trainer does: type(cb)(**args) + setattr
    assert rebuilt.config.offset_api_key == SecretKey(env_key)
    assert rebuilt.config.offset_environment == "sandbox"
    assert rebuilt.config.ledger_path == ledger_path
    assert rebuilt.config.offset_threshold == 0.75
    assert (rebuilt.max_emissions_kg, rebuilt.log_metrics) == (2.0, False)
    assert rebuilt.resume_state == {
        "version": 1,
        "run_id": None,
        "segment_id": None,
        "emissions_kg": 0.0,
        "energy_kwh": 0.0,
    }


def test_report_to_builds_the_callback_from_configuration(
    datasets: Any, server: Any, ledger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert integration_utils.INTEGRATION_TO_CALLBACK[REPORT_TO_NAME] is CarbonOffsetCallback
    assert integration_utils.INTEGRATION_TO_CALLBACK["codecarbon"] is integration_utils.CodeCarbonCallback
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", SECRET_KEY)
    monkeypatch.setenv("CODECARBON_OFFSET_ENVIRONMENT", "sandbox")
    monkeypatch.setenv("CODECARBON_OFFSET_API_URL", server.url)
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", str(ledger_path))
    Path(".codecarbon.config").write_text("[codecarbon]\ncountry_iso_code = FRA\noffset_round_up = true\n")

    trainer = make_trainer(datasets, tmp_path / "out", None, epochs=2, report_to=[REPORT_TO_NAME])
    built = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CarbonOffsetCallback)]
    assert len(built) == 1
    config = built[0].config
    assert config.offset_api_key == SecretKey(SECRET_KEY)
    assert (config.country_iso_code, config.offset_round_up, config.ledger_path) == ("FRA", True, ledger_path)
    trainer.train()

    assert len(carbon_entries(trainer)) == 2
    run = only_run(ledger_path)
    assert (run.label, run.status, run.epochs) == ("huggingface", "finished", 2)
    assert 0 < run.emissions_kg < KG_PER_LB
    assert server.total_lb() == 1  # micrograms, rounded up to one pound at the end


def test_report_to_and_a_given_callback_together_measure_and_buy_once(
    datasets: Any, server: Any, ledger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README shows ``callbacks=[CarbonOffsetCallback()]`` "or" ``report_to=["carbonoffset"]``; a
    user who does both has two callbacks of the class in one Trainer (transformers only logs that it
    "already has one"). One ``train()`` is one run: measured once, its final pound bought once."""
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", SECRET_KEY)
    monkeypatch.setenv("CODECARBON_OFFSET_ENVIRONMENT", "sandbox")
    monkeypatch.setenv("CODECARBON_OFFSET_API_URL", server.url)
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", str(ledger_path))
    Path(".codecarbon.config").write_text("[codecarbon]\ncountry_iso_code = FRA\noffset_round_up = true\n")

    callback = CarbonOffsetCallback()
    trainer = make_trainer(datasets, tmp_path / "out", [callback], epochs=2, report_to=[REPORT_TO_NAME])
    trainer.train()

    run = only_run(ledger_path)  # not one run per callback, each counting the machine's energy
    assert server.total_lb() == 1  # not one rounded-up pound per callback
    assert callback.final_report is not None and callback.final_report.run_id == run.run_id
    assert len(carbon_entries(trainer)) == 2


def test_demo_trains_and_reports(settings: dict[str, Any], server: Any) -> None:
    result = demo.train({**settings, "offset_round_up": True}, epochs=2)
    assert result.epochs == 2
    assert 0.0 <= result.accuracy <= 1.0
    assert result.report.emissions_kg > 0
    assert result.report.offset_lb == 1 and server.total_lb() == 1


def test_missing_transformers_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "from carbonoffset.integrations.huggingface import CarbonOffsetCallback\n"
        "try:\n"
        "    CarbonOffsetCallback(offset_environment='sandbox')\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "`CarbonOffsetCallback` for Hugging Face Transformers requires `transformers>=4.45`" in done.stdout
    assert "pip install carbonoffset[transformers]" in done.stdout


def test_missing_transformers_error_keeps_the_import_error_as_its_cause() -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "from carbonoffset.integrations.huggingface import CarbonOffsetCallback, add_to_model_card\n"
        "for build in (lambda: CarbonOffsetCallback(), lambda: add_to_model_card(None)):\n"
        "    try:\n"
        "        build()\n"
        "    except ModuleNotFoundError as exc:\n"
        "        print(type(exc.__cause__).__name__, '|', exc.__cause__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:  # the reason transformers could not be imported is not lost
        assert line.startswith("ModuleNotFoundError | ") and "transformers" in line, line


def test_notebook_runs_twice_in_its_folder(tmp_path: Path) -> None:
    pytest.importorskip("nbclient")
    outputs = run_twice("huggingface", tmp_path)
    assert "carbon/emissions_kg" in outputs
    assert "captured on the local sandbox: 1 lb" in outputs
