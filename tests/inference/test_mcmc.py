"""Pyro NUTS/HMC engines: known posteriors, per-iteration records, save/load, bad input."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppdgm
from ppdgm.inference import engine_class
from ppdgm.inference.mcmc import HMC, NUTS

from known_posteriors import COV, MEAN, NN_MEAN, NN_SD, X, correlated_gaussian, max_z_scores, normal_normal

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "model,args,site,mean,sd,n,dense",
    [
        (normal_normal, (X,), "mu", [NN_MEAN], [NN_SD], 200, False),
        (correlated_gaussian, (), "z", MEAN.tolist(), COV.diag().sqrt().tolist(), 200, True),
    ],
    ids=["normal-normal", "gaussian-10d"],
)
def test_nuts_matches_analytic_posterior(model, args, site, mean, sd, n, dense):
    fit = NUTS(num_samples=n, num_warmup=150, num_chains=2, dense_mass=dense, jit_compile=True, seed=2).run(
        model, *args
    )
    draws = fit.samples[site].double().numpy()
    assert draws.shape[:2] == (2, n)
    zm, zs = max_z_scores(draws, mean, sd)
    assert zm < 4 and zs < 4, (zm, zs)
    # the kernel's records: adapted step size, acceptance near the 0.8 target, no divergences
    assert len(fit.history["step_size"][0]) == 150 + n
    # Pyro reports the running mean acceptance probability of the phase: near the 0.8 target at its end
    assert 0.6 < fit.history["mean_accept_prob"][0][-1] <= 1.0
    assert fit.history["divergences"] == [0, 0]
    stats = fit.extra["tensors"]["sample_stats"]
    assert stats["diverging"].shape == (2, n) and (stats["n_steps"] >= 1).all()
    # per draw: whether the chain moved (Pyro's public acceptance rate, counted per iteration)
    assert set(stats["acceptance_rate"].unique().tolist()) <= {0.0, 1.0}
    # the log density of a draw is the model's at that draw (both sites are unconstrained)
    for c, d in ((0, 0), (1, n - 1)):
        value = fit.samples[site][c, d]
        tr = pyro.poutine.trace(pyro.poutine.condition(model, data={site: value})).get_trace(*args)
        assert stats["lp"][c, d].item() == pytest.approx(tr.log_prob_sum().item(), rel=1e-5, abs=1e-4)


def test_hmc_static_trajectory():
    fit = HMC(num_samples=200, num_warmup=100, num_chains=2, trajectory_length=1.0, seed=0).run(normal_normal, X)
    zm, zs = max_z_scores(fit.samples["mu"].double().numpy(), [NN_MEAN], [NN_SD])
    assert zm < 4 and zs < 4
    assert fit.engine == "hmc" and engine_class("hmc") is HMC and engine_class("nuts") is NUTS


def test_save_load_round_trip(tmp_path):
    fit = NUTS(num_samples=30, num_warmup=30, num_chains=2).run(normal_normal, X)
    fit.save(tmp_path)
    back = ppdgm.load(tmp_path, model=normal_normal)
    assert torch.equal(back.samples["mu"], fit.samples["mu"])
    back.args = (X,)
    idata = back.to_arviz()
    assert idata.sample_stats["diverging"].shape == (2, 30)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data")


# -- bad input ---------------------------------------------------------------------------------
def test_discrete_latent_named():
    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"'coin'.*discrete"):
        NUTS(num_samples=5, num_warmup=5, num_chains=1).run(model)


def test_nonfinite_initial_density_names_the_site():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("impossible", torch.where(mu > 50, 0.0, -math.inf))

    with pytest.raises(ValueError, match="site 'impossible'"):
        NUTS(num_samples=5, num_warmup=5, num_chains=1, max_init_tries=3).run(model)


@pytest.mark.parametrize(
    "kw", [{"num_samples": 0}, {"num_chains": 0}, {"num_warmup": -1}, {"target_accept": 1.0}, {"max_tree_depth": 0}]
)
def test_bad_config(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        NUTS(**kw)


def test_model_must_be_callable():
    with pytest.raises(TypeError, match="model"):
        NUTS().run("not a model")


@cuda
def test_nuts_cuda_smoke():
    fit = NUTS(num_samples=50, num_warmup=50, num_chains=1).run(normal_normal, X.cuda())
    assert fit.samples["mu"].device.type == "cuda"
    assert abs(fit.samples["mu"].mean().item() - NN_MEAN) < 0.2
