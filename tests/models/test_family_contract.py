"""Every registered zoo family keeps the written contract (ppdgm.models.family), as zuko's flow tests
do: it is parametrized over ``ppdgm.models.MODELS``, so a family is covered the day it is registered.

Each family is built from a tiny slice of its first dataset (``TINY`` keeps the networks small),
rebuilt from its ``spec``, and scored and sampled with the shapes the protocol promises.
"""

import inspect
import json

import pyro
import pytest
import torch

from ppdgm.data import DATASETS, Dataset, load_dataset
from ppdgm.models import MODELS, model_class
from ppdgm.models import family as protocols

ROWS = 24

# small networks, so the whole file stays fast on one core; a family absent here is built as from_data gives it
TINY = {
    "ppca": {"latent_features": 2},
    "bnn": {"hidden_features": (4,)},
    "gan": {"hidden_features": (8,), "critic_hidden_features": (8,)},
    "ebm": {"hidden_features": (8,), "sample_steps": 5},
    "score": {"hidden_features": (8,), "num_scales": 5},
    "flow": {"num_layers": 1, "hidden_features": (8,)},
    "made": {"hidden_features": (8,)},
    "nade": {"hidden_features": 4},
    "timeseries": {"context_length": 6, "window": 8, "hidden_features": 4},
    "vae": {"latent_features": 2, "hidden_features": (8,)},
    "cvae": {"latent_features": 2, "hidden_features": (8,)},
    "ssvae": {"latent_features": 2, "hidden_features": (8,)},
    "rbm": {"hidden_units": 4},
    "dbm": {"hidden_units": (4, 3)},
    "mdbm": {"hidden_units": 4, "top_units": 3},
    "dbn": {"hidden_units": (4, 3)},
}

# cheap settings of the log-likelihood estimators (AIS, importance sampling, ODEs)
LIKELIHOOD_OPTIONS = {
    "rbm": {"method": "exact"},
    "dbm": {"method": "exact", "num_samples": 4},
    "mdbm": {"method": "ais", "num_runs": 8, "num_betas": 50, "seed": 0, "num_samples": 4},
    "dbn": {"method": "exact", "num_samples": 4},
    "vae": {"k": 4},
    "cvae": {"k": 4},
    "ssvae": {"k": 4},
    "score": {"num_steps": 4},
    "gan": {"num_samples": 50},
}

# the protocol each default engine asks for (each engine's ``input``)
ENGINE_PROTOCOL = {
    "svi": protocols.PyroProgram,
    "nuts": protocols.PyroProgram,
    "hmc": protocols.PyroProgram,
    "chees": protocols.PyroProgram,
    "pcd": protocols.PersistentChains,
    "score_matching": protocols.Denoising,
    "adversarial": protocols.Adversarial,
    "greedy": protocols.LayerStack,
}


def synthetic_series():
    """A seasonal count series standing in for a dataset not bundled in this checkout."""
    t = torch.arange(120.0)
    return Dataset(
        50 + 40 * torch.sin(2 * torch.pi * t / 11) + torch.rand(120, generator=torch.Generator().manual_seed(0)),
        None,
        "seasonal",
    )


def tiny_dataset(cls):
    name = cls.datasets[0]
    if name not in DATASETS:  # e.g. sunspots before it is bundled
        return synthetic_series()
    data = load_dataset(name, n=ROWS)
    if data.x.dim() == 1:
        return data
    return Dataset(data.x[:ROWS], None if data.y is None else data.y[:ROWS], data.name, data.image_shape)


def build(name):
    cls = model_class(name)
    data = tiny_dataset(cls)
    torch.manual_seed(0)
    model = cls.from_data(data, **TINY.get(name, {}))
    if isinstance(model, protocols.PredictsFromDraws):  # prior draws stand in for the sampler's posterior
        x, _y = model.data_args(data)
        draws = pyro.infer.Predictive(model.model, num_samples=3)(x, None)
        model.attach_posterior({k: v.unsqueeze(0) for k, v in draws.items() if k != "y"})
    return model, data


def log_likelihood(name, model, args):
    torch.manual_seed(1)
    options = LIKELIHOOD_OPTIONS.get(name, {})
    params = list(inspect.signature(model.log_likelihood).parameters)
    if len(args) > 1 and len(params) > 1 and params[1] in ("y", "t0"):  # scored given labels, targets or times
        return model.log_likelihood(args[0], args[1], **options)
    return model.log_likelihood(args[0], **options)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_family_keeps_the_contract(name):
    model, data = build(name)
    assert isinstance(model, protocols.Family)
    assert isinstance(model, ENGINE_PROTOCOL[model.default_engine])
    assert isinstance(model.engine_config, dict) and set(model.datasets) and isinstance(model.support, str)

    spec = model.spec
    assert spec["name"] == name and json.loads(json.dumps(spec)) == spec
    rebuilt = model_class(spec["name"])(**spec["kwargs"])
    assert rebuilt.spec == spec
    state = model.state_dict()
    assert {k: getattr(v, "shape", None) for k, v in rebuilt.state_dict().items()} == {
        k: getattr(v, "shape", None) for k, v in state.items()
    }
    rebuilt.load_state_dict(state)

    args = model.data_args(data)
    n = args[0].shape[0]
    ll = log_likelihood(name, model, args)
    assert ll.shape == (n,) and torch.isfinite(ll).all()
    assert torch.allclose(log_likelihood(name, rebuilt, args), ll, rtol=1e-4, atol=1e-4)

    torch.manual_seed(2)
    if isinstance(model, protocols.PredictsFromDraws):  # draws of targets at given inputs
        assert model.sample(5, x=args[0][:3]).shape == (5, 3)
    else:
        assert model.sample(5).shape == (5, *args[0].shape[1:])
