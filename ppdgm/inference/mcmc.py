"""NUTS and HMC through Pyro's ``MCMC`` for any Pyro program with continuous latents.

Chains run one after another in this process (seeded, reproducible, no worker processes); each
chain's kernel records its step size, acceptance probability, gradient evaluations and
divergences per iteration, so the Fit's history shows the adaptation and ``to_arviz()`` has a
``sample_stats`` group. The checks shared with the vectorized engine live here too: discrete
latents are refused by name, and an initial point whose log density is not finite is retried
and then reported with the site that made it so.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc import HMC as PyroHMC
from pyro.infer.mcmc import MCMC
from pyro.infer.mcmc import NUTS as PyroNUTS
from pyro.poutine.util import site_is_subsample

from ppdgm import distributed
from ppdgm.fit import Fit
from ppdgm.inference.base import Checkpointer, Engine, move_module, progress_bar, resolve_device, set_seed

# ---------------------------------------------------------------------------------------------
# checks shared by the HMC engines


def as_args(args) -> tuple:
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def prototype_trace(model, args=(), kwargs=None):
    """One validated run of ``model`` (parameters and latents drawn from the prior)."""
    with poutine.block(), torch.no_grad():
        return poutine.trace(model).get_trace(*args, **(kwargs or {}))


def latent_sites(trace) -> dict:
    return {
        n: s
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }


def check_continuous_latents(trace, allow_enumerated: bool) -> None:
    """Raise ValueError naming every discrete latent site HMC cannot move."""
    bad = []
    for name, site in latent_sites(trace).items():
        discrete = site["fn"].support.is_discrete or getattr(site["fn"], "has_enumerate_support", False)
        if discrete and not (allow_enumerated and site["infer"].get("enumerate")):
            bad.append(name)
    if bad:
        how = ("mark them infer={'enumerate': 'parallel'} so NUTS/HMC sum them out, or "
               if allow_enumerated else "")
        raise ValueError(
            f"HMC needs continuous latent sites, but {bad} {'is' if len(bad) == 1 else 'are'} discrete "
            f"(support {latent_sites(trace)[bad[0]]['fn'].support}); {how}observe them, or marginalize them "
            "in the model"
        )


def max_plate_nesting(trace) -> int:
    dims = [f.dim for s in trace.nodes.values() if s["type"] == "sample"
            for f in s["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return -min(dims) if dims else 0


def nonfinite_sites(trace) -> dict:
    """``{site: log_prob sum}`` for sample sites (and factors) whose log density is not finite."""
    bad = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"])
        total = float(lp.sum()) if torch.is_tensor(lp) else float(lp)
        if not torch.isfinite(torch.tensor(total)):
            bad[name] = total
    return bad


def initial_point_error(model, args, kwargs, init_strategy, tries: int) -> ValueError:
    """A ValueError naming the sites whose log density stays non-finite at initial points."""
    counts: dict[str, int] = {}
    with poutine.block(), torch.no_grad(), pyro.validation_enabled(False):
        for _ in range(min(tries, 20)):
            tr = poutine.trace(pyro.infer.autoguide.initialization.InitMessenger(init_strategy)(model)).get_trace(
                *args, **kwargs)
            for name in nonfinite_sites(tr):
                counts[name] = counts.get(name, 0) + 1
    named = sorted(counts, key=counts.get, reverse=True)
    where = (f"site {named[0]!r} has a non-finite log density" + (f" (also {named[1:]})" if named[1:] else "")
             if named else "the gradient of the log density is not finite")
    return ValueError(
        f"no initial point with a finite log density after {tries} tries: {where}; check that site's "
        "distribution parameters and observed values (e.g. data outside its support), or pass "
        "initial values with init_strategy=init_to_value(values=...)"
    )


@contextlib.contextmanager
def default_device(device: torch.device):
    """New tensors (e.g. ``dist.Normal(0., 1.)`` in a plain model) land on ``device``."""
    if device.type == "cpu":
        yield
    else:
        with torch.device(device):
            yield


def move_args(args, kwargs, device):
    def mv(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    return tuple(mv(a) for a in args), {k: mv(v) for k, v in kwargs.items()}


# ---------------------------------------------------------------------------------------------
# kernels that record what they did


class _Recording:
    """Mixin for Pyro's HMC/NUTS: per-iteration step size, accept prob, gradient calls, divergence."""

    def _reset_record(self):
        self.record = {"step_size": [], "accept_prob": [], "num_grads": [], "diverging": [], "potential": []}
        self._grad_calls = 0

    def setup(self, warmup_steps, *args, **kwargs):
        self._reset_record()
        super().setup(warmup_steps, *args, **kwargs)
        inner = self.potential_fn

        def counted(z):
            self._grad_calls += 1
            return inner(z)

        self.potential_fn = counted

    def sample(self, params):
        step_size, calls, div = self.step_size, self._grad_calls, len(self._divergences)
        t, mean_prev = self._t, self._mean_accept_prob
        z = super().sample(params)
        n = self._t - self._warmup_steps if self._t > self._warmup_steps else self._t
        prev = 0.0 if n == 1 else mean_prev
        self.record["step_size"].append(float(step_size))
        self.record["accept_prob"].append(n * self._mean_accept_prob - (n - 1) * prev if self._t > t else 1.0)
        self.record["num_grads"].append(self._grad_calls - calls)
        self.record["diverging"].append(len(self._divergences) > div)
        cached = self._fetch_from_cache()
        self.record["potential"].append(float(cached[1]) if cached[1] is not None else float("nan"))
        return z


