"""A zoo family's ``spec``, derived from the arguments its constructor was called with.

A class that inherits :class:`ConstructorSpec` records the bound arguments of the outermost
``__init__`` call (defaults applied) as plain data, so that ``spec`` is
``{"name": <its ppdgm.models.MODELS key>, "kwargs": <those arguments>}`` and
``MODELS[name](**kwargs)`` rebuilds it, with no family restating its own arguments. Tuples
become lists, networkx graphs (and :class:`ppdgm.graphs.LayerGraph`) node-link data that rebuilds
an equal graph, paths strings; tensors are refused (a spec is JSON, weights live in the Fit).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

_RECORD = "_constructor_arguments"


class ConstructorSpec:
    """Mixin: ``spec`` is the outermost constructor call's arguments (see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_arguments", False):
            cls.__init__ = _recording(init, cls.__qualname__)  # type: ignore[method-assign]  # the mixin's purpose

    @property
    def spec(self) -> dict:
        return {"name": registry_name(type(self)), "kwargs": dict(self.__dict__[_RECORD])}


def registry_name(cls) -> str:
    """The ``ppdgm.models.MODELS`` key that names ``cls`` exactly (a subclass is not its parent)."""
    from ppdgm.models import MODELS

    target = f"{cls.__module__}:{cls.__qualname__}"
    for name, path in MODELS.items():
        if path == target:
            return name
    raise AttributeError(f"{cls.__qualname__} is not registered in ppdgm.models.MODELS, so it has no spec")


def _recording(init, owner: str):
    signature = inspect.signature(init)
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{owner}.__init__ takes *{p.name}; a spec needs named constructor arguments")

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        outermost = _RECORD not in self.__dict__
        if outermost:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            # written straight into __dict__: it precedes nn.Module.__init__ and is no attribute of torch's
            self.__dict__[_RECORD] = {
                name: plain_data(value, name) for name, value in list(bound.arguments.items())[1:]
            }
        init(self, *args, **kwargs)

    __init__.__dict__["_records_arguments"] = True
    return __init__


def plain_data(value, name: str = "value"):
    """``value`` as JSON-ready data that a constructor accepts back in its place."""
    import networkx as nx

    from ppdgm.graphs import LayerGraph, graph_to_json

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, LayerGraph):
        return value.to_json()
    if isinstance(value, nx.Graph):
        return graph_to_json(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): plain_data(v, f"{name}[{k!r}]") for k, v in value.items()}
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(
        f"{name}: a zoo family's constructor arguments must be plain data (numbers, strings, lists, "
        f"dicts, networkx graphs) so its spec can rebuild it, got {type(value).__name__}"
    )
