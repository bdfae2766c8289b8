"""ArviZ for every HMC/SVI result (named dims, LOO) and the amortized-guide-vs-HMC check."""

import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppdgm.amortization import amortized_posterior_check, energy_distance
from ppdgm.diagnostics import pointwise_log_likelihood
from ppdgm.inference.chees import ChEES
from ppdgm.inference.mcmc import NUTS
from ppdgm.inference.svi import SVI

matplotlib.use("Agg")

SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])
Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


@pytest.mark.parametrize("engine", ["nuts", "chees", "svi"])
def test_to_arviz_named_dims_and_loo(engine):
    if engine == "nuts":
        fit = NUTS(num_samples=100, num_warmup=100, num_chains=2, jit_compile=True).run(eight_schools, SIGMA, Y)
    elif engine == "chees":
        fit = ChEES(num_chains=16, num_samples=50, num_warmup=100, jit_compile=True).run(eight_schools, SIGMA, Y)
    else:
        fit = SVI(num_steps=300, lr=0.05).run(eight_schools, None, (SIGMA, Y))
    idata = fit.to_arviz(num_samples=200)
    assert idata.posterior["eta"].dims == ("chain", "draw", "school")
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "school")
    assert list(idata.observed_data["obs"].dims) == ["school"]
    assert list(idata.log_likelihood.data_vars) == ["obs"]
    loo = az.loo(idata)
    # every engine lands near the known eight-schools elpd_loo of about -30.7
    assert -33.0 < loo.elpd_loo < -29.5, loo.elpd_loo
    if engine != "svi":
        assert idata.sample_stats["diverging"].dims == ("chain", "draw")
        assert az.rhat(idata)["mu"] < 1.1
    if engine == "chees":
        pp = fit.to_arviz(posterior_predictive=True).posterior_predictive["obs"]
        assert pp.dims == ("chain", "draw", "school") and pp.shape == (16, 50, 8)
        assert abs(float(pp.std()) - 15) < 5  # measurement noise (sd 9..18) dominates the spread


def test_pointwise_log_likelihood_batched_equals_loop():
    fit = ChEES(num_chains=4, num_samples=5, num_warmup=20).run(eight_schools, SIGMA, Y)
    ll = pointwise_log_likelihood(eight_schools, fit.samples, (SIGMA, Y), observed=["obs"])["obs"]
    s = {k: v[1, 3] for k, v in fit.samples.items()}
    expect = dist.Normal(s["mu"] + s["tau"] * s["eta"], SIGMA).log_prob(Y)
    assert ll.shape == (4, 5, 8)
    assert np.allclose(ll[1, 3], expect.numpy(), atol=1e-5)


def test_energy_distance_zero_for_same_and_positive_for_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)
    assert abs(energy_distance(a, b)) < 0.05
    assert energy_distance(a, b + 1.0) > 0.5


# -- amortized guide vs HMC on a linear-Gaussian "VAE" with an exact posterior ---------------------
W = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.8, -0.7]])
B = torch.tensor([0.2, -0.1, 0.4])
NOISE = 0.5
POST_COV = torch.linalg.inv(torch.eye(2) + W.T @ W / NOISE**2)
POST_L = torch.linalg.cholesky(POST_COV)
ENC = POST_COV @ W.T / NOISE**2  # exact posterior mean = ENC (x - B)


def lg_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        loc = (W @ z.unsqueeze(-1)).squeeze(-1) + B
        pyro.sample("x", dist.Normal(loc, NOISE).to_event(1), obs=x)


def make_guide(shift=0.0, scale=1.0):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = ((x - B) @ ENC.T) + shift
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale * POST_L))

    return guide