class RecordingNUTS(_Recording, PyroNUTS):
    pass


class RecordingHMC(_Recording, PyroHMC):
    pass


# ---------------------------------------------------------------------------------------------


class Sampler(Engine):
    """A posterior sampler: ``run(model, *args, **kwargs)`` returns draws; the CLI drives it by ``run_zoo``."""

    input = "posterior"

    def _setup(self, model, args, kwargs, allow_enumerated: bool):
        """Checks and placement every sampler does first: ``(device, args, kwargs, prototype trace)``."""
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro program, got {type(model).__name__}")
        device = resolve_device(self.device, *args, *kwargs.values())
        args, kwargs = move_args(args, kwargs, device)
        move_module(model, device)
        set_seed(self.seed)
        with default_device(device):
            trace = prototype_trace(model, args, kwargs)
        check_continuous_latents(trace, allow_enumerated=allow_enumerated)
        if not latent_sites(trace):
            raise ValueError("the model has no latent sample sites: there is nothing for HMC to sample")
        return device, args, kwargs, trace

    def _settings(self) -> dict:
        """What decides the draws: a checkpoint from other settings cannot be resumed."""
        return {k: v for k, v in self.config.items() if k not in ("device", "progress", "checkpoint_every")}

    def _load(self, ckpt: Checkpointer) -> dict | None:
        """The saved state (and random state) to resume from, or None when there is none."""
        state = ckpt.load()
        if state is None:
            return None
        if state["settings"] != self._settings():
            changed = sorted(k for k in self._settings() if state["settings"].get(k) != self._settings()[k])
            raise ValueError(f"{ckpt.path}: the checkpoint was written with other sampler settings ({changed}); "
                             "rerun without resume or with the same settings")
        return state

    def run_zoo(self, obj, train_args, valid_args=None, checkpoint_dir=None, resume=False) -> Fit:
        """What the CLI calls: sample ``obj.model(*train_args)``, checkpointing to ``checkpoint_dir``."""
        fit = self.run(obj.model, *as_args(train_args), checkpoint_dir=checkpoint_dir, resume=resume)
        fit.module, fit.spec = obj, getattr(obj, "spec", None)
        if hasattr(obj, "attach_posterior"):  # models that predict from draws (e.g. the BNN) keep them
            obj.attach_posterior(fit.samples)
        return fit


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
    kernel_class = RecordingNUTS

    def __init__(self, num_samples: int = 1000, num_warmup: int = 500, num_chains: int = 2,
                 target_accept: float = 0.8, max_tree_depth: int = 10, dense_mass: bool = False,
                 jit_compile: bool = False, init_strategy=init_to_uniform, max_init_tries: int = 100,
                 seed: int | None = 0, device=None, progress: bool | None = None):
        for arg, val in (("num_samples", num_samples), ("num_chains", num_chains), ("max_tree_depth", max_tree_depth),
                         ("max_init_tries", max_init_tries)):
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
        return self.kernel_class(model, target_accept_prob=self.target_accept, max_tree_depth=self.max_tree_depth,
                                 full_mass=self.dense_mass, jit_compile=self.jit_compile,
                                 ignore_jit_warnings=True, init_strategy=self._init_strategy)

    def run(self, model, *args, checkpoint_dir=None, resume: bool = False, **kwargs) -> Fit:
        """Draw from the posterior of ``model(*args, **kwargs)``; returns a Fit with ``samples``.

        With ``checkpoint_dir`` every finished chain is saved; ``resume=True`` keeps the chains a
        killed run finished and runs only the others (each chain is seeded by its index, so the
        result is the uninterrupted run's).
        """
        device, args, kwargs, trace = self._setup(model, args, kwargs, allow_enumerated=True)
        t0 = time.perf_counter()
        with default_device(device):
            world = distributed.init_from_env(device)
            mine = [c for c in range(self.num_chains) if c % world.size == world.rank]
            ckpt = Checkpointer(_rank_dir(checkpoint_dir, world), 1)
            finished = self._finished_chains(ckpt) if resume else {}
            chains, records = [], []
            bar = progress_bar(len(mine) * (self.num_warmup + self.num_samples), self.name, self.progress)
            for c in mine:
                if c in finished:
                    chains.append(_to_device(finished[c]["samples"], device))
                    records.append(finished[c]["record"])
                    bar.update(self.num_warmup + self.num_samples)
                    continue
                if self.seed is not None:  # chain c's draws do not depend on which process runs it
                    pyro.set_rng_seed(self.seed * 1_000_003 + c)
                kernel = self._kernel(model)

                def hook(kernel, params, stage, i):
                    bar.update(1)

                mcmc = MCMC(kernel, num_samples=self.num_samples, warmup_steps=self.num_warmup, num_chains=1,
                            disable_progbar=True, hook_fn=hook)
                try:
                    mcmc.run(*args, **kwargs)
                except ValueError as err:
                    if "cannot find valid initial params" not in str(err):
                        raise
                    raise initial_point_error(model, args, kwargs, self._init_strategy, self.max_init_tries) from None
                chains.append({k: v.detach() for k, v in mcmc.get_samples().items()})
                records.append(kernel.record)
                finished[c] = {"samples": _cpu(chains[-1]), "record": kernel.record}
                ckpt.save({"settings": self._settings(), "chains": finished})
            bar.close()
            if world.parallel:  # chains ran on ranks c % world; put them back in chain order
                gathered = [None] * world.size
                torch.distributed.all_gather_object(gathered, (mine, [_cpu(ch) for ch in chains], records))
                by_chain = {c: (ch, rec) for ids, chs, recs in gathered for c, ch, rec in zip(ids, chs, recs)}
                chains = [_to_device(by_chain[c][0], device) for c in range(self.num_chains)]
                records = [by_chain[c][1] for c in range(self.num_chains)]
        seconds = time.perf_counter() - t0
        samples = {k: torch.stack([ch[k] for ch in chains]) for k in chains[0]}
        return self._fit(model, samples, records, seconds, args, kwargs)

    def _finished_chains(self, ckpt: Checkpointer) -> dict:
        state = self._load(ckpt)
        return state["chains"] if state is not None else {}

    def _fit(self, model, samples, records, seconds, args, kwargs) -> Fit:
        w = self.num_warmup
        history = {k: [r[k] for r in records] for k in ("step_size", "accept_prob", "num_grads", "diverging")}
        history["divergences"] = [int(sum(r["diverging"][w:])) for r in records]
        stats = {
            "diverging": torch.tensor([r["diverging"][w:] for r in records]),
            "acceptance_rate": torch.tensor([r["accept_prob"][w:] for r in records]),
            "n_steps": torch.tensor([r["num_grads"][w:] for r in records]),
            "step_size": torch.tensor([r["step_size"][w:] for r in records]),
            "lp": -torch.tensor([r["potential"][w:] for r in records]),
        }
        total = self.num_chains * (self.num_warmup + self.num_samples)
        return Fit(
            engine=self.name,
            config=self.config,
            history=history,
            timing={"seconds": seconds, "ms_per_iteration": 1e3 * seconds / total,
                    "grad_evals": int(sum(sum(r["num_grads"]) for r in records))},
            samples=samples,
            extra={"tensors": {"sample_stats": stats}},
            model=model,
            args=args,
            kwargs=kwargs,
        )


