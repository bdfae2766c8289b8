"""Sphinx configuration for the ppdgm documentation site (``make docs``).

The family and engine pages are written from the registries (``ppdgm.models.MODELS``,
``ppdgm.inference.ENGINES``) at build time, and the tutorials are copied in from ``tutorials/``
with the outputs they were stored with, so a newly registered family, engine or notebook gets its
page without an edit here. Everything written at build time lands in ``docs/generated/``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "generated"
sys.path.insert(0, str(ROOT))

import ppdgm  # noqa: E402  (after the path so the build documents this checkout)
from ppdgm.inference import ENGINES  # noqa: E402
from ppdgm.models import MODELS  # noqa: E402

project = "ppdgm"
author = "the ppdgm developers"
copyright = "the ppdgm developers"
release = ppdgm.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# docstrings: Google-style "Args:" sections and RST; members in source order
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# members defined in each module only: a name re-exported by a package (``ppdgm.Fit``) is
# documented once, where it is defined (``ppdgm.fit.Fit``), so cross-references are unambiguous
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# notebooks are shown with the outputs stored in them (``make tutorials`` refreshes those)
nb_execution_mode = "off"
nb_output_stderr = "remove"  # progress bars and warnings of the stored run are noise on a page
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = "ppdgm"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}


def _registered(registry: dict[str, str], name: str) -> tuple[str, str, type]:
    """``(module, class name, class)`` of a registry entry ``"module:Class"``."""
    module, cls = registry[name].split(":")
    return module, cls, getattr(importlib.import_module(module), cls)


def _page(name: str, registry: dict[str, str], intro: str) -> str:
    """A registry entry's page: its title, ``intro`` and the class's documentation.

    ``:no-index:`` because the API reference documents the class too, and cross-references go there.
    """
    module, cls, _ = _registered(registry, name)
    return f"""# `{name}`: {cls}

{intro}

```{{eval-rst}}
.. autoclass:: {module}.{cls}
   :no-index:
   :members:
   :show-inheritance:
```
"""


def _family_page(name: str) -> str:
    family = _registered(MODELS, name)[2]
    engine = family.default_engine
    engine_module, engine_cls, _ = _registered(ENGINES, engine)
    datasets = ", ".join(f"`{d}`" for d in family.datasets)
    return _page(
        name,
        MODELS,
        f"""Registered in `ppdgm.models.MODELS` as `{name}`. It trains with the
[`{engine}`](../engines/{engine}.md) engine ({{class}}`~{engine_module}.{engine_cls}`) and suits the
bundled datasets {datasets}:

```bash
ppdgm fit {name} --data {family.datasets[0]} --out runs/{name}
```""",
    )


def _engine_page(name: str) -> str:
    engine = _registered(ENGINES, name)[2]
    families = [f"[`{f}`](../families/{f}.md)" for f in MODELS if _registered(MODELS, f)[2].default_engine == name]
    trains = f"It is the default engine of {', '.join(families)}." if families else ""
    return _page(
        name,
        ENGINES,
        f"""Registered in `ppdgm.inference.ENGINES` as `{name}`; its `run` takes input of kind
`{engine.input}` (see [the architecture](../../architecture.md)). {trains}""",
    )


def _sync_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Make ``folder`` hold exactly ``files`` (name -> content), removing what is no longer there.

    Unchanged files are left untouched, which keeps Sphinx's incremental rebuilds incremental.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in {p.name for p in folder.iterdir()} - set(files):
        (folder / stale).unlink()
    for name, content in files.items():
        path = folder / name
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)


def write_generated_pages(app) -> None:
    """One page per registered family and engine, and the tutorials copied in from ``tutorials/``."""
    _sync_folder(GENERATED / "families", {f"{n}.md": _family_page(n).encode() for n in sorted(MODELS)})
    _sync_folder(GENERATED / "engines", {f"{n}.md": _engine_page(n).encode() for n in sorted(ENGINES)})
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    _sync_folder(GENERATED / "tutorials", {p.name: p.read_bytes() for p in notebooks})


def setup(app):
    app.connect("builder-inited", write_generated_pages)
