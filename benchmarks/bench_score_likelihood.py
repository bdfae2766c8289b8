"""The score model's likelihood on dequantized 17-level digits, by both of its estimates.

Trains the score family exactly as ``bench_samplers.py`` does (``from_data``, its suggested
engine settings, the step count of its FAMILIES row) and reports the test NLL of the 17-level
image (the dequantization bound ``-log p(v) + 64 log 17``) by the probability-flow ODE (dopri5,
exact divergence) at two tolerances and by the VDM variational bound: mean with its standard
error, median and worst image, with the solver's function evaluations and the seconds spent.
For the worst image it lists the pixels whose level is rarer than 1 in 200 among the training
images at that pixel: the images that cost the most are those with strokes where the digits
almost never have ink.

    OMP_NUM_THREADS=1 python benchmarks/bench_score_likelihood.py [--steps N] [--tolerances 1e-3,1e-5]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from bench_samplers import FAMILIES, LEVELS, data_for, train


def summary(name: str, nll: torch.Tensor, seconds: float, extra: str = "") -> str:
    se = float(nll.std()) / math.sqrt(len(nll))
    return (
        f"| {name} | {float(nll.mean()):.2f} ± {se:.2f} | {float(nll.median()):.2f} | {float(nll.max()):.1f} | "
        f"{seconds:.0f} | {extra} |"
    )


def rare_pixels(train_x: torch.Tensor, image: torch.Tensor, rate: float = 1 / 200) -> list:
    """``(pixel, level, share of training images at that level or above)`` for rare levels."""
    k_train, k = (train_x * LEVELS).floor(), (image * LEVELS).floor()
    share = (k_train >= k).double().mean(0)
    return [(i, int(k[i]), round(float(share[i]), 4)) for i in range(len(k)) if k[i] > 0 and share[i] < rate]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = {name: n for name, _, n in FAMILIES}["score"]
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--tolerances", default="1e-3,1e-5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _, seconds = train("score", "dequantized", args.steps)
    tr, _, te = data_for("dequantized")
    constant = te.x.shape[1] * math.log(LEVELS)
    print(
        f"{args.steps} steps, {seconds:.0f} s; learned gamma_min {float(model.sde.gamma_min.detach()):.2f}, "
        f"gamma_max {float(model.sde.gamma_max.detach()):.2f}\n"
    )
    print("| estimate | test NLL (nats) mean ± se | median | worst image | seconds | note |")
    print("|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    nll = constant - model.vdm_bound(te.x).double()
    print(summary("VDM bound", nll, time.perf_counter() - t0, "64 times per image"), flush=True)
    for tol in (float(v) for v in args.tolerances.split(",")):
        t0 = time.perf_counter()
        nll = constant - model.log_likelihood(te.x, rtol=tol, atol=tol).double()
        note = f"rtol = atol = {tol:g}, {model.last_nfe} evaluations"
        print(summary("probability-flow ODE", nll, time.perf_counter() - t0, note), flush=True)
    worst = int(nll.argmax())
    print(f"\nworst test image {worst}: rare pixels (pixel, level, training share) {rare_pixels(tr.x, te.x[worst])}")


if __name__ == "__main__":
    main()
