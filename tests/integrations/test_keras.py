"""The Keras 3 callback, on real tiny models trained by Keras (torch backend) on scikit-learn digits."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import types
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

if importlib.util.find_spec("keras") is None:
    pytest.skip("keras is not installed (pip install carbonoffset[keras])", allow_module_level=True)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "carbonoffset" / "integrations" / "keras.py"
CARBON_KEYS = ("carbon/energy_kwh", "carbon/emissions_kg", "carbon/offset_kg", "carbon/pending_kg")


@pytest.fixture(scope="module")
def kx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    """Keras on the torch backend (KERAS_HOME in a temp folder), the callback class and the digits data."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_BACKEND", "torch")
        mp.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
        import keras

        from carbonoffset.demo.data import load_digits_split
        from carbonoffset.integrations.keras import CarbonOffsetCallback

        assert keras.backend.backend() == "torch"
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: one thread is faster and immune to a busy machine

        class Boom(keras.layers.Layer):
            """Identity layer that raises once armed (an exception from a layer's call)."""

            def __init__(self) -> None:
                super().__init__()
                self.armed = False

            def call(self, x: Any) -> Any:
                if self.armed:
                    raise RuntimeError("boom from a layer")
                return x

        yield types.SimpleNamespace(
            keras=keras, Callback=CarbonOffsetCallback, data=load_digits_split(), Boom=Boom
        )
        torch.set_num_threads(threads)


def _model(kx: types.SimpleNamespace, *extra: Any) -> Any:
    keras = kx.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input(shape=(64,)), *extra, keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _fit(kx: types.SimpleNamespace, model: Any, callbacks: list[Any], epochs: int) -> Any:
    return model.fit(
        kx.data.x_train,
        kx.data.y_train,
        epochs=epochs,
        batch_size=512,
        verbose=0,
        callbacks=callbacks,
    )


def _spy(kx: types.SimpleNamespace, callback: Any) -> Any:
    """A callback placed after ours: keeps the CodeCarbon tracker of each fit and the logs it saw."""

    class Spy(kx.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.trackers: list[Any] = []
            self.logs: list[dict[str, Any]] = []

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            tracker = callback.session.source.tracker
            if not self.trackers or self.trackers[-1] is not tracker:
                self.trackers.append(tracker)
            self.logs.append(dict(logs))

    return Spy()


def _raise_at(kx: types.SimpleNamespace, epoch: int, exc: BaseException) -> Any:
    class RaiseAt(kx.keras.callbacks.Callback):
        def on_epoch_end(self, index: int, logs: Any = None) -> None:
            if index == epoch:
                raise exc

    return RaiseAt()


def _in_process() -> CodeCarbonSource:
    """CodeCarbon in the test process, for the tests that compare the ledger with the tracker's own
    final figures (the default source measures in a separate process: see tests/core/test_meter.py)."""
    return CodeCarbonSource(country_iso_code="FRA")


def _tracker_threads_alive(timeout: float = 2.0) -> list[threading.Thread]:
    """CodeCarbon samples on ``threading.Timer`` threads; give cancelled ones a moment to exit."""
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer)]
    for timer in timers:
        timer.join(timeout)
    return [t for t in timers if t.is_alive()]


def _runs(ledger_path: Path) -> list[Any]:
    with Ledger(ledger_path) as ledger:
        return ledger.runs()


