"""The pointwise log-likelihood of ``to_arviz``: guarded on its real size, computed in chunks."""

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppdgm.diagnostics import pointwise_log_likelihood, samples_to_inference_data
from ppdgm.logdensity import BatchedLogDensity

POINTS = 20_000


def many_points(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, scale), obs=y)


def draws(chains=2, num=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"mu": torch.randn(chains, num, generator=g), "scale": torch.rand(chains, num, generator=g) + 0.5}


Y = torch.randn(POINTS, generator=torch.Generator().manual_seed(1))


def test_chunked_log_likelihood_equals_one_call_and_stays_within_the_chunk(monkeypatch):
    samples = draws()
    whole = pointwise_log_likelihood(many_points, samples, (Y,), observed=["y"])["y"]
    sizes = []
    trace = BatchedLogDensity.trace

    def counted(self, values):
        sizes.append(next(iter(values.values())).shape[0])
        return trace(self, values)

    monkeypatch.setattr(BatchedLogDensity, "trace", counted)
    three_draws = 3 * POINTS * 4  # bytes of three draws' float32 values
    chunked = pointwise_log_likelihood(many_points, samples, (Y,), observed=["y"], chunk_bytes=three_draws)["y"]
    assert sizes == [3, 3, 3, 1]  # 10 draws, three per call
    assert chunked.shape == (2, 5, POINTS)
    np.testing.assert_array_equal(chunked, whole)
    s = {k: v[1, 4] for k, v in samples.items()}
    expect = dist.Normal(s["mu"], s["scale"]).log_prob(Y).numpy()
    np.testing.assert_allclose(chunked[1, 4], expect, rtol=1e-6, atol=1e-6)


def test_guard_counts_data_points_not_draws():
    samples = draws()  # 10 draws only, but 10 x 20,000 x 4 bytes = 800,000 bytes of log-likelihood
    with pytest.warns(UserWarning, match=r"log_likelihood_max_bytes=800000\)"):
        idata = samples_to_inference_data(many_points, samples, (Y,), log_likelihood_max_bytes=500_000)
    assert "log_likelihood" not in idata.groups() and "posterior" in idata.groups()
    idata = samples_to_inference_data(many_points, samples, (Y,), log_likelihood_max_bytes=800_000)
    assert idata.log_likelihood["y"].shape == (2, 5, POINTS)
    assert np.isfinite(az.loo(idata).elpd_loo)


@pytest.mark.parametrize("arg", ["log_likelihood_max_bytes", "log_likelihood_chunk_bytes"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_caps_are_refused_by_name(arg, bad):
    with pytest.raises(ValueError, match=arg):
        samples_to_inference_data(many_points, draws(), (Y,), **{arg: bad})
