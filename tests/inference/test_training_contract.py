"""The contract every training engine keeps, checked for each one registered in ``ENGINES``.

An engine is covered the day it is registered: it is a training engine when its ``input`` is not
``"posterior"``, and ``CASES`` gives each input kind a tiny problem. A registered training engine
whose input kind has no case here fails loudly instead of being skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppdgm
from ppdgm.inference import ENGINES, NonFiniteLossError, engine_class
from ppdgm.inference.callbacks import Callback

COMMON = {"num_steps": 12, "checkpoint_every": 3, "seed": 0, "progress": False}
STOP_AT, POISON_AFTER = 5, 2


@dataclass
class Case:
    """A tiny problem for one input kind: how to build it, run an engine on it, read its trained
    tensors, and make its next losses non-finite without touching its parameters."""

    config: dict
    build: Callable[[], object]
    run: Callable  # (engine, problem, **run_kwargs) -> Fit
    weights: Callable[[object], dict]
    poison: Callable[[object], None]
    load_model: Callable[[object], object] = lambda problem: None


def _store_weights(_problem) -> dict:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _module_weights(module) -> dict:
    """Parameters and buffers; extra state (an RBM's kept chains) is not a weight."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _poisonable(module):
    """Persistent CD adds ``regularizer()`` to the loss: a zero one until ``poisoned``, then NaN,
    which poisons the loss and leaves the weights alone."""
    params = [p for p in module.parameters() if p.requires_grad]
    module.poisoned = False
    module.regularizer = lambda: sum(p.sum() for p in params) * (math.nan if module.poisoned else 0.0)
    return module


# -- program (SVI): a plain Pyro function with a global latent and a param -------------------


class _Program:
    poisoned = False

    def __call__(self, x):
        scale = pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)
        if self.poisoned:
            pyro.factor("poison", torch.tensor(math.inf))


def _program_case() -> Case:
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([2.0, 0.5])
    return Case(
        config={"batch_size": 10, "lr": 0.05},
        build=_Program,
        run=lambda engine, program, **kw: engine.run(program, None, x, **kw),
        weights=_store_weights,
        poison=lambda program: setattr(program, "poisoned", True),
        load_model=lambda program: program,
    )


# -- energy (persistent CD): an RBM --------------------------------------------------------------


def _binary(n, d, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(seed))


def _energy_case() -> Case:
    from ppdgm.models.rbm import RBM

    x = _binary(40, 6)

    def build():
        torch.manual_seed(1)
        return _poisonable(RBM(features=6, hidden_units=4))

    return Case(
        config={"batch_size": 10, "num_chains": 6, "lr": 0.05},
        build=build,
        run=lambda engine, rbm, **kw: engine.run(rbm, x, **kw),
        weights=_module_weights,
        poison=lambda rbm: setattr(rbm, "poisoned", True),
    )


# -- denoising (score matching): a small score network -------------------------------------------


def _denoising_case() -> Case:
    from ppdgm.models.score import ScoreModel

    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(1)
        model = ScoreModel(features=2, hidden_features=[16])  # registered, so its Fit rebuilds on load
        model.poisoned = False
        loss = model.denoising_loss
        model.denoising_loss = lambda batch: loss(batch) * (math.nan if model.poisoned else 1.0)
        return model

    return Case(
        config={"batch_size": 16, "lr": 1e-2},
        build=build,
        run=lambda engine, model, **kw: engine.run(model, x, **kw),
        weights=_module_weights,
        poison=lambda model: setattr(model, "poisoned", True),
    )


# -- adversarial: a GAN's generator program and critic --------------------------------------------


def _adversarial_case() -> Case:
    from ppdgm.models.gan import GAN

    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(1)
        gan = GAN(features=2, hidden_features=[8], critic_hidden_features=[8], spectral_norm=True)
        forward = gan.critic.forward
        gan.critic.poisoned = False
        gan.critic.forward = lambda *a: forward(*a) * (math.nan if gan.critic.poisoned else 1.0)
        return gan

    return Case(
        config={"batch_size": 16, "n_critic": 2, "ema": 0.9},
        build=build,
        run=lambda engine, gan, **kw: engine.run(gan.model, gan.critic, x, **kw),
        weights=_module_weights,
        poison=lambda gan: setattr(gan.critic, "poisoned", True),
    )


