"""The prior power live figures are estimated at before CodeCarbon's first reading (core.estimates)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


def test_a_remembered_power_moves_along_codecarbons_load_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CodeCarbon's cpu_load mode (machine tracking): CPU power = TDP * (0.1 + 0.9 * load**3)
    (codecarbon.external.hardware.CPU._get_power_from_cpu_load); the rest of the power stays."""
    from carbonoffset.core import estimates

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tdp_w, ram_w = 65.0, 10.0
    at_busy = tdp_w * (0.1 + 0.9 * 0.9**3)
    estimates.remember("k", power_w=ram_w + at_busy, kg_per_kwh=0.05, cpu_w=at_busy, cpu_load=0.9)
    remembered = estimates.remembered("k")
    assert remembered is not None and remembered.origin == "remembered"
    assert remembered.at_load(0.25) == pytest.approx(ram_w + tdp_w * (0.1 + 0.9 * 0.25**3))
    assert remembered.at_load(0.0) == pytest.approx(ram_w + tdp_w * 0.1)
    assert remembered.at_load(2.0) == pytest.approx(ram_w + tdp_w)  # a load is at most 1
    assert remembered.at_load(None) == remembered.power_w  # no load known: as remembered
    # a power CodeCarbon did not draw from the load (RAPL, a constant) is used as it is
    estimates.remember("c", power_w=40.0, kg_per_kwh=0.05)
    constant = estimates.remembered("c")
    assert constant is not None and constant.cpu_w is None and constant.at_load(0.1) == 40.0


def test_the_machines_cpu_load_is_read_between_two_moments() -> None:
    from carbonoffset.core import estimates

    start = estimates.busy_times()
    if start is None:
        pytest.skip("no /proc/stat here")
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        pass  # one core busy
    load = estimates.load_between(start, estimates.busy_times())
    assert load is not None and 0.9 / (os.cpu_count() or 1) <= load <= 1.0
    assert estimates.load_between(start, start) is None
