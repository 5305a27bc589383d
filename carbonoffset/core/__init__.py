"""The framework-free core: settings, units, ledger, offset protocol and the run object (:class:`OffsetSession`)."""

from carbonoffset.core.callback import CallbackCore
from carbonoffset.core.config import OffsetConfig, SecretKey, default_ledger_path
from carbonoffset.core.errors import CarbonOffsetError, ConfigurationError, LedgerError, OffsetServiceError
from carbonoffset.core.ledger import Balance, Ledger
from carbonoffset.core.meter import MeterSource
from carbonoffset.core.offsetter import OffsetOutcome, Offsetter
from carbonoffset.core.ranks import Collective, Ranks
from carbonoffset.core.session import EpochReport, OffsetSession, RunReport
from carbonoffset.core.sources import CodeCarbonSource, EmissionsSource, Measurement
from carbonoffset.core.units import KG_PER_LB, kg_to_lb, lb_to_kg, whole_lb_ceil, whole_lb_floor

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
