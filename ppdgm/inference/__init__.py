"""Engines: one file each, ``Engine(**config).run(model, ...) -> Fit``.

``ENGINES`` maps a CLI name to ``"module:Class"``, imported lazily.
"""

import importlib

from ppdgm.inference.base import Engine, NonFiniteLossError
from ppdgm.inference.svi import SVI

ENGINES: dict[str, str] = {
    "svi": "ppdgm.inference.svi:SVI",
    "adversarial": "ppdgm.inference.adversarial:Adversarial",
    "score_matching": "ppdgm.inference.score_matching:ScoreMatching",
    "nuts": "ppdgm.inference.mcmc:NUTS",
    "hmc": "ppdgm.inference.mcmc:HMC",
    "chees": "ppdgm.inference.chees:ChEES",
    "pcd": "ppdgm.inference.pcd:PersistentCD",
    "greedy": "ppdgm.inference.greedy:GreedyLayerwise",
}


def engine_class(name: str):
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Engine", "NonFiniteLossError", "SVI", "ENGINES", "engine_class"]
