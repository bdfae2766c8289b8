"""HMC side by side: ppdgm ChEES vs BlackJAX ChEES vs NumPyro NUTS (vectorized) vs Pyro NUTS.

Three posteriors (``hmc_targets.py``; each written as a Pyro model, a NumPyro model and a JAX log
density, checked to agree at a random point before anything is timed): logistic regression on
breast cancer (31 dims), non-centered eight schools (10 dims) and a 2PL item-response model,
200 students x 20 items (243 dims).

Every sampler gets the same number of chains, warm-up iterations and draws per chain (Pyro NUTS,
which runs its chains one after another, gets ``--pyro-chains``, 4 by default: 64 would take an
hour). Initial points are uniform in (-2, 2) on the unconstrained space for all; BlackJAX and
NumPyro start from the very same array, Pyro and ppdgm (which take no per-chain initial points)
draw their own from the same distribution. Torch and XLA both run on one thread
(``--threads``).

What each column means:

- ``wall``: warm-up + sampling seconds, compilation excluded. BlackJAX's jitted program is
  compiled ahead of time (``jit(...).lower(...).compile()``, the ``compile`` column). NumPyro runs
  twice with the same shapes; the second run is timed and ``compile`` is the first's excess. ppdgm's
  ``compile`` is its ``init_seconds`` (initial points, step-size search and compiling the potential
  and its gradient with TorchInductor, ``--ppdgm-compile``).
  Pyro's JIT trace is inside its wall time (Pyro does not split it out).
- ``grads``: gradient evaluations of one chain's log density, summed over chains, warm-up included
  (a leapfrog step of 64 vectorized chains counts 64).
- ``min ESS`` / ``med ESS``: the smallest and the median bulk-ESS (ArviZ) over every scalar
  coordinate of the posterior; ``ESS/s`` and ``ESS/grad`` use the minimum.
- ``R-hat``: the largest rank-normalized split R-hat; above 1.01 means a sampler has not
  converged and its ESS is not to be trusted.
- ``us/grad``: wall microseconds per one-chain gradient: the cost side of ESS/s.

The last two lines are the headline, the smallest ratio over the targets (a script can read them)::

    ratio ppdgm ChEES / BlackJAX ChEES ESS/s = <number>
    ratio ppdgm ChEES / BlackJAX ChEES ESS/gradient = <number>

Above 1 means ppdgm's ChEES is ahead on every target. ``--profile`` then runs ppdgm's ChEES
under cProfile on each target and prints where its time goes per batched gradient evaluation,
beside BlackJAX's milliseconds per batched gradient.

    OMP_NUM_THREADS=1 python benchmarks/bench_hmc.py            # all four samplers, three targets
    OMP_NUM_THREADS=1 python benchmarks/bench_hmc.py --quick    # a smoke run (16 chains, 100 + 100)
    OMP_NUM_THREADS=1 python benchmarks/bench_hmc.py --samplers ppdgm,blackjax --targets logistic,schools
    OMP_NUM_THREADS=1 python benchmarks/bench_hmc.py --samplers blackjax --warmup 100 --samples 100 --profile

The slow rows: NumPyro's vectorized NUTS (a vmapped tree-building loop: every iteration waits for
the chain with the deepest tree) and Pyro NUTS; ``--samplers ppdgm,blackjax`` skips them. From the
uniform (-2, 2) start BlackJAX's adaptation does not converge on the item-response target (step
size shrinks, stuck chains diverge every iteration; with ``--blackjax-mass diagonal`` the
trajectory length runs to hundreds of steps, so that row takes long): its R-hat says so.
``--blackjax-init-radius 0.5`` starts it closer in, where it converges (ppdgm keeps (-2, 2)).

Wall times depend on the machine and its load; ratios measured in one process, ESS per gradient
and R-hat do not. Not a test: it asserts only that the three log densities agree.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass


@dataclass
class Config:
    chains: int
    warmup: int
    samples: int


@dataclass
class Result:
    draws: dict  # site -> (chains, draws, ...), constrained
    wall: float
    compile: float
    grads: int  # one-chain gradient evaluations, summed over chains, warm-up included
    divergences: int
    tuned: str  # the adapted step size and leapfrog steps, as text


# ---------------------------------------------------------------------------------------------
# the four samplers


def run_blackjax(target, cfg: Config, init: dict, seed: int, opt) -> Result:
    """``chees_adaptation`` then ``dynamic_hmc`` with the adapted parameters, chains vmapped, the
    whole run one jitted program compiled ahead of time."""
    import blackjax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from blackjax.adaptation.base import get_filter_adapt_info_fn

    log_density = target.jax_log_density
    adaptation = blackjax.chees_adaptation(
        log_density,
        cfg.chains,
        mass_matrix_estimation=None if opt.blackjax_mass == "none" else "diagonal",
        adaptation_info_fn=get_filter_adapt_info_fn(info_keys={"num_integration_steps", "is_divergent"}),
    )

    def run(key, positions):
        key_warmup, key_sample = jax.random.split(key)
        (states, params), info = adaptation.run(
            key_warmup,
            positions,
            step_size=opt.blackjax_step_size,
            optim=optax.adam(opt.blackjax_lr),
            num_steps=cfg.warmup,
            max_sampling_steps=max(cfg.samples, 1000),
        )
        kernel = blackjax.dynamic_hmc(log_density, **params)

        def one_draw(states, key):
            states, step_info = jax.vmap(kernel.step)(jax.random.split(key, cfg.chains), states)
            return states, (states.position, step_info.num_integration_steps, step_info.is_divergent)

        _, (draws, steps, divergent) = jax.lax.scan(one_draw, states, jax.random.split(key_sample, cfg.samples))
        grads = info.info.num_integration_steps.sum() + steps.sum()
        return draws, grads, divergent.sum(), params["step_size"], params["integration_steps_params"][0]

    shrink = opt.blackjax_init_radius / 2  # the shared start is uniform in (-2, 2)
    key, positions = jax.random.PRNGKey(seed), {k: jnp.asarray(v * shrink) for k, v in init.items()}
    t = time.perf_counter()
    compiled = jax.jit(run).lower(key, positions).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(key, positions))
    wall = time.perf_counter() - t
    draws, grads, divergent, step_size, n_steps = out
    draws = target.constrain({k: np.swapaxes(np.asarray(v), 0, 1) for k, v in draws.items()})
    tuned = f"eps {float(step_size):.3g}, L {float(n_steps):.1f}"
    return Result(draws, wall, compile_s, int(grads), int(divergent), tuned)


def run_numpyro(target, cfg: Config, init: dict, seed: int, opt) -> Result:
    """NumPyro NUTS with ``chain_method="vectorized"``; run twice, the second run timed."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from hmc_targets import model_args
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(
        NUTS(target.numpyro_model),
        num_warmup=cfg.warmup,
        num_samples=cfg.samples,
        num_chains=cfg.chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    args = model_args(target, "numpyro")
    init_params = {k: jnp.asarray(v) for k, v in init.items()}

    def once(key):
        key_warmup, key_sample = jax.random.split(key)
        mcmc.warmup(key_warmup, *args, init_params=init_params, extra_fields=("num_steps",), collect_warmup=True)
        warm_grads = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
        mcmc.run(key_sample, *args, extra_fields=("num_steps", "diverging"))
        draws = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
        return draws, warm_grads, mcmc.get_extra_fields(group_by_chain=True)

    t = time.perf_counter()
    once(jax.random.PRNGKey(seed + 1))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    draws, warm_grads, extra = once(jax.random.PRNGKey(seed))
    wall = time.perf_counter() - t
    steps = np.asarray(extra["num_steps"])
    return Result(
        {k: np.asarray(v) for k, v in draws.items()},
        wall,
        cold - wall,
        warm_grads + int(steps.sum()),
        int(np.asarray(extra["diverging"]).sum()),
        f"eps {float(np.mean(mcmc.last_state.adapt_state.step_size)):.3g}, L {steps.mean():.1f} (mean)",
    )


def run_pyro(target, cfg: Config, init: dict, seed: int, opt) -> Result:
    """Pyro's NUTS (through ppdgm's driver), chains one after another, JIT-compiled potential."""
    import numpy as np
    from hmc_targets import model_args

    from ppdgm.inference.mcmc import NUTS

    pyro_cfg = Config(opt.pyro_chains, cfg.warmup, cfg.samples)
    fit = NUTS(
        num_warmup=pyro_cfg.warmup,
        num_samples=pyro_cfg.samples,
        num_chains=pyro_cfg.chains,
        jit_compile=True,
        seed=seed,
        progress=False,
    ).run(target.pyro_model, *model_args(target, "pyro"))
    stats = fit.extra["tensors"]["sample_stats"]
    n_steps = stats["n_steps"].float().mean()
    return Result(
        {k: v.numpy() for k, v in fit.samples.items()},
        fit.timing["seconds"],
        float("nan"),
        int(fit.timing["grad_evals"]),
        int(stats["diverging"].sum()),
        f"eps {float(np.mean(stats['step_size'].numpy())):.3g}, L {float(n_steps):.1f} (mean)",
    )


def run_ppdgm(target, cfg: Config, init: dict, seed: int, opt) -> Result:
    """ppdgm's ChEES: all chains one batch, the potential and its gradient compiled once
    (``--ppdgm-compile``: TorchInductor by default, or the TorchScript trace)."""
    from hmc_targets import model_args

    fit = chees(cfg, seed, opt.ppdgm_compile).run(target.pyro_model, *model_args(target, "pyro"))
    stats = fit.extra["tensors"]["sample_stats"]
    steps = fit.extra["trajectory_length"] / fit.extra["step_size"]
    return Result(
        {k: v.numpy() for k, v in fit.samples.items()},
        fit.timing["warmup_seconds"] + fit.timing["sample_seconds"],
        fit.timing["init_seconds"],
        int(fit.timing["grad_evals"]) * cfg.chains,  # the driver counts batched evaluations
        int(stats["diverging"].sum()),
        f"eps {fit.extra['step_size']:.3g}, L {steps:.1f}",
    )


def chees(cfg: Config, seed: int, compile: str = "inductor"):
    from ppdgm.inference.chees import ChEES

    return ChEES(
        num_chains=cfg.chains,
        num_warmup=cfg.warmup,
        num_samples=cfg.samples,
        jit_compile={"inductor": "inductor", "trace": True, "none": False}[compile],
        seed=seed,
        progress=False,
    )


SAMPLERS = {
    "ppdgm": ("ppdgm ChEES", run_ppdgm),
    "blackjax": ("BlackJAX ChEES", run_blackjax),
    "numpyro": ("NumPyro NUTS (vec)", run_numpyro),
    "pyro": ("Pyro NUTS", run_pyro),
}


# ---------------------------------------------------------------------------------------------


def ess_and_rhat(draws: dict) -> tuple[float, float, float]:
    """Minimum and median bulk-ESS, and maximum R-hat, over every scalar of ``{site: (chain, draw, ...)}``."""
    import arviz as az
    import numpy as np

    idata = az.from_dict(posterior={k: np.asarray(v, dtype=np.float64) for k, v in draws.items()})
    ess = np.concatenate([v.values.ravel() for v in az.ess(idata, method="bulk").data_vars.values()])
    rhat = np.concatenate([v.values.ravel() for v in az.rhat(idata).data_vars.values()])
    return float(ess.min()), float(np.median(ess)), float(rhat.max())


def profile_ppdgm(target, cfg: Config, seed: int, top: int) -> float:
    """ppdgm's ChEES on ``target`` under cProfile: prints the ``top`` functions by cumulative time,
    in milliseconds per batched gradient evaluation; returns the total ms per batched gradient."""
    import cProfile
    import pstats

    from hmc_targets import model_args

    profiler = cProfile.Profile()
    profiler.enable()
    fit = chees(cfg, seed).run(target.pyro_model, *model_args(target, "pyro"))
    profiler.disable()
    batched = fit.timing["grad_evals"]
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)
    print(f"\n### ppdgm ChEES profile, {target.name}: {batched} batched gradients, cumulative ms per gradient")
    print("| ms/grad | calls/grad | function |")
    print("|---|---|---|")
    for (path, line, func), (_, calls, _, cumulative, _) in rows[:top]:
        where = f"{os.path.basename(path)}:{line}({func})" if line else func
        print(f"| {1e3 * cumulative / batched:.3f} | {calls / batched:.1f} | `{where}` |")
    return 1e3 * (fit.timing["warmup_seconds"] + fit.timing["sample_seconds"]) / batched


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny runs (16 chains, 100 + 100, item response 50x10), to check the script",
    )
    parser.add_argument("--chains", type=int, default=64, help="chains of every sampler but Pyro NUTS")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500, help="draws per chain")
    parser.add_argument("--pyro-chains", type=int, default=4, help="Pyro NUTS runs its chains in sequence")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated subset of {list(SAMPLERS)}")
    parser.add_argument("--targets", default="logistic,schools,irt", help="comma-separated subset of them")
    parser.add_argument("--threads", type=int, default=1, help="torch and XLA CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blackjax-mass", choices=("diagonal", "none"), default="diagonal")
    parser.add_argument("--blackjax-step-size", type=float, default=0.1, help="BlackJAX's initial step size")
    parser.add_argument("--blackjax-lr", type=float, default=0.025, help="Adam's rate on log trajectory length")
    parser.add_argument(
        "--blackjax-init-radius",
        type=float,
        default=2.0,
        help="BlackJAX starts uniform in (-r, r) (2: the others' start; 0.5 lets it converge on item response)",
    )
    parser.add_argument(
        "--ppdgm-compile",
        choices=("inductor", "trace", "none"),
        default="inductor",
        help="how ppdgm's ChEES compiles its potential and gradient (its compile time is the compile column)",
    )
    parser.add_argument("--profile", action="store_true", help="then profile ppdgm ChEES on each target")
    parser.add_argument("--profile-top", type=int, default=25)
    opt = parser.parse_args()
    samplers = opt.samplers.split(",")
    unknown = [s for s in samplers if s not in SAMPLERS] + [
        t for t in opt.targets.split(",") if t not in ("logistic", "schools", "irt")
    ]
    if unknown:
        parser.error(f"unknown sampler or target {unknown}")
    if opt.threads == 1:  # before JAX starts its CPU client
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    import jax
    import numpy as np
    import pyro
    import torch
    from hmc_targets import TARGETS, check_log_densities_agree, item_response

    torch.set_num_threads(opt.threads)
    jax.config.update("jax_platforms", "cpu")
    cfg = Config(16, 100, 100) if opt.quick else Config(opt.chains, opt.warmup, opt.samples)
    if opt.quick:
        opt.pyro_chains = 2

    factories = {**TARGETS, "irt": lambda: item_response(50, 10)} if opt.quick else TARGETS
    targets = [factories[t]() for t in opt.targets.split(",")]
    for target in targets:
        check_log_densities_agree(target)
    print(
        f"{cfg.chains} chains x ({cfg.warmup} warm-up + {cfg.samples} draws); Pyro NUTS {opt.pyro_chains} chains; "
        f"torch {torch.__version__}, jax {jax.__version__}, {opt.threads} thread(s), load {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    rows = []
    for target in targets:
        init = target.uniform_init(cfg.chains, opt.seed)
        for key in samplers:
            label, fn = SAMPLERS[key]
            pyro.clear_param_store()
            r = fn(target, cfg, init, opt.seed, opt)
            ess, med, rhat = ess_and_rhat(r.draws)
            chains, draws = next(iter(r.draws.values())).shape[:2]
            rows.append(
                {
                    "target": target.name,
                    "sampler": key,
                    "label": label,
                    "runs": f"{chains} x ({cfg.warmup} + {draws})",
                    "wall": r.wall,
                    "compile": r.compile,
                    "grads": r.grads,
                    "ess": ess,
                    "med": med,
                    "ess_s": ess / r.wall,
                    "ess_grad": ess / r.grads,
                    "us_grad": 1e6 * r.wall / r.grads,
                    "rhat": rhat,
                    "div": r.divergences,
                    "tuned": r.tuned,
                }
            )
            compile_text = "in wall" if np.isnan(r.compile) else f"{r.compile:.2f}s"
            print(
                f"  {target.name:22s} {label:19s} wall {r.wall:7.2f}s  compile {compile_text}  grads {r.grads:,}  "
                f"min ESS {ess:7.0f}  ESS/grad {ess / r.grads:.2e}  R-hat {rhat:.3f}  div {r.divergences}  ({r.tuned})",
                flush=True,
            )

    print(
        "\n| target | sampler | chains x (warm-up + draws) | wall (s) | compile (s) | grads | min ESS | med ESS "
        "| ESS/s | ESS/grad | us/grad | max R-hat | div | adapted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        comp = "in wall" if np.isnan(r["compile"]) else f"{r['compile']:.1f}"
        print(
            f"| {r['target']} | {r['label']} | {r['runs']} | {r['wall']:.1f} | {comp} | {r['grads']:,} "
            f"| {r['ess']:.0f} | {r['med']:.0f} | {r['ess_s']:.1f} | {r['ess_grad']:.2e} | {r['us_grad']:.1f} "
            f"| {r['rhat']:.3f} | {r['div']} | {r['tuned']} |"
        )

    def row(target, sampler):
        return next((r for r in rows if r["target"] == target.name and r["sampler"] == sampler), None)

    if {"ppdgm", "blackjax"} <= set(samplers):
        for measure, key in (("ESS/s", "ess_s"), ("ESS/gradient", "ess_grad")):
            ratios = {t.name: row(t, "ppdgm")[key] / row(t, "blackjax")[key] for t in targets}
            print(f"\nppdgm ChEES / BlackJAX ChEES {measure}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
        print()
        for measure, key in (("ESS/s", "ess_s"), ("ESS/gradient", "ess_grad")):
            worst = min(row(t, "ppdgm")[key] / row(t, "blackjax")[key] for t in targets)
            print(f"ratio ppdgm ChEES / BlackJAX ChEES {measure} = {worst:.3g}")

    if opt.profile:
        for target in targets:
            ms = profile_ppdgm(target, cfg, opt.seed, opt.profile_top)
            bj = row(target, "blackjax")
            blackjax_ms = f"{1e-3 * bj['us_grad'] * cfg.chains:.3f}" if bj else "not run"
            print(
                f"\n{target.name}: ms per batched gradient ({cfg.chains} chains), profiler off: see the table; "
                f"under cProfile ppdgm {ms:.3f}, BlackJAX {blackjax_ms}"
            )


if __name__ == "__main__":
    main()
