"""carbonoffset: measure the carbon emissions of ML training and offset them, exactly once.

Every public name is loaded on first access, so ``import carbonoffset`` costs
almost nothing and never imports torch, Lightning, transformers, Keras or
CodeCarbon. Framework callbacks live in :mod:`carbonoffset.integrations`; the
CodeCarbon drop-in classes (``EmissionsTracker``, ``OfflineEmissionsTracker``,
``track_emissions``) in :mod:`carbonoffset.codecarbon`.
"""

import typing as _typing

from carbonoffset._lazy import lazy_attributes as _lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "KG_PER_LB": "carbonoffset.core.units",
    "CarbonOffsetError": "carbonoffset.core.errors",
    "ConfigurationError": "carbonoffset.core.errors",
    "LedgerError": "carbonoffset.core.errors",
    "OffsetServiceError": "carbonoffset.core.errors",
    "OffsetConfig": "carbonoffset.core.config",
    "Ledger": "carbonoffset.core.ledger",
    "Measurement": "carbonoffset.core.sources",
    "EpochReport": "carbonoffset.core.session",
    "OffsetSession": "carbonoffset.core.session",
    "RunReport": "carbonoffset.core.session",
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

if _typing.TYPE_CHECKING:
    from carbonoffset.codecarbon import (
        EmissionsTracker,
        OfflineEmissionsTracker,
        OneClickImpactOutput,
        track_emissions,
    )
    from carbonoffset.core.config import OffsetConfig
    from carbonoffset.core.errors import (
        CarbonOffsetError,
        ConfigurationError,
        LedgerError,
        OffsetServiceError,
    )
    from carbonoffset.core.ledger import Ledger
    from carbonoffset.core.session import EpochReport, OffsetSession, RunReport
    from carbonoffset.core.sources import Measurement
    from carbonoffset.core.units import KG_PER_LB


__getattr__, __dir__ = _lazy_attributes(__name__, _LAZY, __all__)
