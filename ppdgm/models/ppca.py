"""Bayesian probabilistic PCA (Tipping & Bishop 1999) with an autoguide.

x_n ~ N(mu, W W^T + sigma^2 I) with the latent z_n integrated out; W and sigma have priors and an
``AutoNormal`` guide, mu is a point parameter. Because only global latents remain, minibatch SVI
optimizes the exact full-data ELBO.
"""

from __future__ import annotations

from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

from ppdgm.data import check_data
from ppdgm.models.spec import ConstructorSpec


class PPCA(ConstructorSpec, PyroModule):
    datasets = ("digits",)
    default_engine = "svi"
    engine_config: ClassVar[dict] = {}
    mu: torch.Tensor  # a PyroParam: reading the attribute gives the tensor
    support = "real"
    likelihood_method = "exact at the guide's posterior median"

    def __init__(self, features: int = 64, latent_features: int = 8, prior_scale: float = 1.0):
        super().__init__()
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        if not isinstance(latent_features, int) or not 1 <= latent_features <= features:
            raise ValueError(f"latent_features must be an int in [1, features={features}], got {latent_features!r}")
        self.features, self.latent_features, self.prior_scale = features, latent_features, prior_scale
        self.mu = PyroParam(torch.zeros(features))  # type: ignore[assignment]
        self.guide = AutoNormal(self.model, init_scale=0.01)

    @classmethod
    def from_data(cls, data, **kwargs):
        return cls(features=data.x.shape[1], **kwargs)

    def data_args(self, dataset) -> tuple:
        return (self._check(dataset.x, "x"),)

    def _check(self, x, name: str) -> torch.Tensor:
        x = check_data(x, name, rank=2)
        if x.shape[1] != self.features:
            raise ValueError(f"{name}: expected {self.features} columns, got shape {tuple(x.shape)}")
        return x

    def model(self, x=None, n: int | None = None):
        mu = self.mu
        W = pyro.sample(
            "W",
            dist.Normal(mu.new_zeros(()), self.prior_scale).expand([self.features, self.latent_features]).to_event(2),
        )
        sigma = pyro.sample("sigma", dist.LogNormal(mu.new_tensor(-1.0), 1.0))
        n = x.shape[0] if x is not None else n
        with pyro.plate("data", n):
            return pyro.sample("x", self.likelihood(W, sigma), obs=x)

    def likelihood(self, W, sigma):
        return dist.LowRankMultivariateNormal(self.mu, W, (sigma**2).unsqueeze(-1).expand(self.features))

    def _ensure_guide(self):
        if self.guide.prototype_trace is None:  # a freshly loaded guide builds its sites lazily
            with pyro.poutine.block():  # built with observed x, so x is not mistaken for a latent
                self.guide(self.mu.new_zeros(1, self.features))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` new data points, with W and sigma drawn from the guide."""
        self._ensure_guide()
        return Predictive(self.model, guide=self.guide, num_samples=1, return_sites=["x"])(None, n)["x"][0]

    @torch.no_grad()
    def log_likelihood(self, x) -> torch.Tensor:
        """Exact log p(x | W, sigma) in nats per point at the guide's posterior median."""
        x = self._check(x, "x")
        self._ensure_guide()
        med = self.guide.median()
        return self.likelihood(med["W"], med["sigma"]).log_prob(x.to(self.mu.device))
