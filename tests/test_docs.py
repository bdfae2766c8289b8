"""The documentation site builds with warnings as errors, as on a fresh clone, and its API reference
documents every registered family and engine."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppdgm.inference import ENGINES
from ppdgm.models import MODELS

ROOT = Path(__file__).resolve().parents[1]

for requirement in ("sphinx", "myst_nb", "pydata_sphinx_theme"):
    pytest.importorskip(requirement, reason="the docs extra is not installed: pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build a copy of the sources without anything a previous build generated; return the HTML folder."""
    tmp = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "docs", tmp / "docs", ignore=shutil.ignore_patterns("_build", "generated"))
    shutil.copytree(ROOT / "tutorials", tmp / "tutorials", ignore=shutil.ignore_patterns(".*", "*.py"))
    shutil.copy(ROOT / "README.md", tmp / "README.md")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(tmp / "docs"),
            str(tmp / "html"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert build.returncode == 0, f"sphinx-build -W failed:\n{build.stderr[-6000:]}"
    return tmp / "html"


def text_of(page: Path) -> str:
    """The words of an HTML page, without its markup."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.mark.parametrize("registry, kind", [(MODELS, "families"), (ENGINES, "engines")])
def test_every_registered_class_has_a_page_and_an_api_entry(site, registry, kind):
    for name, target in registry.items():
        module, cls = target.split(":")
        api = (site / "generated" / "api" / f"{module}.html").read_text()
        assert f'id="{module}.{cls}"' in api, f"{module}.{cls} is missing from the API reference"
        page = text_of(site / "generated" / kind / f"{name}.html")
        assert f"{name}: {cls}" in page and f"class {module}.{cls}(" in page, f"the {kind} page of {name!r}"


def test_tutorials_and_readme_sections_are_rendered(site):
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        figures = sum("image/png" in out.get("data", {}) for c in cells for out in c.get("outputs", []))
        page = (site / "generated" / "tutorials" / f"{notebook.stem}.html").read_text()
        assert page.count("<img") >= figures, f"{notebook.name}: {figures} stored figures, not all rendered"
    assert "<table" in (site / "benchmarks.html").read_text()
    assert "bench_svi.py" in text_of(site / "benchmarks.html")
    getting_started = text_of(site / "getting-started.html")
    assert "torch==2.13.0" in getting_started and "eight_schools" in getting_started
    assert (site / "architecture.html").exists()
