"""ChEES-HMC: many HMC chains as one batch, tuned without U-turn trees.

Hoffman, Radul & Sountsov (2021), "An Adaptive MCMC Scheme for Setting Trajectory Lengths in
Hamiltonian Monte Carlo". All chains share one step size and one (jittered) trajectory length, so
a leapfrog step of every chain is one call of the model's log density: the model runs once under
an outer ``pyro.plate`` over chains, as Pyro's vectorized ELBO particles do. During warm-up the
step size follows dual averaging on the harmonic mean of the chains' acceptance probabilities,
the trajectory length follows Adam on the ChEES criterion (the change in the chains' spread,
which long enough trajectories maximize), with Halton-sequence jitter, and a diagonal mass
matrix comes from the chains' variance in doubling windows. From the first window on the length
is capped at a half turn of the slowest direction the mass matrix leaves (``pi sqrt(lambda_max)``
of the window's whitened covariance, for dim <= 1000): ChEES's criterion, driven by the chains in
a heavy tail, climbs past it (eight schools: 10 where 3.8 gives more ESS per gradient), and under
uniform jitter a longer trajectory no longer decorrelates a Gaussian's slowest direction.

Any model NUTS runs runs here: :class:`~ppdgm.logdensity.BatchedLogDensity` evaluates the chains
under one outer plate when every batch dimension is a plate's and the model broadcasts (e.g.
``(x * w).sum(-1)``), else with ``torch.func.vmap`` over one chain's log density (``x @ w``, vector
sites without a plate), else chain by chain, checking the choice against a plain run of the model.
A chain whose evaluation raises a numerical error (a Cholesky factor of a matrix that is not
positive-definite ...) gets an infinite potential, as in Pyro's NUTS: its proposal is rejected and
the other chains go on. A warm-up that ends with the trajectory length still moving warns and
sets ``fit.extra["warmup_converged"]`` to False.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import pyro
import torch

from ppdgm.fit import Fit
from ppdgm.inference.adaptation import (
    CovarianceWelford,
    DualAveraging,
    TrajectoryAdam,
    Welford,
    half_turn,
    halton,
    warmup_windows,
)
from ppdgm.inference.base import Checkpointer
from ppdgm.inference.callbacks import as_callbacks
from ppdgm.inference.sampling import Sampler, Step, default_device, frozen_params
from ppdgm.logdensity import BatchedLogDensity

INIT_METHODS = ("uniform", "prior")
FULL_COVARIANCE_DIM = 1000  # above it no quarter-turn cap (a dim x dim covariance per window)


@dataclass
class ChEESState:
    """Everything a ChEES run carries from one iteration to the next (as blackjax's
    ``ChEESAdaptationState`` plus the chains): saved whole in a checkpoint."""

    position: torch.Tensor  # (chains, dim), unconstrained
    potential: torch.Tensor  # (chains,)
    grad: torch.Tensor  # (chains, dim), of the potential
    inverse_mass: torch.Tensor  # (dim,), diagonal
    step_size: float
    averager: DualAveraging
    log_length: TrajectoryAdam  # log trajectory length and its optimizer
    variance: Welford  # the chains' variance over the current mass-matrix window
    window_start: int
    covariance: CovarianceWelford | None = None  # the window's full covariance (dim <= FULL_COVARIANCE_DIM)
    length_cap: float | None = None  # half turn of the slowest whitened direction, from the last window
    log_length_sum: float = 0.0  # averaged over the last 10% of warm-up: the sampling length
    log_length_n: int = 0
    log_length_mark: float | None = None  # at 80% of warm-up, to see whether the length settled
    log_length_sq: float = 0.0  # sum of its squared moves since then
    warmup_converged: bool | None = None  # None until warm-up ends (and with no warm-up)

    def trajectory_length(self) -> float:
        """The trajectory length to jitter: ChEES's, capped at the half turn once known."""
        length = math.exp(self.log_length.value)
        return length if self.length_cap is None else min(length, max(self.length_cap, self.step_size))

    @classmethod
    def from_dict(cls, d: dict) -> ChEESState:
        return cls(
            **{
                **d,
                "averager": DualAveraging(**d["averager"]),
                "log_length": TrajectoryAdam(**d["log_length"]),
                "variance": Welford(**d["variance"]),
                "covariance": None if d.get("covariance") is None else CovarianceWelford(**d["covariance"]),
            }
        )


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
            then take the same path through its Python on every call). ``"inductor"``: compile
            forward and backward into one program with TorchInductor instead (5-11x fewer ms per
            gradient than the trace, for seconds to tens of seconds of compile at the start,
            ``fit.extra["compile_seconds"]``; falls back to the trace where it fails).
        checkpoint_every: iterations between checkpoints (with ``checkpoint_dir`` in ``run``); a
            resumed run continues from the last one and ends with the uninterrupted run's draws.
    """

    name = "chees"

    def __init__(
        self,
        num_chains: int = 64,
        num_samples: int = 500,
        num_warmup: int = 500,
        target_accept: float = 0.651,
        trajectory_lr: float = 0.025,
        max_leapfrog_steps: int = 1000,
        adapt_mass: bool = True,
        init="uniform",
        init_step_size: float | None = None,
        max_init_tries: int = 100,
        jit_compile: bool | str = False,
        checkpoint_every: int | None = None,
        seed: int | None = 0,
        device=None,
        progress: bool | None = None,
    ):
        if not isinstance(num_chains, int) or isinstance(num_chains, bool) or num_chains < 2:
            raise ValueError(
                f"num_chains must be an int >= 2 for ChEES (its adaptation and R-hat compare "
                f"chains), got {num_chains!r}"
            )
        for arg, val in (
            ("num_samples", num_samples),
            ("max_leapfrog_steps", max_leapfrog_steps),
            ("max_init_tries", max_init_tries),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if not isinstance(num_warmup, int) or isinstance(num_warmup, bool) or num_warmup < 0:
            raise ValueError(f"num_warmup must be a non-negative int, got {num_warmup!r}")
        if not (isinstance(target_accept, float) and 0 < target_accept < 1):
            raise ValueError(f"target_accept must be a float in (0, 1), got {target_accept!r}")
        if not (isinstance(trajectory_lr, (int, float)) and trajectory_lr > 0):
            raise ValueError(f"trajectory_lr must be a positive number, got {trajectory_lr!r}")
        if isinstance(init, torch.Tensor):
            if init.dim() != 2 or init.shape[0] != num_chains or not init.is_floating_point():
                raise ValueError(
                    f"init as a tensor must be floating point of shape (num_chains, dim) = ({num_chains}, dim), "
                    f"got {init.dtype} of shape {tuple(init.shape)}"
                )
        elif not ((isinstance(init, str) and init in INIT_METHODS) or isinstance(init, dict)):
            raise ValueError(
                f"init must be one of {INIT_METHODS}, a dict of site values or a (num_chains, dim) tensor, got {init!r}"
            )
        if init_step_size is not None and not init_step_size > 0:
            raise ValueError(f"init_step_size must be positive or None, got {init_step_size!r}")
        self.num_chains, self.num_samples, self.num_warmup = num_chains, num_samples, num_warmup
        self.target_accept, self.trajectory_lr, self.max_leapfrog_steps = (
            target_accept,
            float(trajectory_lr),
            max_leapfrog_steps,
        )
        self.adapt_mass, self.init_step_size, self.max_init_tries = adapt_mass, init_step_size, max_init_tries
        if jit_compile not in (False, True, "inductor"):
            raise ValueError(f"jit_compile must be False, True or 'inductor', got {jit_compile!r}")
        self.jit_compile = jit_compile if jit_compile == "inductor" else bool(jit_compile)
        Checkpointer(None, checkpoint_every)  # validates it
        self.checkpoint_every = checkpoint_every
        self.init = init if isinstance(init, str) else "values" if isinstance(init, dict) else "points"
        self._init_values = init if isinstance(init, dict) else None
        self._init_points = init.detach().clone() if isinstance(init, torch.Tensor) else None
        self.seed, self.device, self.progress = seed, device, progress

    def run(self, model, *args, checkpoint_dir=None, resume: bool = False, callbacks=(), **kwargs) -> Fit:
        """Draw ``num_samples`` from each of ``num_chains`` chains of ``model(*args, **kwargs)``'s posterior.

        With ``checkpoint_dir`` and ``checkpoint_every`` the whole sampler state (chains, adaptation,
        draws so far, random state) is saved every ``checkpoint_every`` iterations; ``resume=True``
        continues from the last save and ends with the draws of an uninterrupted run. ``callbacks``
        see every iteration (:class:`~ppdgm.inference.sampling.SamplingDriver`) and the Fit.
        """
        callbacks = as_callbacks(callbacks)
        device, args, kwargs, trace = self._setup(model, args, kwargs, allow_enumerated=False)
        with default_device(device):
            density = BatchedLogDensity(model, args, kwargs, trace)
            chains = ChEESChains(self, density, device)
            with pyro.validation_enabled(False), torch.no_grad(), frozen_params():
                run = self._driver(checkpoint_dir, self.checkpoint_every, callbacks).run([chains], device, resume)
        state = run.states[0]
        extra = {
            "step_size": state["step_size"],
            # from the saved state: a resumed run that had nothing left to do never started the chains
            "trajectory_length": ChEESState.from_dict(state).trajectory_length(),
            "inverse_mass": state["inverse_mass"].tolist(),
            "divergences": int(run.draws.stats["diverging"].sum()),
            "warmup_converged": state["warmup_converged"],
            "compile_seconds": density.compile_seconds,
        }
        return self._fit(run, run.history[0], extra, model, args, kwargs, callbacks)


class ChEESChains:
    """All ChEES chains as one group of the sampling driver: ``step`` is one jittered HMC
    trajectory of every chain, and during warm-up one update of each adaptation piece."""

    def __init__(self, config: ChEES, density: BatchedLogDensity, device):
        self.config, self.density, self.device = config, density, device
        self.width = config.num_chains
        self.windows = warmup_windows(config.num_warmup) if config.adapt_mass else []

    # -- the driver's protocol ----------------------------------------------------------------
    def start(self, state: dict | None) -> None:
        if state is not None:
            self.state = ChEESState.from_dict(state)
        else:
            q, potential, grad = self._initial_points()
            inv_mass = torch.ones(self.density.dim, device=self.device, dtype=q.dtype)
            step_size = self._find_step_size(q, potential, grad, inv_mass)
            self.state = ChEESState(
                q,
                potential,
                grad,
                inv_mass,
                step_size,
                DualAveraging.start(step_size, self.config.target_accept),
                TrajectoryAdam(math.log(max(step_size, 1e-8) * 5), self.config.trajectory_lr),
                Welford.empty(inv_mass),
                window_start=int(0.15 * self.config.num_warmup),
                covariance=self._empty_covariance(q[0]),
            )
        if self.config.jit_compile:
            self.density.compile(self.state.position, "inductor" if self.config.jit_compile == "inductor" else "trace")

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state)

    def end_warmup(self) -> None:
        s, W = self.state, self.config.num_warmup
        if W:
            s.step_size = s.averager.final
        if s.log_length_mark is not None:
            cap = math.inf if s.length_cap is None else math.log(s.length_cap)
            capped = min(s.log_length_mark, s.log_length.value) >= cap  # what ChEES did no longer mattered
            s.warmup_converged = capped or self._check_settled(s.log_length_mark, s.log_length.value, s.log_length_sq)
        if s.log_length_n:
            s.log_length.value = s.log_length_sum / s.log_length_n
            s.length_cap = None  # the average is of the capped length

    def _check_settled(self, mark: float, last: float, moved_sq: float) -> bool:
        """Whether the log trajectory length stopped moving over the last 20% of warm-up: a net
        change of more than 10% that is also more than 3 deviations of a random walk with the
        same steps (``3 sqrt(sum of squared steps)``) means the adaptation was still climbing (or
        falling); warns once."""
        W, net = self.config.num_warmup, last - mark
        if abs(net) <= max(math.log(1.1), 3 * math.sqrt(moved_sq)):
            return True
        warnings.warn(
            f"ChEES warm-up of {W} iterations ended with the trajectory length still "
            f"{'rising' if net > 0 else 'falling'} ({math.exp(mark):.3g} -> {math.exp(last):.3g} over its "
            f"last {W - settle_mark(W)} iterations); use more warm-up (num_warmup)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def draw(self) -> dict:
        return self.density.constrain(self.state.position)

    def step(self, iteration: int, warmup: bool) -> Step:
        s, cfg = self.state, self.config
        length = halton(iteration + 1) * self.length()
        n_steps = int(min(cfg.max_leapfrog_steps, max(1, math.ceil(length / s.step_size))))
        q1, p1, pot1, g1, h0, h1 = self._trajectory(
            s.position, s.potential, s.grad, s.inverse_mass, s.step_size, n_steps
        )
        delta = h0 - h1
        finite = torch.isfinite(delta) & torch.isfinite(q1).all(1)
        log_accept = torch.where(finite, delta.clamp(max=0.0), torch.full_like(delta, -math.inf))
        accept_prob = log_accept.exp()
        diverging = ~finite | (delta < -1000.0)
        accepted = torch.rand_like(accept_prob).log() < log_accept
        accept_h = _harmonic_accept(h0, h1, skip_nonfinite=True)
        if warmup:
            g = chees_gradient(s.position, q1, p1, s.inverse_mass, accept_prob, finite, length)
            before = s.log_length.value
            s.log_length.step(g, math.log(s.step_size), math.log(s.step_size * cfg.max_leapfrog_steps))
            if s.log_length_mark is not None:
                s.log_length_sq += (s.log_length.value - before) ** 2
            s.step_size = s.averager.update(accept_h)
        s.position = torch.where(accepted[:, None], q1, s.position)
        s.potential = torch.where(accepted, pot1, s.potential)
        s.grad = torch.where(accepted[:, None], g1, s.grad)
        if warmup:
            self._adapt_mass(iteration)
            if iteration + 1 == settle_mark(cfg.num_warmup):
                s.log_length_mark = s.log_length.value
        stats = {
            "diverging": diverging,
            "acceptance_rate": accept_prob,
            "energy": h0,
            "lp": -s.potential,
            "step_size": torch.full_like(h0, s.step_size),
            "n_steps": torch.full(h0.shape, n_steps, dtype=torch.long, device=h0.device),
        }
        history = {
            "step_size": s.step_size,
            "trajectory_length": self.length(),
            "num_steps": n_steps,
            "accept_harmonic": accept_h,
            "accept_mean": float(accept_prob.mean()),
            "divergences": int(diverging.sum()),
        }
        return Step(history, stats, n_steps)

    # -- pieces of a step ---------------------------------------------------------------------
    def _adapt_mass(self, iteration: int) -> None:
        """Welford over the window's draws; at a window's end, a new mass matrix and step size."""
        s, W = self.state, self.config.num_warmup
        if iteration >= s.window_start:
            s.variance.update(s.position)
            if s.covariance is not None:
                s.covariance.update(s.position)
        if iteration + 1 in self.windows:
            s.inverse_mass = s.variance.regularized_variance()
            s.step_size = self._find_step_size(s.position, s.potential, s.grad, s.inverse_mass)
            s.averager.reset(s.step_size)
            if s.covariance is not None:
                s.length_cap = half_turn(s.covariance.covariance, s.inverse_mass)
                s.covariance = self._empty_covariance(s.inverse_mass)
            s.window_start, s.variance = iteration + 1, Welford.empty(s.inverse_mass)
        if iteration >= int(0.9 * W):
            s.log_length_sum, s.log_length_n = s.log_length_sum + math.log(self.length()), s.log_length_n + 1

    def length(self) -> float:
        return self.state.trajectory_length()

    def _empty_covariance(self, like: torch.Tensor) -> CovarianceWelford | None:
        return CovarianceWelford.empty(like) if like.numel() <= FULL_COVARIANCE_DIM else None

    def _initial_points(self):
        density, device, cfg = self.density, self.device, self.config
        init_values = cfg._init_values or {}
        C, D = cfg.num_chains, density.dim
        if cfg._init_points is not None:
            if cfg._init_points.shape[1] != D:
                raise ValueError(
                    f"init: the model has {D} unconstrained dimensions "
                    f"({', '.join(f'{s.name} {tuple(s.shape)}' for s in density.sites)}), "
                    f"got points of shape {tuple(cfg._init_points.shape)}"
                )
            u = cfg._init_points.to(device=device, dtype=density.dtype)
            potential, grad = density.potential_and_grad(u)
            bad = ~(torch.isfinite(potential) & torch.isfinite(grad).all(1))
            if bad.any():
                raise ValueError(
                    f"init: {int(bad.sum())} of {C} given starting points have a non-finite log density "
                    f"or gradient (chains {bad.nonzero().flatten().tolist()[:10]})"
                )
            return u, potential, grad

        def draw(n):
            if cfg.init == "uniform":
                return torch.rand(n, D, device=device, dtype=density.dtype) * 4 - 2
            if cfg.init == "prior":
                return density.prior_draws(n)
            values = {
                s.name: torch.as_tensor(init_values[s.name], device=device, dtype=density.dtype).expand(n, *s.shape)
                if s.name in init_values
                else None
                for s in density.sites
            }
            missing = [k for k, v in values.items() if v is None]
            if missing:
                raise ValueError(f"init: no initial value for latent sites {missing}")
            u = density.unconstrain(values)
            return u + 0.01 * torch.randn_like(u)

        u = draw(C)
        potential, grad = density.potential_and_grad(u)
        for _ in range(cfg.max_init_tries):
            bad = ~(torch.isfinite(potential) & torch.isfinite(grad).all(1))
            if not bad.any():
                return u, potential, grad
            u[bad] = draw(int(bad.sum()))
            potential, grad = density.potential_and_grad(u)
        bad = ~(torch.isfinite(potential) & torch.isfinite(grad).all(1))
        _, terms = density.log_density(u[bad], per_site=True)
        sites = [n for n, lp in terms.items() if not torch.isfinite(lp).all()]
        where = (
            f"site {sites[0]!r} has a non-finite log density" + (f" (also {sites[1:]})" if sites[1:] else "")
            if sites
            else "the gradient of the log density is not finite"
        )
        raise ValueError(
            f"no initial point with a finite log density for {int(bad.sum())} of {C} chains after "
            f"{cfg.max_init_tries} tries: {where}; check that site's distribution parameters and observed "
            "values (e.g. data outside its support), or pass init={site: value}"
        )

    def _trajectory(self, q, potential, grad, inv_mass, step_size, num_steps):
        """``num_steps`` leapfrog steps of every chain; returns the proposal and both energies."""
        p = torch.randn_like(q) / inv_mass.sqrt()
        h0 = potential + 0.5 * (p * p * inv_mass).sum(1)
        q1, g1, pot1 = q, grad, potential
        p = p - 0.5 * step_size * g1
        lost = torch.zeros_like(potential, dtype=torch.bool)
        for i in range(num_steps):
            q1 = q1 + step_size * inv_mass * p
            pot1, g1 = self.density.potential_and_grad(q1)
            p = p - (step_size if i < num_steps - 1 else 0.5 * step_size) * g1
            if num_steps > 1:
                # a chain whose density stopped being finite is rejected at the end; parked at its
                # start it stops costing a chain-by-chain evaluation at every later step
                lost = lost | ~(torch.isfinite(pot1) & torch.isfinite(g1).all(1))
                q1, p = torch.where(lost[:, None], q, q1), torch.where(lost[:, None], 0.0, p)
        pot1 = torch.where(lost, math.inf, pot1)
        h1 = pot1 + 0.5 * (p * p * inv_mass).sum(1)
        return q1, p, pot1, g1, h0, h1

    def _find_step_size(self, q, potential, grad, inv_mass) -> float:
        """Double or halve one leapfrog step until the harmonic-mean acceptance crosses 1/2."""
        step_size = self.config.init_step_size or 1.0
        direction = None
        for _ in range(60):
            *_, h0, h1 = self._trajectory(q, potential, grad, inv_mass, step_size, 1)
            up = _harmonic_accept(h0, h1) > 0.5
            if direction is None:
                direction = up
            if up != direction:
                break
            step_size = step_size * 2 if up else step_size / 2
        return step_size


def settle_mark(num_warmup: int) -> int:
    """The warm-up iteration from which the trajectory length should no longer move (80%)."""
    return int(0.8 * num_warmup)


def chees_gradient(q0, q1, p1, inv_mass, accept_prob, finite, length) -> float:
    """The acceptance-weighted ChEES criterion's gradient with respect to log trajectory length
    (Hoffman et al. 2021, eq. 6), in mass-preconditioned coordinates."""
    scale = inv_mass.rsqrt()
    x0 = q0 * scale
    x1 = torch.where(finite[:, None], q1 * scale, torch.zeros_like(q1))
    w = accept_prob / (accept_prob.sum() + 1e-20)
    x0c = x0 - x0.mean(0)
    x1c = x1 - (w[:, None] * x1).sum(0)
    v1 = torch.where(finite[:, None], p1 * inv_mass * scale, torch.zeros_like(p1))
    g = length * ((x1c**2).sum(1) - (x0c**2).sum(1)) * (x1c * v1).sum(1)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    return float((accept_prob * g).sum() / (accept_prob.sum() + 1e-20))


def _harmonic_accept(h0, h1, skip_nonfinite: bool = False) -> float:
    """Harmonic mean over chains of min(1, exp(h0 - h1)): 0 when any chain's energy is not finite,
    or with ``skip_nonfinite`` over the chains whose energy is (as BlackJAX's ChEES leaves out
    divergent chains: else one chain at a wall, e.g. a region where the model raises, drives the
    step size of all chains to nothing)."""
    delta = h0 - h1
    finite = torch.isfinite(delta)
    log_a = torch.where(finite, delta.clamp(max=0.0), torch.full_like(delta, -math.inf))
    if not skip_nonfinite:
        return float(torch.exp(-torch.logsumexp(-log_a, 0) + math.log(len(log_a))))
    log_a = torch.where(finite, log_a, torch.full_like(delta, math.inf))  # 1 / a = 0: left out
    mean = torch.exp(-torch.logsumexp(-log_a, 0) + finite.sum().log())
    return float(torch.where(finite.any(), mean, 0.0))
