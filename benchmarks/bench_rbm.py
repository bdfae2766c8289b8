"""scikit-learn's BernoulliRBM vs ppdgm's RBM trained by PersistentCD, side by side in one process.

Same data (binarized digits, 1,200 training images), hidden size, learning rate, batch size,
epochs and algorithm (PCD-1 with one persistent chain per batch row, plain SGD, no momentum or
weight decay, weights initialized N(0, 0.01^2)). Prints seconds per epoch of each and their
ratio, and both models' test log-likelihood by ppdgm's AIS (sklearn's weights are copied into a
ppdgm RBM for the evaluation). Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_rbm.py``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.neural_network import BernoulliRBM

from ppdgm.data import load_digits
from ppdgm.evaluate import bernoulli_baseline, log_likelihood
from ppdgm.inference.pcd import PersistentCD
from ppdgm.models.rbm import RBM


def train_sklearn(x, hidden, lr, batch_size, epochs, seed):
    rbm = BernoulliRBM(n_components=hidden, learning_rate=lr, batch_size=batch_size, n_iter=epochs, random_state=seed)
    t0 = time.perf_counter()
    rbm.fit(x.numpy().astype(np.float64))
    return rbm, (time.perf_counter() - t0) / epochs


def train_ppdgm(x, hidden, lr, batch_size, epochs, seed):
    torch.manual_seed(seed)
    rbm = RBM(features=x.shape[1], hidden_units=hidden)
    engine = PersistentCD(
        num_epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optim="sgd",
        momentum=0.0,
        num_chains=batch_size,
        k=1,
        seed=seed,
        progress=False,
    )
    t0 = time.perf_counter()
    engine.run(rbm, x)
    return rbm, (time.perf_counter() - t0) / epochs


def as_ppdgm(sk: BernoulliRBM) -> RBM:
    rbm = RBM(features=sk.components_.shape[1], hidden_units=sk.components_.shape[0])
    with torch.no_grad():
        rbm.W.copy_(torch.as_tensor(sk.components_.T))
        rbm.b.copy_(torch.as_tensor(sk.intercept_visible_))
        rbm.c.copy_(torch.as_tensor(sk.intercept_hidden_))
    return rbm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--ais-betas", type=int, default=10000)
    parser.add_argument("--ais-runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_digits("train", binarize=True).x
    test = load_digits("test", binarize=True).x
    base = bernoulli_baseline(train, test)
    print(
        f"binarized digits: {len(train)} train / {len(test)} test; hidden={args.hidden}, lr={args.lr}, "
        f"epochs={args.epochs}, PCD-1, SGD; factorized-Bernoulli test log p(x) = {base.mean:.2f} nats\n"
    )
    print(
        "| batch | sklearn s/epoch | ppdgm s/epoch | ratio ppdgm/sklearn | sklearn test log p(x) (AIS) | "
        "ppdgm test log p(x) (AIS) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    train_sklearn(train, args.hidden, args.lr, 10, 1, args.seed)  # warm-up: first-call costs of both libraries
    train_ppdgm(train, args.hidden, args.lr, 10, 1, args.seed)
    for batch in args.batch_sizes:
        sk, sk_time = train_sklearn(train, args.hidden, args.lr, batch, args.epochs, args.seed)
        pp, pp_time = train_ppdgm(train, args.hidden, args.lr, batch, args.epochs, args.seed)
        ais = {"num_runs": args.ais_runs, "num_betas": args.ais_betas, "base_data": train, "seed": args.seed}
        sk_model = as_ppdgm(sk)
        sk_ll = log_likelihood(sk_model, test, **ais)
        sk_z = sk_model.last_log_z
        pp_ll = log_likelihood(pp, test, **ais)
        print(
            f"| {batch} | {sk_time:.4f} | {pp_time:.4f} | {pp_time / sk_time:.2f}x | "
            f"{sk_ll.mean:.2f} ± {sk_ll.stderr:.2f} (log Z s.e. {sk_z.stderr:.2f}) | "
            f"{pp_ll.mean:.2f} ± {pp_ll.stderr:.2f} (log Z s.e. {pp.last_log_z.stderr:.2f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
