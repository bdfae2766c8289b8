"""MAF by ppdgm (Pyro transforms, trained by the SVI engine) vs zuko's MAF, side by side.

Same architecture (layers, hidden widths, alternating orders: equal parameter counts), same
optimizer (Adam), learning rate, batch size, minibatch order and number of steps, on a 2-D toy
(moons) and on the 17-level digits (uniform dequantization + logit, the same for both; the NLL is
the dequantization bound in nats per image on the discrete pixels; 600 steps is about where the
held-out NLL of both bottoms out on 1,200 training images). A third row trains ppdgm's
FlowModel with a plain torch loop, which separates the cost of the transforms from the cost of
the SVI engine.

    OMP_NUM_THREADS=1 python benchmarks/bench_flows.py            # ~2 min on one quiet CPU core
    OMP_NUM_THREADS=1 python benchmarks/bench_flows.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import torch
import zuko

from ppdgm.data import load_dataset, load_digits
from ppdgm.inference import SVI
from ppdgm.models.flows import FlowModel


class Timer:
    """Wall and CPU (this process) milliseconds per step. On a shared machine the CPU time is
    the steadier number: other processes' load inflates wall time but not our own CPU time."""

    def __init__(self, steps):
        self.steps = steps

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.ms = (
            1e3 * (time.perf_counter() - self.wall) / self.steps,
            1e3 * (time.process_time() - self.cpu) / self.steps,
        )


def batches(n, batch, steps, seed=0):
    """The SVI engine's minibatch order: DistributedSampler's seeded permutation per epoch."""
    per_epoch = math.ceil(n / batch)
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(seed + epoch)
        yield torch.randperm(n, generator=gen)[pos * batch : (pos + 1) * batch]


def logit_preprocess(v, alpha):
    """u = logit(alpha + (1 - 2 alpha) v) and log |du/dv| per point (the same map FlowModel uses)."""
    s = alpha + (1 - 2 * alpha) * v
    return torch.logit(s), (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).sum(-1)


def dequantize(x, levels, gen):
    k = (x * (levels - 1)).round()
    return (k + torch.rand(x.shape, generator=gen)) / levels


def run_ppdgm_svi(train, test, cfg):
    pyro.set_rng_seed(0)
    flow = FlowModel(
        features=train.shape[1],
        kind="maf",
        num_layers=cfg["layers"],
        hidden_features=cfg["hidden"],
        levels=cfg["levels"],
    )
    svi = SVI(num_steps=cfg["steps"], lr=cfg["lr"], batch_size=cfg["batch"], seed=0, progress=False)
    with Timer(cfg["steps"]) as timer:
        svi.run(flow.model, None, train)
    torch.manual_seed(1)
    nll = -flow.log_likelihood(test).mean().item()
    return timer.ms, nll, sum(p.numel() for p in flow.parameters())


def run_ppdgm_torch(train, test, cfg):
    torch.manual_seed(0)
    flow = FlowModel(
        features=train.shape[1],
        kind="maf",
        num_layers=cfg["layers"],
        hidden_features=cfg["hidden"],
        levels=cfg["levels"],
    )
    opt = torch.optim.Adam(flow.parameters(), lr=cfg["lr"])
    with Timer(cfg["steps"]) as timer:
        for idx in batches(len(train), cfg["batch"], cfg["steps"]):
            x = train[idx]
            v = flow.dequantize(x) if cfg["levels"] else x
            loss = -flow.distribution().log_prob(v).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.manual_seed(1)
    return timer.ms, -flow.log_likelihood(test).mean().item(), sum(p.numel() for p in flow.parameters())


def run_zuko(train, test, cfg, alpha=0.05):
    torch.manual_seed(0)
    d, levels = train.shape[1], cfg["levels"]
    flow = zuko.flows.MAF(d, transforms=cfg["layers"], hidden_features=tuple(cfg["hidden"]))
    opt = torch.optim.Adam(flow.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(0)

    def log_p(x, gen):
        """log density of the (dequantized) data, with the logit Jacobian for pixels."""
        if not levels:
            return flow().log_prob(x)
        u, logdet = logit_preprocess(dequantize(x, levels, gen), alpha)
        return flow().log_prob(u) + logdet - d * math.log(levels)

    with Timer(cfg["steps"]) as timer:
        for idx in batches(len(train), cfg["batch"], cfg["steps"]):
            loss = -log_p(train[idx], gen).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        nll = -log_p(test, torch.Generator().manual_seed(1)).mean().item()
    return timer.ms, nll, sum(p.numel() for p in flow.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, to check the script runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # the first torch optimizer imports torch._dynamo (seconds): pay it before any timing
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    scale = 0.05 if args.quick else 1.0
    cases = {
        "moons (2-D)": (
            load_dataset("moons", "train", n=2000).x,
            load_dataset("moons", "test", n=1000).x,
            {"layers": 5, "hidden": [64, 64], "lr": 3e-3, "batch": 256, "steps": int(1500 * scale), "levels": None},
        ),
        "digits (64-D, 17 levels)": (
            load_digits("train").x,
            load_digits("test").x,
            {"layers": 5, "hidden": [128], "lr": 1e-3, "batch": 200, "steps": int(600 * scale), "levels": 17},
        ),
    }
    runners = {"ppdgm (SVI engine)": run_ppdgm_svi, "ppdgm FlowModel, torch loop": run_ppdgm_torch, "zuko": run_zuko}
    print(
        "| data | library | params | steps | wall ms/step | CPU ms/step | CPU time ratio vs zuko "
        "| test NLL (nats) | NLL - zuko NLL |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for data, (train, test, cfg) in cases.items():
        results = {name: fn(train, test, cfg) for name, fn in runners.items()}
        (_, z_cpu), z_nll, _ = results["zuko"]
        for name, ((wall, cpu), nll, params) in results.items():
            print(
                f"| {data} | {name} | {params} | {cfg['steps']} | {wall:.2f} | {cpu:.2f} | {cpu / z_cpu:.2f} "
                f"| {nll:.3f} | {nll - z_nll:+.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
