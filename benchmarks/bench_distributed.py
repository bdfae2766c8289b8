"""Data-parallel SVI: one process vs two (torchrun, gloo) training a VAE on binarized digits.

Same global work per epoch: 1 process x batch 2B against 2 processes x batch B (the same
optimization, see ppdgm.distributed). Each configuration trains ``--epochs`` epochs after a
one-epoch warm-up; prints steps/s of each and the speed-up. Each step all-reduces every
gradient once, a fixed cost per step, so the speed-up grows with the work per step (batch x
width) and small steps are slower on two processes than on one.

    python benchmarks/bench_distributed.py [--epochs 20] [--batch B --hidden H]
"""

import argparse
import json
import os
import subprocess
import sys


def worker(args):
    import torch

    torch.set_num_threads(1)
    from ppdgm.data import load_digits
    from ppdgm.distributed import finish, init_from_env
    from ppdgm.inference import SVI
    from ppdgm.models.vae import VAE

    world = init_from_env()
    x = load_digits("train", binarize=True).x
    batch = args.batch * 2 // world.size
    torch.manual_seed(0)
    vae = VAE(features=64, latent_features=16, hidden_features=(args.hidden, args.hidden))
    SVI(num_epochs=1, batch_size=batch, lr=1e-3, progress=False).run(vae.model, vae.guide, x)  # warm-up
    fit = SVI(num_epochs=args.epochs, batch_size=batch, lr=1e-3, progress=False).run(vae.model, vae.guide, x)
    finish()
    if world.is_main:
        print(
            json.dumps(
                {"steps": fit.timing["steps"], "seconds": fit.timing["seconds"], "samples": args.epochs * len(x)}
            )
        )


def launch(nproc, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PPDGM_BACKEND": "gloo"}
    me = [
        os.path.abspath(__file__),
        "--worker",
        "--epochs",
        str(args.epochs),
        "--batch",
        str(args.batch),
        "--hidden",
        str(args.hidden),
    ]
    cmd = (
        [sys.executable, *me]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
    )
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, help="per-rank batch B (one process uses 2B); default: a sweep")
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sweep = [(args.batch, args.hidden)] if args.batch else [(50, 512), (300, 1024), (600, 1024)]
    print(
        f"VAE 64-H-H-16 on binarized digits (1200 images), {args.epochs} epochs after a warm-up epoch, "
        f"{os.cpu_count()} CPU cores, gloo, one torch thread per process. Same global batch 2B either way.\n"
    )
    print("| hidden H | global batch | 1 process steps/s | 2 processes steps/s | speed-up |")
    print("|---|---|---|---|---|")
    for batch, hidden in sweep:
        args.batch, args.hidden = batch, hidden
        one, two = launch(1, args), launch(2, args)
        s1, s2 = one["steps"] / one["seconds"], two["steps"] / two["seconds"]
        print(f"| {hidden} | {2 * batch} | {s1:.1f} | {s2:.1f} | {s2 / s1:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
