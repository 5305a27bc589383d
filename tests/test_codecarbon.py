"""The CodeCarbon drop-in: real CodeCarbon trackers (offline, France), the real makeimpact SDK, the local fake API.

Deterministic totals come from real ``codecarbon`` ``EmissionsData`` objects passed to the handler's
``out()`` / ``live_out()`` (exactly what CodeCarbon passes), or from CodeCarbon's own configuration
(``CODECARBON_FORCE_RAM_POWER`` and ``CODECARBON_FORCE_CARBON_INTENSITY_G_CO2E_KWH``) when a whole
run must cross a threshold by itself.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import codecarbon
import pytest
from codecarbon.output_methods.base_output import BaseOutput
from codecarbon.output_methods.emissions_data import EmissionsData
from codecarbon.output_methods.file import FileOutput

import carbonoffset
from carbonoffset.codecarbon import (
    OFFSET_ARGUMENTS,
    EmissionsTracker,
    OfflineEmissionsTracker,
    OneClickImpactOutput,
    track_emissions,
)
from carbonoffset.core.config import CONFIG_KEYS, default_ledger_path
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact, Fault

KEY = "test_carbonoffset_SECRET_4f1d9c"  # the key of conftest's ``settings`` fixture


# --------------------------------------------------------------------------- helpers
def totals(emissions_kg: float, *, run_id: str = "run", energy_kwh: float | None = None) -> EmissionsData:
    """A real CodeCarbon ``EmissionsData`` carrying the given cumulative totals."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(EmissionsData):
        if field.default is not dataclasses.MISSING:
            continue
        values[field.name] = "" if field.type in ("str", str) else 0.0
    values.update(
        run_id=run_id,
        emissions=emissions_kg,
        energy_consumed=emissions_kg / 0.056 if energy_kwh is None else energy_kwh,
        country_iso_code="FRA",
    )
    return EmissionsData(**values)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def tracker_with(settings: dict[str, Any], **kwargs: Any) -> OfflineEmissionsTracker:
    """An offline (France) tracker for the local server's sandbox account."""
    return OfflineEmissionsTracker(**{**settings, "log_level": "error", **kwargs})


def all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def carbonoffset_records(
    caplog: pytest.LogCaptureFixture, level: int = logging.WARNING
) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("carbonoffset") and r.levelno >= level]