def test_amortized_check_exact_and_wrong_guides():
    x = torch.tensor([[1.0, 0.5, -0.2], [-1.5, 2.0, 0.3], [0.0, 0.0, 3.0]])
    true_lp = dist.MultivariateNormal(B, W @ W.T + NOISE**2 * torch.eye(3)).log_prob(x)
    kw = {"num_chains": 16, "num_warmup": 150, "num_samples": 100, "num_importance": 4000}
    exact = amortized_posterior_check(lg_model, make_guide(), x, **kw)
    assert torch.allclose(exact.log_evidence, true_lp, atol=0.03)
    assert torch.allclose(exact.elbo, true_lp, atol=1e-3)  # exact guide: the ELBO is log p(x)
    assert exact.gap.abs().max() < 0.03
    assert exact.hmc_draws.shape == (16, 100, 3, 2)

    shift, scale = 0.5, 2.0
    wrong = amortized_posterior_check(lg_model, make_guide(shift, scale), x, **kw)
    q = dist.MultivariateNormal(torch.zeros(2) + shift, scale_tril=scale * POST_L)
    p = dist.MultivariateNormal(torch.zeros(2), scale_tril=POST_L)
    kl = torch.distributions.kl_divergence(q, p).item()  # the same for every point
    assert torch.allclose(wrong.log_evidence, true_lp, atol=0.05)
    se = (wrong.elbo_se**2 + wrong.log_evidence_se**2).sqrt()
    assert ((wrong.gap - kl).abs() < 4 * se + 0.02).all(), (wrong.gap, kl, se)
    assert (se < 0.1).all()  # the estimates are precise enough for the comparison to mean something
    assert (wrong.energy_distance > 5 * exact.energy_distance.abs().max() + 0.05).all()
    assert "mean gap" in wrong.summary()
    data = wrong.to_arviz()
    assert data["HMC"].posterior["z"].dims == ("chain", "draw", "point", "z_dim_0")
    assert wrong.plot(points=[0]) is not None


def test_amortized_check_bad_input():
    x = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="latent"):
        amortized_posterior_check(lg_model, make_guide(), x, latent="w")
    with pytest.raises(ValueError, match="points"):
        amortized_posterior_check(lg_model, make_guide(), x, points=[5])
    with pytest.raises(TypeError, match="x"):
        amortized_posterior_check(lg_model, make_guide(), [[0.0]])


def test_amortized_check_on_a_trained_vae():
    """A VAE's encoder is an approximation: the gap is positive and the HMC-based log-evidence
    agrees with the guide's importance-weighted bound (two estimates of the same log p(x))."""
    vae_module = pytest.importorskip("ppdgm.models.vae")
    from ppdgm.data import load_digits

    x = load_digits("train", binarize=True).x
    vae = vae_module.VAE(features=64, latent_features=2, hidden_features=(32,))
    SVI(num_steps=200, batch_size=100, lr=3e-3).run(vae.model, vae.guide, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chk = amortized_posterior_check(
            vae.model,
            vae.guide,
            x,
            points=[0, 1, 2],
            num_chains=16,
            num_warmup=120,
            num_samples=60,
            num_importance=1000,
        )
    # HMC freezes the trained networks on purpose: Pyro's "not registered" warning is not the user's concern
    assert not [w for w in caught if "not registered in the param store" in str(w.message)]
    se = (chk.elbo_se**2 + chk.log_evidence_se**2).sqrt()
    assert (chk.gap > -4 * se).all() and chk.gap.mean() > 0
    assert (chk.iwae <= chk.log_evidence + 4 * chk.log_evidence_se + 0.05).all()
    assert (chk.log_evidence - chk.iwae).abs().max() < 0.5
    # a decoder param is still trainable after HMC froze it
    assert all(p.requires_grad for p in vae.parameters())


def test_models_without_a_posterior_convert_to_their_draws_of_the_data():
    from ppdgm.inference import SVI
    from ppdgm.inference.score_matching import ScoreMatching
    from ppdgm.models.flows import FlowModel
    from ppdgm.models.score import ScoreModel

    x = torch.randn(200, 2) * torch.tensor([1.0, 0.2])
    score = ScoreModel(features=2, hidden_features=[8], num_scales=20)
    flow = FlowModel(features=2, num_layers=1, hidden_features=[8])
    fits = [
        ScoreMatching(num_steps=5, progress=False).run(score, x),
        SVI(num_steps=5, progress=False).run(flow.model, None, x),
    ]
    fits[1].module = flow  # what `ppdgm fit` attaches
    for fit in fits:
        idata = fit.to_arviz(num_samples=30)
        assert idata.posterior_predictive["x"].dims == ("chain", "draw", "feature")
        assert idata.posterior_predictive["x"].shape == (1, 30, 2)
        assert np.array_equal(idata.observed_data["x"].values, x.numpy())
