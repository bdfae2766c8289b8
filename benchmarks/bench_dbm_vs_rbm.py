"""Does depth pay? The DBM against an RBM of its whole hidden budget, over training seeds.

One training run and one AIS estimate per model move a digits test NLL by 0.1-0.4 nats (training
seed) and 0.05 (AIS seed), as much as the gap being measured; so each row here is trained on
several seeds and each trained model's ``log Z`` is estimated by several independent AIS runs
(fixed AIS seeds, the same for every row). Both families are trained by persistent CD with the
family's suggested settings (``engine_config``), at the same number of steps, on binarized digits.
The DBM's NLL is its importance-sampled bound (h1 summed out, h2 importance-sampled), so its
row is an upper bound on its true NLL; the RBM's is exact up to AIS. Columns: the mean over
seeds, the standard deviation, the per-seed values, the per-seed difference DBM - this row and
that difference's mean with its standard error (paired by training seed).

``--sparsity`` trains every row with the sparsity penalty (``sparsity_cost=0.01``, target 0.2 on
the first hidden layer and 0.1 on the DBM's second).

    OMP_NUM_THREADS=1 python benchmarks/bench_dbm_vs_rbm.py [--seeds 6] [--steps 20000] [--sparsity] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from bench_samplers import train_fit

from ppdgm.data import load_digits

ROWS = [  # (label, MODELS name, from_data kwargs)
    ("dbm 128+64", "dbm", {}),
    ("rbm 192 (the DBM's hidden budget)", "rbm", {"hidden_units": 192}),
    ("rbm 128", "rbm", {}),
]
AIS_SEEDS = (100, 101)
SPARSITY = {
    "dbm": {"sparsity_cost": 0.01, "sparsity_target": (0.2, 0.1)},
    "rbm": {"sparsity_cost": 0.01, "sparsity_target": 0.2},
}


def test_nll(obj, test: torch.Tensor, ais_runs: int) -> float:
    """Test NLL in nats, averaged over the AIS seeds' estimates of ``log Z``."""
    values = []
    for seed in AIS_SEEDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values.append(float(-obj.log_likelihood(test, num_runs=ais_runs, seed=seed).double().mean()))
    return statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="training seeds 0 .. seeds-1")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--ais-runs", type=int, default=100)
    parser.add_argument("--sparsity", action="store_true", help="every row with the sparsity penalty")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps, 2 seeds (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, seeds = (max(10, args.steps // 10), min(args.seeds, 2)) if args.quick else (args.steps, args.seeds)
    test = load_digits("test", binarize=True).x
    results: dict[str, list[float]] = {}
    for label, name, kwargs in ROWS:
        kwargs = {**kwargs, **(SPARSITY[name] if args.sparsity else {})}
        t0 = time.perf_counter()
        results[label] = [
            test_nll(train_fit(name, "binary", steps, seed=s, **kwargs)[0], test, args.ais_runs) for s in range(seeds)
        ]
        print(f"done {label} in {time.perf_counter() - t0:.0f} s", flush=True)
    first = results[ROWS[0][0]]
    penalty = ", sparsity penalty on every row" if args.sparsity else ""
    ais = f"log Z by AIS ({args.ais_runs} runs x seeds {AIS_SEEDS})"
    print(f"\n{steps} steps, training seeds 0-{seeds - 1}, {ais}{penalty}\n")
    print("| model | test NLL mean | SD | per seed | DBM - this, per seed | DBM - this, mean +- s.e. |")
    print("|---|---|---|---|---|---|")
    for label, values in results.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        diffs = [a - b for a, b in zip(first, values)]
        per_seed = " / ".join(f"{v:.2f}" for v in values)
        paired, mean_se = ("", "") if values is first else (" / ".join(f"{d:+.2f}" for d in diffs), mean_and_se(diffs))
        print(f"| {label} | {statistics.fmean(values):.2f} | {sd:.2f} | {per_seed} | {paired} | {mean_se} |")


def mean_and_se(diffs: list[float]) -> str:
    """``"+0.02 +- 0.03"``: the mean paired difference and its standard error over seeds."""
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return f"{statistics.fmean(diffs):+.3f} +- {se:.3f}"


if __name__ == "__main__":
    main()
