"""Fit overhead: the same training with and without carbonoffset's callback, per framework.

Every fit runs in a fresh process (nothing cached between them, as for a user's
script), and the variants of one round run back to back in a rotating order
(interleaved A/B/C), so machine noise hits every variant alike. Reported per
variant: the median wall time of ``fit`` and the median of the per-round ratios
to the fit without any tracking.

Variants:

* ``none``: the plain fit.
* ``callback``: carbonoffset's ``CarbonOffsetCallback`` (offline CodeCarbon
  tracker for France, sandbox key against the loopback fake API, a temporary
  ledger), built before the trainer as a user would.
* ``codecarbon``: plain CodeCarbon used the documented way: an
  ``OfflineEmissionsTracker(country_iso_code="FRA")`` started before ``fit``
  and stopped after it (its default CSV output in a temporary folder); its
  start and stop are inside the timed region.
* ``hf_codecarbon`` (Hugging Face only): transformers' own
  ``CodeCarbonCallback`` (``report_to=["codecarbon"]``, an online tracker).

Every fit process runs with a fresh home folder, but all of them share one
cache folder (``XDG_CACHE_HOME``) in which carbonoffset's CPU-model cache was
filled once before the first round: the fits run as on a machine where
carbonoffset ran before. (On a machine's very first run, carbonoffset's
measuring process also runs CodeCarbon's CPU-model detection, 1-2 s of CPU at
low priority, once. Plain CodeCarbon runs it in every process.)

The timed region of every variant starts before the tracking is imported and
built (callback or tracker) and ends after ``fit`` (and the tracker's
``stop()``): model, data and trainer construction are inside it for every
variant alike, the frameworks' own imports are not.

The callback variant also times its own per-epoch hook (the framework's
epoch-end method of the callback) and reports median and p99, and what
carbonoffset itself costs, bottom-up and free of the machine's noise: "own
CPU / fit" is the CPU time of carbonoffset's threads in the training process
(``carbonoffset-*``: ledger writer, offset worker, the measuring process's
reader; sampled from ``/proc`` every 0.25 s) plus the time spent in its epoch
hooks, over the fit's wall time; "meter CPU s" is the CPU time of the measuring
process (a separate process at low priority: it competes with the training
only for a CPU core, never for its GIL).

Usage (full, about 20-30 s per fit on 2 cores; ~1 h in all)::

    python benchmarks/fit_overhead.py --json results/fit_overhead.json

With the training on one thread and a core free (the fits inherit the environment; the JSON
records ``omp_num_threads``)::

    OMP_NUM_THREADS=1 python benchmarks/fit_overhead.py --frameworks lightning --json results/fit_overhead_1thread.json

Quick check (a few seconds per fit)::

    python benchmarks/fit_overhead.py --quick --json results/fit_overhead_quick.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import child_env, median, percentile, run_child, table, write_json

FRAMEWORKS = ("lightning", "huggingface", "keras")
VARIANTS = {
    "lightning": ("none", "callback", "codecarbon"),
    "huggingface": ("none", "callback", "codecarbon", "hf_codecarbon"),
    "keras": ("none", "callback", "codecarbon"),
}
# epochs giving ~20-30 s fits on a 2-core CPU machine, and the --quick sizes
FULL_EPOCHS = {"lightning": 400, "huggingface": 24, "keras": 170}
QUICK_EPOCHS = {"lightning": 60, "huggingface": 2, "keras": 30}


# ----------------------------------------------------------------------- workers
def _timed_hook(callback: Any, name: str, times: list[float]) -> None:
    original = getattr(callback, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)

    setattr(callback, name, timed)


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "codecarbon", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Variant:
    """What one variant adds to a fit: the callback (with its epoch hook timed) or a plain
    CodeCarbon tracker used the documented way (started before the fit, stopped after).

    Build it right after the timed region starts: importing the tracking is part of its cost.
    """

    def __init__(
        self, variant: str, settings: dict[str, Any], folder: Path, integration: str, hook: str
    ) -> None:
        # everything tracking adds is inside: import, construction, fit, stop
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.steal_started = _steal_s()
        self.callbacks: list[Any] = []
        self.hook_s: list[float] = []
        self.callback: Any = None
        self.tracker: Any = None
        self.sampler: _ThreadCpu | None = None
        if variant == "callback":
            self.sampler = _ThreadCpu("carbonoffset")
            module = importlib.import_module(f"carbonoffset.integrations.{integration}")
            self.callback = module.CarbonOffsetCallback(**settings)
            _timed_hook(self.callback, hook, self.hook_s)
            self.callbacks.append(self.callback)
        elif variant == "codecarbon":
            from codecarbon import OfflineEmissionsTracker

            self.tracker = OfflineEmissionsTracker(
                country_iso_code="FRA", output_dir=str(folder), log_level="error"
            )

    def fit(self, fit: Callable[[], Any]) -> dict[str, Any]:
        """Run ``fit`` (inside the plain tracker, if any) and return the timed region's figures."""
        if self.tracker is not None:
            self.tracker.start()
        fit()
        if self.tracker is not None:
            self.tracker.stop()
        fit_s = time.perf_counter() - self.started
        own = self.sampler.stop() if self.sampler is not None else None
        return {
            "fit_s": fit_s,
            "threads_cpu_s": own,
            "meter_cpu_s": _meter_cpu_s() if self.sampler is not None else None,
            "cpu_s": time.process_time() - self.cpu_started,
            "steal_s": _steal_s() - self.steal_started,
            "hook_s": self.hook_s,
            **_report(self.callback),
        }


