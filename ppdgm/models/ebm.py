"""Energy-based model: an MLP energy E(x) as the unnormalized density exp(-E(x)).

As a Pyro program the energy enters as ``pyro.factor("log_density", -E(x))`` in the data plate.
Training is persistent contrastive divergence (:class:`ppdgm.inference.pcd.PersistentCD`) with
the shared Langevin sampler advancing the negative chains; this class implements that engine's
protocol (``positive_log_density``, ``init_chains``, ``sample_chains``, ``negative_log_density``,
``regularizer``). Chains restart from noise with probability ``reinit_prob`` at every call, so
the persistent chains act as the replay buffer of Du & Mordatch (2019); the energy-magnitude
penalty ``alpha * (E(x+)^2 + E(x-)^2)`` of the same paper keeps energies near zero.

Langevin chains started from noise do not mix between distant modes within a few hundred steps,
so the mass a fresh chain finds reflects basins of attraction, not probabilities. The persistent
chains do carry the model's mass (the negative phase pushes energy up wherever they
over-populate), so every advanced chain state also enters a :class:`ReplayBuffer` that is saved
with the model, and :meth:`EBM.sample` starts from it once it holds states.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import pyro
import torch
from pyro.nn import PyroModule

from ppdgm.data import check_data
from ppdgm.langevin import Langevin, ReplayBuffer, check_step_size
from ppdgm.models.spec import ConstructorSpec
from ppdgm.nn import MLP, ConvEncoder


class EBM(ConstructorSpec, PyroModule):
    """``p(x) ∝ exp(-E(x))`` with ``E`` an MLP on ``features`` inputs.

    Args:
        features: data dimension.
        hidden_features, activation: the energy network (a smooth activation keeps Langevin gradients smooth).
        low, high: the box that noise chains start in and Langevin states are clamped to.
        step_size, noise_scale, grad_clip: Langevin settings for training chains (noise_scale
            None means ``sqrt(2 * step_size)``, i.e. unadjusted Langevin).
        sample_steps: Langevin steps from noise for :meth:`sample`.
        reinit_prob: chance a persistent chain restarts from noise at each training step.
        alpha: weight of the energy-magnitude penalty.
        buffer_size: capacity of the replay buffer of chain states that :meth:`sample` starts from.
        image_shape: ``(height, width)`` makes the energy a small conv net on the flat images
            (:class:`ppdgm.nn.ConvEncoder` with ``hidden_features[0]`` and ``hidden_features[-1]``
            channels) instead of an MLP.
    """

    datasets = ("moons", "digits")

    default_engine = "pcd"
    # Langevin chains need several steps per update, and the energy net Adam (Du & Mordatch 2019)
    engine_config: ClassVar[dict] = {"optim": "adam", "k": 10, "num_chains": 256}
    support = "real"
    likelihood_method = "grid quadrature (d <= 2) / AIS"

    def __init__(
        self,
        features: int = 2,
        hidden_features=(128, 128),
        activation: str = "silu",
        low: float = -4.0,
        high: float = 4.0,
        step_size: float = 0.01,
        noise_scale: float | None = None,
        grad_clip: float | None = None,
        sample_steps: int = 500,
        reinit_prob: float = 0.05,
        alpha: float = 1e-3,
        buffer_size: int = 10000,
        image_shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        if not low < high:
            raise ValueError(f"low must be below high, got low={low!r}, high={high!r}")
        check_step_size(step_size)
        if not isinstance(sample_steps, int) or sample_steps < 1:
            raise ValueError(f"sample_steps must be a positive int, got {sample_steps!r}")
        if not 0 <= reinit_prob <= 1:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        self.features, self.hidden_features, self.activation = features, list(hidden_features), activation
        self.low, self.high = float(low), float(high)
        self.step_size, self.noise_scale, self.grad_clip = float(step_size), noise_scale, grad_clip
        self.sample_steps, self.reinit_prob, self.alpha = sample_steps, float(reinit_prob), float(alpha)
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        if self.image_shape is not None:
            if len(self.image_shape) != 2:
                raise ValueError(f"image_shape: expected (height, width), got {self.image_shape}")
            if self.image_shape[0] * self.image_shape[1] != features:
                raise ValueError(f"image_shape {self.image_shape} does not hold features={features} pixels")
            self.energy: torch.nn.Module = ConvEncoder(
                (self.image_shape[0], self.image_shape[1]),
                1,
                (self.hidden_features[0], self.hidden_features[-1]),
                activation=activation,
            )
        else:
            self.energy = MLP(features, self.hidden_features, 1, activation)
        self._energies: list[torch.Tensor] = []
        self.buffer_size = buffer_size
        self.buffer = ReplayBuffer(self.noise, capacity=buffer_size, reinit_prob=0.0)
        self.chain_steps = sample_steps  # Langevin steps per training-chain advance, once trained

    @classmethod
    def from_data(cls, data, **kwargs):
        x = data.x if hasattr(data, "x") else data
        lo, hi = float(x.min()), float(x.max())
        pad = 0.1 * (hi - lo)
        kwargs.setdefault("low", lo - pad if lo < 0 or hi > 1 else lo)
        kwargs.setdefault("high", hi + pad if lo < 0 or hi > 1 else hi)
        return cls(features=x.shape[1], **kwargs)

    def get_extra_state(self):
        states = self.buffer.states
        return {
            "replay": states.detach() if states is not None else torch.zeros(0, self.features),
            "chain_steps": self.chain_steps,
        }

    def set_extra_state(self, state):
        replay = state.get("replay") if isinstance(state, dict) else None
        self.buffer.states = replay if replay is not None and replay.numel() else None
        if isinstance(state, dict) and "chain_steps" in state:
            self.chain_steps = int(state["chain_steps"])

    @property
    def sampler(self) -> Langevin:
        return Langevin(self.step_size, self.sample_steps, self.noise_scale, self.grad_clip, (self.low, self.high))

    # -- the density ----------------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalized log-density ``-E(x)`` per row."""
        return -self.energy(x).squeeze(-1)

    def model(self, x: torch.Tensor):
        pyro.module("energy", self.energy)
        with pyro.plate("data", x.shape[0]):
            pyro.factor("log_density", self.log_prob(x))

    def guide(self, x: torch.Tensor):
        """No latent variables."""

    # -- persistent-CD protocol -------------------------------------------------------------------
    def _check(self, x, name):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a tensor shaped (n, {self.features}), got {shape}")
        return x

    def data_args(self, dataset) -> tuple:
        return (self.check_data(dataset.x, "x"),)

    def check_data(self, x, name: str = "data") -> torch.Tensor:
        """Validate training data before the engine runs: finite values shaped ``(n, features)``."""
        return self._check(check_data(x, name, rank=2), name)

    def noise(self, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` states drawn uniformly in the ``[low, high]`` box."""
        p = next(self.energy.parameters())
        device = like.device if like is not None else p.device
        return self.low + (self.high - self.low) * torch.rand(n, self.features, device=device, dtype=p.dtype)

    def positive_log_density(self, batch: torch.Tensor) -> torch.Tensor:
        lp = self.log_prob(self._check(batch, "batch"))
        self._energies = [lp]
        return lp

    def init_chains(self, num_chains: int, data: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains must be a positive int, got {num_chains!r}")
        return self.noise(num_chains, data)

    def sample_chains(self, state: torch.Tensor, steps: int) -> torch.Tensor:
        """Restart each chain from noise w.p. ``reinit_prob``, then ``steps`` Langevin moves (no grad)."""
        state = self._check(state, "state").detach()
        restart = torch.rand(state.shape[0], 1, device=state.device) < self.reinit_prob
        state = torch.where(restart, self.noise(state.shape[0], state), state)
        state = self.sampler.run(state, log_density=self.log_prob, num_steps=steps)
        self.buffer.push(state)
        self.chain_steps = steps
        return state

    def negative_log_density(self, state: torch.Tensor) -> torch.Tensor:
        lp = self.log_prob(self._check(state, "state").detach())
        self._energies.append(lp)
        return lp

    def chain_energy(self, state: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return -self.log_prob(state)

    def regularizer(self) -> torch.Tensor:
        """``alpha * mean(E^2)`` over the latest positive and negative energies (Du & Mordatch 2019)."""
        if not self._energies:
            return next(self.energy.parameters()).new_zeros(())
        e = torch.cat([lp.flatten() for lp in self._energies])
        return self.alpha * e.pow(2).mean()

    # -- sampling and likelihood -----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, num_steps: int | None = None, from_buffer: bool = True) -> torch.Tensor:
        """``n`` draws by Langevin dynamics: from the replay buffer of training chains (when it holds
        states and ``from_buffer``) advanced as many steps as a training chain is per update, so the
        draws follow the negative phase the energy was fitted against; else from uniform noise,
        ``sample_steps`` steps. ``num_steps`` overrides either."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if from_buffer and len(self.buffer):
            x0, steps = self.buffer.sample(n), self.chain_steps
        else:
            x0, steps = self.noise(n), self.sample_steps
        return self.sampler.run(x0, log_density=self.log_prob, num_steps=steps if num_steps is None else num_steps)

    @torch.no_grad()
    def log_normalizer(self, grid: int = 400, num_chains: int = 256, num_temps: int = 1000) -> float:
        """log Z = log ∫ exp(-E(x)) dx over the box: quadrature for d <= 2, else AIS (from the replay
        buffer's Gaussian once trained)."""
        if self.features <= 2:
            p = next(self.energy.parameters())
            axis = torch.linspace(self.low, self.high, grid + 1, device=p.device, dtype=p.dtype)
            mid = 0.5 * (axis[1:] + axis[:-1])
            pts = torch.cartesian_prod(*[mid] * self.features).reshape(-1, self.features)
            cell = ((self.high - self.low) / grid) ** self.features
            return float(torch.logsumexp(self.log_prob(pts), 0) + math.log(cell))
        return self._ais_log_normalizer(num_chains, num_temps)

    @torch.no_grad()
    def _ais_log_normalizer(self, num_chains, num_temps) -> float:
        """Annealed importance sampling from a normalized base density to exp(-E) along the
        geometric path, with Metropolis-adjusted Langevin moves that leave each intermediate
        density invariant. The base is a diagonal Gaussian fitted to the replay buffer (the trained
        model's own chains) and truncated to the box, or the uniform box before training: on
        digits the buffer base finds log Z about 30 nats higher than the uniform one, whose
        weights are dominated by chains that never reach the model's modes. The step size adapts
        towards a 60% acceptance rate; ``self.last_ais`` keeps the diagnostics."""
        base = _BoxBase(self.low, self.high, self.features, next(self.energy.parameters()), self.buffer.states)
        s = torch.sigmoid(torch.linspace(-6, 6, num_temps + 1, dtype=torch.float64))
        betas = ((s - s[0]) / (s[-1] - s[0])).tolist()  # sigmoid spacing: finer at both ends
        x = base.sample(num_chains)
        log_w = torch.zeros(num_chains, device=x.device, dtype=x.dtype)
        eps, accepted = self.step_size, []
        for b0, b1 in itertools.pairwise(betas):
            log_w += (b1 - b0) * (self.log_prob(x) - base.log_prob(x))
            x, rate = _mala_step(
                lambda z, b=b1: b * self.log_prob(z) + (1 - b) * base.log_prob(z), x, eps, self.low, self.high
            )
            eps *= math.exp(0.1 * (rate - 0.6))
            accepted.append(rate)
        ess = float(log_w.logsumexp(0).mul(2).sub((2 * log_w).logsumexp(0)).exp())
        self.last_ais = {
            "acceptance": sum(accepted) / len(accepted),
            "final_step_size": eps,
            "effective_sample_size": ess,
            "base": base.kind,
        }
        return float(torch.logsumexp(log_w, 0) - math.log(num_chains))

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """log p(x) = -E(x) - log Z in nats per point (Z by :meth:`log_normalizer`)."""
        x = self._check(check_data(x, "x", rank=2), "x").to(next(self.energy.parameters()).device)
        return self.log_prob(x) - self.log_normalizer(**kwargs)


class _BoxBase:
    """A normalized density on the box ``[low, high]^dim`` that AIS starts from: independent
    Gaussians truncated to the box, or the uniform box when there are too few states to fit."""

    def __init__(self, low: float, high: float, dim: int, like: torch.Tensor, states=None):
        self.low, self.high, self.dim, self.like = low, high, dim, like
        self.normal = None
        if states is not None and states.shape[0] >= 2 * dim:
            states = states.to(like)
            self.normal = torch.distributions.Normal(states.mean(0), states.std(0).clamp_min(0.01 * (high - low)))
            lo, hi = self.normal.cdf(like.new_tensor(low)), self.normal.cdf(like.new_tensor(high))
            self.cdf_low, self.mass = lo, hi - lo
        self.kind = "uniform box" if self.normal is None else "diagonal Gaussian fitted to the replay buffer"

    def sample(self, n: int) -> torch.Tensor:
        u = torch.rand(n, self.dim, device=self.like.device, dtype=self.like.dtype)
        if self.normal is None:
            return self.low + (self.high - self.low) * u
        tiny = torch.finfo(u.dtype).eps
        return self.normal.icdf((self.cdf_low + self.mass * u).clamp(tiny, 1 - tiny)).clamp(self.low, self.high)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.normal is None:
            return x.new_full(x.shape[:1], -self.dim * math.log(self.high - self.low))
        return (self.normal.log_prob(x) - self.mass.log()).sum(-1)


def _mala_step(log_density, x, eps, low, high):
    """One Metropolis-adjusted Langevin step targeting ``log_density`` restricted to the box."""
    from ppdgm.langevin import score_of

    score = score_of(log_density)
    g = score(x)
    y = x + eps * g + math.sqrt(2 * eps) * torch.randn_like(x)
    inside = ((y >= low) & (y <= high)).all(-1)
    y = torch.where(inside.unsqueeze(-1), y, x)
    gy = score(y)
    lq_fwd = -((y - x - eps * g) ** 2).sum(-1) / (4 * eps)
    lq_bwd = -((x - y - eps * gy) ** 2).sum(-1) / (4 * eps)
    log_acc = log_density(y) - log_density(x) + lq_bwd - lq_fwd
    accept = inside & (torch.rand_like(log_acc).log() < log_acc)
    return torch.where(accept.unsqueeze(-1), y, x), float(accept.float().mean())
