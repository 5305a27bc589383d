"""Execute the notebooks in ``notebooks/`` and save them with their outputs.

The notebooks are committed executed, so that a reader on GitHub sees the
figures and the plot. Run this after changing a notebook or what it shows::

    .venv/bin/python scripts/run_notebooks.py                # all, written in place
    .venv/bin/python scripts/run_notebooks.py keras          # one (name without .ipynb)
    .venv/bin/python scripts/run_notebooks.py --check        # execute, write nothing
    .venv/bin/python scripts/run_notebooks.py --into DIR     # write the executed copies into DIR

Each notebook runs in a fresh kernel of this Python (``python3`` kernel,
ipykernel), with ``notebooks/`` as its working folder, offline
(``HF_HUB_OFFLINE=1``) and with Keras on the torch backend. Every notebook
keeps its ledger and logs in its own temporary folder, so it can run any
number of times. Exits 1 when a cell raises or when the kernel writes a
traceback to its stderr (at shutdown, say): the test suite runs this too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("lightning", "huggingface", "keras")


def execute(name: str, *, into: Path | None = None, write: bool = True, timeout_s: int = 600) -> Path:
    """Execute ``notebooks/<name>.ipynb`` in a fresh kernel (working folder ``notebooks/``) and save it
    with its outputs.

    Args:
        name: ``lightning``, ``huggingface`` or ``keras``.
        into: a folder to save the executed copy in (default: in place).
        write: ``False``: save nothing.
        timeout_s: limit for one cell, seconds.

    Returns:
        The path written (or that would have been).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised (its traceback is in the message).
    """
    import nbformat
    from nbclient import NotebookClient

    path = NOTEBOOKS / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout_s,
        kernel_name="python3",
        record_timing=False,  # no timestamps: a re-run changes only what the notebook shows
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    target = path if into is None else into / path.name
    if write:
        nbformat.write(notebook, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", choices=[[], *NAMES], help="notebooks to run (default: all)")
    parser.add_argument("--check", action="store_true", help="execute without writing the notebooks")
    parser.add_argument("--into", type=Path, help="save the executed notebooks in this folder, not in place")
    args = parser.parse_args(argv)
    names = args.names or list(NAMES)
    if os.environ.get("_CARBONOFFSET_NOTEBOOK_CHILD") != "1":
        # run in a child whose stderr is read here: the kernels inherit it, so a traceback a kernel
        # prints while shutting down (after the last cell) is seen and fails the run
        env = {
            **os.environ,
            "_CARBONOFFSET_NOTEBOOK_CHILD": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch"),
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
        command = [sys.executable, __file__, *names, *(["--check"] if args.check else [])]
        if args.into is not None:
            command += ["--into", str(args.into.resolve())]
        result = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True, check=False)
        sys.stderr.write(result.stderr)
        if result.returncode == 0 and "Traceback" in result.stderr:
            print("a kernel printed a traceback (see above): failing", file=sys.stderr)
            return 1
        return result.returncode
    for name in names:
        path = execute(name, into=args.into, write=not args.check)
        print(f"{'checked' if args.check else 'executed, saved as'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
