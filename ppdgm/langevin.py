"""Langevin dynamics for unnormalized densities, shared by energy-based and score-based models.

One step moves every chain along the score (the gradient of the log-density) and adds Gaussian
noise: ``x <- x + step_size * score(x) + noise_scale * N(0, I)``. With
``noise_scale = sqrt(2 * step_size)`` (the default) this is the unadjusted Langevin algorithm,
whose stationary law approaches the target as the step shrinks. Du & Mordatch (2019) decouple
the two (large step, small noise) and keep a persistent :class:`ReplayBuffer` of past chain
states from which new chains start, re-initializing a few from noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def check_step_size(step_size, name: str = "step_size") -> float:
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, (int, float))
        or not math.isfinite(step_size)
        or step_size <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {step_size!r}")
    return float(step_size)


def score_of(log_density: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient of ``log_density`` (summed over chains) with respect to the chain states."""

    def score(x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_density(x).sum(), x)
        return grad

    return score


class Langevin:
    """Langevin dynamics: ``Langevin(step_size, num_steps).run(x0, log_density=...)``.

    Args:
        step_size: the drift multiplier (> 0).
        num_steps: steps per ``run`` call.
        noise_scale: standard deviation of the added noise; None means ``sqrt(2 * step_size)``.
        grad_clip: clip each chain's score to this norm (Du & Mordatch clip gradients), or None.
        clamp: ``(low, high)`` to keep states inside the data's box, or None.
    """

    def __init__(
        self,
        step_size: float = 0.01,
        num_steps: int = 100,
        noise_scale: float | None = None,
        grad_clip: float | None = None,
        clamp: tuple[float, float] | None = None,
    ):
        self.step_size = check_step_size(step_size)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
        if noise_scale is not None and not (isinstance(noise_scale, (int, float)) and noise_scale >= 0):
            raise ValueError(f"noise_scale must be a non-negative number or None, got {noise_scale!r}")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or None, got {grad_clip!r}")
        if clamp is not None and not (len(clamp) == 2 and clamp[0] < clamp[1]):
            raise ValueError(f"clamp must be a pair (low, high) with low < high, got {clamp!r}")
        self.num_steps = num_steps
        self.noise_scale = math.sqrt(2 * self.step_size) if noise_scale is None else float(noise_scale)
        self.grad_clip = grad_clip
        self.clamp = tuple(clamp) if clamp is not None else None

    def step(
        self, x: torch.Tensor, score: Callable, step_size: float | None = None, noise_scale: float | None = None
    ) -> torch.Tensor:
        """One Langevin move of every chain (rows of ``x``)."""
        eps = self.step_size if step_size is None else step_size
        sd = self.noise_scale if noise_scale is None else noise_scale
        g = score(x)
        if self.grad_clip is not None:
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
            g = g * (self.grad_clip / norm).clamp(max=1.0)
        x = x + eps * g
        if sd > 0:
            x = x + sd * torch.randn_like(x)
        if self.clamp is not None:
            x = x.clamp(*self.clamp)
        return x.detach()

    @torch.no_grad()
    def run(
        self,
        x0: torch.Tensor,
        log_density: Callable | None = None,
        score: Callable | None = None,
        num_steps: int | None = None,
        return_path: bool = False,
    ):
        """Advance chains from ``x0`` by ``num_steps`` steps; give ``log_density`` or ``score``.

        Returns the final states, or ``(states, path)`` with ``path`` shaped ``(steps + 1, *x0.shape)``.
        """
        if score is None:
            if log_density is None:
                raise ValueError("give exactly one of log_density= or score=")
            score = score_of(log_density)
        elif log_density is not None:
            raise ValueError("give exactly one of log_density= or score=")
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
            raise TypeError(f"x0 must be a floating-point tensor of chain states, got {type(x0).__name__}")
        steps = self.num_steps if num_steps is None else num_steps
        x = x0.detach()
        path = [x] if return_path else []
        for _ in range(steps):
            x = self.step(x, score)
            if return_path:
                path.append(x)
        return (x, torch.stack(path)) if return_path else x


class ReplayBuffer:
    """Persistent chain states (Du & Mordatch 2019): draw starts from past states, a few from noise.

    ``init(n)`` returns ``n`` fresh noise states; the buffer holds up to ``capacity`` states.
    """

    def __init__(self, init: Callable[[int], torch.Tensor], capacity: int = 10000, reinit_prob: float = 0.05):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not 0 <= reinit_prob <= 1:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob!r}")
        self.init, self.capacity, self.reinit_prob = init, capacity, float(reinit_prob)
        self.states: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.states is None else self.states.shape[0]

    def sample(self, n: int) -> torch.Tensor:
        """``n`` starting states: from the buffer where it has any, each replaced by noise w.p. ``reinit_prob``."""
        fresh = self.init(n)
        if self.states is None or len(self) == 0:
            return fresh
        idx = torch.randint(len(self), (n,), device=self.states.device)
        old = self.states[idx].to(fresh.device)
        keep = (torch.rand(n, device=fresh.device) >= self.reinit_prob).view(-1, *[1] * (fresh.dim() - 1))
        return torch.where(keep, old, fresh)

    def push(self, x: torch.Tensor) -> None:
        """Add states, dropping the oldest beyond ``capacity``."""
        x = x.detach()
        self.states = x if self.states is None else torch.cat([x, self.states.to(x.device)])[: self.capacity]
