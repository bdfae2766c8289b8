"""The importance-weighted log-likelihood on a conjugate model whose log p(x) and ELBO are exact."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppdgm.evaluate import iwae_log_likelihood, summarize

NOISE = 0.5  # x = z + NOISE * eps, z ~ N(0, I_2)
VAR = 1 + NOISE**2


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)


def exact_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / VAR, math.sqrt(NOISE**2 / VAR)).to_event(1))


POOR_LOC, POOR_SCALE = 0.5, 1.0


def poor_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(POOR_LOC * x, POOR_SCALE).to_event(1))


def exact_log_px(x):
    return dist.Normal(0.0, math.sqrt(VAR)).log_prob(x).sum(-1)


def poor_guide_elbo(x):
    """E_q[log p(x, z) - log q(z)] in closed form, per point."""
    m, v = POOR_LOC * x, POOR_SCALE**2
    lik = -0.5 * math.log(2 * math.pi * NOISE**2) - ((x - m) ** 2 + v) / (2 * NOISE**2)
    prior = -0.5 * math.log(2 * math.pi) - (m**2 + v) / 2
    entropy = 0.5 * math.log(2 * math.pi * math.e * v)
    return (lik + prior + entropy).sum(-1)


@pytest.fixture
def x():
    return torch.randn(400, 2, generator=torch.Generator().manual_seed(1)) * math.sqrt(VAR)


def test_exact_posterior_gives_exact_log_likelihood_for_any_batching(x):
    expected = exact_log_px(x)
    for k, batch_size, particle_batch in ((1, 400, None), (7, 33, 3)):
        got = iwae_log_likelihood(model, exact_guide, x, k=k, batch_size=batch_size, particle_batch=particle_batch)
        assert got.shape == (400,)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_k1_is_the_elbo_in_expectation(x):
    est = summarize(iwae_log_likelihood(model, poor_guide, x.repeat(5, 1), k=1), "k=1")
    elbo = poor_guide_elbo(x).mean().item()
    assert abs(est.mean - elbo) < 4 * est.stderr
    assert est.mean < exact_log_px(x).mean().item() - 0.3  # a loose guide: a visible gap


def test_bound_tightens_with_k_towards_log_px(x):
    means = [iwae_log_likelihood(model, poor_guide, x, k=k).mean().item() for k in (1, 10, 100, 1000)]
    assert means == sorted(means), means
    assert abs(means[-1] - exact_log_px(x).mean().item()) < 0.02


def test_model_latents_without_guide_site_use_the_prior_as_proposal(x):
    def empty_guide(x):
        pass

    got = iwae_log_likelihood(model, empty_guide, x[:50], k=4000).mean().item()
    assert abs(got - exact_log_px(x[:50]).mean().item()) < 0.05


def test_extra_arguments_are_cut_with_the_data():
    """A conditional model: ``y`` shares the first dim with ``x`` and is chunked alongside it."""

    def cond_model(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(y, 1.0), obs=x)

    x, y = torch.zeros(10), torch.arange(10.0)
    got = iwae_log_likelihood(cond_model, lambda x, y: None, x, y, k=2, batch_size=3)
    torch.testing.assert_close(got, dist.Normal(y, 1.0).log_prob(x))


def test_site_outside_the_data_plate_is_refused(x):
    def global_model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(theta, 1.0), obs=x[:, 0])

    def global_guide(x):
        pyro.sample("theta", dist.Normal(0.0, 0.5))

    with pytest.raises(ValueError, match=r"theta.*outside the plate 'data'"):
        iwae_log_likelihood(global_model, global_guide, x, k=2)


@settings(max_examples=25, deadline=None)
@given(bad=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.just("10"), st.booleans()))
def test_bad_k_is_refused(bad):
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        iwae_log_likelihood(model, exact_guide, x, k=bad)


def test_bad_arguments_are_refused():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        iwae_log_likelihood(model, exact_guide, x, batch_size=0)
    with pytest.raises(ValueError, match="particle_batch"):
        iwae_log_likelihood(model, exact_guide, x, particle_batch=-2)
    with pytest.raises(ValueError, match="expected the data as the first positional argument"):
        iwae_log_likelihood(model, exact_guide, k=3)
    with pytest.raises(TypeError, match="callable"):
        iwae_log_likelihood(model, "guide", x)
