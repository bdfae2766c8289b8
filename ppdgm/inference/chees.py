"""ChEES-HMC: many HMC chains as one batch, tuned without U-turn trees.

Hoffman, Radul & Sountsov (2021), "An Adaptive MCMC Scheme for Setting Trajectory Lengths in
Hamiltonian Monte Carlo". All chains share one step size and one (jittered) trajectory length, so
a leapfrog step of every chain is one call of the model's log density: the model runs once under
an outer ``pyro.plate`` over chains, as Pyro's vectorized ELBO particles do. During warm-up the
step size follows dual averaging on the harmonic mean of the chains' acceptance probabilities,
the trajectory length follows Adam on the ChEES criterion (the change in the chains' spread,
which long enough trajectories maximize), with Halton-sequence jitter, and a diagonal mass
matrix comes from the chains' variance in doubling windows.

The model must broadcast over a batch dimension on its left, as any model used with
``Predictive(parallel=True)`` or ``vectorize_particles=True`` must: e.g. ``(x * w).sum(-1)``
rather than ``x @ w``. Plain Pyro models such as eight schools do so unchanged; the engine
checks it before sampling and says so when a model does not.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from torch.distributions import biject_to

from ppdgm.fit import Fit
from ppdgm.inference.base import Checkpointer, progress_bar
from ppdgm.inference.mcmc import (
    Sampler,
    default_device,
    latent_sites,
    max_plate_nesting,
    prototype_trace,
)

INIT_METHODS = ("uniform", "prior")


@dataclass
class _Site:
    name: str
    shape: torch.Size  # one chain's value
    event_dim: int
    transform: torch.distributions.Transform
    ushape: torch.Size  # one chain's unconstrained value
    offset: int
    numel: int


class BatchedLogDensity:
    """log p(latents, data) of a Pyro model for a batch of latent values, in one model call.

    Values live in unconstrained space as rows of a ``(batch, dim)`` matrix; the model runs
    under an outer plate at dim ``-(max_plate_nesting + 1)`` with each site's constrained value
    padded to that depth, and the log-Jacobians of the transforms are added.
    """

    plate_name = "_chains"

    def __init__(self, model, args=(), kwargs=None, trace=None):
        self.model, self.args, self.kwargs = model, args, kwargs or {}
        trace = trace if trace is not None else prototype_trace(model, args, kwargs)
        self.nesting = max_plate_nesting(trace)
        self.sites, offset = [], 0
        for name, site in latent_sites(trace).items():
            value, fn = site["value"], site["fn"]
            t = biject_to(fn.support)
            ushape = torch.Size(t.inv.forward_shape(value.shape))
            numel = max(1, ushape.numel())
            self.sites.append(_Site(name, value.shape, fn.event_dim, t, ushape, offset, numel))
            offset += numel
        self.dim = offset
        self.dtype = next(iter(latent_sites(trace).values()))["value"].dtype if self.sites else torch.get_default_dtype()

    # -- unconstrained <-> constrained --------------------------------------------------------
    def split(self, u: torch.Tensor) -> dict:
        return {s.name: u[:, s.offset : s.offset + s.numel].reshape(u.shape[0], *s.ushape) for s in self.sites}

    def constrain(self, u: torch.Tensor) -> dict:
        """``{site: (batch, *site_shape)}`` constrained values."""
        return {s.name: s.transform(v) for s, v in zip(self.sites, self.split(u).values())}

    def unconstrain(self, values: dict) -> torch.Tensor:
        parts = [s.transform.inv(values[s.name]).reshape(values[s.name].shape[0], -1) for s in self.sites]
        return torch.cat(parts, dim=1)

    def pad(self, site: _Site, value: torch.Tensor) -> torch.Tensor:
        batch_ndim = len(site.shape) - site.event_dim
        return value.reshape(value.shape[0], *([1] * (self.nesting - batch_ndim)), *site.shape)

    # -- densities ----------------------------------------------------------------------------
    def trace(self, values: dict):
        """A trace of the model with ``values`` ``{site: (batch, *shape)}`` under the batch plate."""
        batch = next(iter(values.values())).shape[0]
        padded = {s.name: self.pad(s, values[s.name]) for s in self.sites if s.name in values}
        with poutine.block(), pyro.plate(self.plate_name, batch, dim=-(self.nesting + 1)):
            return poutine.trace(poutine.condition(self.model, data=padded)).get_trace(*self.args, **self.kwargs)

    def site_log_probs(self, tr, batch: int) -> dict:
        """``{site: (batch,)}`` summed log densities of every sample site of a batched trace."""
        out = {}
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or name == self.plate_name or site.get("is_subsample"):
                continue
            if type(site["fn"]).__name__ == "_Subsample":
                continue
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
            if not torch.is_tensor(lp) or lp.dim() == 0:
                lp = torch.as_tensor(lp, dtype=self.dtype).expand(batch)
            elif lp.dim() != self.nesting + 1 or lp.shape[0] not in (1, batch):
                raise ValueError(
                    f"site {name!r} has batch shape {tuple(lp.shape)} when {batch} draws run as an outer plate "
                    f"at dim {-(self.nesting + 1)}: the model does not broadcast over a batch dimension on its "
                    "left. Write it as for Predictive(parallel=True), e.g. (x * w).sum(-1) instead of x @ w"
                )
            out[name] = lp.reshape(lp.shape[0], -1).sum(1).expand(batch)
        return out

    def log_density(self, u: torch.Tensor, per_site: bool = False):
        """``(batch,)`` log joint density at unconstrained ``u`` (plus ``{site: (batch,)}`` terms)."""
        batch = u.shape[0]
        values, ladj = {}, u.new_zeros(batch)
        for s, v in zip(self.sites, self.split(u).values()):
            x = s.transform(v)
            values[s.name] = x
            j = s.transform.log_abs_det_jacobian(v, x)
            if torch.is_tensor(j) and j.dim() > 0:
                ladj = ladj + j.reshape(batch, -1).sum(1)
        terms = self.site_log_probs(self.trace(values), batch)
        total = ladj + sum(terms.values())
        return (total, terms) if per_site else total

    def compile(self, u: torch.Tensor) -> None:
        """Trace ``log_density`` with the PyTorch JIT for batches shaped like ``u`` (the model's
        Python then runs once; later calls replay the recorded tensor program)."""
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("ignore")
            self._jit = torch.jit.trace(self.log_density, (u.detach(),), check_trace=False)
        self._jit_shape = u.shape

    def potential_and_grad(self, u: torch.Tensor):
        """Potential ``-log density`` ``(batch,)`` and its gradient ``(batch, dim)``."""
        fn = self._jit if getattr(self, "_jit_shape", None) == u.shape else self.log_density
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            logp = fn(u)
            (grad,) = torch.autograd.grad(logp.sum(), u)
        return -logp.detach(), -grad


@contextlib.contextmanager
def frozen_params():
    """Pyro params (e.g. a trained decoder's weights) are constants while HMC moves the latents:
    no gradient flows into them, and the JIT may bake them into its trace."""
    params = [p for p in pyro.get_param_store()._params.values() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def halton(n: int, base: int = 2) -> float:
    """The ``n``-th (n >= 1) element of the van der Corput sequence in (0, 1)."""
    f, r = 1.0, 0.0
    while n > 0:
        f /= base
        n, digit = divmod(n, base)
        r += f * digit
    return r


class DualAveraging:
    """Nesterov dual averaging of log step size (Hoffman & Gelman 2014, Stan's constants)."""

    def __init__(self, step_size: float, target: float, gamma=0.05, t0=10.0, kappa=0.75):
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.reset(step_size)

    def reset(self, step_size: float):
        self.mu, self.t, self.h_bar, self.x_bar = math.log(10 * step_size), 0, 0.0, 0.0
        self.x = math.log(step_size)

    def update(self, accept: float) -> float:
        self.t += 1
        eta = 1.0 / (self.t + self.t0)
        self.h_bar = (1 - eta) * self.h_bar + eta * (self.target - accept)
        self.x = self.mu - math.sqrt(self.t) / self.gamma * self.h_bar
        w = self.t ** (-self.kappa)
        self.x_bar = w * self.x + (1 - w) * self.x_bar
        return math.exp(self.x)

    @property
    def final(self) -> float:
        return math.exp(self.x_bar)


def warmup_windows(num_warmup: int) -> list[int]:
    """Iterations at which the mass matrix is re-estimated: after a 15% start, doubling windows
    end by 90% of warm-up (the last 10% tunes the step size alone)."""
    if num_warmup < 20:
        return []
    start, end = int(0.15 * num_warmup), int(0.9 * num_warmup)
    ends, size, pos = [], max(5, (end - start) // 7), start
    while pos + size < end:
        pos += size
        ends.append(pos)
        size *= 2
        if pos + 2 * size > end:
            break
    if not ends or ends[-1] != end:
        ends.append(end)
    return ends


class ChEES(Sampler):
    """Vectorized many-chain HMC with ChEES trajectory-length adaptation.

    Args:
        num_chains: chains run as one batch (>= 2; the adaptation and R-hat compare chains).
        num_samples, num_warmup: draws kept per chain and adaptation iterations before them.
        target_accept: dual-averaging target for the harmonic mean of the chains' acceptance
            probabilities (0.651 in the paper).
        trajectory_lr: Adam learning rate on log trajectory length.
        max_leapfrog_steps: cap on leapfrog steps per iteration.
        adapt_mass: estimate a diagonal mass matrix from the chains' variance.
        init: ``"uniform"`` (uniform in (-2, 2) unconstrained, as Stan), ``"prior"`` (prior
            draws) or a dict ``{site: value}`` of one chain's (constrained) initial values.
        max_init_tries: redraws of a chain whose initial log density is not finite.
        jit_compile: trace the batched log density with the PyTorch JIT once the chains have a
            finite starting point (about 3x faster per step for small models; the model must
            then take the same path through its Python on every call).
        checkpoint_every: iterations between checkpoints (with ``checkpoint_dir`` in ``run``); a
            resumed run continues from the last one and ends with the uninterrupted run's draws.
    """

    name = "chees"

    def __init__(self, num_chains: int = 64, num_samples: int = 500, num_warmup: int = 500,
                 target_accept: float = 0.651, trajectory_lr: float = 0.025, max_leapfrog_steps: int = 1000,
                 adapt_mass: bool = True, init="uniform", init_step_size: float | None = None,
                 max_init_tries: int = 100, jit_compile: bool = False, checkpoint_every: int | None = None,
                 seed: int | None = 0, device=None, progress: bool | None = None):
        if not isinstance(num_chains, int) or isinstance(num_chains, bool) or num_chains < 2:
            raise ValueError(f"num_chains must be an int >= 2 for ChEES (its adaptation and R-hat compare "
                             f"chains), got {num_chains!r}")
        for arg, val in (("num_samples", num_samples), ("max_leapfrog_steps", max_leapfrog_steps),
                         ("max_init_tries", max_init_tries)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if not isinstance(num_warmup, int) or isinstance(num_warmup, bool) or num_warmup < 0:
            raise ValueError(f"num_warmup must be a non-negative int, got {num_warmup!r}")
        if not (isinstance(target_accept, float) and 0 < target_accept < 1):
            raise ValueError(f"target_accept must be a float in (0, 1), got {target_accept!r}")
        if not (isinstance(trajectory_lr, (int, float)) and trajectory_lr > 0):
            raise ValueError(f"trajectory_lr must be a positive number, got {trajectory_lr!r}")
        if not (init in INIT_METHODS or isinstance(init, dict)):
            raise ValueError(f"init must be one of {INIT_METHODS} or a dict of site values, got {init!r}")
        if init_step_size is not None and not init_step_size > 0:
            raise ValueError(f"init_step_size must be positive or None, got {init_step_size!r}")
        self.num_chains, self.num_samples, self.num_warmup = num_chains, num_samples, num_warmup
        self.target_accept, self.trajectory_lr, self.max_leapfrog_steps = target_accept, float(trajectory_lr), max_leapfrog_steps
        self.adapt_mass, self.init_step_size, self.max_init_tries = adapt_mass, init_step_size, max_init_tries
        self.jit_compile = bool(jit_compile)
        Checkpointer(None, checkpoint_every)  # validates it
        self.checkpoint_every = checkpoint_every
        self.init = init if isinstance(init, str) else "values"
        self._init_values = init if isinstance(init, dict) else None
        self.seed, self.device, self.progress = seed, device, progress

    # -----------------------------------------------------------------------------------------
    def run(self, model, *args, checkpoint_dir=None, resume: bool = False, **kwargs) -> Fit:
        """Draw ``num_samples`` from each of ``num_chains`` chains of ``model(*args, **kwargs)``'s posterior.

        With ``checkpoint_dir`` and ``checkpoint_every`` the whole sampler state (chains, adaptation,
        draws so far, random state) is saved every ``checkpoint_every`` iterations; ``resume=True``
        continues from the last save and ends with the draws of an uninterrupted run.
        """
        device, args, kwargs, trace = self._setup(model, args, kwargs, allow_enumerated=False)
        with default_device(device):
            density = BatchedLogDensity(model, args, kwargs, trace)
            with pyro.validation_enabled(False), torch.no_grad(), frozen_params():
                ckpt = Checkpointer(checkpoint_dir, self.checkpoint_every)
                return self._sample(model, density, args, kwargs, device, ckpt, resume)

    # -----------------------------------------------------------------------------------------
    def _initial_points(self, density: BatchedLogDensity, device):
        C, D = self.num_chains, density.dim

        def draw(n):
            if self.init == "uniform":
                return torch.rand(n, D, device=device, dtype=density.dtype) * 4 - 2
            if self.init == "prior":
                # block outside the plate: the plate must see the sites to batch them
                with poutine.block(), pyro.plate("_init", n, dim=-(density.nesting + 1)):
                    tr = poutine.trace(density.model).get_trace(*density.args, **density.kwargs)
                return density.unconstrain({s.name: tr.nodes[s.name]["value"].reshape(n, *s.shape)
                                            for s in density.sites})
            values = {s.name: torch.as_tensor(self._init_values[s.name], device=device, dtype=density.dtype)
                      .expand(n, *s.shape) if s.name in self._init_values else None for s in density.sites}
            missing = [k for k, v in values.items() if v is None]
            if missing:
                raise ValueError(f"init: no initial value for latent sites {missing}")
            u = density.unconstrain(values)
            return u + 0.01 * torch.randn_like(u)

        u = draw(C)
        potential, grad = density.potential_and_grad(u)
        for _ in range(self.max_init_tries):
            bad = ~(torch.isfinite(potential) & torch.isfinite(grad).all(1))
            if not bad.any():
                return u, potential, grad
            u[bad] = draw(int(bad.sum()))
            potential, grad = density.potential_and_grad(u)
        bad = ~(torch.isfinite(potential) & torch.isfinite(grad).all(1))
        _, terms = density.log_density(u[bad], per_site=True)
        sites = [n for n, lp in terms.items() if not torch.isfinite(lp).all()]
        where = (f"site {sites[0]!r} has a non-finite log density" + (f" (also {sites[1:]})" if sites[1:] else "")
                 if sites else "the gradient of the log density is not finite")
        raise ValueError(
            f"no initial point with a finite log density for {int(bad.sum())} of {C} chains after "
            f"{self.max_init_tries} tries: {where}; check that site's distribution parameters and observed "
            "values (e.g. data outside its support), or pass init={site: value}"
        )

    def _trajectory(self, density, q, potential, grad, inv_mass, step_size, num_steps):
        """``num_steps`` leapfrog steps of every chain; returns the proposal and both energies."""
        p = torch.randn_like(q) / inv_mass.sqrt()
        h0 = potential + 0.5 * (p * p * inv_mass).sum(1)
        q1, g1, pot1 = q, grad, potential
        p = p - 0.5 * step_size * g1
        for i in range(num_steps):
            q1 = q1 + step_size * inv_mass * p
            pot1, g1 = density.potential_and_grad(q1)
            p = p - (step_size if i < num_steps - 1 else 0.5 * step_size) * g1
        h1 = pot1 + 0.5 * (p * p * inv_mass).sum(1)
        return q1, p, pot1, g1, h0, h1

    def _find_step_size(self, density, q, potential, grad, inv_mass) -> float:
        """Double or halve one leapfrog step until the harmonic-mean acceptance crosses 1/2."""
        step_size = self.init_step_size or 1.0
        direction = None
        for _ in range(60):
            *_, h0, h1 = self._trajectory(density, q, potential, grad, inv_mass, step_size, 1)
            accept = _harmonic_accept(h0, h1)
            up = accept > 0.5
            if direction is None:
                direction = up
            if up != direction:
                break
            step_size = step_size * 2 if up else step_size / 2
        return step_size

    def _sample(self, model, density: BatchedLogDensity, args, kwargs, device, ckpt: Checkpointer,
                resume: bool) -> Fit:
        C, D, W = self.num_chains, density.dim, self.num_warmup
        t_start = time.perf_counter()
        beta2 = 0.95
        windows = warmup_windows(W) if self.adapt_mass else []
        state = self._load(ckpt) if resume else None
        if state is None:
            q, potential, grad = self._initial_points(density, device)
            inv_mass = torch.ones(D, device=device, dtype=q.dtype)
            step_size = self._find_step_size(density, q, potential, grad, inv_mass)
            averager = DualAveraging(step_size, self.target_accept)
            log_T = math.log(max(step_size, 1e-8) * 5)
            adam_v, log_T_sum, log_T_n = 0.0, 0.0, 0
            window_start, w_mean, w_m2, w_n = int(0.15 * W), torch.zeros_like(inv_mass), torch.zeros_like(inv_mass), 0
            history = {k: [] for k in ("step_size", "trajectory_length", "num_steps", "accept_harmonic",
                                       "accept_mean", "divergences")}
            draws = {s.name: [] for s in density.sites}
            stats = {k: [] for k in ("diverging", "acceptance_rate", "energy", "lp")}
            grad_evals, start = 0, 0
        else:
            state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}
            (q, potential, grad, inv_mass, step_size, log_T, adam_v, log_T_sum, log_T_n, window_start, w_mean,
             w_m2, w_n, history, draws, stats, grad_evals, start) = (state[k] for k in _STATE)
            draws = {k: [t.to(device) for t in v] for k, v in draws.items()}
            stats = {k: [t.to(device) for t in v] for k, v in stats.items()}
            averager = DualAveraging(1.0, self.target_accept)
            vars(averager).update(state["averager"])
        if self.jit_compile:
            density.compile(q)
        t_init = time.perf_counter() - t_start

        def snapshot(next_it):
            local = {"q": q, "potential": potential, "grad": grad, "inv_mass": inv_mass, "step_size": step_size,
                     "log_T": log_T, "adam_v": adam_v, "log_T_sum": log_T_sum, "log_T_n": log_T_n,
                     "window_start": window_start, "w_mean": w_mean, "w_m2": w_m2, "w_n": w_n, "history": history,
                     "draws": draws, "stats": stats, "grad_evals": grad_evals, "start": next_it}
            return {**local, "averager": dict(vars(averager)), "settings": self._settings()}

        bar = progress_bar(W + self.num_samples, self.name, self.progress)
        bar.update(start)
        t_warm = time.perf_counter()
        t_sample = None
        for it in range(start, W + self.num_samples):
            warm = it < W
            if it == W:
                step_size = averager.final if W else step_size
                log_T = log_T_sum / log_T_n if log_T_n else log_T
                t_sample = time.perf_counter()
            jitter = halton(it + 1)
            length = jitter * math.exp(log_T)
            n_steps = int(min(self.max_leapfrog_steps, max(1, math.ceil(length / step_size))))
            q1, p1, pot1, g1, h0, h1 = self._trajectory(density, q, potential, grad, inv_mass, step_size, n_steps)
            grad_evals += n_steps
            delta = h0 - h1
            finite = torch.isfinite(delta) & torch.isfinite(q1).all(1)
            log_accept = torch.where(finite, delta.clamp(max=0.0), torch.full_like(delta, -math.inf))
            accept_prob = log_accept.exp()
            diverging = ~finite | (delta < -1000.0)
            accepted = torch.rand_like(accept_prob).log() < log_accept
            if warm:
                accept_h = _harmonic_accept(h0, h1)
                # ChEES gradient w.r.t. log T, in mass-preconditioned coordinates
                scale = inv_mass.rsqrt()
                x0 = q * scale
                x1 = torch.where(finite[:, None], q1 * scale, torch.zeros_like(q1))
                w = accept_prob / (accept_prob.sum() + 1e-20)
                x0c = x0 - x0.mean(0)
                x1c = x1 - (w[:, None] * x1).sum(0)
                v1 = torch.where(finite[:, None], p1 * inv_mass * scale, torch.zeros_like(p1))
                g = length * ((x1c**2).sum(1) - (x0c**2).sum(1)) * (x1c * v1).sum(1)
                g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
                g = float((accept_prob * g).sum() / (accept_prob.sum() + 1e-20))
                adam_v = beta2 * adam_v + (1 - beta2) * g * g
                v_hat = adam_v / (1 - beta2 ** (it + 1))
                log_T = log_T + self.trajectory_lr * g / (math.sqrt(v_hat) + 1e-8)
                log_T = min(max(log_T, math.log(step_size)), math.log(step_size * self.max_leapfrog_steps))
                step_size = averager.update(accept_h)
            q = torch.where(accepted[:, None], q1, q)
            potential = torch.where(accepted, pot1, potential)
            grad = torch.where(accepted[:, None], g1, grad)
            if warm:
                if it >= window_start:
                    # Welford over chains and draws of the window
                    w_n += C
                    d = q - w_mean
                    w_mean = w_mean + d.sum(0) / w_n
                    w_m2 = w_m2 + (d * (q - w_mean)).sum(0)
                if it + 1 in windows:
                    var = w_m2 / max(w_n - 1, 1)
                    inv_mass = (w_n / (w_n + 5.0)) * var + 1e-3 * (5.0 / (w_n + 5.0))
                    step_size = self._find_step_size(density, q, potential, grad, inv_mass)
                    averager.reset(step_size)
                    window_start, w_mean, w_m2, w_n = it + 1, torch.zeros_like(w_mean), torch.zeros_like(w_m2), 0
                if it >= int(0.9 * W):
                    log_T_sum, log_T_n = log_T_sum + log_T, log_T_n + 1
                history["accept_harmonic"].append(accept_h)
            else:
                for name, v in density.constrain(q).items():
                    draws[name].append(v)
                stats["diverging"].append(diverging)
                stats["acceptance_rate"].append(accept_prob)
                stats["energy"].append(h0)
                stats["lp"].append(-potential)
                history["accept_harmonic"].append(_harmonic_accept(h0, h1))
            history["step_size"].append(step_size)
            history["trajectory_length"].append(math.exp(log_T))
            history["num_steps"].append(n_steps)
            history["accept_mean"].append(float(accept_prob.mean()))
            history["divergences"].append(int(diverging.sum()))
            if ckpt.due(it + 1):
                ckpt.save(snapshot(it + 1))
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix(eps=f"{step_size:.3g}", L=n_steps, acc=f"{history['accept_mean'][-1]:.2f}")
        bar.close()
        t_end = time.perf_counter()
        t_sample = t_sample if t_sample is not None else t_end
        samples = {k: torch.stack(v, dim=1) for k, v in draws.items()}
        sample_stats = {k: torch.stack(v, dim=1) for k, v in stats.items()}
        sample_stats["step_size"] = torch.full_like(sample_stats["lp"], step_size)
        sample_stats["n_steps"] = torch.tensor(history["num_steps"][W:], device=q.device).expand(C, -1)
        return Fit(
            engine=self.name,
            config=self.config,
            history=history,
            timing={"seconds": t_end - t_start, "init_seconds": t_init, "warmup_seconds": t_sample - t_warm,
                    "sample_seconds": t_end - t_sample, "grad_evals": grad_evals,
                    "ms_per_grad": 1e3 * (t_end - t_start) / max(grad_evals, 1)},
            samples=samples,
            extra={"step_size": step_size, "trajectory_length": math.exp(log_T),
                   "inverse_mass": inv_mass.tolist(),
                   "divergences": int(sample_stats["diverging"].sum()),
                   "tensors": {"sample_stats": sample_stats}},
            model=model,
            args=args,
            kwargs=kwargs,
        )


_STATE = ("q", "potential", "grad", "inv_mass", "step_size", "log_T", "adam_v", "log_T_sum", "log_T_n",
          "window_start", "w_mean", "w_m2", "w_n", "history", "draws", "stats", "grad_evals", "start")


def _harmonic_accept(h0, h1) -> float:
    """Harmonic mean over chains of min(1, exp(h0 - h1)) (0 when any chain's energy is not finite)."""
    delta = h0 - h1
    log_a = torch.where(torch.isfinite(delta), delta.clamp(max=0.0), torch.full_like(delta, -math.inf))
    return float(torch.exp(-torch.logsumexp(-log_a, 0) + math.log(len(log_a))))
