"""The framework-free core: settings, units, ledger, offset protocol and the run object (:class:`OffsetSession`).

Every name is loaded on first access: a submodule imported on its own (the measuring process
imports :mod:`carbonoffset.core._meter`, which needs CodeCarbon and no ledger) does not import the
ledger, SQLAlchemy or the offset client with it.
"""

import typing as _typing

from carbonoffset._lazy import lazy_attributes as _lazy_attributes

_LAZY = {
    "CallbackCore": "carbonoffset.core.callback",
    "OffsetConfig": "carbonoffset.core.config",
    "SecretKey": "carbonoffset.core.config",
    "default_ledger_path": "carbonoffset.core.config",
    "CarbonOffsetError": "carbonoffset.core.errors",
    "ConfigurationError": "carbonoffset.core.errors",
    "LedgerError": "carbonoffset.core.errors",
    "OffsetServiceError": "carbonoffset.core.errors",
    "Balance": "carbonoffset.core.ledger",
    "Ledger": "carbonoffset.core.ledger",
    "MeterSource": "carbonoffset.core.meter",
    "OffsetOutcome": "carbonoffset.core.offsetter",
    "Offsetter": "carbonoffset.core.offsetter",
    "Collective": "carbonoffset.core.ranks",
    "Ranks": "carbonoffset.core.ranks",
    "EpochReport": "carbonoffset.core.session",
    "OffsetSession": "carbonoffset.core.session",
    "RunReport": "carbonoffset.core.session",
    "CodeCarbonSource": "carbonoffset.core.sources",
    "EmissionsSource": "carbonoffset.core.sources",
    "Measurement": "carbonoffset.core.sources",
    "KG_PER_LB": "carbonoffset.core.units",
    "kg_to_lb": "carbonoffset.core.units",
    "lb_to_kg": "carbonoffset.core.units",
    "whole_lb_ceil": "carbonoffset.core.units",
    "whole_lb_floor": "carbonoffset.core.units",
}

__all__ = [
    "KG_PER_LB",
    "Balance",
    "CallbackCore",
    "CarbonOffsetError",
    "CodeCarbonSource",
    "Collective",
    "ConfigurationError",
    "EmissionsSource",
    "EpochReport",
    "Ledger",
    "LedgerError",
    "Measurement",
    "MeterSource",
    "OffsetConfig",
    "OffsetOutcome",
    "OffsetServiceError",
    "OffsetSession",
    "Offsetter",
    "Ranks",
    "RunReport",
    "SecretKey",
    "default_ledger_path",
    "kg_to_lb",
    "lb_to_kg",
    "whole_lb_ceil",
    "whole_lb_floor",
]

if _typing.TYPE_CHECKING:
    from carbonoffset.core.callback import CallbackCore
    from carbonoffset.core.config import OffsetConfig, SecretKey, default_ledger_path
    from carbonoffset.core.errors import (
        CarbonOffsetError,
        ConfigurationError,
        LedgerError,
        OffsetServiceError,
    )
    from carbonoffset.core.ledger import Balance, Ledger
    from carbonoffset.core.meter import MeterSource
    from carbonoffset.core.offsetter import OffsetOutcome, Offsetter
    from carbonoffset.core.ranks import Collective, Ranks
    from carbonoffset.core.session import EpochReport, OffsetSession, RunReport
    from carbonoffset.core.sources import CodeCarbonSource, EmissionsSource, Measurement
    from carbonoffset.core.units import KG_PER_LB, kg_to_lb, lb_to_kg, whole_lb_ceil, whole_lb_floor


__getattr__, __dir__ = _lazy_attributes(__name__, _LAZY, __all__)
