"""``carbonoffset card`` and ``carbonoffset report --run --statement`` on real Lightning and Keras runs.

The runs are real fits (the demo's tiny models on scikit-learn digits) measured by the real
CodeCarbon tracker, or by ``ScriptedEmissions`` where an offset must be bought through the real
makeimpact SDK and the loopback server. Cards are read back with ``huggingface_hub``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from carbonoffset.cli import EXIT_CONFIG, app
from carbonoffset.core.card import SECTION_BEGIN, SECTION_TITLE
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.units import kg_to_g
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions

pytestmark = pytest.mark.slow
ModelCard = pytest.importorskip("huggingface_hub").ModelCard

LIVE_KEY = "live_cli_card_SECRET_77e1"
USER_CARD = "---\nlicense: mit\ntags:\n- digits\nlibrary_name: {library}\n---\n# Digits\n\nA tiny model.\n"


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def _card_twice(runner: CliRunner, ledger_path: Path, run_id: str, readme: Path) -> Any:
    for _ in range(2):  # the second merge replaces the section written by the first
        result = runner.invoke(
            app, ["card", "--run", run_id, "--ledger", str(ledger_path), "--update", str(readme)]
        )
        assert result.exit_code == 0, result.output
    return ModelCard.load(readme)


def _check_card(card: Any, ledger_path: Path, run_id: str, library: str) -> None:
    with Ledger(ledger_path) as ledger:
        run = ledger.run(run_id)
    assert run is not None and run.emissions_kg > 0
    assert card.data.license == "mit" and card.data.library_name == library and card.data.tags == ["digits"]
    assert card.text.startswith("# Digits\n\nA tiny model.\n")
    assert card.text.count(SECTION_BEGIN) == 1 and card.text.count(f"## {SECTION_TITLE}") == 1
    co2 = card.data.co2_eq_emissions
    assert co2["emissions"] == kg_to_g(run.emissions_kg)
    assert co2["source"].startswith("CodeCarbon ") and co2["geographical_location"] == "France"
    assert str(run.details["cpu_model"]) in co2["hardware_used"]
    assert "training_type" not in co2  # not known for these frameworks unless given


def test_card_on_a_lightning_run_merges_into_its_readme_once(
    tmp_path: Path, settings: dict[str, Any], ledger_path: Path
) -> None:
    _needs("lightning")
    from carbonoffset.demo import lightning as demo

    result = demo.train(settings, epochs=2)
    run_id = result.report.run_id
    assert run_id is not None
    readme = tmp_path / "README.md"
    readme.write_text(USER_CARD.format(library="pytorch-lightning"), encoding="utf-8")
    card = _card_twice(CliRunner(), ledger_path, run_id, readme)
    _check_card(card, ledger_path, run_id, "pytorch-lightning")
    assert settings["offset_api_key"] not in readme.read_text()
    # the docs' two lines after training, from Python: the same card
    from carbonoffset.core.card import update_model_card

    update_model_card(tmp_path / "my-model" / "README.md", result.report)
    same = ModelCard.load(tmp_path / "my-model" / "README.md")
    assert same.data.co2_eq_emissions == card.data.co2_eq_emissions
    assert same.text.strip() == card.text[card.text.index(SECTION_BEGIN) :].strip()


def test_card_on_a_keras_run_merges_into_its_readme_once(
    tmp_path: Path, settings: dict[str, Any], ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs("keras")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    from carbonoffset.demo import keras as demo

    result = demo.train(settings, epochs=2)
    run_id = result.report.run_id
    assert run_id is not None
    readme = tmp_path / "README.md"
    readme.write_text(USER_CARD.format(library="keras"), encoding="utf-8")
    card = _card_twice(CliRunner(), ledger_path, run_id[:8], readme)  # a prefix names the run
    _check_card(card, ledger_path, run_id, "keras")


def test_card_formats_and_a_missing_run(tmp_path: Path, settings: dict[str, Any], ledger_path: Path) -> None:
    _needs("lightning")
    from carbonoffset.demo import lightning as demo

    demo.train(settings, epochs=1)
    runner = CliRunner()
    base = ["card", "--run", "latest", "--ledger", str(ledger_path)]
    as_json = json.loads(
        runner.invoke(app, [*base, "--format", "json", "--training-type", "pre-training"]).output
    )
    co2 = as_json["co2_eq_emissions"]
    assert co2["training_type"] == "pre-training" and co2["emissions"] == kg_to_g(
        as_json["run"]["emissions_kg"]
    )
    yaml_text = runner.invoke(app, [*base, "--format", "yaml"]).output
    assert yaml_text.startswith("co2_eq_emissions:\n  emissions: ")
    markdown = runner.invoke(app, base).output
    printed = ModelCard(markdown)
    assert printed.data.co2_eq_emissions["emissions"] == co2["emissions"]
    assert printed.text.count(SECTION_BEGIN) == 1
    missing = runner.invoke(app, ["card", "--run", "nope", "--ledger", str(ledger_path)])
    assert missing.exit_code == EXIT_CONFIG and "no run 'nope'" in missing.output
    wrong = runner.invoke(app, [*base, "--format", "html"])
    assert wrong.exit_code == EXIT_CONFIG and "--format must be" in wrong.output


def test_statement_of_a_lightning_run_without_offsets(settings: dict[str, Any], ledger_path: Path) -> None:
    _needs("lightning")
    from carbonoffset.demo import lightning as demo

    report = demo.train(settings, epochs=2).report  # a few mg: under the threshold, nothing bought
    assert report.offset_lb == 0
    result = CliRunner().invoke(
        app, ["report", "--run", str(report.run_id), "--ledger", str(ledger_path), "--statement"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.startswith(f"Training this model (carbonoffset run {str(report.run_id)[:8]}, 2 epochs, ")
    assert "measured with CodeCarbon" in text and "at the carbon intensity of France" in text
    assert text.endswith("These emissions are not offset.")
    assert settings["offset_api_key"] not in result.output


def test_statement_of_a_lightning_run_whose_threshold_bought_an_offset(
    tmp_path: Path, ledger_path: Path
) -> None:
    _needs("lightning")
    from carbonoffset.demo import lightning as demo

    with FakeOneClickImpact(environment="production") as server:
        report = demo.train(
            {
                "source": ScriptedEmissions([0.2, 0.55, 0.8]),
                "offset_api_key": LIVE_KEY,
                "offset_environment": "production",
                "offset_api_url": server.url,
                "offset_ledger": ledger_path,
                "offset_threshold": 0.5,
                "offset_request_timeout": 2.0,
            },
            epochs=3,
        ).report
        (capture,) = server.captures
    result = CliRunner().invoke(
        app, ["report", "--run", str(report.run_id), "--ledger", str(ledger_path), "--statement"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "used 14.3 kWh of electricity and emitted 800 g CO2eq" in text
    assert "measured by the emissions source given to carbonoffset" in text  # not CodeCarbon: not claimed
    assert (
        f"Of these emissions, 454 g CO2eq were offset through 1ClickImpact's carbon capture "
        f"(receipt: user_id {capture.user_id}, time_utc {capture.time_utc}); 346 g CO2eq remain to be offset."
    ) in text
    assert LIVE_KEY not in result.output
    needs_run = CliRunner().invoke(app, ["report", "--ledger", str(ledger_path), "--statement"])
    assert needs_run.exit_code == EXIT_CONFIG and "--run RUN_ID is needed" in needs_run.output
