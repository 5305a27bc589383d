"""`carbonoffset demo` says what its offset will do and what it did, and shows progress while training."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from carbonoffset.cli import app
from carbonoffset.core.ledger import Ledger
from carbonoffset.testing import FakeOneClickImpact

pytestmark = pytest.mark.slow

KEY = "test_demo_user_key_0a1b2c"


def test_second_run_says_the_credit_covers_it_and_buys_nothing(
    server: FakeOneClickImpact, ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lightning")
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", KEY)
    monkeypatch.setenv("CODECARBON_OFFSET_ENVIRONMENT", "sandbox")
    monkeypatch.setenv("CODECARBON_OFFSET_API_URL", server.url)
    runner = CliRunner()
    args = ["demo", "--epochs", "2", "--ledger", str(ledger_path)]

    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    said = " ".join(first.output.split())  # the console wraps long lines
    assert "this buys 1 lb (0.4536 kg) of carbon capture" in said
    assert "Bought 1 lb (0.4536 kg) of carbon capture" in said
    assert server.total_lb(KEY) == 1

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    said = " ".join(second.output.split())
    assert "this buys 1 lb" not in said  # the old promise, broken by the credit
    assert "of credit left from earlier rounded-up offsets; it covers this small run" in said
    assert "Bought nothing: the account's credit from earlier offsets covered this run's" in said
    assert server.total_lb(KEY) == 1  # nothing more was bought, as announced
    with Ledger(ledger_path) as ledger:
        runs = ledger.runs()
        assert len(runs) == 2 and len(ledger.offsets()) == 1
        assert ledger.balance(runs[0].account).credit_kg > 0


@pytest.mark.parametrize("framework", ["lightning", "keras", "huggingface"])
def test_demo_training_reports_progress_after_every_epoch(
    framework: str, settings: dict[str, object], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip({"huggingface": "transformers"}.get(framework, framework))
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    from carbonoffset.demo import trainer_module

    seen: list[tuple[int, int]] = []
    result = trainer_module(framework).train(
        settings, epochs=2, progress=lambda done, total: seen.append((done, total))
    )
    assert seen == [(1, 2), (2, 2)]
    assert result.epochs == 2
