"""Hugging Face demo: a tiny BERT classifier trained with ``Trainer`` on digits.

Each 8x8 digit image becomes a sequence of 64 tokens, one per pixel, whose
token id is the pixel intensity 0..16 (vocabulary of 17). The model is built
from a :class:`transformers.BertConfig` (2 layers, hidden size 32): nothing is
downloaded, no hub is contacted, nothing is saved.

The helpers (:func:`build_model`, :func:`build_datasets`,
:func:`training_arguments`, :func:`accuracy`) are reused by the test suite and
the notebook.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from carbonoffset.demo import DemoResult, Progress
from carbonoffset.demo.data import load_digits_split

#: Pixel intensities 0..16 are the tokens.
VOCAB_SIZE = 17
#: 8x8 pixels.
SEQUENCE_LENGTH = 64


def _offline() -> None:
    """Never reach the Hugging Face Hub from the demo."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_model(seed: int = 0) -> Any:
    """A 2-layer BERT classifier (hidden 32, 2 heads, 10 labels) with seeded random weights."""
    _offline()
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQUENCE_LENGTH,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.1,  # wider than BERT's 0.02: this tiny model learns digits in a few epochs
    )
    config.num_labels = 10
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


class _TokenDigits:
    """A map-style dataset of ``{"input_ids", "labels"}`` tensors (the Trainer's default collator stacks them)."""

    def __init__(self, x: Any, y: Any) -> None:
        import torch

        self.input_ids = torch.as_tensor((x * 16.0).round().astype("int64"))
        self.labels = torch.as_tensor(y)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def build_datasets(val_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> tuple[Any, Any]:
    """Digits as token datasets ``(train, validation)`` (1438 / 359 samples by default).

    Args:
        val_fraction: share of samples kept for validation, in (0, 1).
        seed: shuffling seed.
        limit: keep at most this many samples in each set (quick tests).
    """
    digits = load_digits_split(val_fraction=val_fraction, seed=seed)
    n = slice(None, limit)
    return (
        _TokenDigits(digits.x_train[n], digits.y_train[n]),
        _TokenDigits(digits.x_val[n], digits.y_val[n]),
    )


def accuracy(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: ``{"accuracy": share of correct labels in [0, 1]}``."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def training_arguments(output_dir: str, *, epochs: int, **overrides: Any) -> Any:
    """``TrainingArguments`` for the demo: CPU-friendly, evaluation each epoch, no saving, no hub, no reporting.

    Args:
        output_dir: where the Trainer may write (nothing is saved unless
            ``overrides`` ask for it).
        epochs: number of epochs (>= 1).
        **overrides: any ``TrainingArguments`` field.
    """
    _offline()
    from transformers import TrainingArguments

    options: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 256,
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "push_to_hub": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def train(callback_settings: dict[str, Any], *, epochs: int, progress: Progress | None = None) -> DemoResult:
    """Train the tiny BERT on digits for ``epochs`` epochs with ``CarbonOffsetCallback(**callback_settings)``.

    Args:
        callback_settings: keyword arguments of
            :class:`carbonoffset.integrations.huggingface.CarbonOffsetCallback`.
        epochs: epochs to train (>= 1); about 1-2 s each on 2 CPU cores
            (validation accuracy about 0.7 after 5 epochs).
        progress: called after every epoch with ``(epochs_done, epochs)``.

    Returns:
        The :class:`DemoResult` (validation accuracy after the last epoch, the
        callback's final report).

    Raises:
        ModuleNotFoundError: transformers or scikit-learn is missing.
        ValueError: ``epochs < 1`` or invalid callback settings.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    _offline()
    from carbonoffset.integrations.huggingface import CarbonOffsetCallback

    callback = CarbonOffsetCallback(**callback_settings)
    from transformers import Trainer, TrainerCallback

    callbacks: list[Any] = [callback]
    if progress is not None:
        on_epoch: Progress = progress

        class EpochProgress(TrainerCallback):
            def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                on_epoch(round(state.epoch or 0), epochs)

        callbacks.append(EpochProgress())

    train_set, val_set = build_datasets()
    with tempfile.TemporaryDirectory(prefix="carbonoffset-hf-demo-") as output_dir:
        trainer = Trainer(
            model=build_model(),
            args=training_arguments(output_dir, epochs=epochs),
            train_dataset=train_set,
            eval_dataset=val_set,
            compute_metrics=accuracy,
            callbacks=callbacks,
        )
        with callback.guard():
            trainer.train()
        evaluations = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    report = callback.final_report
    if report is None:  # pragma: no cover - on_train_end always sets it after a normal train()
        raise RuntimeError("training ended without a carbon report")
    last_accuracy = float(evaluations[-1]["eval_accuracy"]) if evaluations else float("nan")
    return DemoResult(epochs=report.epochs, accuracy=last_accuracy, report=report)
