"""The Keras demo: a small dense network on scikit-learn's digits, trained with the callback."""

from __future__ import annotations

import os
from typing import Any

from carbonoffset.demo import DemoResult, Progress
from carbonoffset.demo.data import load_digits_split


def build_model(keras: Any) -> Any:
    """The compiled demo model, seeded: 64 -> 32 (ReLU) -> 10 (softmax), Adam (lr 0.01),
    sparse categorical cross-entropy, accuracy. ``keras`` is the imported Keras 3 module."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def fit_digits(model: Any, data: Any, *, epochs: int, callbacks: list[Any]) -> Any:
    """``model.fit`` on the digits split (a :func:`~carbonoffset.demo.data.load_digits_split`
    result) as the demo trains: batches of 64, validation on its held-out part, silent.
    Returns the Keras ``History``."""
    return model.fit(
        data.x_train,
        data.y_train,
        validation_data=(data.x_val, data.y_val),
        epochs=epochs,
        batch_size=64,
        verbose=0,
        callbacks=callbacks,
    )


def train(callback_settings: dict[str, Any], *, epochs: int, progress: Progress | None = None) -> DemoResult:
    """Train a 64-32-10 dense network on digits for ``epochs`` epochs with the Keras callback.

    Uses the torch backend unless ``KERAS_BACKEND`` is already set (it must be
    set before Keras is first imported). Trains silently (``verbose=0``).

    Args:
        callback_settings: keyword arguments for
            :class:`carbonoffset.integrations.keras.CarbonOffsetCallback`.
        epochs: epochs to train (>= 1).
        progress: called after every epoch with ``(epochs_done, epochs)``.

    Returns:
        The epochs trained, the validation accuracy in [0, 1] and the callback's final report.

    Raises:
        ValueError: ``epochs < 1`` or invalid callback settings.
        ModuleNotFoundError: Keras 3, its backend or scikit-learn is missing.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    from carbonoffset.integrations.keras import CarbonOffsetCallback

    callback = CarbonOffsetCallback(**callback_settings)  # raises first if Keras is missing
    import keras

    data = load_digits_split()
    model = build_model(keras)
    callbacks: list[Any] = [callback]
    if progress is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: progress(epoch + 1, epochs))
        )
    with callback.guard():
        history = fit_digits(model, data, epochs=epochs, callbacks=callbacks)
    report = callback.final_report
    if report is None:  # on_train_end always runs after a fit that returns
        raise RuntimeError("the Keras fit ended without a final report")
    return DemoResult(
        epochs=len(history.history["loss"]),
        accuracy=float(history.history["val_accuracy"][-1]),
        report=report,
    )
