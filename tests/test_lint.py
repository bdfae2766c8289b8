"""Lint, format and types as part of the test command: ruff and mypy, configured in pyproject.toml.

Each runs as a subprocess from the repository root so it reads that configuration; a failure
prints what the tool printed. mypy keeps its cache in ``.mypy_cache`` (ignored by git), so a
second run checks only what changed.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what ruff looks at: the package, the tests, the benchmarks, the tutorials' runner and the docs' config
RUFF_PATHS = ["ppdgm", "tests", "benchmarks", "tutorials", "docs/conf.py"]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("ruff", "check", *RUFF_PATHS), id="ruff-check"),
        pytest.param(("ruff", "format", "--check", *RUFF_PATHS), id="ruff-format"),
        pytest.param(("mypy",), id="mypy"),  # the files and settings are [tool.mypy]'s
    ],
)
@pytest.mark.timeout(660)  # mypy alone takes minutes on a loaded 2-core machine
def test_tool_passes(command):
    result = run_tool(*command)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
