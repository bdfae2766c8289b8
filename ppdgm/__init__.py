"""ppdgm: deep generative models as Pyro programs, pluggable engines, ArviZ diagnostics."""

import importlib

from ppdgm import data, inference, models
from ppdgm.fit import Fit, load

__all__ = ["Fit", "load", "data", "models", "inference", "diagnostics", "evaluate"]
__version__ = "0.1.0"


def __getattr__(name):
    # ArviZ and the metrics are heavy imports; load them on first use
    if name in ("diagnostics", "evaluate"):
        return importlib.import_module(f"ppdgm.{name}")
    raise AttributeError(f"module 'ppdgm' has no attribute {name!r}")
