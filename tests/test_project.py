"""Project-level checks: lint, types, docs build, packaging hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import carbonoffset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", "carbonoffset", "tests", "benchmarks", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_the_whole_package() -> None:
    result = _run(str(BIN / "mypy"), "carbonoffset")
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    result = _run(str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_import_pulls_in_no_ml_framework() -> None:
    code = (
        "import carbonoffset, sys; "
        "bad = {'torch','lightning','transformers','keras','tensorflow','codecarbon','pandas'} & set(sys.modules); "
        "assert not bad, bad"
    )
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr


def test_all_lists_exactly_the_public_names() -> None:
    for name in carbonoffset.__all__:
        assert getattr(carbonoffset, name) is not None, name
    submodules = {"core", "integrations", "testing", "codecarbon", "demo", "cli", "plot"}
    public = {name for name in vars(carbonoffset) if not name.startswith("_")} - submodules
    assert public <= set(carbonoffset.__all__), public - set(carbonoffset.__all__)
    assert set(carbonoffset.__all__) == set(carbonoffset._LAZY) | {"__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        carbonoffset.nope  # noqa: B018


def test_typed_package_marker() -> None:
    assert (ROOT / "carbonoffset" / "py.typed").is_file()


def test_constraints_pin_cpu_torch() -> None:
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


@pytest.mark.parametrize("command", ["README.md", ".ci/run"])
def test_ci_runs_the_readme_test_command(command: str) -> None:
    readme = (ROOT / "README.md").read_text()
    test_command = 'python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e ".[dev]" && .venv/bin/python -m pytest'
    assert test_command in readme
    assert test_command in (ROOT / ".ci" / "run").read_text()