class _ThreadCpu:
    """CPU seconds of this process's threads whose name starts with ``prefix`` (Linux), sampled
    every 0.25 s so that threads which end before the fit does are counted too."""

    def __init__(self, prefix: str) -> None:
        import threading

        self.prefix = prefix
        self.cpu: dict[int, float] = {}
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import threading

        for thread in threading.enumerate():
            if thread.name.startswith(self.prefix) and thread.native_id:
                try:
                    with open(f"/proc/self/task/{thread.native_id}/stat", encoding="ascii") as file:
                        fields = file.read().rsplit(")", 1)[1].split()
                    self.cpu[thread.native_id] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                except (OSError, IndexError, ValueError):
                    pass

    def _run(self) -> None:
        while not self.halt.wait(0.25):
            self._sample()

    def stop(self) -> float:
        self.halt.set()
        self.thread.join()
        self._sample()
        return sum(self.cpu.values())


def _meter_cpu_s() -> float | None:
    """CPU seconds of this process's measuring process(es) so far (user + system)."""
    try:
        import psutil

        total = 0.0
        for child in psutil.Process().children():
            if "carbonoffset.core._meter" in " ".join(child.cmdline()):
                times = child.cpu_times()
                total += times.user + times.system
        return total
    except Exception:  # noqa: BLE001 -- not measurable here
        return None


