"""ChEES-HMC: known posteriors, R-hat across chains, exact batched log density, bad input."""

import itertools
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer.mcmc.util import initialize_model

import ppdgm
from ppdgm.inference.adaptation import halton, warmup_windows
from ppdgm.inference.chees import ChEES
from ppdgm.logdensity import BatchedLogDensity

from known_posteriors import COV, MEAN, NN_MEAN, NN_SD, X, correlated_gaussian, max_z_scores, normal_normal

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])
Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])


@pytest.mark.parametrize(
    "model,args,site,mean,sd",
    [
        (normal_normal, (X,), "mu", [NN_MEAN], [NN_SD]),
        (correlated_gaussian, (), "z", MEAN.tolist(), COV.diag().sqrt().tolist()),
    ],
    ids=["normal-normal", "gaussian-10d"],
)
def test_chees_matches_analytic_posterior(model, args, site, mean, sd):
    fit = ChEES(num_chains=64, num_warmup=200, num_samples=300, jit_compile=True, seed=1).run(model, *args)
    draws = fit.samples[site].double().numpy()
    assert draws.shape[:2] == (64, 300)
    zm, zs = max_z_scores(draws, mean, sd)
    assert zm < 4 and zs < 4, (zm, zs)
    rhat = az.rhat(fit.to_arviz(log_likelihood=False))[site].values
    assert np.max(rhat) < 1.01
    assert fit.extra["divergences"] == 0
    # the adaptation went somewhere sensible: a trajectory of several steps, acceptance near target
    assert fit.extra["trajectory_length"] > 2 * fit.extra["step_size"]
    assert 0.5 < np.mean(fit.history["accept_mean"][200:]) < 0.99


def test_batched_log_density_equals_pyro_potential():
    """Constrained sites (HalfCauchy tau) need the log-Jacobian: compare with Pyro's own potential."""
    density = BatchedLogDensity(eight_schools, (SIGMA, Y))
    _, potential_fn, _transforms, _ = initialize_model(eight_schools, (SIGMA, Y))
    u = torch.randn(5, density.dim, generator=torch.Generator().manual_seed(0)) * 2
    ours = -density.log_density(u)
    for c in range(5):
        z = {s.name: u[c, s.offset : s.offset + s.numel].reshape(s.ushape) for s in density.sites}
        assert torch.allclose(ours[c], potential_fn(z), rtol=1e-5, atol=1e-4)


def test_jit_and_eager_agree():
    density = BatchedLogDensity(eight_schools, (SIGMA, Y))
    u = torch.randn(16, density.dim)
    eager = density.potential_and_grad(u)
    density.compile(u)
    v = torch.randn(16, density.dim)
    jit, ref = density.potential_and_grad(v), BatchedLogDensity(eight_schools, (SIGMA, Y)).potential_and_grad(v)
    assert torch.allclose(jit[0], ref[0]) and torch.allclose(jit[1], ref[1], atol=1e-5)
    assert eager[0].shape == (16,)


def test_eight_schools_plain_pyro_model_reproducible_and_saved(tmp_path):
    eng = ChEES(num_chains=16, num_warmup=60, num_samples=20, max_leapfrog_steps=16, seed=3)
    a, b = eng.run(eight_schools, SIGMA, Y), eng.run(eight_schools, SIGMA, Y)
    assert a.samples["theta"].shape == (16, 20, 8) and a.samples["tau"].shape == (16, 20)
    assert (a.samples["tau"] > 0).all()
    assert torch.equal(a.samples["mu"], b.samples["mu"])
    assert len(a.history["step_size"]) == 80
    assert set(a.timing) >= {"init_seconds", "warmup_seconds", "sample_seconds", "grad_evals"}
    a.save(tmp_path)
    back = ppdgm.load(tmp_path, model=eight_schools)
    assert torch.equal(back.samples["theta"], a.samples["theta"])
    back.args = (SIGMA, Y)
    idata = back.to_arviz()
    assert idata.sample_stats["energy"].shape == (16, 20)
    assert np.all(np.isfinite(az.bfmi(idata)))


def test_prior_init_starts_the_chains_at_prior_draws():
    """With no data the posterior is the prior: chains started at prior draws stay distributed as
    the prior after an exact HMC step (uniform(-2, 2) starts would put loc's mean near 0)."""

    def prior_only():
        pyro.sample("loc", dist.Normal(3.0, 2.0).expand([2]).to_event(1))
        pyro.sample("scale", dist.LogNormal(0.0, 0.5))

    fit = ChEES(num_chains=2000, num_warmup=0, num_samples=1, init="prior", seed=0).run(prior_only)
    loc, log_scale = fit.samples["loc"].reshape(-1, 2), fit.samples["scale"].log().reshape(-1)
    assert torch.allclose(loc.mean(0), torch.tensor([3.0, 3.0]), atol=0.2)  # 4.5 standard errors
    assert torch.allclose(loc.std(0), torch.tensor([2.0, 2.0]), atol=0.15)
    assert abs(log_scale.mean()) < 0.05 and abs(log_scale.std() - 0.5) < 0.04


def test_halton_and_windows():
    assert [halton(n) for n in range(1, 5)] == [0.5, 0.25, 0.75, 0.125]
    assert warmup_windows(10) == []


@given(st.integers(20, 5000))
@settings(max_examples=30, deadline=None)
def test_warmup_windows_grow_inside_warmup(w):
    ends = warmup_windows(w)
    assert ends and ends[-1] == int(0.9 * w) and ends[0] > int(0.15 * w)
    assert all(b > a for a, b in itertools.pairwise(ends))


# -- bad input ---------------------------------------------------------------------------------
@given(st.one_of(st.integers(-3, 1), st.floats(2, 10), st.just(True), st.just("8")))
@settings(max_examples=10, deadline=None)
def test_fewer_than_two_chains_is_an_error(n):
    with pytest.raises(ValueError, match="num_chains must be an int >= 2"):
        ChEES(num_chains=n)


@pytest.mark.parametrize(
    "kw", [{"num_samples": 0}, {"num_warmup": -1}, {"target_accept": 1.5}, {"init": "zeros"}, {"trajectory_lr": 0}]
)
def test_bad_config(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        ChEES(**kw)


def test_discrete_latent_named():
    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'coin'"):
        ChEES(num_chains=4).run(model)


def test_nonfinite_initial_density_names_the_site():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("impossible", torch.where(mu > 50, 0.0, -math.inf))

    with pytest.raises(ValueError, match="site 'impossible'"):
        ChEES(num_chains=4, max_init_tries=3).run(model)


def test_model_that_does_not_broadcast_is_refused():
    x = torch.randn(10, 3)

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=torch.zeros(10))

    with pytest.raises((ValueError, RuntimeError)):
        ChEES(num_chains=4, num_warmup=2, num_samples=2).run(model, x)


@cuda
def test_chees_cuda_smoke():
    x = X.cuda()
    fit = ChEES(num_chains=32, num_warmup=100, num_samples=50).run(normal_normal, x)
    assert fit.samples["mu"].device.type == "cuda"
    assert abs(fit.samples["mu"].mean().item() - NN_MEAN) < 0.1
