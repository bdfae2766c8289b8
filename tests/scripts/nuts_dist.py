"""NUTS on a conjugate Normal model, under torchrun (chains on separate ranks) or in one process.

usage: nuts_dist.py OUT_DIR
"""

import os
import sys

import pyro
import pyro.distributions as dist
import torch

torch.set_num_threads(1)
from ppdgm.distributed import finish  # noqa: E402
from ppdgm.inference.mcmc import NUTS  # noqa: E402


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("obs", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


y = torch.linspace(-1.0, 3.0, 20)

if __name__ == "__main__":
    fit = NUTS(num_samples=150, num_warmup=100, num_chains=2, seed=7, progress=False).run(model, y)
    finish()
    if int(os.environ.get("RANK", "0")) == 0:
        fit.save(sys.argv[1])