# -- layers (greedy layer-wise): a DBN ------------------------------------------------------------


def _layers_case() -> Case:
    from ppdgm.models.dbn import DBN

    x = _binary(40, 6)

    def build():
        torch.manual_seed(1)
        dbn = DBN(sizes=[6, 4, 3])
        for rbm in dbn.stack:
            _poisonable(rbm)
        return dbn

    return Case(
        config={"batch_size": 10, "num_chains": 10, "lr": 0.05},
        build=build,
        run=lambda engine, dbn, **kw: engine.run(dbn, x, **kw),
        weights=_module_weights,
        poison=lambda dbn: [setattr(rbm, "poisoned", True) for rbm in dbn.stack],
    )


CASES = {
    "program": _program_case,
    "energy": _energy_case,
    "denoising": _denoising_case,
    "adversarial": _adversarial_case,
    "layers": _layers_case,
}

TRAINING = sorted(name for name in ENGINES if engine_class(name).input != "posterior")


def test_every_registered_training_engine_has_a_case():
    missing = {name: engine_class(name).input for name in TRAINING if engine_class(name).input not in CASES}
    assert not missing, f"training engines whose input kind has no contract case: {missing}; add one to CASES"


def _setup(name, **config):
    case = CASES[engine_class(name).input]()
    engine = engine_class(name)(**{**COMMON, **case.config, **config})
    return case, engine


class _StopAt(Callback):
    def __init__(self, step):
        self.step, self.seen = step, []

    def on_step(self, step, info):
        self.seen.append(step)
        return step == self.step


@pytest.mark.parametrize("name", TRAINING)
def test_kill_and_resume_equals_an_uninterrupted_run(name, tmp_path):
    case, engine = _setup(name)
    whole = case.build()
    fit_whole = case.run(engine, whole)
    expected = case.weights(whole)

    part = case.build()
    case.run(engine, part, checkpoint_dir=tmp_path, callbacks=[_StopAt(STOP_AT)])
    resumed = case.build()
    fit_resumed = case.run(engine, resumed, checkpoint_dir=tmp_path, resume=True)
    got = case.weights(resumed)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.allclose(expected[k], got[k], atol=1e-6), k
    assert fit_resumed.history["loss"] == pytest.approx(fit_whole.history["loss"])


@pytest.mark.parametrize("name", TRAINING)
def test_a_callback_stops_the_run(name):
    case, engine = _setup(name)
    stop = _StopAt(STOP_AT)
    fit = case.run(engine, case.build(), callbacks=[stop, lambda step, info: None])
    assert stop.seen == list(range(1, STOP_AT + 1))
    assert len(fit.history["loss"]) == STOP_AT < COMMON["num_steps"]


@pytest.mark.parametrize("name", TRAINING)
def test_non_finite_loss_names_the_step_keeps_and_saves_the_last_finite_state(name, tmp_path):
    case, engine = _setup(name, checkpoint_every=None)
    problem = case.build()
    kept = {}

    def poison(step, info):
        if step == POISON_AFTER:
            kept.update(case.weights(problem))
            case.poison(problem)

    with pytest.raises(NonFiniteLossError, match=f"at step {POISON_AFTER}") as err:
        case.run(engine, problem, checkpoint_dir=tmp_path, callbacks=[poison])
    assert err.value.fit.num_steps == POISON_AFTER
    after = case.weights(problem)
    for k in kept:
        assert torch.equal(kept[k], after[k]), k
    assert list(tmp_path.rglob("fit.json")), "the last finite state was not saved"


@pytest.mark.parametrize("name", TRAINING)
def test_fit_saves_loads_and_converts_to_arviz(name, tmp_path):
    case, engine = _setup(name)
    problem = case.build()
    fit = case.run(engine, problem)
    assert fit.timing["steps"] == len(fit.history["loss"]) >= COMMON["num_steps"]
    fit.save(tmp_path)
    model = case.load_model(problem)
    loaded = ppdgm.load(tmp_path, model=model)
    if model is not None:  # a user's own program: they hand back the program and its data
        loaded.args = fit.args
    assert loaded.engine == fit.engine and loaded.config == fit.config
    assert loaded.history["loss"] == pytest.approx(fit.history["loss"])
    assert isinstance(fit.to_arviz(num_samples=10), az.InferenceData)
    assert isinstance(loaded.to_arviz(num_samples=10), az.InferenceData)
