"""The Trainer's own model card carries the run's emissions (grams) and offsets.

A real tiny BERT (built from a config, never from a hub) fitted by the real Trainer; the card is
the one ``trainer.create_model_card()`` writes to ``output_dir`` (what ``push_to_hub`` uploads),
read back with ``huggingface_hub.ModelCard``. Emissions from the real CodeCarbon tracker, or from
``ScriptedEmissions`` where an offset must be bought; offsets through the real makeimpact SDK to
the loopback server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install carbonoffset[transformers])"
)
pytest.importorskip(
    "accelerate", reason="the Trainer needs accelerate (pip install carbonoffset[transformers])"
)

import torch  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from transformers import Trainer  # noqa: E402

from carbonoffset.core.card import SECTION_BEGIN, SECTION_TITLE  # noqa: E402
from carbonoffset.core.ledger import Ledger  # noqa: E402
from carbonoffset.core.units import kg_to_g  # noqa: E402
from carbonoffset.demo import huggingface as demo  # noqa: E402
from carbonoffset.integrations.huggingface import REPORT_TO_NAME, CarbonOffsetCallback, add_to_model_card  # noqa: E402
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")]

SAMPLES = 128
LIVE_KEY = "live_card_SECRET_5d2f"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def datasets() -> tuple[Any, Any]:
    return demo.build_datasets(limit=SAMPLES)


def fit(
    datasets: tuple[Any, Any], output_dir: Path, callback: CarbonOffsetCallback, *, epochs: int = 2
) -> Trainer:
    train_set, val_set = datasets
    trainer = Trainer(
        model=demo.build_model(),
        args=demo.training_arguments(str(output_dir), epochs=epochs),
        train_dataset=train_set,
        eval_dataset=val_set,
        compute_metrics=demo.accuracy,
        callbacks=[callback],
    )
    callback.add_to_model_card(trainer)
    with callback.guard():
        trainer.train()
    return trainer


def test_the_trainers_card_carries_the_measured_grams_location_and_hardware(
    datasets: tuple[Any, Any], tmp_path: Path, settings: dict[str, Any], ledger_path: Path
) -> None:
    callback = CarbonOffsetCallback(**settings)  # real CodeCarbon (offline, France), sandbox account
    trainer = fit(datasets, tmp_path / "out", callback)
    report = callback.final_report
    assert report is not None and report.emissions_kg > 0
    trainer.create_model_card(model_name="tiny-digits-bert")
    readme = tmp_path / "out" / "README.md"
    card = ModelCard.load(readme)
    with Ledger(ledger_path) as ledger:
        run = ledger.run(report.run_id)  # type: ignore[arg-type]
    assert run is not None
    co2 = card.data.co2_eq_emissions
    assert co2["emissions"] == kg_to_g(run.emissions_kg)  # grams, the ledger's final figure
    assert co2["emissions"] == pytest.approx(run.emissions_kg * 1000, rel=1e-15)
    assert co2["source"].startswith(f"CodeCarbon {run.details['codecarbon_version']} via carbonoffset")
    assert co2["training_type"] == "pre-training"  # built from a config: random weights
    assert co2["geographical_location"] == "France"
    assert str(run.details["cpu_model"]) in co2["hardware_used"]
    # the Trainer's own card is kept around our section
    assert "generated_from_trainer" in card.data.tags
    assert "tiny-digits-bert" in card.text and "## Training procedure" in card.text
    assert card.text.count(f"## {SECTION_TITLE}") == 1
    assert "sandbox" in card.text.lower() and "none of these emissions is offset" in card.text
    assert settings["offset_api_key"] not in readme.read_text()

    trainer.create_model_card(model_name="tiny-digits-bert")  # written again (as push_to_hub does)
    again = ModelCard.load(readme)
    assert again.text.count(SECTION_BEGIN) == 1 and again.data.co2_eq_emissions == co2


def test_offsets_bought_in_production_appear_with_their_receipts(
    datasets: tuple[Any, Any], tmp_path: Path, ledger_path: Path
) -> None:
    with FakeOneClickImpact(environment="production") as server:
        callback = CarbonOffsetCallback(
            source=ScriptedEmissions(
                [0.3, 0.6, 0.9], details={"codecarbon_version": "3.3.2", "country_name": "France"}
            ),
            offset_api_key=LIVE_KEY,
            offset_environment="production",
            offset_api_url=server.url,
            offset_ledger=ledger_path,
            offset_threshold=0.5,
            offset_request_timeout=2.0,
            offset_timeout=10.0,
        )
        trainer = fit(datasets, tmp_path / "out", callback, epochs=3)
        (capture,) = server.captures
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.co2_eq_emissions["emissions"] == kg_to_g(0.9) == 900.0
    assert capture.user_id in card.text and capture.time_utc in card.text
    assert "| Offset (1ClickImpact carbon capture) | 454 g CO2eq |" in card.text
    assert "| Not yet offset | 446 g CO2eq |" in card.text
    assert "sandbox" not in card.text.lower()
    assert LIVE_KEY not in (tmp_path / "out" / "README.md").read_text()


def test_a_card_without_a_run_is_left_as_the_trainer_wrote_it(
    datasets: tuple[Any, Any], tmp_path: Path, settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    train_set, _ = datasets
    callback = CarbonOffsetCallback(**settings)
    trainer = Trainer(
        model=demo.build_model(),
        args=demo.training_arguments(str(tmp_path / "out"), epochs=1, eval_strategy="no"),
        train_dataset=train_set,
        callbacks=[callback],
    )
    callback.add_to_model_card(trainer, training_type="fine-tuning")
    trainer.create_model_card()  # before any training
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "co2_eq_emissions" not in card.data.to_dict()
    assert "no training run was recorded yet" in caplog.text


def test_a_trainer_built_callback_from_report_to_completes_the_card_too(
    datasets: tuple[Any, Any],
    tmp_path: Path,
    server: FakeOneClickImpact,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", "test_card_report_to_SECRET")
    monkeypatch.setenv("CODECARBON_OFFSET_ENVIRONMENT", "sandbox")
    monkeypatch.setenv("CODECARBON_OFFSET_API_URL", server.url)
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", str(ledger_path))
    monkeypatch.setenv("CODECARBON_COUNTRY_ISO_CODE", "FRA")
    train_set, val_set = datasets
    trainer = Trainer(
        model=demo.build_model(),
        args=demo.training_arguments(str(tmp_path / "out"), epochs=1, report_to=[REPORT_TO_NAME]),
        train_dataset=train_set,
        eval_dataset=val_set,
    )
    add_to_model_card(trainer, training_type="fine-tuning")
    trainer.train()
    trainer.create_model_card()
    co2 = ModelCard.load(tmp_path / "out" / "README.md").data.co2_eq_emissions
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert co2["emissions"] == kg_to_g(run.emissions_kg) and co2["training_type"] == "fine-tuning"
    bare = Trainer(
        model=demo.build_model(),
        args=demo.training_arguments(str(tmp_path / "b"), epochs=1, eval_strategy="no"),
    )
    with pytest.raises(ValueError, match="no CarbonOffsetCallback"):
        add_to_model_card(bare)
