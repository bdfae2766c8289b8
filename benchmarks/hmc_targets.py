"""The posteriors of ``bench_hmc.py``, each written three ways: a Pyro model (for Pyro NUTS and
ppdgm's ChEES), a NumPyro model, and a JAX log density over the unconstrained parameters (for
BlackJAX). ``check_log_densities_agree`` checks the three at a random point before any timing.

The Pyro models broadcast over a batch dimension on their left (``(x * w).sum(-1)``,
``theta[..., student]``), as ChEES's one-batch-for-all-chains log density needs.

- logistic regression: scikit-learn's breast-cancer data, 569 x 30 standardized, plus an
  intercept (31 dimensions).
- eight schools, non-centered (10 dimensions).
- a two-parameter-logistic item-response model on generated data: 200 students x 20 items, every
  student answers every item; abilities ``theta_j ~ N(0, 1)``, difficulties ``b_i ~ N(mu_b,
  sigma_b)``, discriminations ``a_i = exp(sigma_a z_i)`` with ``z_i ~ N(0, 1)`` (243 dimensions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import torch


@dataclass
class Target:
    """One posterior three ways. ``positive`` names the sites sampled as ``exp`` of their
    unconstrained value (every other site is unconstrained); ``shapes`` gives each latent
    site's event shape, in the order the JAX log density's dict uses."""

    name: str
    pyro_model: Callable
    numpyro_model: Callable
    jax_log_density: Callable  # dict of unconstrained site values (one chain) -> scalar
    args: tuple  # numpy arrays: the models' positional arguments
    shapes: dict
    positive: set = field(default_factory=set)

    @property
    def dim(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def uniform_init(self, num_chains: int, seed: int) -> dict:
        """Per-chain initial points uniform in (-2, 2) on the unconstrained space (Stan's, Pyro's
        and NumPyro's ``init_to_uniform``, and ppdgm ChEES's ``init="uniform"``)."""
        rng = np.random.default_rng(seed)
        return {k: rng.uniform(-2, 2, (num_chains, *s)).astype(np.float32) for k, s in self.shapes.items()}

    def constrain(self, unconstrained: dict) -> dict:
        return {k: np.exp(v) if k in self.positive else v for k, v in unconstrained.items()}


# ---------------------------------------------------------------------------------------------
# logistic regression


def pyro_logistic(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1) + b), obs=y)


def numpyro_logistic(x, y):
    import numpyro
    import numpyro.distributions as nd

    w = numpyro.sample("w", nd.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", nd.Normal(0.0, 5.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", nd.Bernoulli(logits=x @ w + b), obs=y)


def jax_logistic(x, y):
    import jax.numpy as jnp
    from jax.scipy.stats import norm

    def log_density(p):
        logits = x @ p["w"] + p["b"]
        lik = jnp.sum(y * logits - jnp.logaddexp(0.0, logits))
        return lik + norm.logpdf(p["w"]).sum() + norm.logpdf(p["b"], 0.0, 5.0)

    return log_density


def logistic_regression() -> Target:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = y.astype(np.float32)
    return Target(
        "logistic regression",
        pyro_logistic,
        numpyro_logistic,
        jax_logistic(x, y),
        (x, y),
        {"w": (x.shape[1],), "b": ()},
    )


# ---------------------------------------------------------------------------------------------
# eight schools, non-centered


def pyro_schools(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def numpyro_schools(sigma, y):
    import numpyro
    import numpyro.distributions as nd

    mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
    with numpyro.plate("school", len(sigma)):
        eta = numpyro.sample("eta", nd.Normal(0.0, 1.0))
        numpyro.sample("obs", nd.Normal(mu + tau * eta, sigma), obs=y)


def jax_schools(sigma, y):
    import jax.numpy as jnp
    from jax.scipy.stats import cauchy, norm

    def log_density(p):
        tau = jnp.exp(p["tau"])
        half_cauchy = math.log(2.0) + cauchy.logpdf(tau, 0.0, 5.0) + p["tau"]  # + log |d tau / d u|
        lik = norm.logpdf(y, p["mu"] + tau * p["eta"], sigma).sum()
        return lik + norm.logpdf(p["mu"], 0.0, 5.0) + half_cauchy + norm.logpdf(p["eta"]).sum()

    return log_density


def eight_schools() -> Target:
    sigma = np.array([15.0, 10, 16, 11, 9, 11, 10, 18], dtype=np.float32)
    y = np.array([28.0, 8, -3, 7, -1, 1, 18, 12], dtype=np.float32)
    return Target(
        "eight schools (nc)",
        pyro_schools,
        numpyro_schools,
        jax_schools(sigma, y),
        (sigma, y),
        {"mu": (), "tau": (), "eta": (8,)},
        positive={"tau"},
    )


# ---------------------------------------------------------------------------------------------
# two-parameter-logistic item response


def pyro_irt(student, item, y, num_students: int, num_items: int):
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 2.0))
    sigma_b = pyro.sample("sigma_b", dist.HalfNormal(2.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(1.0))
    with pyro.plate("students", num_students):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
    with pyro.plate("items", num_items):
        b = pyro.sample("b", dist.Normal(mu_b, sigma_b))
        z_a = pyro.sample("z_a", dist.Normal(0.0, 1.0))
    a = torch.exp(sigma_a * z_a)
    with pyro.plate("responses", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=a[..., item] * (theta[..., student] - b[..., item])), obs=y)


def numpyro_irt(student, item, y, num_students: int, num_items: int):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    mu_b = numpyro.sample("mu_b", nd.Normal(0.0, 2.0))
    sigma_b = numpyro.sample("sigma_b", nd.HalfNormal(2.0))
    sigma_a = numpyro.sample("sigma_a", nd.HalfNormal(1.0))
    with numpyro.plate("students", num_students):
        theta = numpyro.sample("theta", nd.Normal(0.0, 1.0))
    with numpyro.plate("items", num_items):
        b = numpyro.sample("b", nd.Normal(mu_b, sigma_b))
        z_a = numpyro.sample("z_a", nd.Normal(0.0, 1.0))
    a = jnp.exp(sigma_a * z_a)
    with numpyro.plate("responses", len(y)):
        numpyro.sample("y", nd.Bernoulli(logits=a[item] * (theta[student] - b[item])), obs=y)


def jax_irt(student, item, y):
    import jax.numpy as jnp
    from jax.scipy.stats import norm

    def log_density(p):
        sigma_b, sigma_a = jnp.exp(p["sigma_b"]), jnp.exp(p["sigma_a"])
        a = jnp.exp(sigma_a * p["z_a"])
        logits = a[item] * (p["theta"][student] - p["b"][item])
        lik = jnp.sum(y * logits - jnp.logaddexp(0.0, logits))
        half_normals = (
            2 * math.log(2.0) + norm.logpdf(sigma_b, 0.0, 2.0) + norm.logpdf(sigma_a) + p["sigma_b"] + p["sigma_a"]
        )
        prior = (
            norm.logpdf(p["mu_b"], 0.0, 2.0)
            + norm.logpdf(p["theta"]).sum()
            + norm.logpdf(p["b"], p["mu_b"], sigma_b).sum()
            + norm.logpdf(p["z_a"]).sum()
        )
        return lik + half_normals + prior

    return log_density


def item_response(num_students: int = 200, num_items: int = 20, seed: int = 0) -> Target:
    """Responses drawn from the model with ``sigma_b = 1``, ``sigma_a = 0.3``, ``mu_b = 0``."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=num_students)
    b = rng.normal(size=num_items)
    a = np.exp(0.3 * rng.normal(size=num_items))
    student, item = (g.ravel() for g in np.meshgrid(np.arange(num_students), np.arange(num_items), indexing="ij"))
    p = 1 / (1 + np.exp(-a[item] * (theta[student] - b[item])))
    y = (rng.uniform(size=p.shape) < p).astype(np.float32)
    return Target(
        f"item response ({num_students}x{num_items})",
        pyro_irt,
        numpyro_irt,
        jax_irt(student, item, y),
        (student, item, y, np.array(num_students), np.array(num_items)),
        {
            "mu_b": (),
            "sigma_b": (),
            "sigma_a": (),
            "theta": (num_students,),
            "b": (num_items,),
            "z_a": (num_items,),
        },
        positive={"sigma_b", "sigma_a"},
    )


