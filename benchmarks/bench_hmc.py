"""HMC side by side: Pyro NUTS vs ppdgm ChEES (vectorized chains) vs NumPyro NUTS (if installed).

Two posteriors: Bayesian logistic regression on scikit-learn's breast-cancer data (569 x 30,
standardized, plus an intercept) and non-centered eight schools. Each sampler's wall time is
warm-up + sampling with compilation excluded (NumPyro compiles on a first run that is not timed;
ChEES's JIT trace is part of its init, reported separately); ESS is the minimum bulk-ESS over
every scalar parameter. Chains of the NUTS samplers run one after another (2 cores, shared).
Prints a markdown table and the ESS/s ratios. Not a test: asserts nothing.

    OMP_NUM_THREADS=1 python benchmarks/bench_hmc.py            # about 3-4 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/bench_hmc.py --quick    # a smoke run
    OMP_NUM_THREADS=1 python benchmarks/bench_hmc.py --samplers chees,numpyro   # skip Pyro NUTS (slowest)
"""

from __future__ import annotations

import argparse
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch

from ppdgm.inference.chees import ChEES
from ppdgm.inference.mcmc import NUTS

# ---------------------------------------------------------------------------------------------
# problems, written once for Pyro (broadcasting over a batch of draws on the left) and NumPyro


def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def logistic_regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1) + b), obs=y)


SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])
Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def numpyro_models():
    import numpyro
    import numpyro.distributions as nd

    def logreg(x, y):
        w = numpyro.sample("w", nd.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        b = numpyro.sample("b", nd.Normal(0.0, 5.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", nd.Bernoulli(logits=x @ w + b), obs=y)

    def schools(sigma, y=None):
        mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
        with numpyro.plate("school", len(sigma)):
            eta = numpyro.sample("eta", nd.Normal(0.0, 1.0))
            numpyro.sample("obs", nd.Normal(mu + tau * eta, sigma), obs=y)

    return {"logistic regression": logreg, "eight schools (nc)": schools}


# ---------------------------------------------------------------------------------------------


def min_ess_and_rhat(samples: dict) -> tuple[float, float]:
    """Minimum bulk-ESS and maximum R-hat over every scalar of ``{site: (chain, draw, ...)}``."""
    idata = az.from_dict(posterior={k: np.asarray(v) for k, v in samples.items()})
    ess = az.ess(idata, method="bulk")
    rhat = az.rhat(idata)
    return (
        float(min(ess[k].values.min() for k in ess.data_vars)),
        float(max(rhat[k].values.max() for k in rhat.data_vars)),
    )


def run_pyro_nuts(model, args, warmup, samples, chains):
    t = time.perf_counter()
    fit = NUTS(num_warmup=warmup, num_samples=samples, num_chains=chains, jit_compile=True, seed=0, progress=False).run(
        model, *args
    )
    wall = time.perf_counter() - t
    return {k: v.numpy() for k, v in fit.samples.items()}, wall, float("nan"), fit.timing["grad_evals"]


def run_chees(model, args, warmup, samples, chains):
    fit = ChEES(
        num_chains=chains, num_warmup=warmup, num_samples=samples, jit_compile=True, seed=0, progress=False
    ).run(model, *args)
    wall = fit.timing["warmup_seconds"] + fit.timing["sample_seconds"]
    return {k: v.numpy() for k, v in fit.samples.items()}, wall, fit.timing["init_seconds"], fit.timing["grad_evals"]


def run_numpyro(model, args, warmup, samples, chains):
    """One compiled single-chain sampler reused for every chain: the first (cold) run compiles."""
    import jax
    from numpyro.infer import MCMC
    from numpyro.infer import NUTS as NNUTS

    args = tuple(a.numpy() for a in args)
    mcmc = MCMC(
        NNUTS(model), num_warmup=warmup, num_samples=samples, num_chains=1, progress_bar=False, jit_model_args=True
    )
    t = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(100), *args)
    jax.block_until_ready(mcmc.get_samples())
    cold = time.perf_counter() - t
    per_chain, wall, grads = [], 0.0, 0
    for c in range(chains):
        t = time.perf_counter()
        mcmc.run(jax.random.PRNGKey(c), *args, extra_fields=("num_steps",))
        jax.block_until_ready(mcmc.get_samples())
        wall += time.perf_counter() - t
        per_chain.append({k: np.asarray(v) for k, v in mcmc.get_samples().items()})
        grads += int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
    draws = {k: np.stack([d[k] for d in per_chain]) for k in per_chain[0]}
    return draws, wall, cold - wall / chains, grads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs, to check the script works")
    parser.add_argument("--chees-chains", type=int, default=64)
    parser.add_argument(
        "--samplers",
        default="pyro,chees,numpyro",
        help="comma-separated subset of pyro, chees, numpyro (ChEES always runs: the ratios need it)",
    )
    opt = parser.parse_args()
    torch.set_num_threads(1)
    q = opt.quick
    nuts_cfg = {"warmup": 100 if q else 500, "samples": 100 if q else 500, "chains": 2}
    # many chains pool their information, so ChEES adapts in fewer iterations than one NUTS chain
    chees_cfg = {"warmup": 100 if q else 200, "samples": 50 if q else 300, "chains": 16 if q else opt.chees_chains}
    x, y = breast_cancer()
    problems = {"logistic regression": (logistic_regression, (x, y)), "eight schools (nc)": (eight_schools, (SIGMA, Y))}
    try:
        npm = numpyro_models()
    except ImportError:
        npm = None
        print("numpyro not installed: skipping NumPyro NUTS (pip install numpyro jax)")

    rows = []
    for name, (model, args) in problems.items():
        wanted = set(opt.samplers.split(",")) | {"chees"}
        runs = [("Pyro NUTS", run_pyro_nuts, model, nuts_cfg)] if "pyro" in wanted else []
        runs.append(("ppdgm ChEES", run_chees, model, chees_cfg))
        if npm is not None and "numpyro" in wanted:
            runs.append(("NumPyro NUTS", run_numpyro, npm[name], nuts_cfg))
        for sampler, fn, m, cfg in runs:
            pyro.clear_param_store()
            draws, wall, compile_s, grads = fn(m, args, cfg["warmup"], cfg["samples"], cfg["chains"])
            ess, rhat = min_ess_and_rhat(draws)
            rows.append(
                {
                    "problem": name,
                    "sampler": sampler,
                    "chains": cfg["chains"],
                    "warmup": cfg["warmup"],
                    "draws": cfg["chains"] * cfg["samples"],
                    "wall": wall,
                    "compile": compile_s,
                    "ess": ess,
                    "ess_s": ess / wall,
                    "rhat": rhat,
                    "grads": grads,
                }
            )
            print(
                f"  {name:20s} {sampler:13s} wall {wall:7.2f}s  min bulk-ESS {ess:9.0f}  ESS/s {ess / wall:9.1f}",
                flush=True,
            )

    print(
        "\n| problem | sampler | chains x (warm-up + draws) | warm wall (s) | compile/init (s) | min bulk-ESS "
        "| ESS/s | max R-hat | ChEES ESS/s ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chees = next(c for c in rows if c["problem"] == r["problem"] and c["sampler"] == "ppdgm ChEES")
        ratio = chees["ess_s"] / r["ess_s"] if r["sampler"] != "ppdgm ChEES" else 1.0
        comp = "-" if np.isnan(r["compile"]) else f"{r['compile']:.2f}"
        draws = f"{r['chains']} x ({r['warmup']} + {r['draws'] // r['chains']})"
        print(
            f"| {r['problem']} | {r['sampler']} | {draws} | {r['wall']:.2f} | {comp} "
            f"| {r['ess']:.0f} | {r['ess_s']:.1f} | {r['rhat']:.3f} | "
            + (f"{ratio:.1f}x vs this" if r["sampler"] != "ppdgm ChEES" else "-")
            + " |"
        )
    print("\nPyro NUTS runs with jit_compile=True; its JIT trace is inside its wall time (it cannot be split out).")


if __name__ == "__main__":
    main()
