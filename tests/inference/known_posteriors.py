"""Targets with analytic posteriors shared by the HMC engines' tests, and the MCSE z-score check."""

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch

X = torch.tensor([1.4, 0.2, 2.1, 0.9, 1.7, -0.3, 1.1, 0.6, 2.4, 1.0, 0.8, 1.9, 0.1, 1.3, 1.6, 0.4, 2.0, 0.7, 1.2, 1.5])
NN_MEAN, NN_SD = float(X.sum() / (len(X) + 1)), math.sqrt(1 / (len(X) + 1))


def normal_normal(x):
    """mu ~ N(0, 1), x_i ~ N(mu, 1): the posterior is N(sum x / (n + 1), 1 / (n + 1))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


D = 10
_i = torch.arange(D)
SCALES = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
COV = SCALES[:, None] * SCALES[None, :] * 0.5 ** (_i[:, None] - _i[None, :]).abs()
MEAN = torch.linspace(-1.0, 1.0, D)
L = torch.linalg.cholesky(COV).float()


def correlated_gaussian():
    """A 10-d Gaussian with sds 0.5..2 and correlation 0.5^|i-j|."""
    pyro.sample("z", dist.MultivariateNormal(MEAN, scale_tril=L))


def max_z_scores(draws: np.ndarray, mean, sd):
    """Largest |estimate - truth| / MCSE over dimensions, for the mean and for the sd."""
    draws = draws.reshape(*draws.shape[:2], -1)
    zm = zs = 0.0
    for j in range(draws.shape[-1]):
        a = draws[..., j]
        zm = max(zm, abs(a.mean() - float(mean[j])) / float(az.mcse(a, method="mean")))
        zs = max(zs, abs(a.std() - float(sd[j])) / float(az.mcse(a, method="sd")))
    return zm, zs
