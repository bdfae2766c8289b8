"""Engines run with their ``threads`` torch CPU threads and give the caller back its own count."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppdgm.ais import annealed_importance_sampling
from ppdgm.inference.callbacks import Callback
from ppdgm.inference.chees import ChEES
from ppdgm.inference.svi import SVI
from ppdgm.models.rbm import RBM
from ppdgm.threads import torch_threads


@pytest.fixture
def caller_threads():
    """The caller runs with 3 threads (the suite runs with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


class SeesThreads(Callback):
    def __init__(self):
        self.seen = set()

    def on_step(self, step, info):
        self.seen.add(torch.get_num_threads())


def normal_mean(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


X = torch.tensor([0.3, 1.2, -0.4, 0.9])


def test_block_runs_with_its_threads_and_restores_the_callers_even_on_error(caller_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == caller_threads
    with pytest.raises(KeyError), torch_threads(2):
        assert torch.get_num_threads() == 2
        raise KeyError("inside")
    assert torch.get_num_threads() == caller_threads
    with torch_threads(None):
        assert torch.get_num_threads() == caller_threads


@pytest.mark.parametrize("threads, inside", [(1, {1}), (2, {2}), (None, {3})])
def test_sampler_and_trainer_steps_see_the_engines_threads(caller_threads, threads, inside):
    chees = ChEES(num_chains=4, num_warmup=5, num_samples=5, seed=0, progress=False)
    svi = SVI(num_steps=5, lr=0.01, seed=0, progress=False)
    for engine, args in ((chees, (normal_mean, X)), (svi, (normal_mean, None, X))):
        engine.threads, seen = threads, SeesThreads()
        engine.run(*args, callbacks=[seen])
        assert seen.seen == inside, engine.name
        assert torch.get_num_threads() == caller_threads


def test_ais_runs_with_one_thread_by_default_and_restores_the_callers(caller_threads, monkeypatch):
    import ppdgm.ais

    seen, transition = set(), ppdgm.ais._transition

    def counted(*args):
        seen.add(torch.get_num_threads())
        return transition(*args)

    monkeypatch.setattr(ppdgm.ais, "_transition", counted)
    annealed_importance_sampling(RBM(features=6, hidden_units=4).energy_graph(), num_runs=8, num_betas=20, seed=0)
    assert seen == {1} and torch.get_num_threads() == caller_threads


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "1"])
def test_bad_threads_refused_by_name(bad):
    with pytest.raises(ValueError, match="threads must be a positive int or None"):
        annealed_importance_sampling(RBM(features=6, hidden_units=4).energy_graph(), threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive int or None"), torch_threads(bad):
        pass
