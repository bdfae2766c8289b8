"""Minibatch SVI on a model with a global latent, under torchrun or as one process.

usage: train_dist.py OUT_DIR STEPS BATCH [--kill-rank R --kill-at STEP] [--resume]
Rank 0 saves the fit to OUT_DIR (checkpoints every 10 steps).
"""

import os
import signal
import sys

import pyro
import pyro.distributions as dist
import torch

torch.set_num_threads(1)
from ppdgm.distributed import finish  # noqa: E402
from ppdgm.inference import SVI  # noqa: E402

out, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kill_rank = int(sys.argv[sys.argv.index("--kill-rank") + 1]) if "--kill-rank" in sys.argv else None
kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else None
rank = int(os.environ.get("RANK", "0"))

g = torch.Generator().manual_seed(0)
X = torch.randn(480, 3, generator=g)
y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(480, generator=g)


def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), s), obs=y)


def die(step, info):
    if rank == kill_rank and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


fit = SVI(num_steps=steps, batch_size=batch, lr=0.02, seed=3, checkpoint_every=10, progress=False).run(
    model, None, (X, y), checkpoint_dir=out, resume="--resume" in sys.argv, callbacks=[die]
)
finish()
if rank == 0:
    fit.save(out)