def _rank_dir(directory, world):
    """Each process of a multi-process run checkpoints its own chains."""
    if directory is None or not world.parallel:
        return directory
    return Path(directory) / f"rank{world.rank}"


def _cpu(d: dict) -> dict:
    return {k: v.cpu() for k, v in d.items()}


def _to_device(d: dict, device) -> dict:
    return {k: v.to(device) for k, v in d.items()}


class HMC(NUTS):
    """Static-trajectory HMC (Pyro's ``HMC``): ``trajectory_length`` in units of the unconstrained space."""

    name = "hmc"
    kernel_class = RecordingHMC

    def __init__(self, num_samples: int = 1000, num_warmup: int = 500, num_chains: int = 2,
                 trajectory_length: float = 1.0, target_accept: float = 0.8, **kwargs):
        super().__init__(num_samples, num_warmup, num_chains, target_accept, **kwargs)
        if not (isinstance(trajectory_length, (int, float)) and trajectory_length > 0):
            raise ValueError(f"trajectory_length must be a positive number, got {trajectory_length!r}")
        self.trajectory_length = float(trajectory_length)

    def _kernel(self, model):
        return self.kernel_class(model, trajectory_length=self.trajectory_length,
                                 target_accept_prob=self.target_accept, full_mass=self.dense_mass,
                                 jit_compile=self.jit_compile, ignore_jit_warnings=True,
                                 init_strategy=self._init_strategy)
