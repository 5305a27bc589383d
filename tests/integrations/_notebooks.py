"""Run a notebook the way it is committed: through ``scripts/run_notebooks.py``, twice in a row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_notebooks.py"
NOTEBOOK_KEY = "test_notebook_demo_key"


def run_twice(name: str, tmp_path: Path) -> str:
    """Execute ``notebooks/<name>.ipynb`` twice in a row in its own folder (``notebooks/``), as a user
    re-running it would; return the text outputs of the second run.

    Fails when a cell raises in either run (the notebooks assert their own figures), when a kernel
    prints a traceback (at shutdown too: the script checks its kernels' stderr), or when a run leaves
    a file in ``notebooks/``.
    """
    import nbformat

    into = tmp_path / "executed"
    into.mkdir()
    env = dict(os.environ)
    for variable, folder in (
        ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
        ("JUPYTER_DATA_DIR", "jupyter-data"),
        ("IPYTHONDIR", "ipython"),
        ("MPLCONFIGDIR", "mpl"),
    ):
        (tmp_path / folder).mkdir()
        env[variable] = str(tmp_path / folder)
    env["OMP_NUM_THREADS"] = "1"  # the kernel's torch: steady on a busy 2-core machine
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    before = sorted(p.name for p in (ROOT / "notebooks").iterdir())
    result = subprocess.run(
        [sys.executable, str(SCRIPT), name, name, "--into", str(into)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in (ROOT / "notebooks").iterdir()) == before  # nothing left behind
    notebook = nbformat.read(into / f"{name}.ipynb", as_version=4)
    outputs = "\n".join(
        str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "NOTEBOOK OK" in outputs, outputs
    assert NOTEBOOK_KEY not in outputs  # the key never shows, not even in a repr
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, "the notebook's plot is missing"
    return outputs