# --------------------------------------------------------------------------- real CodeCarbon
def test_metrics_reach_history_and_ledger_run_equals_the_tracker(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    callback = kx.Callback(**settings, source=_in_process())
    spy = _spy(kx, callback)
    history = _fit(kx, _model(kx), [callback, spy], epochs=3)

    for key in CARBON_KEYS:
        assert len(history.history[key]) == 3, key
    emissions = history.history["carbon/emissions_kg"]
    assert emissions == sorted(emissions)
    assert [logs["carbon/emissions_kg"] for logs in spy.logs] == emissions  # later callbacks see them too
    assert history.history["carbon/offset_kg"] == [0.0, 0.0, 0.0]
    assert len(spy.trackers) == 1

    final = spy.trackers[0].final_emissions_data  # set by the tracker's own stop()
    (run,) = _runs(ledger_path)
    assert run.label == "keras" and run.status == "finished" and run.epochs == 3
    assert run.emissions_kg > 0
    assert run.emissions_kg == pytest.approx(final.emissions, rel=1e-12)
    assert run.energy_kwh == pytest.approx(final.energy_consumed, rel=1e-12)
    assert emissions[-1] <= run.emissions_kg
    report = callback.final_report
    assert report.run_id == run.run_id and report.epochs == 3
    assert report.emissions_kg == run.emissions_kg
    assert report.pending_kg == pytest.approx(run.emissions_kg)  # micrograms: far below the threshold
    assert server.total_lb() == 0
    assert not callback.session.running
    assert _tracker_threads_alive() == []


def test_callbacks_placed_before_ours_see_the_metrics(
    kx: types.SimpleNamespace, settings: dict[str, Any], tmp_path: Path
) -> None:
    """EarlyStopping monitoring carbon/emissions_kg and a CSVLogger placed *before* the callback: no
    "metric not available" warning, the budget-like stop works, the CSV has the figures."""
    import csv
    import warnings

    keras = kx.keras
    callback = kx.Callback(**settings, source=ScriptedEmissions([1e-6, 2e-6, 2e-6, 2e-6, 2e-6]))
    early = keras.callbacks.EarlyStopping(monitor="carbon/emissions_kg", mode="max", patience=1)
    csv_path = tmp_path / "log.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit(kx, _model(kx), [early, keras.callbacks.CSVLogger(str(csv_path)), callback], epochs=8)
    assert not [w for w in caught if "not available" in str(w.message)], [str(w.message) for w in caught]
    # the figure stopped growing after epoch 1: EarlyStopping(patience=1) stopped the fit after epoch 2
    assert history.history["carbon/emissions_kg"] == pytest.approx([1e-6, 2e-6, 2e-6])
    assert early.stopped_epoch == 2
    with open(csv_path, encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [float(r["carbon/emissions_kg"]) for r in rows] == pytest.approx([1e-6, 2e-6, 2e-6])


def test_two_consecutive_fits_are_both_tracked(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path
) -> None:
    callback = kx.Callback(**settings)  # the default: CodeCarbon in a measuring process
    model = _model(kx)
    first = _fit(kx, model, [callback], epochs=2)
    first_report = callback.final_report
    second = _fit(kx, model, [callback], epochs=3)
    second_report = callback.final_report

    assert isinstance(callback.session.source, MeterSource) and not callback.session.source.measuring
    assert len(first.history["carbon/emissions_kg"]) == 2
    assert len(second.history["carbon/emissions_kg"]) == 3
    runs = _runs(ledger_path)
    assert [r.run_id for r in runs] == [first_report.run_id, second_report.run_id]
    assert first_report.run_id != second_report.run_id
    for run, report, epochs in zip(runs, (first_report, second_report), (2, 3), strict=True):
        assert run.status == "finished" and run.epochs == epochs
        assert run.emissions_kg > 0
        assert run.emissions_kg == report.emissions_kg
    # the second run's figures start from zero again (cumulative per run, not per callback)
    assert second.history["carbon/emissions_kg"][0] < runs[0].emissions_kg + runs[1].emissions_kg
    assert _tracker_threads_alive() == []


def test_two_callbacks_in_one_fit_measure_and_buy_once(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    """A notebook cell doing ``callbacks.append(CarbonOffsetCallback(...))``, run twice, gives one fit
    two callbacks. One fit is one run: measured once, its final pound bought once."""
    callbacks = [kx.Callback(**settings, offset_round_up=True) for _ in range(2)]
    history = _fit(kx, _model(kx), callbacks, epochs=2)

    (run,) = _runs(ledger_path)  # not one run per callback, each counting the machine's energy
    assert server.total_lb() == 1  # not one rounded-up pound per callback
    reports = [cb.final_report for cb in callbacks if cb.final_report is not None]
    assert [r.run_id for r in reports] == [run.run_id]
    assert len(history.history["carbon/emissions_kg"]) == 2


@pytest.mark.parametrize(
    ("where", "exc_type", "status", "epochs"),
    [
        ("layer", RuntimeError, "failed", 2),  # raised inside epoch 2: epochs 0 and 1 were recorded
        ("callback", RuntimeError, "failed", 3),  # raised after our epoch-2 hook ran
        ("callback", KeyboardInterrupt, "interrupted", 3),
    ],
)
def test_exception_inside_fit_with_guard_stops_the_tracker_and_keeps_the_emissions(
    kx: types.SimpleNamespace,
    settings: dict[str, Any],
    ledger_path: Path,
    server: FakeOneClickImpact,
    where: str,
    exc_type: type[BaseException],
    status: str,
    epochs: int,
) -> None:
    # even so: no final offset for a failed fit
    callback = kx.Callback(**settings, offset_round_up=True, source=_in_process())
    spy = _spy(kx, callback)
    if where == "layer":
        boom = kx.Boom()
        model = _model(kx, boom)

        class Arm(kx.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                boom.armed = epoch == 2

        extra = [Arm()]
    else:
        model = _model(kx)
        extra = [_raise_at(kx, 2, exc_type("boom from a callback"))]

    with pytest.raises(exc_type, match="boom"), callback.guard():
        _fit(kx, model, [callback, spy, *extra], epochs=5)

    assert not callback.session.running
    assert _tracker_threads_alive() == []
    (run,) = _runs(ledger_path)
    assert run.status == status and run.epochs == epochs
    assert run.emissions_kg > 0
    assert run.emissions_kg == pytest.approx(spy.trackers[0].final_emissions_data.emissions, rel=1e-12)
    assert callback.final_report.emissions_kg == run.emissions_kg
    assert callback.final_report.pending_kg == pytest.approx(run.emissions_kg)  # kept, pending
    assert server.captures == []


def test_unguarded_exception_is_closed_by_the_next_fit(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = kx.Callback(**settings, source=_in_process())
    spy = _spy(kx, callback)
    model = _model(kx)
    with pytest.raises(RuntimeError):
        _fit(kx, model, [callback, spy, _raise_at(kx, 1, RuntimeError("boom"))], epochs=4)
    assert callback.session.running  # Keras skipped on_train_end: only a later event can stop it
    failed_run_id = callback.session.run_id

    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        _fit(kx, model, [callback, spy], epochs=2)

    assert any("without on_train_end" in r.getMessage() for r in caplog.records)
    first, second = _runs(ledger_path)
    assert first.run_id == failed_run_id and first.status == "interrupted" and first.epochs == 2
    assert first.emissions_kg > 0
    assert first.emissions_kg == pytest.approx(spy.trackers[0].final_emissions_data.emissions, rel=1e-12)
    assert (
        second.status == "finished" and second.epochs == 2 and second.run_id == callback.final_report.run_id
    )
    assert _tracker_threads_alive() == []


# --------------------------------------------------------------------------- scripted emissions
def test_threshold_offset_goes_through_the_local_server_without_blocking_epochs(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, server: FakeOneClickImpact
) -> None:
    server.delay_s = 2.0  # every API answer takes 2 s
    script = [0.3, 0.6, 0.9, 1.4]  # kg CO2eq, cumulative: crosses the 0.5 kg threshold at epoch 1
    hook_seconds: list[float] = []

    class Timed(kx.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            started = time.perf_counter()
            super().on_epoch_end(epoch, logs)
            hook_seconds.append(time.perf_counter() - started)

    settings = {**settings, "offset_request_timeout": 8.0}  # a slow answer, not a lost one
    callback = Timed(source=ScriptedEmissions(script), **settings)
    history = _fit(kx, _model(kx), [callback], epochs=4)

    assert len(hook_seconds) == 4
    assert max(hook_seconds) < 0.5, hook_seconds  # never waited for the 2 s network round trip
    assert history.history["carbon/emissions_kg"] == pytest.approx(script)
    owed_lb = math.floor(script[-1] / KG_PER_LB)  # 3 lb; the 0.039 kg left is below the threshold
    assert server.total_lb() == owed_lb
    report = callback.final_report
    assert report.confirmed_lb == owed_lb and report.in_flight_lb == 0  # on_train_end waited for them
    assert report.pending_kg == pytest.approx(script[-1] - owed_lb * KG_PER_LB)
    (run,) = _runs(ledger_path)
    assert run.emissions_kg == pytest.approx(script[-1])


def test_budget_stops_training_at_the_right_epoch(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = kx.Callback(
        source=ScriptedEmissions([0.1, 0.2, 0.3, 0.4, 0.5]), max_emissions_kg=0.25, **settings
    )
    with caplog.at_level(logging.WARNING, logger="carbonoffset"):
        history = _fit(kx, _model(kx), [callback], epochs=10)

    assert len(history.history["loss"]) == 3  # 0.3 kg after epoch index 2 passes 0.25 kg
    assert history.history["carbon/emissions_kg"] == pytest.approx([0.1, 0.2, 0.3])
    (run,) = _runs(ledger_path)
    assert run.epochs == 3 and run.status == "finished" and run.emissions_kg == pytest.approx(0.3)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # after the first epoch: 0.1 kg x 10 planned epochs (params["epochs"]) is over budget
    assert any("projected emissions for 10 epochs" in m for m in messages), messages
    assert any("passed max_emissions_kg" in m and "stopping training" in m for m in messages), messages


def test_log_metrics_false_keeps_logs_untouched_but_still_records(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path
) -> None:
    callback = kx.Callback(source=ScriptedEmissions([0.01, 0.02]), log_metrics=False, **settings)
    history = _fit(kx, _model(kx), [callback], epochs=2)
    assert not any(key.startswith("carbon/") for key in history.history)
    (run,) = _runs(ledger_path)
    assert run.epochs == 2 and run.emissions_kg == pytest.approx(0.02)


def test_state_dict_resume_continues_the_run(
    kx: types.SimpleNamespace, settings: dict[str, Any], ledger_path: Path
) -> None:
    first = kx.Callback(source=ScriptedEmissions([0.1, 0.2]), **settings)
    model = _model(kx)
    _fit(kx, model, [first], epochs=2)
    state = json.loads(json.dumps(first.state_dict()))
    assert settings["offset_api_key"] not in json.dumps(state)

    resumed = kx.Callback(source=ScriptedEmissions([0.05, 0.1]), **settings)
    resumed.load_state_dict(state)
    history = model.fit(
        kx.data.x_train,
        kx.data.y_train,
        epochs=4,
        initial_epoch=2,
        batch_size=256,
        verbose=0,
        callbacks=[resumed],
    )
    assert history.history["carbon/emissions_kg"] == pytest.approx([0.25, 0.3])
    (run,) = _runs(ledger_path)
    assert run.run_id == first.final_report.run_id == resumed.final_report.run_id
    assert run.emissions_kg == pytest.approx(0.3) and run.epochs == 4


# --------------------------------------------------------------------------- construction
def test_invalid_settings_raise_before_training(kx: types.SimpleNamespace, settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="max_emissions_kg"):
        kx.Callback(max_emissions_kg=0, **settings)
    with pytest.raises(ValueError, match="offset_environment"):
        kx.Callback(offset_environment="staging")
    with pytest.raises(ValueError, match="unknown setting"):
        kx.Callback(offset_treshold=1.0)


def test_missing_keras_raises_module_not_found_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` now fails as if not installed
    spec = importlib.util.spec_from_file_location("_carbonoffset_keras_without_keras", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing the module works
    with pytest.raises(ModuleNotFoundError) as info:
        module.CarbonOffsetCallback(offset_environment="sandbox")
    message = str(info.value)
    assert "CarbonOffsetCallback" in message and "keras>=3" in message
    assert "pip install carbonoffset[keras]" in message


def test_missing_keras_error_keeps_the_import_error_as_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)
    spec = importlib.util.spec_from_file_location("_carbonoffset_keras_without_keras", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ModuleNotFoundError) as info:
        module.CarbonOffsetCallback()
    cause = info.value.__cause__
    assert isinstance(cause, ModuleNotFoundError) and cause.name == "keras", cause


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="tensorflow is installed")
def test_keras_without_its_backend_says_how_to_choose_one(tmp_path: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "KERAS_HOME": str(tmp_path)}
    code = (
        "from carbonoffset.integrations.keras import CarbonOffsetCallback\n"
        "try:\n    CarbonOffsetCallback()\n"
        "except ModuleNotFoundError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert "KERAS_BACKEND=torch" in result.stdout and "tensorflow" in result.stdout


# --------------------------------------------------------------------------- demo and notebook
def test_demo_trains_and_rounds_up_to_one_pound(
    kx: types.SimpleNamespace, settings: dict[str, Any], server: FakeOneClickImpact
) -> None:
    from carbonoffset.demo.keras import train

    result = train({**settings, "offset_round_up": True}, epochs=2)
    assert result.epochs == 2
    assert 0.5 < result.accuracy <= 1.0
    assert result.report.emissions_kg > 0 and result.report.confirmed_lb == 1
    assert server.total_lb() == 1


def test_notebook_runs_twice_in_its_folder(tmp_path: Path) -> None:
    pytest.importorskip("nbclient")
    outputs = run_twice("keras", tmp_path)
    assert "sandbox    1 capture(s), 1 lb" in outputs  # each run buys its own pound: no credit carried over


def test_an_unusable_ledger_is_reported_when_the_callback_is_built(
    kx: types.SimpleNamespace, tmp_path: Path
) -> None:
    from carbonoffset.core.errors import LedgerError
    from carbonoffset.integrations.keras import CarbonOffsetCallback

    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"not a database at all" * 50)
    before = corrupt.read_bytes()
    with pytest.raises(LedgerError, match="not modified"):
        CarbonOffsetCallback(offset_ledger=corrupt, country_iso_code="FRA")
    assert corrupt.read_bytes() == before
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="offset_ledger"):
        CarbonOffsetCallback(offset_ledger=blocker / "ledger.sqlite3", country_iso_code="FRA")