def _steal_s() -> float:
    """CPU time the hypervisor gave to other guests, all cores summed (Linux ``/proc/stat``); 0 elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as file:
            fields = file.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _EpochClock(pl: Any) -> Any:  # noqa: N802 -- builds a class on the framework's Callback
    """A Lightning callback noting when each training epoch ended (``perf_counter``), in every
    variant alike: where in a fit the time goes (e.g. during the measuring process's start)."""

    class EpochClock(pl.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.times.append(time.perf_counter())

        def ends(self, started: float) -> list[float]:
            """Seconds from ``started`` (the timed region's start) to each epoch's end."""
            return [round(t - started, 4) for t in self.times]

    return EpochClock()


def _lightning(variant: str, epochs: int, settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from carbonoffset.demo.data import load_digits_split
    from carbonoffset.demo.lightning import digits_loader, digits_module

    run = _Variant(variant, settings, folder, "lightning", "on_train_epoch_end")
    data = load_digits_split()
    loader = digits_loader(torch, data)
    model = digits_module(pl, torch)()
    clock = _EpochClock(pl)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[*run.callbacks, clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(folder),
    )
    return {**run.fit(lambda: trainer.fit(model, loader)), "epoch_end_s": clock.ends(run.started)}


def _huggingface(variant: str, epochs: int, settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    from transformers import Trainer
    from transformers.integrations import integration_utils  # noqa: F401 -- part of the framework's import

    from carbonoffset.demo.huggingface import accuracy, build_datasets, build_model, training_arguments

    run = _Variant(variant, settings, folder, "huggingface", "on_epoch_end")
    report_to = ["codecarbon"] if variant == "hf_codecarbon" else "none"
    train_set, val_set = build_datasets()
    trainer = Trainer(
        model=build_model(),
        args=training_arguments(str(folder / "out"), epochs=epochs, report_to=report_to),
        train_dataset=train_set,
        eval_dataset=val_set,
        compute_metrics=accuracy,
        callbacks=run.callbacks,
    )
    return run.fit(trainer.train)


def _keras(variant: str, epochs: int, settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    import keras

    from carbonoffset.demo.data import load_digits_split
    from carbonoffset.demo.keras import build_model, fit_digits

    run = _Variant(variant, settings, folder, "keras", "on_epoch_end")
    data = load_digits_split()
    model = build_model(keras)
    return run.fit(lambda: fit_digits(model, data, epochs=epochs, callbacks=run.callbacks))


def _report(callback: Any) -> dict[str, Any]:
    if callback is None or callback.final_report is None:
        return {}
    report = callback.final_report
    source = callback.session.source if callback.session is not None else None
    return {
        "emissions_kg": report.emissions_kg,
        "energy_kwh": report.energy_kwh,
        "epochs": report.epochs,
        "late_start_s": getattr(source, "late_start_s", None),
    }


def worker(framework: str, variant: str, epochs: int) -> dict[str, Any]:
    _quiet()
    import sklearn.datasets  # noqa: F401 -- the data's library, imported before any timing
    from _common import fake_server, settings_for

    with tempfile.TemporaryDirectory(prefix="carbonoffset-fit-") as tmp, fake_server() as server:
        folder = Path(tmp)
        settings = settings_for(server, folder / "ledger.sqlite3")
        train = {"lightning": _lightning, "huggingface": _huggingface, "keras": _keras}[framework]
        return train(variant, epochs, settings, folder)


# ------------------------------------------------------------------------ parent
_PRIME_CACHE = (
    "import json; from carbonoffset.core.sources import warm_up_codecarbon; "
    "print(json.dumps({'primed': warm_up_codecarbon().wait(300)}))"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for the docs)")
    parser.add_argument("--quick", action="store_true", help="short fits (a few seconds) instead of 20-30 s")
    parser.add_argument("--epochs", type=json.loads, default=None, help="e.g. '{\"lightning\": 100}'")
    parser.add_argument("--variants", nargs="+", default=None, help="restrict the variants")
    parser.add_argument(
        "--worker", nargs=3, metavar=("FRAMEWORK", "VARIANT", "EPOCHS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        framework, variant, epochs = args.worker
        print(json.dumps(worker(framework, variant, int(epochs))))
        return

    cache = tempfile.mkdtemp(prefix="carbonoffset-bench-cache-")
    env = child_env(XDG_CACHE_HOME=cache)
    run_child(["-c", _PRIME_CACHE], env=env)  # the CPU model, detected once, as after a first run
    epochs = dict(QUICK_EPOCHS if args.quick else FULL_EPOCHS)
    epochs.update(args.epochs or {})
    results: dict[str, Any] = {"rounds": args.rounds, "quick": args.quick, "epochs": epochs, "frameworks": {}}
    rows = []
    for framework in args.frameworks:
        variants = [v for v in VARIANTS[framework] if not args.variants or v in args.variants or v == "none"]
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for round_index in range(args.rounds):
            shift = round_index % len(variants)
            order = variants[shift:] + variants[:shift]  # rotate: every variant takes every slot
            for variant in order:
                result = run_child(
                    [__file__, "--worker", framework, variant, str(epochs[framework])], env=dict(env)
                )
                runs[variant].append(result)
                print(
                    f"{framework:12s} round {round_index + 1}/{args.rounds} {variant:14s} {result['fit_s']:.2f} s"
                    f" (CPU {result['cpu_s']:.2f} s, steal {result['steal_s']:.2f} s)",
                    flush=True,
                )
        base = [r["fit_s"] for r in runs["none"]]
        summary = {}
        for variant in variants:
            times = [r["fit_s"] for r in runs[variant]]
            ratios = [t / b for t, b in zip(times, base, strict=True)]
            hooks = [h for r in runs[variant] for h in r.get("hook_s", [])]
            summary[variant] = {
                "fit_s": times,
                "median_fit_s": median(times),
                "median_ratio": median(ratios),
                "ratio_of_medians": median(times) / median(base),
                "hook_median_ms": median(hooks) * 1e3 if hooks else None,
                "hook_p99_ms": percentile(hooks, 99) * 1e3 if hooks else None,
                "late_start_s": [r.get("late_start_s") for r in runs[variant]],
                "threads_cpu_s": [r.get("threads_cpu_s") for r in runs[variant]],
                "meter_cpu_s": [r.get("meter_cpu_s") for r in runs[variant]],
                "hook_total_s": [sum(r.get("hook_s", [])) for r in runs[variant]],
                "cpu_s": [r.get("cpu_s") for r in runs[variant]],
                "emissions_kg": [r.get("emissions_kg") for r in runs[variant]],
            }
            own = [
                (r["threads_cpu_s"] + sum(r.get("hook_s", []))) / r["fit_s"]
                for r in runs[variant]
                if r.get("threads_cpu_s") is not None
            ]
            meter = [r["meter_cpu_s"] for r in runs[variant] if r.get("meter_cpu_s") is not None]
            summary[variant]["own_cpu_share"] = median(own) if own else None
            summary[variant]["median_meter_cpu_s"] = median(meter) if meter else None
            rows.append(
                [
                    framework,
                    variant,
                    epochs[framework],
                    summary[variant]["median_fit_s"],
                    summary[variant]["median_ratio"],
                    summary[variant]["hook_median_ms"] if hooks else "",
                    summary[variant]["hook_p99_ms"] if hooks else "",
                    f"{100 * median(own):.2f} %" if own else "",
                    median(meter) if meter else "",
                ]
            )
        results["frameworks"][framework] = summary
    print(
        table(
            f"Fit overhead ({args.rounds} interleaved rounds, fresh process per fit; ratio = median of per-round "
            "ratios to 'none')",
            [
                "framework",
                "variant",
                "epochs",
                "median fit s",
                "ratio",
                "hook median ms",
                "hook p99 ms",
                "own CPU / fit",
                "meter CPU s",
            ],
            rows,
        )
    )
    write_json(args.json, {"benchmark": "fit_overhead", **results})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
