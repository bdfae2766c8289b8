"""The engines' default paths at one and at two torch threads, side by side in one process.

Each workload runs at 1 and 2 threads in turn (``torch.set_num_threads`` inside this process),
``--repeats`` times, and the median per unit of work is printed: AIS on an RBM (ms per
temperature), PersistentCD on an RBM (ms per step), ChEES on Bayesian logistic regression (ms per
iteration of 64 chains) and SVI on a small VAE (ms per step). The last line is
``ratio 2 threads / 1 thread ms (smallest) = <number>``.
Run: ``python benchmarks/bench_threads.py`` (no OMP_NUM_THREADS: the script sets the threads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch

from ppdgm.ais import annealed_importance_sampling
from ppdgm.data import load_digits
from ppdgm.inference.chees import ChEES
from ppdgm.inference.pcd import PersistentCD
from ppdgm.inference.svi import SVI
from ppdgm.models.rbm import RBM
from ppdgm.models.vae import VAE


def logistic_regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1) + b), obs=y)


def keep_threads(engine):
    """The engine runs with the threads this script sets (not its default of one)."""
    engine.threads = None
    return engine


def workloads():
    """``{name: (unit, run)}``: ``run()`` does the work and returns how many units it did."""
    digits = load_digits("train", binarize=True).x
    torch.manual_seed(0)
    rbm = RBM(features=64, hidden_units=128)
    PersistentCD(num_steps=50, batch_size=100, lr=0.05, seed=0, progress=False).run(rbm, digits)
    logit_x = torch.randn(569, 30)
    logit_y = (logit_x[:, 0] + 0.5 * torch.randn(569) > 0).float()

    def ais():
        annealed_importance_sampling(rbm.energy_graph(), num_runs=100, num_betas=500, seed=0, threads=None)
        return 499

    def pcd():
        keep_threads(PersistentCD(num_steps=100, batch_size=100, lr=0.05, seed=0, progress=False)).run(rbm, digits)
        return 100

    def chees():
        engine = keep_threads(ChEES(num_chains=64, num_warmup=25, num_samples=25, seed=0, progress=False))
        engine.run(logistic_regression, logit_x, logit_y)
        return 50

    def svi():
        pyro.clear_param_store()
        vae = VAE(features=64, latent_features=16, hidden_features=[256])
        engine = keep_threads(SVI(num_steps=100, batch_size=100, lr=1e-3, seed=0, progress=False))
        engine.run(vae.model, vae.guide, digits)
        return 100

    return {
        "AIS on an RBM (64-128), 100 runs": ("ms/temperature", ais),
        "PersistentCD on an RBM (64-128), batch 100": ("ms/step", pcd),
        "ChEES, logistic regression (30-d), 64 chains": ("ms/iteration", chees),
        "SVI, VAE (64-256-16), batch 100": ("ms/step", svi),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="run the workloads whose name contains this text")
    args = parser.parse_args()
    ratios = []
    print(f"{'workload':<48} {'unit':<15} {'1 thread':>9} {'2 threads':>10} {'2/1':>6}")
    for name, (unit, run) in workloads().items():
        if args.only.lower() not in name.lower():
            continue
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                units = run()
                times[threads].append(1e3 * (time.perf_counter() - t0) / units)
        one, two = statistics.median(times[1]), statistics.median(times[2])
        ratios.append(two / one)
        print(f"{name:<48} {unit:<15} {one:>9.3f} {two:>10.3f} {two / one:>6.2f}", flush=True)
    torch.set_num_threads(1)
    print(f"ratio 2 threads / 1 thread ms (smallest) = {min(ratios):.2f}")


if __name__ == "__main__":
    main()
