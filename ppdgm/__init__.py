"""ppdgm: deep generative models as Pyro programs, pluggable engines, ArviZ diagnostics."""

from ppdgm import data, diagnostics, inference, models
from ppdgm.fit import Fit, load

__all__ = ["Fit", "load", "data", "models", "inference", "diagnostics", "evaluate"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "evaluate":
        import importlib

        return importlib.import_module("ppdgm.evaluate")
    raise AttributeError(name)
