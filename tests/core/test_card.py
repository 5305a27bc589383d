"""The carbon statement of a run: grams for model cards, offsets shared out first come first served,
sandbox purchases never shown as offsets, cards merged without duplicates, a paragraph for a paper."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from carbonoffset.core import card
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.session import OffsetSession
from carbonoffset.core.units import G_PER_KG, KG_PER_LB, kg_to_g
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions

HARDWARE = {
    "codecarbon_version": "3.3.2",
    "carbonoffset_version": "0.1.0",
    "country_name": "France",
    "country_iso_code": "FRA",
    "region": None,
    "cpu_model": "AMD EPYC 7B13",
    "cpu_count": 16,
    "gpu_model": "2 x NVIDIA H200",
    "gpu_count": 2,
    "ram_total_size": 125.7,
    "tracking_mode": "machine",
}


# ------------------------------------------------------------------------- units
def test_one_kg_is_exactly_1000_g_and_the_decimal_point_just_moves() -> None:
    assert G_PER_KG == 1000
    assert kg_to_g(1.0) == 1000.0 and kg_to_g(0.0) == 0.0
    assert kg_to_g(0.0041) == 4.1 != 0.0041 * 1000  # binary multiplication adds noise; kg_to_g does not
    assert kg_to_g(1e-7) == 1e-4 and kg_to_g(123.456789) == 123456.789
    rng = random.Random(16)
    for _ in range(2000):
        kg = rng.uniform(0, 10) * 10 ** rng.randint(-9, 3)
        exact = Fraction(repr(kg)) * 1000  # the decimal the kg figure is written as, times 1000
        assert kg_to_g(kg) == float(exact)  # the float nearest to it
        assert abs(kg_to_g(kg) - kg * 1000) <= math.ulp(kg * 1000)
    with pytest.raises(ValueError, match="finite"):
        kg_to_g(float("nan"))


@pytest.mark.parametrize(
    ("kg", "mass", "energy_kwh", "energy"),
    [
        (0.0, "0 g", 0.0, "0 Wh"),
        (0.00123456, "1.23 g", 0.0221, "22.1 Wh"),
        (0.000999999, "1.00 g", 0.9995, "1.00 kWh"),
        (0.0000123, "12.3 mg", 0.000001, "1.00 mWh"),
        (1.0, "1.00 kg", 12.345, "12.3 kWh"),
        (999.9, "1.00 t", 1234.5, "1.23 MWh"),
        (0.1, "100 g", 100.0, "100 kWh"),
        (1234567.0, "1230 t", 2.5e6, "2.50 GWh"),
    ],
)
def test_figures_have_an_si_prefix_and_three_significant_figures(
    kg: float, mass: str, energy_kwh: float, energy: str
) -> None:
    assert card.format_mass(kg) == mass
    assert card.format_energy(energy_kwh) == energy


# -------------------------------------------------------------- sharing offsets
def _run(ledger: Ledger, account: str, kg: float, details: dict[str, object] | None = None) -> str:
    run_id = ledger.start_run(account=account, environment=account.split(":")[0])
    ledger.record(run_id, emissions_kg=kg, energy_kwh=kg / 0.056, epoch=0)
    ledger.set_run_details(run_id, details or HARDWARE)
    ledger.end_run(run_id)
    return run_id


def _buy(ledger: Ledger, account: str, run_id: str, lb: int, *, state: str = "confirmed") -> str:
    intent = ledger.create_intent(
        account=account,
        environment=account.split(":")[0],
        run_id=run_id,
        amount_lb_for=lambda kg: lb,
        min_pending_kg=0.0,
        lease_s=10.0,
    )
    assert intent is not None
    if state == "confirmed":
        ledger.mark_confirmed(
            intent.offset_id, user_id="U42", time_utc="2026-12-01T09:00:00Z", carbon_captured=lb
        )
    elif state == "failed":
        ledger.mark_failed(intent.offset_id, error="refused")
    return intent.offset_id


def test_offsets_cover_the_accounts_runs_first_come_first_served(tmp_path: Path) -> None:
    account = "production:abc"
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        first = _run(ledger, account, 0.3)  # under the threshold: pending until the next run
        second = _run(ledger, account, 0.3)
        _buy(ledger, account, second, 1, state="failed")  # a refused purchase covers nothing
        bought = _buy(ledger, account, second, 1)  # 0.4536 kg, triggered by the second run
        third = _run(ledger, account, 0.2)
        in_flight = _buy(ledger, account, third, 1, state="intent")
        a, b, c = (card.run_carbon(ledger, r) for r in (first, second, third))
        balance = ledger.balance(account)
    assert a.offset_kg == pytest.approx(0.3) and a.pending_kg == 0.0
    assert [r.offset_id for r in a.receipts] == [bought]
    assert b.offset_kg == pytest.approx(KG_PER_LB - 0.3) and b.in_flight_kg == pytest.approx(0.6 - KG_PER_LB)
    assert b.pending_kg == 0.0 and [r.offset_id for r in b.receipts] == [bought, in_flight]
    assert c.in_flight_kg == pytest.approx(0.2) and c.offset_kg == 0.0 and c.pending_kg == 0.0
    # the runs' shares add up to the account's figures
    assert a.offset_kg + b.offset_kg + c.offset_kg == pytest.approx(balance.offset_kg)
    assert sum(x.pending_kg for x in (a, b, c)) == pytest.approx(balance.pending_kg)
    assert b.receipts[0].user_id == "U42" and b.receipts[1].user_id is None


def test_the_metadata_block_is_in_grams_with_what_codecarbon_recorded(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        run_id = _run(ledger, "production:abc", 0.0041)
        carbon = card.run_carbon(ledger, run_id)
    assert card.co2_eq_emissions(carbon, training_type="fine-tuning") == {
        "emissions": 4.1,
        "source": "CodeCarbon 3.3.2 via carbonoffset 0.1.0",
        "training_type": "fine-tuning",
        "geographical_location": "France",
        "hardware_used": "2 x NVIDIA H200, AMD EPYC 7B13 (16 CPU threads), 126 GB RAM",
    }
    assert "training_type" not in card.co2_eq_emissions(carbon)


def test_sandbox_purchases_are_never_presented_as_offsets(tmp_path: Path) -> None:
    account = "sandbox:abc"
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        run_id = _run(ledger, account, 0.6)
        _buy(ledger, account, run_id, 1)
        carbon = card.run_carbon(ledger, run_id)
    section, text, data = card.card_section(carbon), card.statement(carbon), card.as_json(carbon)
    assert "| Offset | **none**: 1ClickImpact sandbox (test mode), no carbon was captured |" in section
    assert "| Not offset | 600 g CO2eq (all of it) |" in section
    assert "were offset" not in text and "not offset" in text and "sandbox" in text
    assert data["run"]["offset_kg"] == 0.0 and data["run"]["pending_kg"] == 0.6
    assert data["run"]["sandbox_purchases_kg"] == pytest.approx(KG_PER_LB)


# ----------------------------------------------------------------- merging a card
def test_a_card_keeps_its_front_matter_and_text_and_gets_one_section(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import ModelCard

    account = "production:abc"
    readme = tmp_path / "README.md"
    readme.write_text(
        "---\nlicense: mit\ntags:\n- digits\n---\n# Digits MLP\n\nA small model.\n", encoding="utf-8"
    )
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        run_id = _run(ledger, account, 0.6)
        card.update_model_card(readme, run_id, ledger=ledger)
        first = ModelCard.load(readme)
        _buy(ledger, account, run_id, 1)  # bought later: a rerun shows it
        card.update_model_card(readme, run_id[:6], ledger=ledger, training_type="pre-training")
    merged = ModelCard.load(readme)
    assert merged.data.license == "mit" and merged.data.tags == ["digits"]
    assert merged.text.startswith("# Digits MLP\n\nA small model.\n")
    assert merged.text.count(card.SECTION_BEGIN) == 1 and merged.text.count(f"## {card.SECTION_TITLE}") == 1
    assert "| Not yet offset | 600 g CO2eq |" in first.text
    assert "| Offset (1ClickImpact carbon capture) | 454 g CO2eq |" in merged.text
    assert "| Not yet offset | 146 g CO2eq |" in merged.text and "`U42`" in merged.text
    assert merged.data.co2_eq_emissions["emissions"] == 600.0
    assert merged.data.co2_eq_emissions["training_type"] == "pre-training"


def test_a_missing_card_is_created_and_an_unknown_run_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import ModelCard

    with Ledger(tmp_path / "l.sqlite3") as ledger:
        run_id = _run(ledger, "production:abc", 0.01)
        _run(ledger, "production:abc", 0.02)
        card.update_model_card(tmp_path / "new" / "README.md", run_id, ledger=ledger)
        with pytest.raises(KeyError, match="no run 'nope'"):
            card.update_model_card(tmp_path / "README.md", "nope", ledger=ledger)
        assert card.resolve_run_id(ledger, "latest") != run_id
        for chosen in ("abc1", "abc2"):
            ledger.start_run(account="production:abc", environment="production", run_id=chosen)
        with pytest.raises(KeyError, match="matches 2 runs"):
            card.resolve_run_id(ledger, "abc")
        assert card.resolve_run_id(ledger, "abc2") == "abc2" == card.resolve_run_id(ledger, "latest")
        with pytest.raises(KeyError, match="no run ''"):
            card.resolve_run_id(ledger, "")
    assert ModelCard.load(tmp_path / "new" / "README.md").data.co2_eq_emissions["emissions"] == 10.0


def test_importing_the_card_module_imports_no_framework_nor_huggingface_hub() -> None:
    code = (
        "import sys, carbonoffset.core.card; "
        "bad = {'huggingface_hub', 'torch', 'transformers', 'lightning', 'keras', 'codecarbon'} & set(sys.modules); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the statement
def test_the_statement_of_a_run_whose_offset_was_bought_names_the_receipt(
    tmp_path: Path, server_production: FakeOneClickImpact
) -> None:
    ledger_path = tmp_path / "l.sqlite3"
    session = OffsetSession(
        source=ScriptedEmissions([0.3, 0.6, 0.9], details=HARDWARE),
        offset_api_key="live_statement_SECRET_1a2b",
        offset_environment="production",
        offset_api_url=server_production.url,
        offset_ledger=ledger_path,
        offset_threshold=0.5,
        offset_request_timeout=2.0,
    )
    run_id = session.start()
    for epoch in range(3):
        session.record_epoch(epoch)
    session.stop()
    session.close()
    (capture,) = server_production.captures
    with Ledger(ledger_path) as ledger:
        text = card.statement(card.run_carbon(ledger, run_id))  # type: ignore[arg-type]
    assert text.startswith(f"Training this model (carbonoffset run {run_id[:8]}, 3 epochs, ")  # type: ignore[index]
    assert "used 16.1 kWh of electricity and emitted 900 g CO2eq" in text
    assert "measured with CodeCarbon 3.3.2 for the whole machine, on 2 x NVIDIA H200" in text
    assert "at the carbon intensity of France (56.0 g CO2eq/kWh)" in text
    assert (
        f"Of these emissions, 454 g CO2eq were offset through 1ClickImpact's carbon capture "
        f"(receipt: user_id {capture.user_id}, time_utc {capture.time_utc}); 446 g CO2eq remain to be offset."
    ) in text
    assert "live_statement_SECRET_1a2b" not in text


def test_the_statement_of_a_run_without_offsets_says_so(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        run_id = _run(ledger, "production:abc", 0.00123, {"carbonoffset_version": "0.1.0"})
        text = card.statement(card.run_carbon(ledger, run_id))
    assert "emitted 1.23 g CO2eq, measured by the emissions source given to carbonoffset" in text
    assert text.endswith("These emissions have not been offset.")


@pytest.fixture
def server_production() -> FakeOneClickImpact:
    with FakeOneClickImpact(environment="production") as fake:
        yield fake  # type: ignore[misc]


def test_a_failed_run_is_stated_as_one(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        run_id = ledger.start_run(account="production:abc", environment="production")
        ledger.record(run_id, emissions_kg=0.002, energy_kwh=0.04, epoch=1)
        ledger.end_run(run_id, status="failed")
        carbon = card.run_carbon(ledger, run_id)
    assert f"(carbonoffset run {run_id[:8]}, 2 epochs, " in card.statement(carbon)
    assert ", failed before its end)" in card.statement(carbon)
    assert "> The training run failed before its end" in card.card_section(carbon)


def test_a_card_from_the_report_of_a_run_on_a_team_ledger_opens_that_ledger(
    tmp_path: Path, postgres_url: str
) -> None:
    """The report shows the URL with its password masked; the card is still made from that ledger,
    and a run it lacks is named with the masked URL (never the password, never "None")."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import ModelCard

    from carbonoffset.core.ledger.urls import url_password

    session = OffsetSession(
        source=ScriptedEmissions([0.004, 0.008], details=HARDWARE),
        offset_ledger=postgres_url,
        offset_environment="sandbox",
    )
    session.start()
    session.record_epoch(0)
    report = session.stop()
    session.close()
    password = url_password(postgres_url)
    assert password and password not in str(report.ledger_path)
    path = card.update_model_card(tmp_path / "README.md", report)
    assert ModelCard.load(path).data.co2_eq_emissions["emissions"] == 4.0  # the last figure read, in g
    assert report.run_id is not None and report.run_id in path.read_text()
    with pytest.raises(KeyError) as info:
        card.update_model_card(tmp_path / "README.md", "nope", ledger=report.ledger_path)
    message = str(info.value)
    assert str(report.ledger_path) in message and "None" not in message and password not in message
