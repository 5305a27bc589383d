"""Test doubles users can use too: a loopback 1ClickImpact server, a scripted and a broken emissions source."""

from carbonoffset.testing.emissions import BrokenEmissions, ScriptedEmissions
from carbonoffset.testing.server import CaptureRecord, FakeOneClickImpact, Fault

__all__ = ["BrokenEmissions", "CaptureRecord", "FakeOneClickImpact", "Fault", "ScriptedEmissions"]
