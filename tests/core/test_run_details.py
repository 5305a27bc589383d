"""What a run was measured on and where: CodeCarbon's details, through the measuring process, into the ledger."""

from __future__ import annotations

import json
import time

import pytest

from carbonoffset.core.meter import MeterSource
from carbonoffset.core.sources import DETAIL_FIELDS, CodeCarbonSource, Measurement


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(1000))


# ------------------------------------------------------------------ Measurement
def test_a_sum_keeps_the_details_and_equality_ignores_them() -> None:
    measured = Measurement(0.002, 0.04, {"cpu_model": "A", "region": "x"})
    total = Measurement(0.001, 0.02) + measured
    assert total.details == {"cpu_model": "A", "region": "x"}
    assert (measured + Measurement(0.0, 0.0, {"region": "y"})).details == {"cpu_model": "A", "region": "y"}
    assert Measurement(1.0, 2.0, {"a": 1}) == Measurement(1.0, 2.0)
    assert Measurement().details == {}


# ---------------------------------------------------------------- real CodeCarbon
@pytest.mark.slow
def test_codecarbon_source_gives_the_hardware_and_location_it_measured() -> None:
    source = CodeCarbonSource("FRA", measure_power_secs=1)
    source.start()
    _busy(0.5)
    final = source.stop()
    details = final.details
    assert set(details) <= set(DETAIL_FIELDS)
    assert details["country_iso_code"] == "FRA" and details["country_name"] == "France"
    assert details["codecarbon_version"] and details["cpu_model"]
    assert details["cpu_count"] >= 1 and details["ram_total_size"] > 0
    assert details["tracking_mode"] == "machine"
    assert "latitude" not in details and "longitude" not in details
    json.dumps(details)  # JSON values only


@pytest.mark.slow
def test_the_measuring_process_sends_the_details_with_its_final_figures() -> None:
    source = MeterSource("FRA")
    source.start()
    _busy(1.0)
    final = source.stop()
    assert final.emissions_kg > 0
    assert final.details["country_iso_code"] == "FRA"
    assert final.details["codecarbon_version"] and final.details["cpu_model"]
    assert final.details["duration"] > 0
