"""Data-parallel SVI: one process vs two (torchrun, gloo) training a VAE on binarized digits.

Same global work per epoch: 1 process x batch 2B against 2 processes x batch B (the same
optimization, see ppdgm.distributed). Each configuration trains ``--epochs`` epochs after a
one-epoch warm-up; prints steps/s, samples/s and the speed-up.

    python benchmarks/bench_distributed.py [--epochs 5] [--batch 100] [--hidden 512]
"""

import argparse
import json
import os
import subprocess
import sys
import time


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
    vae = VAE(x_dim=64, latent_dim=16, hidden=(args.hidden, args.hidden))
    SVI(num_epochs=1, batch_size=batch, lr=1e-3, progress=False).run(vae.model, vae.guide, x)  # warm-up
    fit = SVI(num_epochs=args.epochs, batch_size=batch, lr=1e-3, progress=False).run(vae.model, vae.guide, x)
    finish()
    if world.is_main:
        print(json.dumps({"steps": fit.timing["steps"], "seconds": fit.timing["seconds"], "samples": args.epochs * len(x)}))


def launch(nproc, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PPDGM_BACKEND": "gloo"}
    me = [os.path.abspath(__file__), "--worker", "--epochs", str(args.epochs), "--batch", str(args.batch),
          "--hidden", str(args.hidden)]
    cmd = [sys.executable, *me] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=100, help="per-rank batch B (one process uses 2B)")
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    t0 = time.time()
    one, two = launch(1, args), launch(2, args)
    print(f"VAE 64-{args.hidden}-{args.hidden}-16 on binarized digits (1200), {args.epochs} epochs, "
          f"global batch {2 * args.batch}, {os.cpu_count()} CPU cores, gloo\n")
    print("| processes | steps | seconds | steps/s | samples/s |")
    print("|---|---|---|---|---|")
    for n, r in ((1, one), (2, two)):
        print(f"| {n} | {r['steps']} | {r['seconds']:.2f} | {r['steps'] / r['seconds']:.1f} | "
              f"{r['samples'] / r['seconds']:.0f} |")
    print(f"\nspeed-up 2 processes / 1 process = {one['seconds'] / two['seconds']:.2f}x "
          f"(wall incl. start-up {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
