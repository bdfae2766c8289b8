"""ppdgm: deep generative models as Pyro programs, pluggable engines, ArviZ diagnostics.

Submodules load on first use, so ``import ppdgm`` (and ``ppdgm --help``) does not import torch.
"""

import importlib

__all__ = ["Fit", "data", "diagnostics", "evaluate", "inference", "load", "models"]
__version__ = "0.1.0"

_SUBMODULES = ("data", "models", "inference", "diagnostics", "evaluate")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"ppdgm.{name}")
    if name in ("Fit", "load"):
        return getattr(importlib.import_module("ppdgm.fit"), name)
    raise AttributeError(f"module 'ppdgm' has no attribute {name!r}")
