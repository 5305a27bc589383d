"""Live figures from the first epoch, and clean Ctrl-C / SIGTERM: fresh processes, real CodeCarbon
(in the measuring process), real tiny models trained by the real frameworks on digits.

Each script starts a cold process (no CodeCarbon imported, no meter running) with an empty user
cache (a new ``HOME``), as on a machine where carbonoffset never ran: the per-epoch figures before
the meter's first reading come from CodeCarbon's defaults, never a zero.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _scripts import run_script, subprocess_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX"),
]

_SETTINGS = (
    "dict(offset_ledger=LEDGER, country_iso_code='FRA', offset_environment='sandbox', auto_offset=False)"
)

_LIGHTNING_MODULE = """
import lightning.pytorch as pl, torch
from torch.utils.data import DataLoader, TensorDataset
from carbonoffset.demo.data import load_digits_split

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

data = load_digits_split()
torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)), batch_size=32)
"""

_LIGHTNING = (
    _LIGHTNING_MODULE
    + """
import csv, glob, json, sys
from lightning.pytorch.loggers import CSVLogger
from carbonoffset.integrations.lightning import CarbonOffsetCallback

callback = CarbonOffsetCallback(**SETTINGS)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, callbacks=[callback], enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     logger=CSVLogger(ROOT, name="csv"), default_root_dir=ROOT)
trainer.fit(Net(), loader)
(path,) = glob.glob(ROOT + "/csv/*/metrics.csv")
rows = [r for r in csv.DictReader(open(path)) if r.get("epoch") and r.get("carbon/emissions_kg")]
print(json.dumps({
    "epochs_kg": [float(r["carbon/emissions_kg"]) for r in rows],
    "estimated_kg": [float(r["carbon/estimated_kg"]) for r in rows],
    "final_kg": callback.final_report.emissions_kg,
    "codecarbon_imported": "codecarbon" in sys.modules,
}))
"""
)

_KERAS = """
import json, os, sys
os.environ["KERAS_BACKEND"] = "torch"
import keras
from carbonoffset.demo.data import load_digits_split
from carbonoffset.demo.keras import build_model, fit_digits
from carbonoffset.integrations.keras import CarbonOffsetCallback

keras.utils.set_random_seed(0)
callback = CarbonOffsetCallback(**SETTINGS)
history = fit_digits(build_model(keras), load_digits_split(), epochs=3, callbacks=[callback])
print(json.dumps({
    "epochs_kg": history.history["carbon/emissions_kg"],
    "estimated_kg": history.history["carbon/estimated_kg"],
    "final_kg": callback.final_report.emissions_kg,
    "codecarbon_imported": "codecarbon" in sys.modules,
}))
"""

_HUGGINGFACE = """
import json, sys
from transformers import Trainer
from carbonoffset.demo.huggingface import build_datasets, build_model, training_arguments
from carbonoffset.integrations.huggingface import CarbonOffsetCallback

callback = CarbonOffsetCallback(**SETTINGS)
train, val = build_datasets(limit=480)
trainer = Trainer(model=build_model(), args=training_arguments(ROOT, epochs=3), train_dataset=train,
                  eval_dataset=val, callbacks=[callback])
trainer.train()
rows = [e for e in trainer.state.log_history if "carbon/emissions_kg" in e and "train_runtime" not in e]
print(json.dumps({
    "epochs_kg": [e["carbon/emissions_kg"] for e in rows],
    "estimated_kg": [e["carbon/estimated_kg"] for e in rows],
    "final_kg": callback.final_report.emissions_kg,
    "codecarbon_imported": "codecarbon" in sys.modules,
}))
"""


def _fresh_env(tmp_path: Path) -> dict[str, str]:
    """A process as on a machine where carbonoffset never ran: empty home and caches."""
    home = tmp_path / "fresh-home"
    home.mkdir(exist_ok=True)
    return {
        **subprocess_env(),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "HF_HUB_OFFLINE": "1",
        "KERAS_HOME": str(home / ".keras"),
    }


def _script(body: str, tmp_path: Path) -> str:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    header = f"LEDGER = {str(tmp_path / 'ledger.sqlite3')!r}\nROOT = {str(root)!r}\nSETTINGS = {_SETTINGS}\n"
    return header + textwrap.dedent(body)


@pytest.mark.parametrize("framework", ["lightning", "keras", "huggingface"])
def test_a_three_epoch_digits_fit_logs_true_figures_from_the_first_epoch(
    framework: str, tmp_path: Path
) -> None:
    body = {"lightning": _LIGHTNING, "keras": _KERAS, "huggingface": _HUGGINGFACE}[framework]
    (out,) = run_script(_script(body, tmp_path), env=_fresh_env(tmp_path))
    epochs_kg, estimated_kg = out["epochs_kg"], out["estimated_kg"]
    assert len(epochs_kg) == 3
    # energy was used from the first batch: never a zero, never going back
    assert all(kg > 0 for kg in epochs_kg), epochs_kg
    assert epochs_kg == sorted(epochs_kg), epochs_kg
    # the estimate is labelled: a part of the figure, never more than it
    assert all(0 <= est <= kg for est, kg in zip(estimated_kg, epochs_kg, strict=True)), (
        estimated_kg,
        epochs_kg,
    )
    assert out["final_kg"] > 0
    assert out["codecarbon_imported"] is False  # CodeCarbon ran in the measuring process only


_INTERRUPTIBLE = (
    _LIGHTNING_MODULE
    + """
