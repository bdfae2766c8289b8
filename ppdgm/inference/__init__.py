"""Engines: one file each, ``Engine(**config).run(model, ...) -> Fit``.

``ENGINES`` maps a CLI name to ``"module:Class"``, imported lazily.
"""

import importlib

from ppdgm.inference.base import Engine, NonFiniteLossError

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


_BY_CLASS = {target.split(":")[1]: name for name, target in ENGINES.items()}


def __getattr__(attr):
    """``from ppdgm.inference import NUTS, ChEES, PersistentCD ...`` imports the engine on first use."""
    if attr in _BY_CLASS:
        return engine_class(_BY_CLASS[attr])
    if attr == "annealed_importance_sampling":
        from ppdgm.ais import annealed_importance_sampling

        return annealed_importance_sampling
    raise AttributeError(f"module 'ppdgm.inference' has no attribute {attr!r}")


__all__ = ["Engine", "NonFiniteLossError", "ENGINES", "engine_class", "annealed_importance_sampling", *_BY_CLASS]
