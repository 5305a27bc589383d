"""What a run was measured on and where: CodeCarbon's details, through the measuring process, into the ledger."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from carbonoffset.core.ledger import SCHEMA_VERSION, Ledger
from carbonoffset.core.meter import MeterSource
from carbonoffset.core.session import OffsetSession
from carbonoffset.core.sources import DETAIL_FIELDS, CodeCarbonSource, Measurement
from carbonoffset.testing import ScriptedEmissions

HARDWARE = {"cpu_model": "Test CPU 9000", "cpu_count": 8, "country_iso_code": "FRA", "country_name": "France"}


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(1000))


# ------------------------------------------------------------------ Measurement
def test_a_sum_keeps_the_details_and_equality_ignores_them() -> None:
    measured = Measurement(0.002, 0.04, details={"cpu_model": "A", "region": "x"})
    total = Measurement(0.001, 0.02) + measured
    assert total.details == {"cpu_model": "A", "region": "x"}
    assert total.estimated_kg == 0.0
    assert (measured + Measurement(0.0, 0.0, details={"region": "y"})).details == {"cpu_model": "A", "region": "y"}
    assert Measurement(1.0, 2.0, details={"a": 1}) == Measurement(1.0, 2.0)
    assert Measurement().details == {}
    with pytest.raises(TypeError, match="details by keyword"):  # the third positional is estimated_kg
        Measurement(1.0, 2.0, {"a": 1})  # type: ignore[arg-type]


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


# ------------------------------------------------------------------------ ledger
def test_set_run_details_merges_keys_and_runs_without_any_read_empty(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        bare = ledger.start_run(account="sandbox:a", environment="sandbox")
        run_id = ledger.start_run(account="sandbox:a", environment="sandbox")
        ledger.set_run_details(run_id, {"cpu_model": "A", "gpu_count": 0})
        ledger.set_run_details(run_id, {"gpu_count": 2, "region": None})
        assert ledger.run(run_id).details == {"cpu_model": "A", "gpu_count": 2, "region": None}  # type: ignore[union-attr]
        assert ledger.run(bare).details == {}  # type: ignore[union-attr]
        assert {r.run_id: r.details for r in ledger.runs()}[run_id]["gpu_count"] == 2
        with pytest.raises(KeyError, match="unknown run"):
            ledger.set_run_details("nope", {"a": 1})
        with pytest.raises(ValueError, match="JSON"):
            ledger.set_run_details(run_id, {"a": object()})
        assert ledger.run(run_id).details["cpu_model"] == "A"  # type: ignore[union-attr]


def test_a_resumed_run_merges_its_segments_details_latest_last(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        run_id = ledger.start_run(account="sandbox:a", environment="sandbox")
        ledger.set_run_details(run_id, {"cpu_model": "first", "country_iso_code": "FRA"})
        segment = ledger.resume_run(run_id, account="sandbox:a", environment="sandbox")
        assert segment.details == {}
        ledger.set_run_details(segment.run_id, {"cpu_model": "second"})
        assert ledger.run(run_id).details == {"cpu_model": "second", "country_iso_code": "FRA"}  # type: ignore[union-attr]


def test_a_version_2_ledger_gets_the_details_column_keeping_its_runs(
    tmp_path: Path, as_schema_2: Callable[[Path], None]
) -> None:
    path = tmp_path / "v2.sqlite3"
    with Ledger(path) as ledger:
        run_id = ledger.start_run(account="sandbox:a", environment="sandbox")
        ledger.record(run_id, emissions_kg=0.25, energy_kwh=1.0, epoch=0)
    as_schema_2(path)
    with Ledger(path) as ledger:
        assert ledger.run(run_id).emissions_kg == pytest.approx(0.25)  # type: ignore[union-attr]
        assert ledger.run(run_id).details == {}  # type: ignore[union-attr]
        ledger.set_run_details(run_id, {"cpu_model": "A"})
        assert ledger.run(run_id).details == {"cpu_model": "A"}  # type: ignore[union-attr]
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    raw.close()


def test_a_version_1_ledger_is_migrated_to_the_details_column_too(
    tmp_path: Path, as_schema_1: Callable[[Path], None]
) -> None:
    path = tmp_path / "v1.sqlite3"
    with Ledger(path) as ledger:
        run_id = ledger.start_run(account="sandbox:a", environment="sandbox")
    as_schema_1(path)
    with Ledger(path) as ledger:
        ledger.set_run_details(run_id, {"region": "x"})
        assert ledger.run(run_id).details == {"region": "x"}  # type: ignore[union-attr]


# ----------------------------------------------------------------------- session
def test_a_session_stores_its_tracker_details_when_it_stops(ledger_path: Path) -> None:
    session = OffsetSession(
        source=ScriptedEmissions([0.001, 0.002], details=HARDWARE), offset_ledger=ledger_path
    )
    run_id = session.start()
    session.record_epoch(0)
    session.stop()
    session.close()
    with Ledger(ledger_path) as ledger:
        details = ledger.run(run_id).details  # type: ignore[arg-type,union-attr]
    assert {k: details[k] for k in HARDWARE} == HARDWARE
    from carbonoffset import __version__

    assert details["carbonoffset_version"] == __version__
    assert "late_start_s" not in details


@pytest.mark.slow
def test_a_session_measured_by_codecarbon_stores_where_and_on_what(ledger_path: Path) -> None:
    session = OffsetSession(offset_ledger=ledger_path, country_iso_code="FRA")
    run_id = session.start()
    _busy(1.0)
    report = session.stop()
    session.close()
    with Ledger(ledger_path) as ledger:
        run = ledger.run(run_id)  # type: ignore[arg-type]
    assert run is not None and run.emissions_kg == report.emissions_kg > 0
    assert run.details["country_iso_code"] == "FRA" and run.details["cpu_model"]
    assert run.details["codecarbon_version"] and run.details["tracking_mode"] == "machine"