import sys
from carbonoffset.integrations.lightning import CarbonOffsetCallback

class Announce(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        print(f"EPOCH {trainer.current_epoch}", flush=True)

callback = CarbonOffsetCallback(**SETTINGS)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=10_000, callbacks=[callback, Announce()],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     logger=False, default_root_dir=ROOT)
trainer.fit(Net(), loader)
"""
)


def _interrupt_after_second_epoch(
    tmp_path: Path, signum: int, *, every_process: bool = False
) -> tuple[int, str, str]:
    """Run the Lightning fit in its own process group and send ``signum`` to the whole group (what
    Ctrl-C in a terminal or a Jupyter interrupt does) after its second epoch; with
    ``every_process``, to each process of the job instead, whatever its session or group (what
    SLURM's ``scancel`` and time limit, and systemd's stop, do: they signal a job's cgroup)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _script(_INTERRUPTIBLE, tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_fresh_env(tmp_path),
        start_new_session=True,  # its own process group, as a shell gives a job
    )
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    try:
        for line in process.stdout:
            lines.append(line)
            if line.strip() == "EPOCH 1":
                if every_process:
                    import psutil  # a CodeCarbon dependency

                    job = psutil.Process(process.pid)
                    for member in [job, *job.children(recursive=True)]:
                        member.send_signal(signum)
                else:
                    os.killpg(process.pid, signum)
                break
            assert time.monotonic() < deadline, "the fit never reached its second epoch"
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, "".join(lines) + out, err


def _report(tmp_path: Path) -> Any:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "carbonoffset.cli",
            "report",
            "--json",
            "--ledger",
            str(tmp_path / "ledger.sqlite3"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_fresh_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _runs(tmp_path: Path) -> list[Any]:
    from carbonoffset.core.ledger import Ledger

    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        return list(ledger.runs())


@pytest.mark.parametrize(
    ("signame", "every_process"),
    [("SIGINT", False), ("SIGTERM", False), ("SIGTERM", True)],
    ids=["SIGINT", "SIGTERM", "SIGTERM-to-every-process"],
)
def test_a_signal_to_the_process_group_ends_the_fit_cleanly_with_its_measured_figures(
    signame: str, every_process: bool, tmp_path: Path
) -> None:
    returncode, out, err = _interrupt_after_second_epoch(
        tmp_path, getattr(signal, signame), every_process=every_process
    )
    if signame == "SIGINT":
        # Lightning turns the KeyboardInterrupt into a graceful shutdown and exit status 1
        assert "Detected KeyboardInterrupt" in out + err
        assert returncode == 1, err
        assert err.count("KeyboardInterrupt") <= 1, err
    else:  # Lightning's SIGTERM handler ends the fit at the epoch's end
        assert returncode in (0, 1, -signal.SIGTERM), err
    assert "Traceback" not in err, err  # nothing from carbonoffset (nor its measuring process)
    assert "did not give the run's final figures" not in err, err  # no fallback to CodeCarbon in process
    assert "measures in the training process" not in err, err
    (run,) = _runs(tmp_path)
    assert run.status == "interrupted"
    assert run.emissions_kg > 0 and run.energy_kwh > 0
    report = _report(tmp_path)
    assert json.dumps(report)  # the CLI reads the run back
    (account,) = report["accounts"] if isinstance(report, dict) and "accounts" in report else report
    assert account["emissions_kg"] == pytest.approx(run.emissions_kg) and account["emissions_kg"] > 0


_CTRL_C_AT_THE_END = """
import json, os, signal, threading
from carbonoffset.core.session import OffsetSession
from carbonoffset.testing import FakeOneClickImpact, Fault, ScriptedEmissions

server = FakeOneClickImpact().start()
server.inject(Fault(delay_s=3.0))  # 1ClickImpact answers the final offset slowly
session = OffsetSession(
    offset_api_key="test_ctrl_c_at_the_end", offset_environment="sandbox", offset_api_url=server.url,
    offset_ledger=LEDGER, offset_round_up=True, offset_timeout=20, offset_request_timeout=10,
    source=ScriptedEmissions([0.1, 0.2]),
)
session.begin()
for epoch in range(2):
    session.epoch_end(epoch)
# the fit is over; its end waits for the final offset and the user presses Ctrl-C
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    session.end()
    raised = None
except KeyboardInterrupt:
    raised = "KeyboardInterrupt"
session.abort("interrupted")  # what Lightning's on_exception and the callbacks' guard() do next
print(json.dumps({"raised": raised, "account": session.config.account}))
"""


def test_ctrl_c_while_the_end_of_a_run_waits_for_its_offset_records_the_run_interrupted(
    tmp_path: Path,
) -> None:
    """The end of a fit waits up to ``offset_timeout`` for the final offset; Ctrl-C there (the fit
    looks done, the prompt does not come back) must still record the run's end, not leave it
    ``running`` in the ledger for ever."""
    (out,) = run_script(_script(_CTRL_C_AT_THE_END, tmp_path), env=_fresh_env(tmp_path))
    assert out["raised"] == "KeyboardInterrupt"  # the user's Ctrl-C goes on as usual
    (run,) = _runs(tmp_path)
    assert run.status == "interrupted"
    assert run.emissions_kg == pytest.approx(0.2)  # the run's final figures, recorded
