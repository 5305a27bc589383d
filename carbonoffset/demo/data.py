"""scikit-learn's digits data set (ships with scikit-learn: no download), split for the demos and tests."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Digits:
    """8x8 digit images flattened to 64 features in [0, 1].

    Attributes:
        x_train, x_val: float32 arrays of shape (n, 64).
        y_train, y_val: int64 arrays of shape (n,), labels 0-9.
    """

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any


def load_digits_split(val_fraction: float = 0.2, seed: int = 0) -> Digits:
    """Load digits (1797 samples) and split it reproducibly.

    Args:
        val_fraction: share of samples kept for validation, in (0, 1).
        seed: shuffling seed.

    Raises:
        ModuleNotFoundError: scikit-learn is missing (``pip install carbonoffset[demo]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModuleNotFoundError(
            "the digits data set comes from scikit-learn; install it with `pip install carbonoffset[demo]`"
        ) from None
    import numpy as np

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return Digits(x[train], y[train], x[val], y[val])
