"""The Lightning demo: a small MLP trained on scikit-learn's digits with :class:`CarbonOffsetCallback`.

Runs on the CPU in a few seconds for ~5 epochs; writes nothing but the
ledger (no checkpoints, no logger files, nothing in the working directory).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

from carbonoffset.demo import DemoResult, Progress

BATCH_SIZE = 64
HIDDEN_UNITS = 64
LEARNING_RATE = 1e-2
SEED = 0

# Lightning and CodeCarbon chatter that says nothing about the demo's result.
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "codecarbon")
_QUIET_WARNINGS = (
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*LeafSpec.*",
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence framework info logs and known harmless warnings; carbonoffset's own logs stay."""
    import codecarbon  # noqa: F401 -- sets its logger's level when first imported: do that first

    saved = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for pattern in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def digits_loader(torch: Any, data: Any) -> Any:
    """The demo's training batches: ``data`` (a :func:`~carbonoffset.demo.data.load_digits_split`)
    as a shuffled ``DataLoader`` of :data:`BATCH_SIZE` rows, seeded with :data:`SEED` (torch's global
    seed too), also the benchmarks'. ``torch`` is the imported ``torch``."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(SEED)
    return DataLoader(
        TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(SEED),
    )


def digits_module(pl: Any, torch: Any) -> Any:
    """The demo's LightningModule class (64 -> 64 (ReLU) -> 10, cross-entropy, Adam), also the
    benchmarks' model. ``pl`` and ``torch`` are the imported ``lightning.pytorch`` and ``torch``."""

    class DigitsMLP(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, HIDDEN_UNITS), torch.nn.ReLU(), torch.nn.Linear(HIDDEN_UNITS, 10)
            )

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)

    return DigitsMLP


def _progress_callback(pl: Any, progress: Progress | None, epochs: int) -> list[Any]:
    if progress is None:
        return []
    report: Progress = progress

    class EpochProgress(pl.Callback):  # type: ignore[misc]
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            report(int(trainer.current_epoch) + 1, epochs)

    return [EpochProgress()]


def train(callback_settings: dict[str, Any], *, epochs: int, progress: Progress | None = None) -> DemoResult:
    """Train the digits MLP with ``CarbonOffsetCallback(**callback_settings)``.

    Args:
        callback_settings: keyword arguments of
            :class:`~carbonoffset.integrations.lightning.CarbonOffsetCallback`
            (``offset_api_key``, ``offset_environment``, ``offset_api_url``,
            ``offset_ledger``, ``country_iso_code``, ``offset_round_up``,
            ``max_emissions_kg``, ``source``, ...).
        epochs: training epochs, >= 1 (fewer run if ``max_emissions_kg`` stops the fit).
        progress: called after every training epoch with ``(epochs_done, epochs)``.

    Returns:
        :class:`~carbonoffset.demo.DemoResult`: epochs trained, validation
        accuracy in [0, 1] after the last epoch, and the callback's final
        :class:`~carbonoffset.core.RunReport`.

    Raises:
        ValueError: ``epochs < 1`` or invalid callback settings.
        ModuleNotFoundError: Lightning (``pip install carbonoffset[lightning]``)
            or scikit-learn (``pip install carbonoffset[demo]``) is missing.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    from carbonoffset.demo.data import load_digits_split
    from carbonoffset.integrations.lightning import CarbonOffsetCallback

    callback = CarbonOffsetCallback(**callback_settings)  # clear error first if Lightning is missing
    data = load_digits_split()

    with _quiet():
        import lightning.pytorch as pl
        import torch

        loader = digits_loader(torch, data)
        model = digits_module(pl, torch)()
        with tempfile.TemporaryDirectory(prefix="carbonoffset-demo-") as root:
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                max_epochs=epochs,
                callbacks=[callback, *_progress_callback(pl, progress, epochs)],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=root,
            )
            trainer.fit(model, loader)

        model.eval()
        with torch.no_grad():
            predicted = model(torch.from_numpy(data.x_val)).argmax(dim=1)
        accuracy = float((predicted == torch.from_numpy(data.y_val)).float().mean())

    report = callback.final_report
    if report is None:  # pragma: no cover - the callback always reports after a fit that returned
        raise RuntimeError("the Lightning fit ended without a carbonoffset report")
    return DemoResult(epochs=int(trainer.current_epoch), accuracy=accuracy, report=report)
