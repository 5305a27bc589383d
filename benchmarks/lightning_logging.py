"""Per-epoch cost of the ways a Lightning callback can publish four epoch metrics.

Variants, interleaved within each round in one process (Lightning imported once):

* ``none``: no metric published (the baseline);
* ``loggers``: write into ``trainer.callback_metrics`` / ``progress_bar_metrics`` and call
  ``logger.log_metrics`` of every logger directly (what the callback did before);
* ``pl_log``: one ``pl_module.log_dict`` call in ``on_train_epoch_end`` with four float64
  tensors (``on_epoch=True, batch_size=1``): Lightning's own logging, one logger row per epoch
  together with the model's own epoch metrics, ``trainer.logged_metrics`` filled.

Each fit trains ``--epochs`` epochs of one batch (``limit_train_batches=1``) of a 64-32-10 MLP
with a ``CSVLogger`` and the model's own ``self.log("train_loss", on_epoch=True)``, so each
epoch is almost nothing but Lightning's per-epoch machinery: the difference to ``none`` is the
publishing cost, inside the hook and in Lightning's epoch-end processing together.

Usage::

    python benchmarks/lightning_logging.py --json benchmarks/results/lightning_logging.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _common import median, table, write_json

NAMES = ("carbon/energy_kwh", "carbon/emissions_kg", "carbon/offset_kg", "carbon/pending_kg")


def build(epochs: int) -> Any:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    x = torch.rand(256, 64)
    y = torch.randint(0, 10, (256,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64)

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            xb, yb = batch
            loss = torch.nn.functional.cross_entropy(self.net(xb), yb)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Publisher(pl.Callback):
        def __init__(self, how: str) -> None:
            self.how = how
            self.hook_s: list[float] = []
            self.n = 0

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.how == "none":
                return
            started = time.perf_counter()
            self.n += 1
            values = {name: 1e-6 * self.n * (i + 1) for i, name in enumerate(NAMES)}
            if self.how == "loggers":
                trainer.callback_metrics.update(
                    {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
                )
                trainer.progress_bar_metrics.update(values)
                for lg in trainer.loggers:
                    lg.log_metrics({**values, "epoch": trainer.current_epoch}, step=trainer.global_step)
            else:
                pl_module.log_dict(
                    {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()},
                    on_step=False,
                    on_epoch=True,
                    batch_size=1,
                )
            self.hook_s.append(time.perf_counter() - started)

    def fit(how: str) -> tuple[float, list[float]]:
        with tempfile.TemporaryDirectory() as tmp:
            publisher = Publisher(how)
            trainer = pl.Trainer(
                accelerator="cpu",
                max_epochs=epochs,
                limit_train_batches=1,
                logger=pl.loggers.CSVLogger(Path(tmp), name="bench"),
                callbacks=[publisher],
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                log_every_n_steps=1,
                default_root_dir=tmp,
            )
            started = time.perf_counter()
            trainer.fit(MLP(), loader)
            return time.perf_counter() - started, publisher.hook_s

    return fit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    fit = build(args.epochs)
    fit("pl_log")  # warm-up: imports, first-call caches
    variants = ("none", "loggers", "pl_log")
    per_epoch: dict[str, list[float]] = {v: [] for v in variants}
    hooks: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for how in order:
            wall, hook_s = fit(how)
            per_epoch[how].append(wall / args.epochs)
            hooks[how].extend(hook_s[1:])
    base = median(per_epoch["none"])
    rows = []
    for how in variants:
        epoch_ms = median(per_epoch[how]) * 1e3
        rows.append(
            [
                how,
                f"{epoch_ms:.3f}",
                f"{epoch_ms - base * 1e3:+.3f}",
                f"{median(hooks[how]) * 1e3:.3f}" if hooks[how] else "-",
            ]
        )
    print(
        table(
            f"Publishing 4 metrics per epoch ({args.epochs} one-batch epochs, median of {args.rounds} rounds)",
            ["variant", "epoch ms", "extra ms per epoch", "hook ms (median)"],
            rows,
        )
    )
    write_json(
        args.json, {"epochs": args.epochs, "rounds": args.rounds, "per_epoch_s": per_epoch, "hook_s": hooks}
    )


if __name__ == "__main__":
    main()
