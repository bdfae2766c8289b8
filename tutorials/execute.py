"""Run every tutorial top to bottom and store its outputs in the notebook (``make tutorials``).

Notebooks are kept in the repository with the outputs of a full run, so their figures and tables
show when browsing them. ``--short`` runs them in the test suite's short mode instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def execute(path: Path, timeout: int, workdir: Path) -> float:
    """Execute ``path`` in ``workdir`` and write it back with its outputs; return the seconds taken."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    if errors:
        raise RuntimeError(f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}")
    for cell in nb.cells:  # execution metadata changes on every run and is noise in a diff
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", type=Path, help="default: every tutorials/*.ipynb")
    p.add_argument("--short", action="store_true", help="the test suite's short mode (PPDGM_SHORT=1)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args(argv)
    if args.short:
        os.environ["PPDGM_SHORT"] = "1"
    else:
        os.environ.pop("PPDGM_SHORT", None)
    workdir = HERE / ".run"
    workdir.mkdir(exist_ok=True)
    for path in args.notebooks or sorted(HERE.glob("*.ipynb")):
        print(f"{path.name}: {execute(path, args.timeout, workdir):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
