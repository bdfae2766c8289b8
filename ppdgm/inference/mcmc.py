"""NUTS and HMC: Pyro's kernels on any Pyro program with continuous latents, in the sampling driver.

Chains run one after another in this process (seeded by chain, reproducible, no worker
processes). Each chain is a group of :mod:`ppdgm.inference.sampling`'s driver that advances a
Pyro ``HMC``/``NUTS`` kernel through its public interface only (``setup``, ``sample``,
``step_size``, ``potential_fn``, ``transforms``, ``logging()``, ``diagnostics()``), recording per
iteration the step size, the acceptance, the gradient evaluations, divergences and the log
density, so the Fit's history shows the adaptation and ``to_arviz()`` has a ``sample_stats``
group. Discrete latents are refused by name, and an initial point whose log density is not
finite is retried and then reported with the site that made it so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc import HMC as PyroHMC
from pyro.infer.mcmc import NUTS as PyroNUTS

from ppdgm import distributed
from ppdgm.fit import Fit
from ppdgm.inference.callbacks import as_callbacks
from ppdgm.inference.sampling import Draws, Sampler, SamplingRun, Step, default_device
from ppdgm.logdensity import nonfinite_sites


def initial_point_error(model, args, kwargs, init_strategy, tries: int) -> ValueError:
    """A ValueError naming the sites whose log density stays non-finite at initial points."""
    counts: dict[str, int] = {}
    with poutine.block(), torch.no_grad(), pyro.validation_enabled(False):
        for _ in range(min(tries, 20)):
            tr = poutine.trace(InitMessenger(init_strategy)(model)).get_trace(*args, **kwargs)
            for name in nonfinite_sites(tr):
                counts[name] = counts.get(name, 0) + 1
    named = sorted(counts, key=lambda name: counts[name], reverse=True)
    where = (
        f"site {named[0]!r} has a non-finite log density" + (f" (also {named[1:]})" if named[1:] else "")
        if named
        else "the gradient of the log density is not finite"
    )
    return ValueError(
        f"no initial point with a finite log density after {tries} tries: {where}; check that site's "
        "distribution parameters and observed values (e.g. data outside its support), or pass "
        "initial values with init_strategy=init_to_value(values=...)"
    )


class PyroChain:
    """One chain of a Pyro ``HMC``/``NUTS`` kernel as a group of the sampling driver.

    Pyro reports per iteration only its running mean acceptance probability (``logging()``) and,
    in the sampling phase, the acceptance rate and divergent iterations (``diagnostics()``); the
    gradient evaluations and the log density of the current point come from wrapping the
    kernel's ``potential_fn``, which remembers the potential of every point it evaluated."""

    width = 1

    def __init__(self, engine: NUTS, model, args, kwargs, chain: int):
        self.engine, self.model, self.args, self.kwargs, self.chain = engine, model, args, kwargs, chain

    def start(self, state: dict | None) -> None:
        engine = self.engine
        if engine.seed is not None:  # chain c's draws do not depend on which process runs it
            pyro.set_rng_seed(engine.seed * 1_000_003 + self.chain)
        self.kernel = engine._kernel(self.model)
        try:
            self.kernel.setup(engine.num_warmup, *self.args, **self.kwargs)
        except ValueError as err:
            if "cannot find valid initial params" not in str(err):
                raise
            raise initial_point_error(
                self.model, self.args, self.kwargs, engine._init_strategy, engine.max_init_tries
            ) from None
        self.params, self.calls = self.kernel.initial_params, 0
        self.evaluated: list[tuple[dict, torch.Tensor]] = []
        inner = self.kernel.potential_fn

        def counted(z):
            value = inner(z)
            self.calls += 1
            self.evaluated.append((z, value.detach()))
            return value

        self._potential, self.kernel.potential_fn = inner, counted
        self.lp: float | None = None
        self.accepted, self.divergences = 0, 0

    def end_warmup(self) -> None:
        pass  # the kernel ends its own adaptation after num_warmup iterations

    def draw(self) -> dict:
        transforms = self.kernel.transforms
        return {k: (transforms[k].inv(v) if k in transforms else v).detach()[None] for k, v in self.params.items()}

    def step(self, iteration: int, warmup: bool) -> Step:
        step_size, calls = float(self.kernel.step_size), self.calls
        with pyro.validation_enabled(False):
            self.params = self.kernel.sample(self.params)
        self.lp = self._log_density()
        accept_prob = float(self.kernel.logging()["acc. prob"])
        if warmup:
            accepted, diverging = float("nan"), False
        else:
            diagnostics = self.kernel.diagnostics()
            n = iteration + 1 - self.engine.num_warmup
            count = round(diagnostics["acceptance rate"] * n)
            accepted, self.accepted = float(count - self.accepted), count
            diverging = len(diagnostics["divergences"]) > self.divergences
            self.divergences = len(diagnostics["divergences"])
        history = {
            "step_size": step_size,
            "mean_accept_prob": accept_prob,
            "num_grads": self.calls - calls,
            "diverging": diverging,
            "potential": -self.lp,
        }
        stats = {
            "diverging": torch.tensor([diverging]),
            "acceptance_rate": torch.tensor([accepted]),
            "n_steps": torch.tensor([self.calls - calls]),
            "step_size": torch.tensor([step_size]),
            "lp": torch.tensor([self.lp]),
        }
        return Step(history, stats, self.calls - calls)

    def _log_density(self) -> float:
        """log density of the current point: remembered when the kernel evaluated it (or when the
        chain was already there), else computed once."""
        found = next(
            (value for z, value in reversed(self.evaluated) if all(z.get(k) is v for k, v in self.params.items())), None
        )
        if found is None:
            with torch.no_grad():
                found = self._potential({k: v.detach() for k, v in self.params.items()})
        self.evaluated = [(self.params, torch.as_tensor(found))]
        return -float(found)