@pytest.fixture
def forced_big_emissions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every real CodeCarbon run emit kilograms: 1 MW of RAM at 100 kg CO2eq/kWh (CodeCarbon's own settings)."""
    monkeypatch.setenv("CODECARBON_FORCE_RAM_POWER", "1000000")
    monkeypatch.setenv("CODECARBON_FORCE_CARBON_INTENSITY_G_CO2E_KWH", "100000")


# ------------------------------------------------------------------- import surface
def test_names_are_codecarbon_subclasses_and_import_stays_light() -> None:
    assert carbonoffset.EmissionsTracker is EmissionsTracker
    assert carbonoffset.OfflineEmissionsTracker is OfflineEmissionsTracker
    assert carbonoffset.track_emissions is track_emissions
    assert carbonoffset.OneClickImpactOutput is OneClickImpactOutput
    assert issubclass(EmissionsTracker, codecarbon.EmissionsTracker)
    assert issubclass(OfflineEmissionsTracker, codecarbon.OfflineEmissionsTracker)
    assert issubclass(OneClickImpactOutput, BaseOutput)
    code = (
        "import carbonoffset, sys; assert 'codecarbon' not in sys.modules and 'makeimpact' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------ plain CodeCarbon parity
def test_without_key_it_is_plain_codecarbon(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    results = {}
    for name, cls in (("codecarbon", codecarbon.OfflineEmissionsTracker), ("ours", OfflineEmissionsTracker)):
        out_dir = tmp_path / name
        out_dir.mkdir()
        tracker = cls(
            country_iso_code="FRA", output_dir=str(out_dir), project_name="parity", log_level="error"
        )
        tracker.start()
        flushed = tracker.flush()
        stopped = tracker.stop()
        results[name] = (tracker, flushed, stopped, read_csv(out_dir / "emissions.csv"))

    plain, ours = results["codecarbon"], results["ours"]
    assert type(ours[1]) is type(plain[1]) is float
    assert type(ours[2]) is type(plain[2]) is float
    assert ours[2] == ours[0].final_emissions
    assert ours[3][0] == plain[3][0]  # same CSV columns, same order
    assert len(ours[3][1]) == len(plain[3][1]) == 2  # one row per flush() and stop()
    assert ours[3][1][-1]["project_name"] == "parity" and ours[3][1][-1]["country_iso_code"] == "FRA"
    assert ours[0].offset_handler is None
    assert (
        [type(h) for h in ours[0]._output_handlers]
        == [type(h) for h in plain[0]._output_handlers]
        == [FileOutput]
    )
    assert not carbonoffset_records(caplog, logging.DEBUG)  # no warning about a missing key, nothing at all
    assert not default_ledger_path().exists()  # nothing written to any ledger
    assert not list(tmp_path.rglob("*.sqlite3"))


def test_with_key_csv_and_return_values_are_unchanged(
    settings: dict[str, Any], tmp_path: Path, server: FakeOneClickImpact
) -> None:
    mine: list[BaseOutput] = [BaseOutput()]
    tracker = tracker_with(settings, output_dir=str(tmp_path), project_name="parity", output_handlers=mine)
    assert mine == [mine[0]]  # CodeCarbon got a fresh list: the caller's list is untouched
    handlers = tracker._output_handlers
    assert (
        handlers[0] is mine[0]
        and handlers[1] is tracker.offset_handler
        and isinstance(handlers[2], FileOutput)
    )
    # the seed's manual loop finds the handler through the tracker's handlers
    found = [h for h in tracker._output_handlers if hasattr(h, "manual_offset")]
    assert found == [tracker.offset_handler]

    tracker.start()
    assert isinstance(tracker.flush(), float)
    emissions_kg = tracker.stop()
    assert isinstance(emissions_kg, float) and emissions_kg == tracker.final_emissions
    columns, rows = read_csv(tmp_path / "emissions.csv")
    assert columns == list(tracker.final_emissions_data.values.keys()) and len(rows) == 2
    report = tracker.offset_handler.report()
    assert report.emissions_kg == pytest.approx(emissions_kg)
    assert report.offset_lb == 0 and server.captures == []  # micrograms: far below one pound


def test_positional_codecarbon_arguments_still_work(settings: dict[str, Any]) -> None:
    tracker = OfflineEmissionsTracker("positional-project", 30, country_iso_code="FRA", log_level="error")
    assert tracker._project_name == "positional-project" and tracker._measure_power_secs == 30
    with pytest.raises(TypeError, match="multiple values"):
        OfflineEmissionsTracker("a", project_name="b", country_iso_code="FRA")


# --------------------------------------------------------------- accounting behaviour
def test_cumulative_totals_are_never_counted_twice(
    settings: dict[str, Any], server: FakeOneClickImpact
) -> None:
    tracker = tracker_with(settings, offset_threshold=5.0, output_methods=[])
    handler = tracker.offset_handler
    tracker.start()
    run = str(tracker.run_id)
    handler.out(totals(0.3, run_id=run), totals(0.3, run_id=run))
    handler.out(totals(0.3, run_id=run), totals(0.0, run_id=run))
    handler.live_out(totals(0.3, run_id=run), totals(0.0, run_id=run))
    assert handler.get_accumulated_emissions() == pytest.approx(0.3)
    handler.out(totals(0.4, run_id=run), totals(0.1, run_id=run))
    handler.live_out(
        totals(0.35, run_id=run), totals(0.0, run_id=run)
    )  # an older, smaller total changes nothing
    assert handler.get_accumulated_emissions() == pytest.approx(0.4)
    tracker.stop()  # CodeCarbon's own (tiny) final total is below what was recorded: kept at 0.4
    assert isinstance(handler.get_accumulated_emissions(), float)
    assert handler.get_accumulated_emissions() == pytest.approx(0.4)
    assert server.captures == []


def test_threshold_offset_buys_whole_pounds_and_carries_the_remainder(
    settings: dict[str, Any], server: FakeOneClickImpact, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carbonoffset")
    tracker = tracker_with(settings, output_methods=[])
    handler = tracker.offset_handler
    tracker.start()
    run = str(tracker.run_id)
    handler.out(totals(0.3, run_id=run), None)
    assert handler.wait(10) and server.captures == []  # below the 0.5 kg threshold
    handler.out(totals(1.0, run_id=run), None)
    assert handler.wait(10)
    assert [c.carbon_captured for c in server.captures] == [2]  # floor(1.0 / 0.45359237) = 2 lb
    remainder = 1.0 - 2 * KG_PER_LB
    assert handler.get_accumulated_emissions() == pytest.approx(remainder)  # carried, not reset to zero
    emissions_kg = tracker.stop()
    assert isinstance(emissions_kg, float)
    assert [c.carbon_captured for c in server.captures] == [2]  # 0.093 kg < threshold: no final offset
    report = handler.report()
    assert report.confirmed_lb == 2 and report.pending_kg == pytest.approx(remainder)
    assert "offsetting 2 lb" in all_log_text(caplog)
    # the carried remainder is durable: a later tracker of the same account starts from it
    later = tracker_with(settings, output_methods=[])
    assert later.offset_handler.get_accumulated_emissions() == pytest.approx(remainder)
    later.start()
    later.offset_handler.out(totals(0.5, run_id=str(later.run_id)), None)
    later.stop()
    assert [c.carbon_captured for c in server.captures] == [2, 1]  # 0.093 + 0.5 kg: one more pound
    assert later.offset_handler.get_accumulated_emissions() == pytest.approx(remainder + 0.5 - KG_PER_LB)


def test_auto_offset_does_not_block_codecarbon_and_stop_waits_bounded(
    settings: dict[str, Any], server: FakeOneClickImpact, caplog: pytest.LogCaptureFixture
) -> None:
    server.delay_s = 1.0
    tracker = tracker_with(settings, output_methods=[])
    handler = tracker.offset_handler
    tracker.start()
    begun = time.monotonic()
    handler.live_out(totals(1.0, run_id=str(tracker.run_id)), None)  # CodeCarbon's timer thread calls this
    assert time.monotonic() - begun < 0.8  # the capture (1 s on this server) runs in the background
    tracker.stop()  # waits for the offset in flight
    report = handler.report()
    assert report.confirmed_lb == 2 and [c.carbon_captured for c in server.captures] == [2]

    # bounded: with offset_timeout shorter than the API's answer, stop() returns and the offset stays in flight
    server.delay_s = 1.5
    slow = tracker_with(settings, output_methods=[], offset_timeout=0.3)
    slow.start()
    slow.offset_handler.out(totals(1.0, run_id=str(slow.run_id)), None)
    begun = time.monotonic()
    assert isinstance(slow.stop(), float)
    assert time.monotonic() - begun < 1.2
    assert "still in flight" in all_log_text(caplog)
    assert slow.offset_handler.wait(10)  # settles later, exactly once
    assert [c.carbon_captured for c in server.captures] == [2, 2]
    ledger = slow.offset_handler.session.ledger
    assert [o.state for o in ledger.offsets()] == ["confirmed", "confirmed"]


@pytest.mark.usefixtures("forced_big_emissions")
def test_codecarbons_periodic_reports_trigger_offsets_while_running(
    settings: dict[str, Any], server: FakeOneClickImpact
) -> None:
    """No test input: CodeCarbon's own timer thread measures and calls live_out(); offsets follow."""
    tracker = tracker_with(settings, output_methods=[], measure_power_secs=0.1, api_call_interval=1)
    tracker.start()
    deadline = time.monotonic() + 20
    while not server.captures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.captures  # bought while the tracker runs
    emissions_kg = tracker.stop()
    report = tracker.offset_handler.report()
    assert report.emissions_kg == pytest.approx(emissions_kg) and emissions_kg > 1.0
    assert report.confirmed_lb == server.total_lb() and report.in_flight_lb == 0
    assert report.pending_kg < 0.5  # what is left after the final offset is below the threshold


def test_round_up_at_stop_keeps_the_overshoot_as_credit(
    settings: dict[str, Any], server: FakeOneClickImpact
) -> None:
    tracker = tracker_with(settings, output_methods=[], offset_round_up=True)
    handler = tracker.offset_handler
    tracker.start()
    handler.out(totals(0.3, run_id=str(tracker.run_id)), None)
    tracker.stop()
    assert [c.carbon_captured for c in server.captures] == [1]
    report = handler.report()
    assert report.pending_kg == 0 and report.credit_kg == pytest.approx(KG_PER_LB - 0.3)


def test_manual_control(
    settings: dict[str, Any], server: FakeOneClickImpact, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = tracker_with(settings, output_methods=[], auto_offset=False)
    handler = tracker.offset_handler
    assert handler.manual_offset() is False  # nothing pending yet
    assert "nothing to offset" in all_log_text(caplog)
    tracker.start()
    handler.out(totals(1.0, run_id=str(tracker.run_id)), None)
    tracker.stop()
    assert server.captures == []  # auto_offset=False: no offset, not even at stop()

    bought = []
    for h in tracker._output_handlers:  # the seed's manual loop, unchanged
        if hasattr(h, "manual_offset"):
            assert h.get_accumulated_emissions() == pytest.approx(1.0)
            bought.append(h.manual_offset())
    assert bought == [True]
    assert [c.carbon_captured for c in server.captures] == [2]
    assert handler.get_accumulated_emissions() == pytest.approx(1.0 - 2 * KG_PER_LB)

    caplog.clear()
    assert handler.manual_offset() is False  # 0.093 kg: less than one pound
    assert "less than one whole pound" in all_log_text(caplog)
    assert handler.manual_offset(round_up=True) is True
    assert [c.carbon_captured for c in server.captures] == [2, 1]
    assert handler.get_accumulated_emissions() == 0.0


def test_manual_offset_never_raises_for_service_failures(
    settings: dict[str, Any], server: FakeOneClickImpact, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = tracker_with(settings, output_methods=[], auto_offset=False)
    handler = tracker.offset_handler
    tracker.start()
    handler.out(totals(1.0, run_id=str(tracker.run_id)), None)
    tracker.stop()
    server.inject(
        Fault(status=400, body={"type": "invalid_request_error", "message": "refused for the test"})
    )
    assert handler.manual_offset() is False
    assert "nothing was bought" in all_log_text(caplog) and "refused for the test" in all_log_text(caplog)
    assert handler.get_accumulated_emissions() == pytest.approx(
        1.0
    )  # a definite refusal returns it to pending
    assert handler.manual_offset() is True and [c.carbon_captured for c in server.captures] == [2]


def test_ambiguous_failure_is_bought_exactly_once_with_a_plain_codecarbon_tracker(
    settings: dict[str, Any], server: FakeOneClickImpact, tmp_path: Path
) -> None:
    """The handler also works inside CodeCarbon's own tracker; a dropped answer is looked up, not re-bought."""
    config = {k: v for k, v in settings.items() if k != "country_iso_code"}
    handler = OneClickImpactOutput(offsetter_options={"wait_initial_s": 0.01, "wait_max_s": 0.05}, **config)
    tracker = codecarbon.OfflineEmissionsTracker(
        country_iso_code="FRA", output_handlers=[handler], output_dir=str(tmp_path), log_level="error"
    )
    tracker.start()
    server.inject(Fault(drop_after_capture=True))  # the server captures, then the answer is lost
    handler.out(totals(1.0, run_id=str(tracker.run_id)), None)
    emissions_kg = tracker.stop()  # CodeCarbon calls exit(): the run ends with a bounded wait
    assert isinstance(emissions_kg, float)
    assert [c.carbon_captured for c in server.captures] == [2]  # bought once, although the answer was lost
    assert [o.state for o in handler.session.ledger.offsets()] == ["confirmed"]
    runs = handler.session.ledger.runs()
    assert len(runs) == 1 and runs[0].status == "finished"
    # a total arriving late from CodeCarbon's (not joined) timer thread is ignored, not a new run
    handler.live_out(totals(5.0, run_id=str(tracker.run_id)), None)
    assert len(handler.session.ledger.runs()) == 1
    assert handler.get_accumulated_emissions() == pytest.approx(1.0 - 2 * KG_PER_LB)


# --------------------------------------------------------------------------- errors
def test_auth_failure_is_logged_without_the_key_and_tracking_continues(
    settings: dict[str, Any], ledger_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad_key = "test_wrong_SECRET_key_98765"
    with FakeOneClickImpact(api_keys=["test_the_only_valid_key"]) as strict:
        tracker = tracker_with(
            settings, offset_api_key=bad_key, offset_api_url=strict.url, output_dir=str(tmp_path)
        )
        handler = tracker.offset_handler
        tracker.start()
        handler.out(totals(1.0, run_id=str(tracker.run_id)), None)
        assert handler.wait(10)
        assert handler.manual_offset() is False
        emissions_kg = tracker.stop()
        assert strict.captures == []
    assert isinstance(emissions_kg, float)  # CodeCarbon's stop() still returns its figure
    errors = [r for r in carbonoffset_records(caplog, logging.ERROR)]
    assert errors and "offset_api_key" in errors[0].getMessage()
    assert handler.get_accumulated_emissions() == pytest.approx(1.0)  # still pending for a later run
    text = all_log_text(caplog)
    for record in caplog.records:
        assert bad_key not in record.getMessage()
    assert bad_key not in text and bad_key not in repr(tracker.offset_config) and bad_key not in repr(handler)
    assert bad_key.encode() not in ledger_path.read_bytes()
    assert bad_key not in (tmp_path / "emissions.csv").read_text()


def test_threshold_below_minimum_raises(settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="offset_threshold must be at least 0.5"):
        tracker_with(settings, offset_threshold=0.4)
    with pytest.raises(ValueError, match="offset_threshold"):
        OfflineEmissionsTracker(country_iso_code="FRA", offset_threshold=0.1)  # even without a key
    decorated = track_emissions(offset_threshold=0.2)(lambda: "ran")  # CodeCarbon raises at the call too
    with pytest.raises(ValueError, match="offset_threshold"):
        decorated()
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "0.3")
    with pytest.raises(ValueError, match="offset_threshold"):
        tracker_with(settings)
    assert tracker_with(settings, offset_threshold=0.5).offset_config.offset_threshold == 0.5


@pytest.mark.parametrize("environment", ["staging", "SANDBOX", "prod"])
def test_unknown_environment_raises_listing_the_choices(settings: dict[str, Any], environment: str) -> None:
    with pytest.raises(ValueError, match="offset_environment") as info:
        tracker_with(settings, offset_environment=environment)
    assert "production" in str(info.value) and "sandbox" in str(info.value)
    decorated = track_emissions(offset_environment=environment)(lambda: "ran")
    with pytest.raises(ValueError, match="'production' or 'sandbox'"):
        decorated()


def test_missing_makeimpact_raises_an_install_hint(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "makeimpact", None)
    with pytest.raises(ImportError, match=r"pip install carbonoffset") as info:
        tracker_with(settings)
    assert "makeimpact" in str(info.value)
    plain = OfflineEmissionsTracker(country_iso_code="FRA", log_level="error")  # no key: SDK not needed
    assert plain.offset_handler is None


def test_offset_arguments_without_key_warn_and_offset_nothing(caplog: pytest.LogCaptureFixture) -> None:
    tracker = OfflineEmissionsTracker(country_iso_code="FRA", offset_environment="sandbox", log_level="error")
    assert tracker.offset_handler is None
    warnings = carbonoffset_records(caplog)
    assert len(warnings) == 1 and "offset_api_key is not set" in warnings[0].getMessage()
    assert not default_ledger_path().exists()


# --------------------------------------------------------------------- configuration
def test_settings_come_from_arguments_env_and_config_files(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch, server: FakeOneClickImpact
) -> None:
    home = Path.home()
    (home / ".codecarbon.config").write_text("[codecarbon]\noffset_threshold = 9\nauto_offset = false\n")
    Path(".codecarbon.config").write_text(
        f"[codecarbon]\nproject_name = from-file\noffset_api_key = {KEY}\n"
        "offset_environment = sandbox\noffset_threshold = 2.0\n"
    )
    plumbing = {k: settings[k] for k in ("offset_api_url", "offset_ledger", "country_iso_code")}
    tracker = OfflineEmissionsTracker(**plumbing, log_level="error")
    config = tracker.offset_config
    assert tracker.offset_handler is not None  # the key came from ./.codecarbon.config
    assert config.offset_environment == "sandbox" and config.offset_threshold == 2.0  # local file beats home
    assert config.auto_offset is False  # only set in ~/.codecarbon.config
    assert tracker._project_name == "from-file"  # one file configures CodeCarbon too

    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "3.0")
    assert OfflineEmissionsTracker(**plumbing).offset_config.offset_threshold == 3.0  # env beats files
    assert OfflineEmissionsTracker(**plumbing, offset_threshold=4.0).offset_config.offset_threshold == 4.0


# ------------------------------------------------------------------------- decorator
def test_track_emissions_bare_form_new_tracker_per_call(
    settings: dict[str, Any], server: FakeOneClickImpact, monkeypatch: pytest.MonkeyPatch, ledger_path: Path
) -> None:
    for name in (
        "offset_api_key",
        "offset_environment",
        "offset_api_url",
        "offset_ledger",
        "country_iso_code",
    ):
        monkeypatch.setenv(f"CODECARBON_{name.upper()}", str(settings[name]))
    monkeypatch.setenv("CODECARBON_LOG_LEVEL", "error")

    @track_emissions(offline=True)  # the country comes from CODECARBON_COUNTRY_ISO_CODE
    def square(x: int) -> int:
        """Squares."""
        return x * x

    assert square.__name__ == "square" and square.__doc__ == "Squares."
    assert square(3) == 9 and square(4) == 16

    @track_emissions(offline=True)
    def boom() -> None:
        raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        boom()
    with Ledger(ledger_path) as ledger:
        runs = ledger.runs()
    assert len(runs) == 3  # one tracker (one ledger run) per call
    assert all(run.label == "codecarbon:codecarbon" for run in runs)  # stopped
    # the call that raised is a failed run, as a failed fit is; its emissions are recorded, pending
    assert sorted(run.status for run in runs) == ["failed", "finished", "finished"]
    _, rows = read_csv(Path("emissions.csv"))
    assert len(rows) == 3 and {row["country_iso_code"] for row in rows} == {"FRA"}  # offline tracker


@pytest.mark.usefixtures("forced_big_emissions")
def test_track_emissions_with_arguments_offsets_a_real_run(
    settings: dict[str, Any], server: FakeOneClickImpact, ledger_path: Path
) -> None:
    @track_emissions(
        project_name="decorated", log_level="error", output_methods=[], offset_threshold=1.0, **settings
    )
    def train() -> str:
        time.sleep(0.05)
        return "done"

    assert train() == "done"
    assert server.captures and all(c.carbon_captured >= 1 for c in server.captures)
    with Ledger(ledger_path) as ledger:
        runs = ledger.runs()
        offsets = ledger.offsets()
        balance = ledger.balance(ledger.accounts()[0])
    assert len(runs) == 1 and runs[0].label == "codecarbon:decorated" and runs[0].emissions_kg > 1.0
    assert {o.state for o in offsets} == {"confirmed"}
    assert sum(o.amount_lb for o in offsets) == sum(c.carbon_captured for c in server.captures)
    assert balance.recorded_kg == pytest.approx(runs[0].emissions_kg)
    assert 0 <= balance.pending_kg < 1.0  # what is left is below the threshold: carried, not lost


def test_track_emissions_argument_errors_come_when_codecarbon_raises_them() -> None:
    """As CodeCarbon 3.3.2: a wrong name or too many arguments fail at decoration (Python's TypeError);
    offline=True without a location fails when the function is called, not at import."""
    with pytest.raises(TypeError, match="unexpected keyword argument.*project_nam"):
        track_emissions(project_nam="typo")
    with pytest.raises(TypeError, match="multiple values for argument 'project_name'"):
        track_emissions(None, "a", project_name="b")
    with pytest.raises(TypeError, match="at most"):
        track_emissions(None, *range(len(inspect.signature(codecarbon.track_emissions).parameters)))
    with pytest.raises(TypeError, match="function to decorate or None"):
        track_emissions("my-project")  # type: ignore[call-overload]
    calls: list[str] = []
    decorated = track_emissions(offline=True)(lambda: calls.append("ran"))  # decorating never raises
    with pytest.raises(ValueError, match=r"offline=True\) needs the location"):
        decorated()
    assert calls == []  # nothing ran, no tracker started


def test_track_emissions_has_codecarbons_signature_plus_the_offset_settings() -> None:
    ours = inspect.signature(track_emissions).parameters
    theirs = inspect.signature(codecarbon.track_emissions).parameters
    assert list(ours)[: len(theirs)] == list(theirs)  # same names, same positional order
    assert all(ours[name].kind == theirs[name].kind for name in theirs)
    extra = list(ours)[len(theirs) :]
    assert extra == list(OFFSET_ARGUMENTS)
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in extra)


def test_the_offset_arguments_are_the_settings_of_the_core_and_the_trackers_take_them() -> None:
    """Declared once: the offset arguments are OffsetConfig's fields but CodeCarbon's own country_iso_code,
    and every tracker shows them (keyword-only, "not given" by default) around CodeCarbon's arguments."""
    assert tuple(key for key in CONFIG_KEYS if key != "country_iso_code") == OFFSET_ARGUMENTS
    for cls in (EmissionsTracker, OfflineEmissionsTracker):
        parameters = inspect.signature(cls).parameters
        kinds = {p.kind for p in parameters.values()}
        assert {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds
        extra = [p for p in parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in extra] == list(OFFSET_ARGUMENTS)
        assert all(p.default is None for p in extra)
        assert all(name in (cls.__doc__ or "") for name in OFFSET_ARGUMENTS)


class _Where(BaseOutput):
    """A CodeCarbon output handler (its public extension point): where the tracker located the run."""

    def __init__(self) -> None:
        self.countries: list[str] = []

    def out(self, total: EmissionsData, delta: EmissionsData) -> None:
        self.countries.append(total.country_iso_code)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"country_iso_code": "FRA"}, "online"),  # a country alone does not switch to offline
        ({"offline": False, "country_iso_code": "FRA"}, "online"),
        ({"offline": True, "country_iso_code": "FRA"}, "offline"),
        ({}, "online"),
    ],
)
def test_track_emissions_chooses_the_tracker_as_codecarbon_does(
    arguments: dict[str, Any], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODECARBON_COUNTRY_ISO_CODE", "DEU")  # configured: never a reason to go offline
    where = _Where()
    positional = ("positional-project",)  # CodeCarbon's own form: track_emissions(None, "project", ...)

    @track_emissions(
        None, *positional, log_level="error", output_methods=[], output_handlers=[where], **arguments
    )
    def work() -> int:
        time.sleep(0.05)
        return 7

    assert work() == 7
    # the offline tracker uses the given country; the online one locates the machine itself (it takes no
    # location argument): here, without network, CodeCarbon's fallback country
    assert where.countries, "the tracker reported nothing"
    if expected == "offline":
        assert set(where.countries) == {"FRA"}
    else:
        assert "FRA" not in where.countries and "DEU" not in where.countries


def test_the_drop_in_stores_what_codecarbon_measured_on_and_where(settings: dict[str, Any]) -> None:
    """A drop-in run's ledger row carries CodeCarbon's own details (as a callback's does), so its
    card and statement name CodeCarbon, the country and the hardware."""
    from carbonoffset.core import card
    from carbonoffset.core.ledger import Ledger

    tracker = tracker_with(settings, output_methods=[])
    tracker.start()
    tracker.stop()
    data = tracker.final_emissions_data
    report = tracker.offset_handler.report()
    with Ledger(settings["offset_ledger"]) as ledger:
        run = ledger.run(report.run_id)  # type: ignore[arg-type]
        assert run is not None
        assert run.details.get("country_iso_code") == "FRA"
        assert run.details.get("codecarbon_version") == data.codecarbon_version
        assert run.details.get("cpu_model") == data.cpu_model
        carbon = card.run_carbon(ledger, run.run_id)
    assert f"CodeCarbon {data.codecarbon_version}" in card.statement(carbon)


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "failed"), (KeyboardInterrupt, "interrupted")])
def test_a_with_block_that_raises_is_a_failed_run_kept_pending_not_offset(
    settings: dict[str, Any], server: FakeOneClickImpact, ledger_path: Path, error: type[BaseException], status: str
) -> None:
    """As a failed fit: CodeCarbon's final figures recorded, the status says what happened, no final
    offset (with offset_round_up a finished run would buy its 1 lb now; these stay pending for the next
    run); the error reaches the caller unchanged."""
    with pytest.raises(error, match="training stopped"), OfflineEmissionsTracker(
        log_level="error", output_methods=[], offset_round_up=True, **settings
    ) as tracker:
        time.sleep(0.05)
        raise error("training stopped")
    assert tracker.offset_handler is not None
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
        balance = ledger.balance(ledger.accounts()[0])
    assert run.status == status and run.emissions_kg > 0  # measured, none lost
    assert not server.captures  # no final offset for a run that failed
    assert balance.pending_kg == pytest.approx(run.emissions_kg)

    with OfflineEmissionsTracker(log_level="error", output_methods=[], offset_round_up=True, **settings):
        time.sleep(0.05)  # the same block, ending normally: finished, and its final offset is bought
    assert len(server.captures) == 1