TARGETS = {"logistic": logistic_regression, "schools": eight_schools, "irt": item_response}


# ---------------------------------------------------------------------------------------------


def check_log_densities_agree(target: Target, seed: int = 0, rtol: float = 1e-4) -> float:
    """The three log densities (with the log-Jacobian of ``exp`` on positive sites) at one random
    unconstrained point, as Pyro's and NumPyro's own ``potential_energy`` compute them; raises
    AssertionError naming the target when they differ. Returns the log density."""
    import jax.numpy as jnp
    from numpyro.infer.util import potential_energy
    from pyro.infer.mcmc.util import initialize_model

    point = {k: v[0] for k, v in target.uniform_init(1, seed).items()}
    jax_lp = float(target.jax_log_density({k: jnp.asarray(v) for k, v in point.items()}))
    numpyro_lp = -float(potential_energy(target.numpyro_model, model_args(target, "numpyro"), {}, point))
    _, potential_fn, _, _ = initialize_model(target.pyro_model, model_args=model_args(target, "pyro"))
    pyro_lp = -float(potential_fn({k: torch.as_tensor(v) for k, v in point.items()}))
    for name, lp in (("NumPyro", numpyro_lp), ("Pyro", pyro_lp)):
        assert math.isclose(lp, jax_lp, rel_tol=rtol, abs_tol=1e-3), (
            f"{target.name}: {name} log density {lp} differs from the JAX one {jax_lp}"
        )
    return jax_lp


def model_args(target: Target, library: str) -> tuple:
    """The models' arguments as the library takes them: integer sizes as Python ints, arrays as
    torch tensors for Pyro and numpy arrays for NumPyro."""
    out: list = []
    for a in target.args:
        if a.ndim == 0:
            out.append(int(a))
        elif library == "pyro":
            out.append(torch.as_tensor(a))
        else:
            out.append(a)
    return tuple(out)