class NUTS(Sampler):
    """The No-U-Turn sampler (Pyro's ``NUTS``) on any Pyro program with continuous latents.

    Args:
        num_samples, num_warmup: draws kept per chain and adaptation iterations before them.
        num_chains: chains, each seeded by (seed, chain index); in one process they run one after
            another, under torchrun chain ``c`` runs on rank ``c % world`` and rank 0's Fit holds all.
        target_accept: dual-averaging target of the step-size adaptation.
        max_tree_depth: NUTS doubling limit (2**depth leapfrog steps at most).
        dense_mass: adapt a dense (True) or diagonal (False) mass matrix.
        jit_compile: trace the potential with the PyTorch JIT (faster for large static models).
        init_strategy: a Pyro init strategy (default: uniform in (-2, 2) unconstrained).
        max_init_tries: initial points tried per chain before an error naming the bad site.
    """

    name = "nuts"

    def __init__(
        self,
        num_samples: int = 1000,
        num_warmup: int = 500,
        num_chains: int = 2,
        target_accept: float = 0.8,
        max_tree_depth: int = 10,
        dense_mass: bool = False,
        jit_compile: bool = False,
        init_strategy=init_to_uniform,
        max_init_tries: int = 100,
        seed: int | None = 0,
        device=None,
        progress: bool | None = None,
    ):
        for arg, val in (
            ("num_samples", num_samples),
            ("num_chains", num_chains),
            ("max_tree_depth", max_tree_depth),
            ("max_init_tries", max_init_tries),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if not isinstance(num_warmup, int) or isinstance(num_warmup, bool) or num_warmup < 0:
            raise ValueError(f"num_warmup must be a non-negative int, got {num_warmup!r}")
        if not (isinstance(target_accept, float) and 0 < target_accept < 1):
            raise ValueError(f"target_accept must be a float in (0, 1), got {target_accept!r}")
        if not callable(init_strategy):
            raise TypeError(f"init_strategy must be a Pyro init strategy (callable), got {init_strategy!r}")
        self.num_samples, self.num_warmup, self.num_chains = num_samples, num_warmup, num_chains
        self.target_accept, self.max_tree_depth, self.dense_mass = target_accept, max_tree_depth, dense_mass
        self.jit_compile, self.max_init_tries = jit_compile, max_init_tries
        self._init_strategy = init_strategy
        self.seed, self.device, self.progress = seed, device, progress

    def _kernel(self, model):
        return PyroNUTS(
            model,
            target_accept_prob=self.target_accept,
            max_tree_depth=self.max_tree_depth,
            full_mass=self.dense_mass,
            jit_compile=self.jit_compile,
            ignore_jit_warnings=True,
            init_strategy=self._init_strategy,
        )

    def run(self, model, *args, checkpoint_dir=None, resume: bool = False, callbacks=(), **kwargs) -> Fit:
        """Draw from the posterior of ``model(*args, **kwargs)``; returns a Fit with ``samples``.

        With ``checkpoint_dir`` every finished chain is saved; ``resume=True`` keeps the chains a
        killed run finished and runs only the others (each chain is seeded by its index, so the
        result is the uninterrupted run's). ``callbacks`` see every iteration of every chain
        (:class:`~ppdgm.inference.sampling.SamplingDriver`) and the Fit.
        """
        callbacks = as_callbacks(callbacks)
        device, args, kwargs, _ = self._setup(model, args, kwargs, allow_enumerated=True)
        with default_device(device):
            world = distributed.init_from_env(device)
            mine = [c for c in range(self.num_chains) if c % world.size == world.rank]
            chains = [PyroChain(self, model, args, kwargs, c) for c in mine]
            run = self._driver(_rank_dir(checkpoint_dir, world), callbacks=callbacks).run(chains, device, resume)
            if world.parallel:
                run = _gather_chains(run, mine, self.num_chains, device)
        w = self.num_warmup
        history = {k: [h[k] for h in run.history] for k in ("step_size", "mean_accept_prob", "num_grads", "diverging")}
        history["divergences"] = [int(sum(h["diverging"][w:])) for h in run.history]
        return self._fit(run, history, {}, model, args, kwargs, callbacks)


def _gather_chains(run: SamplingRun, mine: list, num_chains: int, device) -> SamplingRun:
    """Chains ran on ranks ``c % world``: every rank gets all of them, in chain order."""
    mine_draws = [
        ({k: v[i].cpu() for k, v in run.draws.samples.items()}, {k: v[i].cpu() for k, v in run.draws.stats.items()})
        for i in range(len(mine))
    ]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (mine, mine_draws, run.history))
    by_chain = {c: (d, h) for ids, ds, hs in gathered for c, d, h in zip(ids, ds, hs)}
    samples, stats = (
        {k: torch.stack([by_chain[c][0][part][k] for c in range(num_chains)]).to(device) for k in by_chain[0][0][part]}
        for part in (0, 1)
    )
    draws = Draws(num_chains, run.draws.num_samples, samples, stats)
    return SamplingRun(draws, [by_chain[c][1] for c in range(num_chains)], [None] * num_chains, run.timing)


def _rank_dir(directory, world):
    """Each process of a multi-process run checkpoints its own chains."""
    if directory is None or not world.parallel:
        return directory
    return Path(directory) / f"rank{world.rank}"


class HMC(NUTS):
    """Static-trajectory HMC (Pyro's ``HMC``): ``trajectory_length`` in units of the unconstrained space."""

    name = "hmc"

    def __init__(
        self,
        num_samples: int = 1000,
        num_warmup: int = 500,
        num_chains: int = 2,
        trajectory_length: float = 1.0,
        target_accept: float = 0.8,
        **kwargs,
    ):
        super().__init__(num_samples, num_warmup, num_chains, target_accept, **kwargs)
        if not (isinstance(trajectory_length, (int, float)) and trajectory_length > 0):
            raise ValueError(f"trajectory_length must be a positive number, got {trajectory_length!r}")
        self.trajectory_length = float(trajectory_length)

    def _kernel(self, model):
        return PyroHMC(
            model,
            trajectory_length=self.trajectory_length,
            target_accept_prob=self.target_accept,
            full_mass=self.dense_mass,
            jit_compile=self.jit_compile,
            ignore_jit_warnings=True,
            init_strategy=self._init_strategy,
        )
