"""Bayesian probabilistic PCA (Tipping & Bishop 1999) with an autoguide.

x_n ~ N(mu, W W^T + sigma^2 I) with the latent z_n integrated out; W and sigma have priors and an
``AutoNormal`` guide, mu is a point parameter. Because only global latents remain, minibatch SVI
optimizes the exact full-data ELBO.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

from ppdgm.data import check_data


class PPCA(PyroModule):
    datasets = ('digits',)
    default_engine = "svi"
    support = "real"

    def __init__(self, x_dim: int = 64, latent_dim: int = 8, prior_scale: float = 1.0):
        super().__init__()
        if not isinstance(x_dim, int) or x_dim < 1:
            raise ValueError(f"x_dim must be a positive int, got {x_dim!r}")
        if not isinstance(latent_dim, int) or not 1 <= latent_dim <= x_dim:
            raise ValueError(f"latent_dim must be an int in [1, x_dim={x_dim}], got {latent_dim!r}")
        self.x_dim, self.latent_dim, self.prior_scale = x_dim, latent_dim, prior_scale
        self.mu = PyroParam(torch.zeros(x_dim))
        self.guide = AutoNormal(self.model, init_scale=0.01)

    @classmethod
    def from_data(cls, data, **kwargs):
        return cls(x_dim=data.x.shape[1], **kwargs)

    @property
    def spec(self) -> dict:
        return {"name": "ppca", "kwargs": {"x_dim": self.x_dim, "latent_dim": self.latent_dim,
                                           "prior_scale": self.prior_scale}}

    def model(self, x=None, n: int | None = None):
        mu = self.mu
        W = pyro.sample("W", dist.Normal(mu.new_zeros(()), self.prior_scale)
                        .expand([self.x_dim, self.latent_dim]).to_event(2))
        sigma = pyro.sample("sigma", dist.LogNormal(mu.new_tensor(-1.0), 1.0))
        n = x.shape[0] if x is not None else n
        with pyro.plate("data", n):
            return pyro.sample("x", self.likelihood(W, sigma), obs=x)

    def likelihood(self, W, sigma):
        return dist.LowRankMultivariateNormal(self.mu, W, (sigma**2).unsqueeze(-1).expand(self.x_dim))

    def _ensure_guide(self):
        if self.guide.prototype_trace is None:  # a freshly loaded guide builds its sites lazily
            with pyro.poutine.block():  # built with observed x, so x is not mistaken for a latent
                self.guide(self.mu.new_zeros(1, self.x_dim))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` new data points, with W and sigma drawn from the guide."""
        self._ensure_guide()
        return Predictive(self.model, guide=self.guide, num_samples=1, return_sites=["x"])(None, n)["x"][0]

    @torch.no_grad()
    def log_likelihood(self, x) -> torch.Tensor:
        """Exact log p(x | W, sigma) in nats per point at the guide's posterior median."""
        x = check_data(x, "x", rank=2)
        self._ensure_guide()
        med = self.guide.median()
        return self.likelihood(med["W"], med["sigma"]).log_prob(x.to(self.mu.device))
