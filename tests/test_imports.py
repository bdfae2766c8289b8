"""The import structure of ppdgm: no loops, and models and engines do not reach into each other.

Imports are read from the source (``ast``), not executed. Module-level imports run when a module
loads and must form no cycle. Imports inside functions run later and are allowed to reach
upward (e.g. ``Fit.to_arviz`` importing the ArviZ conversion); they are checked for the rules on
models and engines below.
"""

import ast
from pathlib import Path

import networkx as nx
import pytest

import ppdgm

ROOT = Path(ppdgm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str) -> tuple[set, set]:
    """``(module-level, function-level)`` ppdgm modules that ``name`` imports."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    top, deferred = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `from ppdgm.x import name` imports ppdgm.x
                target = target.rpartition(".")[0]
            if target and target != name:
                (deferred if id(node) in inside else top).add(target)
    return top, deferred


GRAPH = {name: imports(name) for name in MODULES}

# Crossings allowed between models and engines: none. Shared pieces live low in the house
# (ppdgm.logdensity, ppdgm.boltzmann, ppdgm.langevin, ppdgm.ais); a new crossing is refused here.
KNOWN_CROSSINGS: dict[str, str] = {}


def known(names):
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_CROSSINGS[n])) if n in KNOWN_CROSSINGS else n
        for n in sorted(names)
    ]


def test_the_walker_sees_known_imports():
    assert "ppdgm.fit" in GRAPH["ppdgm.inference.base"][0]
    assert "ppdgm.logdensity" in GRAPH["ppdgm.inference.chees"][0]
    assert "ppdgm.diagnostics" in GRAPH["ppdgm.fit"][1]  # Fit.to_arviz imports it when called


def test_module_level_imports_have_no_cycle():
    graph = nx.DiGraph([(a, b) for a, (top, _) in GRAPH.items() for b in top])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import loops among ppdgm modules: {cycles}"


@pytest.mark.parametrize("name", known(n for n in MODULES if n.startswith("ppdgm.models")))
def test_models_do_not_import_engines(name):
    top, deferred = GRAPH[name]
    engines = sorted(m for m in top | deferred if m.startswith("ppdgm.inference"))
    assert not engines, f"{name} imports engine modules {engines}; use ppdgm.logdensity or ppdgm.models.family"


@pytest.mark.parametrize("name", known(n for n in MODULES if n.startswith("ppdgm.inference")))
def test_engines_do_not_import_models(name):
    top, deferred = GRAPH[name]
    models = sorted(m for m in top | deferred if m.startswith("ppdgm.models"))
    assert not models, f"{name} imports model modules {models}; engines know Pyro traces, not model classes"


LOW = ("ppdgm.logdensity", "ppdgm.compiled_density")  # the log density and its compiled form


@pytest.mark.parametrize("name", LOW)
def test_log_density_sits_low(name):
    top, deferred = GRAPH[name]
    others = (top | deferred) - set(LOW)
    assert not others, f"{name} must import no ppdgm module but {LOW}, imports {others}"


def test_imports_inside_functions_have_no_cycle_either():
    graph = nx.DiGraph([(a, b) for a, (top, deferred) in GRAPH.items() for b in top | deferred])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import loops among ppdgm modules, counting imports inside functions: {cycles}"
