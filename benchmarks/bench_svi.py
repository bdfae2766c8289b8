"""ppdgm's SVI engine vs a hand-written ``pyro.infer.SVI`` loop: same model, guide, data, seed.

Bayesian PPCA (64-d digits, 8 latent dims, AutoNormal guide) trained by minibatch SVI
(batch 100, Adam 0.01). Runs alternate A/B/A/B to share the machine's noise; prints the median
ms/step of each and the ratio.

    python benchmarks/bench_svi.py [--steps 1000] [--reps 3] [--compile replay|jit|none]
"""

import argparse
import statistics
import time

import pyro
import torch

from ppdgm.data import load_digits
from ppdgm.inference import SVI
from ppdgm.inference.svi import ScaleDataPlate
from ppdgm.models.ppca import PPCA


def hand_written(x, steps, batch, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = PPCA(features=64, latent_features=8)
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    n = x.shape[0]
    per_epoch = n // batch
    t0 = time.perf_counter()
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:  # the engine's order: DistributedSampler's permutation for one process
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        b = x[order[pos * batch : (pos + 1) * batch]]
        scale = n / b.shape[0]
        svi.model = ScaleDataPlate("data", scale)(model.model)
        svi.guide = ScaleDataPlate("data", scale)(model.guide)
        svi.step(b)
    return time.perf_counter() - t0


def with_ppdgm(x, steps, batch, seed, compile="replay"):
    pyro.set_rng_seed(seed)
    model = PPCA(features=64, latent_features=8)
    engine = SVI(num_steps=steps, batch_size=batch, lr=0.01, seed=seed, progress=False, compile=compile)
    fit = engine.run(model.model, model.guide, x)
    return fit.timing["seconds"], fit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", default="replay", help="the engine's compile= (replay, jit or none)")
    args = p.parse_args()
    torch.set_num_threads(1)
    x = load_digits("train").x
    batch = 100
    hand_written(x, 50, batch, 0)  # warm-up both paths
    with_ppdgm(x, 50, batch, 0, args.compile)
    a, b = [], []
    for rep in range(args.reps):
        a.append(hand_written(x, args.steps, batch, rep))
        seconds, _ = with_ppdgm(x, args.steps, batch, rep, args.compile)
        b.append(seconds)
    ms_a = 1e3 * statistics.median(a) / args.steps
    ms_b = 1e3 * statistics.median(b) / args.steps
    print(f"Bayesian PPCA on digits, batch {batch}, {args.steps} steps x {args.reps} reps, torch threads 1\n")
    print("| loop | ms/step (median) |")
    print("|---|---|")
    print(f"| hand-written pyro.infer.SVI | {ms_a:.3f} |")
    print(f"| ppdgm SVI engine, compile={args.compile!r} | {ms_b:.3f} |")
    print(f"\nratio ppdgm / hand-written = {ms_b / ms_a:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
