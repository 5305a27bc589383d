"""Test doubles users can use too: a loopback 1ClickImpact server and a scripted emissions source."""

from carbonoffset.testing.emissions import ScriptedEmissions
from carbonoffset.testing.server import CaptureRecord, FakeOneClickImpact, Fault

__all__ = ["CaptureRecord", "FakeOneClickImpact", "Fault", "ScriptedEmissions"]
