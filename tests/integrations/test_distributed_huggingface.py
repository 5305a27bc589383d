"""The Hugging Face callback in distributed training: the real ``Trainer`` under ``torchrun`` (CPU, gloo, loopback).

Two launches of a script this module writes (``TRAIN_SCRIPT``), each running
two trainings ("phases") so one launch covers several assertions:

* one node, two processes: ``torchrun --standalone --nproc_per_node=2``;
* two simulated nodes on this machine, one process each: two ``torchrun
  --nnodes=2 --node_rank=<0|1> --nproc_per_node=1 --master_addr=127.0.0.1
  --master_port=<free port>`` launched together.

Inside, every tracker start/stop is appended to ``trackers.jsonl`` (a source
wrapper), and every rank writes what it logged to ``<phase>.rank<N>.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
from _distributed import free_port, read_jsonl

from carbonoffset.core.ledger import Ledger
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install carbonoffset[transformers])"
)
pytest.importorskip(
    "accelerate", reason="the Trainer needs accelerate (pip install carbonoffset[transformers])"
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CARBON_KEYS = ("carbon/energy_kwh", "carbon/emissions_kg", "carbon/offset_kg", "carbon/pending_kg")
LAUNCH_TIMEOUT_S = 240

TRAIN_SCRIPT = '''
"""Written by tests/integrations/test_distributed_huggingface.py; run under torchrun with one argument,
the path of a JSON configuration (see the test module)."""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
CONFIG = json.loads(Path(sys.argv[1]).read_text())
OUT = Path(CONFIG["out"])
RANK = int(os.environ["RANK"])

import torch

torch.set_num_threads(1)
from transformers import Trainer, TrainerCallback

from carbonoffset.core.sources import CodeCarbonSource
from carbonoffset.demo import huggingface as demo
from carbonoffset.integrations.huggingface import CarbonOffsetCallback
from carbonoffset.testing import ScriptedEmissions

CARBON_KEYS = ("carbon/energy_kwh", "carbon/emissions_kg", "carbon/offset_kg", "carbon/pending_kg")


def write(name, row):
    with open(OUT / name, "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\\n")


class Counting:
    """Wraps an emissions source; each start and stop appends a line to trackers.jsonl."""

    def __init__(self, inner, phase):
        self.inner, self.phase = inner, phase

    def start(self):
        self.inner.start()
        write("trackers.jsonl", {"phase": self.phase, "event": "start", "rank": RANK, "t": time.time()})

    def read(self):
        return self.inner.read()

    def stop(self):
        t = time.time()
        total = self.inner.stop()
        write("trackers.jsonl", {"phase": self.phase, "event": "stop", "rank": RANK, "t": t,
                                 "emissions_kg": total.emissions_kg, "energy_kwh": total.energy_kwh})
        return total


class RankRecorder(TrainerCallback):
    """After CarbonOffsetCallback: what this rank logged. With ``reference``, rank 1 (no tracker of ours
    on this node) measures the node over the same training with a plain CodeCarbon tracker."""

    def __init__(self, ours, phase, reference):
        self.ours, self.phase, self.reference, self.tracker = ours, phase, reference, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.reference and RANK == 1:
            from codecarbon import OfflineEmissionsTracker

            self.tracker = OfflineEmissionsTracker(
                country_iso_code="FRA", output_methods=[], save_to_file=False, log_level="error")
            self.tracker.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "carbon/emissions_kg" in logs:
            write(f"{self.phase}.rank{RANK}.jsonl", {"event": "summary" if "train_runtime" in logs else "log",
                                                     "epoch": state.epoch, "step": state.global_step,
                                                     "metrics": {k: logs[k] for k in CARBON_KEYS}})

    def on_train_end(self, args, state, control, **kwargs):
        final = {k: str(v) if isinstance(v, Path) else v
                 for k, v in dataclasses.asdict(self.ours.final_report).items()}
        summary = {k: state.log_history[-1].get(k) for k in CARBON_KEYS}
        write(f"{self.phase}.rank{RANK}.jsonl", {"event": "end", "epoch": state.epoch, "step": state.global_step,
                                                 "final": final, "summary": summary})
        if self.tracker is not None:
            self.tracker.stop()
            data = self.tracker.final_emissions_data
            write("reference.jsonl", {"phase": self.phase, "energy_kwh": data.energy_consumed,
                                      "duration_s": data.duration})


train_set, _ = demo.build_datasets(limit=CONFIG["samples"])
for phase in CONFIG["phases"]:
    name = phase["name"]
    if phase["source"] == "codecarbon":
        inner = CodeCarbonSource(country_iso_code="FRA")
    else:
        inner = ScriptedEmissions(phase["scripts"][str(RANK)])
    callback = CarbonOffsetCallback(
        source=Counting(inner, name), max_emissions_kg=phase.get("max_emissions_kg"),
        **{**CONFIG["settings"], "offset_ledger": phase["ledger"]})
    trainer = Trainer(
        model=demo.build_model(),
        args=demo.training_arguments(str(OUT / name), epochs=phase["epochs"], use_cpu=True,
                                     eval_strategy="no", logging_strategy="no"),
        train_dataset=train_set,
        callbacks=[callback, RankRecorder(callback, name, phase.get("reference", False))],
    )
    trainer.train()

# a clean end for the process group, as PyTorch asks: without it, a rank exiting while gloo's threads
# still run can abort ("terminate called without an active exception") after everything passed
if torch.distributed.is_available() and torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


# ---------------------------------------------------------------- helpers
def _torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _launch(commands: list[list[str]]) -> None:
    """Run the commands together (one per simulated node) and fail with their output if one fails."""
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        for command in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for proc in procs:  # a launch that timed out: do not leave it behind
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-6000:]


def _configure(folder: Path, settings: dict[str, Any], phases: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "train.py"
    script.write_text(TRAIN_SCRIPT, encoding="utf-8")
    wire = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items() if k != "offset_ledger"}
    for phase in phases:
        phase["ledger"] = str(folder / f"{phase['name']}.sqlite3")
    config = folder / "config.json"
    config.write_text(json.dumps({"out": str(folder), "samples": 256, "settings": wire, "phases": phases}))
    return config


def _only_run(path: Path) -> Any:
    with Ledger(path) as ledger:
        (run,) = ledger.runs()
        return run


def _same_on_both_ranks(folder: Path, phase: str) -> list[dict[str, Any]]:
    rank0, rank1 = read_jsonl(folder / f"{phase}.rank0.jsonl"), read_jsonl(folder / f"{phase}.rank1.jsonl")
    assert rank0 and rank0 == rank1
    return rank0


# ------------------------------------------------------------------ tests
def test_torchrun_two_processes_one_tracker_one_run_one_offset_one_stop(
    settings: dict[str, Any], server: FakeOneClickImpact, tmp_path: Path
) -> None:
    phases = [
        {"name": "real", "source": "codecarbon", "epochs": 10, "reference": True},
        {
            # node figures after epochs 0, 1, 2...: threshold (0.5 kg) crossed at epoch 1, budget at epoch 2;
            # rank 1's script (5 kg) would pass the budget at once if it were ever started
            "name": "scripted",
            "source": "scripted",
            "epochs": 10,
            "max_emissions_kg": 0.65,
            "scripts": {"0": [0.2, 0.6, 0.7, 0.8, 0.9, 1.0], "1": [5.0]},
        },
    ]
    config = _configure(tmp_path / "job", settings, phases)
    _launch([_torchrun("--standalone", "--nproc_per_node=2", str(config.parent / "train.py"), str(config))])
    out = config.parent
    trackers = read_jsonl(out / "trackers.jsonl")

    # real CodeCarbon: one tracker (local rank 0), one run of one node equal to that tracker's total ...
    real = [t for t in trackers if t["phase"] == "real"]
    assert [(t["event"], t["rank"]) for t in real] == [("start", 0), ("stop", 0)]
    run = _only_run(out / "real.sqlite3")
    assert (run.status, run.epochs, run.nodes, run.label) == ("finished", 10, 1, "huggingface")
    assert run.emissions_kg == pytest.approx(real[1]["emissions_kg"], rel=1e-12) and run.emissions_kg > 0
    # ... and to one process measuring the node over the same training (same average power within
    # sampling noise; a tracker on each rank would count the node twice)
    (reference,) = read_jsonl(out / "reference.jsonl")
    job_power_w = run.energy_kwh * 3.6e6 / (real[1]["t"] - real[0]["t"])
    reference_power_w = reference["energy_kwh"] * 3.6e6 / reference["duration_s"]
    assert 0.75 < job_power_w / reference_power_w < 1.33, (job_power_w, reference_power_w)
    rows = _same_on_both_ranks(out, "real")
    assert [r["epoch"] for r in rows if r["event"] == "log"] == [float(e) for e in range(1, 11)]
    # the Trainer's end-of-training summary carries the final figures, on every process
    (summary,) = [r for r in rows if r["event"] == "summary"]
    assert summary["metrics"]["carbon/emissions_kg"] == run.emissions_kg
    assert rows[-1]["final"]["emissions_kg"] == run.emissions_kg
    assert rows[-1]["summary"]["carbon/emissions_kg"] == pytest.approx(run.emissions_kg, rel=1e-12)

    # scripted: one tracker, exactly one offset, and both ranks stop after the epoch that passed the budget
    scripted = [t for t in trackers if t["phase"] == "scripted"]
    assert [(t["event"], t["rank"]) for t in scripted] == [("start", 0), ("stop", 0)]
    assert [c.carbon_captured for c in server.captures] == [1]
    run = _only_run(out / "scripted.sqlite3")
    assert (run.status, run.epochs, run.nodes) == ("finished", 3, 1)
    assert run.emissions_kg == pytest.approx(0.7)
    rows = _same_on_both_ranks(out, "scripted")
    logs = [r for r in rows if r["event"] == "log"]
    assert [r["metrics"]["carbon/emissions_kg"] for r in logs] == pytest.approx([0.2, 0.6, 0.7])
    end = rows[-1]
    assert (end["event"], end["epoch"]) == ("end", 3.0)
    assert (end["final"]["offset_lb"], end["final"]["confirmed_lb"]) == (1, 1)
    assert end["final"]["pending_kg"] == pytest.approx(0.7 - KG_PER_LB)


def test_two_nodes_two_trackers_summed_into_one_run_with_one_offset(
    settings: dict[str, Any], server: FakeOneClickImpact, tmp_path: Path
) -> None:
    phases = [
        {"name": "real", "source": "codecarbon", "epochs": 3},
        {
            # node 0 and node 1 figures after epochs 0, 1, 2; job totals 0.25, 0.6, 0.9 kg
            "name": "scripted",
            "source": "scripted",
            "epochs": 3,
            "scripts": {"0": [0.1, 0.2, 0.3], "1": [0.15, 0.4, 0.6]},
        },
    ]
    config = _configure(tmp_path / "job", settings, phases)
    port = free_port()
    _launch(
        [
            _torchrun(
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(config.parent / "train.py"),
                str(config),
            )
            for node in (0, 1)
        ]
    )
    out = config.parent
    trackers = read_jsonl(out / "trackers.jsonl")

    for phase in ("real", "scripted"):
        mine = [t for t in trackers if t["phase"] == phase]
        # one tracker per node (each node's only process is its local rank 0)
        assert sorted((t["event"], t["rank"]) for t in mine) == [
            ("start", 0),
            ("start", 1),
            ("stop", 0),
            ("stop", 1),
        ]
        stops = [t for t in mine if t["event"] == "stop"]
        run = _only_run(out / f"{phase}.sqlite3")
        assert (run.status, run.epochs, run.nodes) == ("finished", 3, 2)
        # the job total is the sum of both nodes' trackers
        assert run.emissions_kg == pytest.approx(sum(t["emissions_kg"] for t in stops), rel=1e-12)
        assert run.energy_kwh == pytest.approx(sum(t["energy_kwh"] for t in stops), rel=1e-12)
        rows = _same_on_both_ranks(out, phase)
        assert rows[-1]["final"]["emissions_kg"] == run.emissions_kg

    logs = [r for r in _same_on_both_ranks(out, "scripted") if r["event"] == "log"]
    assert [r["metrics"]["carbon/emissions_kg"] for r in logs] == pytest.approx([0.25, 0.6, 0.9])
    # one offset for the job: 1 lb once 0.6 kg was pending; 0.9 - 0.4536 kg left is below 0.5 kg
    assert [c.carbon_captured for c in server.captures] == [1]


def test_without_a_process_group_it_warns_once_and_never_waits(
    settings: dict[str, Any], ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A multi-process setting (world_size=2) without an initialised torch.distributed process group:
    per-process figures with one warning, and no hook waits for another process."""
    import torch.distributed as dist

    from carbonoffset.integrations.huggingface import CarbonOffsetCallback

    assert not dist.is_initialized()
    caplog.set_level(logging.WARNING, logger="carbonoffset")
    callback = CarbonOffsetCallback(
        source=ScriptedEmissions([0.1, 0.2, 0.3]), max_emissions_kg=0.25, **settings
    )
    args = types.SimpleNamespace(
        world_size=2,
        process_index=0,
        local_process_index=0,
        device="cpu",
        restore_callback_states_from_checkpoint=False,
    )
    stops: list[bool] = []

    def two_trainings() -> None:
        for _ in range(2):
            state = types.SimpleNamespace(epoch=0.0, num_train_epochs=5, global_step=0, log_history=[])
            control = types.SimpleNamespace(should_log=False, should_training_stop=False)
            callback.on_train_begin(args, state, control)
            for epoch in range(3):
                state.epoch, state.global_step = float(epoch + 1), 8 * (epoch + 1)
                callback.on_epoch_end(args, state, control)
                stops.append(control.should_training_stop)
            callback.on_train_end(args, state, control)

    worker = threading.Thread(target=two_trainings, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "a hook waited for a process that does not exist"

    warnings = [
        r.getMessage() for r in caplog.records if "no torch.distributed process group" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    # this process's own figures and its own budget decision (0.3 kg > 0.25 kg at the third epoch)
    assert stops == [False, False, True, False, False, True]
    with Ledger(ledger_path) as ledger:
        runs = ledger.runs()
    assert [(r.nodes, r.epochs) for r in runs] == [(1, 3), (1, 3)]
    assert [r.emissions_kg for r in runs] == pytest.approx([0.3, 0.3])
