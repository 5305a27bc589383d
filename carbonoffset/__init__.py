"""carbonoffset: measure the carbon emissions of ML training and offset them, exactly once.

Framework callbacks live in :mod:`carbonoffset.integrations` (imported on
demand, so ``import carbonoffset`` never imports torch, Lightning,
transformers or Keras). The CodeCarbon drop-in classes
(``EmissionsTracker``, ``OfflineEmissionsTracker``, ``track_emissions``) are
loaded on first access.
"""

import importlib as _importlib

from carbonoffset.core import (
    KG_PER_LB,
    CarbonOffsetError,
    ConfigurationError,
    EpochReport,
    Ledger,
    LedgerError,
    Measurement,
    OffsetConfig,
    OffsetServiceError,
    OffsetSession,
    RunReport,
)

__version__ = "0.1.0"

_LAZY = {
    "EmissionsTracker": "carbonoffset.codecarbon",
    "OfflineEmissionsTracker": "carbonoffset.codecarbon",
    "OneClickImpactOutput": "carbonoffset.codecarbon",
    "track_emissions": "carbonoffset.codecarbon",
}

__all__ = [
    "KG_PER_LB",
    "CarbonOffsetError",
    "ConfigurationError",
    "EmissionsTracker",
    "EpochReport",
    "Ledger",
    "LedgerError",
    "Measurement",
    "OfflineEmissionsTracker",
    "OffsetConfig",
    "OffsetServiceError",
    "OffsetSession",
    "OneClickImpactOutput",
    "RunReport",
    "__version__",
    "track_emissions",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'carbonoffset' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
