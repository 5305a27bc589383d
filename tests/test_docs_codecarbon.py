"""Every code block of docs/codecarbon.md runs, in order, against the local 1ClickImpact server.

The page is written for a real user; the test only changes the world around it:

* ``CODECARBON_OFFSET_API_URL`` points the real SDK at :class:`FakeOneClickImpact` (a production one
  for blocks showing a ``live_`` key), ``CODECARBON_OFFSET_LEDGER`` at a temporary ledger;
* the key placeholders are replaced by test keys;
* ``bash`` blocks may only install packages (checked to be installed) or ``export`` variables (applied);
* an ``ini`` block is written to ``./.codecarbon.config`` (the temporary working folder) for its section,
  with the environment variables it would be shadowed by removed;
* CodeCarbon's own settings ``CODECARBON_FORCE_RAM_POWER`` / ``CODECARBON_FORCE_CARBON_INTENSITY_G_CO2E_KWH``
  make each real, short run emit kilograms, so the examples cross thresholds and buy offsets
  (``CODECARBON_MEASURE_POWER_SECS=0.02`` so that a run shorter than CodeCarbon's 50 ms re-measure
  interval is still measured).
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib.metadata
import logging
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from carbonoffset.core.config import OffsetConfig
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.units import KG_PER_LB
from carbonoffset.testing import FakeOneClickImpact

DOC = Path(__file__).resolve().parents[1] / "docs" / "codecarbon.md"
SANDBOX_PLACEHOLDER = "test_YOUR_SANDBOX_KEY"
PRODUCTION_PLACEHOLDER = "live_YOUR_PRODUCTION_KEY"
SANDBOX_KEY = "test_docs_SECRET_sandbox_5e6f"
PRODUCTION_KEY = "live_docs_SECRET_production_7a8b"
SECTIONS = [
    "Setup",
    "Basic usage",
    "Decorator",
    "Parameters",
    "Manual control",
    "Threshold",
    "Config file",
    "How it works",
    "Sandbox vs production",
    "Cost",
    "Troubleshooting",
]


@dataclasses.dataclass(frozen=True)
class Block:
    section: str
    language: str
    code: str
    line: int


def read_blocks() -> list[Block]:
    blocks: list[Block] = []
    section = ""
    lines = DOC.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            language, start, body = line[3:].strip(), i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(section, language, "\n".join(body) + "\n", start))
        i += 1
    return blocks


def test_page_has_the_seed_sections_in_order() -> None:
    text = DOC.read_text()
    assert text.startswith("# Using carbonoffset with CodeCarbon\n")
    headings = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS
    assert "### Where carbonoffset differs from the original handler" in text


def test_the_parameters_table_lists_the_offset_arguments_in_order() -> None:
    """The table documents the drop-in's offset arguments, each with its variable and config key."""
    from carbonoffset.codecarbon import OFFSET_ARGUMENTS

    section = DOC.read_text().split("## Parameters", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    assert [name.strip() for name, _ in rows] == [f"`{name}`" for name in OFFSET_ARGUMENTS]
    for name, where in rows:
        key = name.strip().strip("`")
        assert where.strip() == f"`CODECARBON_{key.upper()}` / `{key}`"


def test_every_block_is_of_a_kind_the_runner_executes() -> None:
    blocks = read_blocks()
    assert {b.language for b in blocks} <= {"python", "bash", "ini"}, [b.language for b in blocks]
    with_python = {b.section for b in blocks if b.language == "python"}
    assert {"Basic usage", "Decorator", "Manual control", "Threshold", "Config file"} <= with_python


class Runner:
    """Runs the page's blocks in one namespace, like a script."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, production_url: str) -> None:
        self.monkeypatch = monkeypatch
        self.production_url = production_url
        self.namespace: dict[str, Any] = {"__name__": "__doc_codecarbon__"}
        self.config_file: Path | None = None
        self.section_patch = pytest.MonkeyPatch()

    def enter_section(self) -> None:
        """A config file shown in a section applies to that section only."""
        if self.config_file is not None:
            self.config_file.unlink()
            self.config_file = None
        self.section_patch.undo()

    def run(self, block: Block) -> None:
        code = block.code.replace(SANDBOX_PLACEHOLDER, SANDBOX_KEY).replace(
            PRODUCTION_PLACEHOLDER, PRODUCTION_KEY
        )
        if block.language == "bash":
            self._run_shell(code, block)
        elif block.language == "ini":
            self._write_config(code)
        else:
            self._run_python(code, block)

    def _run_shell(self, code: str, block: Block) -> None:
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[:2] == ["pip", "install"]:
                for requirement in words[2:]:
                    name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]
                    assert importlib.metadata.version(name), f"{name} (line {block.line}) is not installable"
            elif words[0] == "export" and len(words) == 2 and "=" in words[1]:
                name, value = words[1].split("=", 1)
                self.monkeypatch.setenv(name, value)
            else:
                pytest.fail(f"docs/codecarbon.md line {block.line}: the runner cannot execute {line!r}")

    def _write_config(self, code: str) -> None:
        parser = configparser.ConfigParser()
        parser.read_string(code)
        for key in parser["codecarbon"]:  # the file must be what is read, until the section ends
            self.section_patch.delenv(f"CODECARBON_{key.upper()}", raising=False)
        self.config_file = Path.cwd() / ".codecarbon.config"
        self.config_file.write_text(code)

    def _run_python(self, code: str, block: Block) -> None:
        with self.monkeypatch.context() as mp:
            if PRODUCTION_KEY in code:
                mp.setenv("CODECARBON_OFFSET_API_URL", self.production_url)
            # pad with blank lines so tracebacks give the line number in the markdown file
            exec(compile("\n" * block.line + code, str(DOC), "exec"), self.namespace)  # noqa: S102


def test_every_block_runs_against_the_local_server(
    server: FakeOneClickImpact,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.INFO)
    package_logger = logging.getLogger("carbonoffset")
    level = package_logger.level
    request.addfinalizer(lambda: package_logger.setLevel(level))  # the page sets it to INFO
    monkeypatch.setenv("CODECARBON_OFFSET_API_URL", server.url)
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", str(ledger_path))
    monkeypatch.setenv("CODECARBON_LOG_LEVEL", "error")
    monkeypatch.setenv("CODECARBON_FORCE_RAM_POWER", "1000000")
    monkeypatch.setenv("CODECARBON_FORCE_CARBON_INTENSITY_G_CO2E_KWH", "1000000")
    monkeypatch.setenv("CODECARBON_MEASURE_POWER_SECS", "0.02")  # measured even when train() is very fast
    blocks = read_blocks()
    with FakeOneClickImpact(environment="production") as production:
        runner = Runner(monkeypatch, production.url)
        captured_before: dict[str, int] = {}
        section = None
        for block in blocks:
            if block.section != section:
                section = block.section
                runner.enter_section()
                captured_before[section] = len(server.captures)
            runner.run(block)
            ns = runner.namespace
            if block.section == "Basic usage" and "emissions_kg" in ns:
                assert isinstance(ns["emissions_kg"], float) and ns["emissions_kg"] > 0
            if block.section == "Config file" and block.language == "python":
                config = ns["tracker"].offset_config
                assert ns["tracker"].offset_handler is not None
                assert (config.offset_threshold, config.offset_environment) == (1.0, "sandbox")
                assert ns["tracker"]._country_iso_code == "FRA"
            if block.section == "How it works" and block.language == "python":
                # it read the sandbox account the trackers above wrote (environment restored after the file)
                balance = ns["balance"]
                assert balance.recorded_kg > 1.0 and balance.offset_kg > 1.0
                assert balance.offset_kg == pytest.approx(KG_PER_LB * server.total_lb())
        runner.enter_section()
        production_captures = production.captures

    captured_after = {name: len(server.captures) for name in captured_before}
    ns = runner.namespace
    # the examples that run a training bought offsets on the sandbox server ...
    sections = list(captured_before)
    for name in ("Basic usage", "Decorator", "Manual control"):
        following = sections[sections.index(name) + 1]
        assert captured_before[following] > captured_before[name], f"no offset bought in {name!r}"
    assert ns["bought"] is True and isinstance(ns["weights"], np.ndarray)
    assert isinstance(ns["score"], float)
    # ... and the production example on the production server, under its own ledger account
    assert production_captures and all(c.carbon_captured >= 1 for c in production_captures)
    assert captured_after["Sandbox vs production"] == captured_before["Sandbox vs production"]

    out = capsys.readouterr().out
    assert "offset_threshold must be at least 0.5" in out and "'production' or 'sandbox'" in out
    assert "6 0.278" in out  # the cost example
    end_lines = [r.getMessage() for r in caplog.records if r.name == "carbonoffset"]
    assert end_lines and all(line.startswith("carbonoffset: recorded ") for line in end_lines)
    assert "\nrecorded " in "\n" + out  # "What was bought" printed the report's summary
    assert "********" in out  # the config-file example prints the settings without the key

    with Ledger(ledger_path) as ledger:
        sandbox = OffsetConfig(offset_api_key=SANDBOX_KEY, offset_environment="sandbox").account
        production_account = OffsetConfig(
            offset_api_key=PRODUCTION_KEY, offset_environment="production"
        ).account
        assert set(ledger.accounts()) == {sandbox, production_account}
        for account, fake in ((sandbox, server), (production_account, production)):
            confirmed = ledger.offsets(account, states=("confirmed",))
            assert sum(o.amount_lb for o in confirmed) == fake.total_lb() > 0  # every purchase exactly once
            assert not ledger.offsets(account, states=("intent", "unknown", "failed"))
    for secret in (SANDBOX_KEY, PRODUCTION_KEY):
        assert secret not in out and secret not in caplog.text
        assert secret.encode() not in ledger_path.read_bytes()
