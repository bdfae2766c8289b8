"""The small pieces HMC warm-up is built from, each testable on its own.

- :func:`halton`: the van der Corput sequence, the jitter of ChEES's trajectory length.
- :class:`DualAveraging`: Nesterov dual averaging of the log step size toward a target acceptance
  (Hoffman & Gelman 2014, Stan's constants).
- :class:`Welford`: running mean and variance over batches of draws (Chan et al.'s update), the
  diagonal mass matrix of a warm-up window.
- :func:`warmup_windows`: where those windows end.
- :class:`CovarianceWelford` and :func:`half_turn`: the chains' full covariance over a window,
  and half the period of its slowest direction once the mass matrix has whitened it.
- :class:`TrajectoryAdam`: Adam on log trajectory length (ChEES), without first moment as in the
  paper (``torch.optim.Adam`` with ``betas=(0, beta2)``, maximizing).

Each piece is a dataclass of numbers and tensors, so a sampler state that holds them saves with
``dataclasses.asdict`` and loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def halton(n: int, base: int = 2) -> float:
    """The ``n``-th (n >= 1) element of the van der Corput sequence in (0, 1)."""
    f, r = 1.0, 0.0
    while n > 0:
        f /= base
        n, digit = divmod(n, base)
        r += f * digit
    return r


@dataclass
class DualAveraging:
    """Dual averaging of ``log step_size``: ``update(accept)`` returns the next step size, and
    ``final`` the averaged one to sample with once warm-up ends."""

    target: float
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75
    mu: float = 0.0
    t: int = 0
    h_bar: float = 0.0
    x: float = 0.0
    x_bar: float = 0.0

    @classmethod
    def start(cls, step_size: float, target: float) -> DualAveraging:
        averager = cls(target)
        averager.reset(step_size)
        return averager

    def reset(self, step_size: float) -> None:
        """Restart at ``step_size``, shrinking toward ``10 * step_size`` (a new mass matrix)."""
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


@dataclass
class Welford:
    """Running mean and sum of squared deviations per coordinate over rows of ``(batch, dim)``."""

    mean: torch.Tensor
    m2: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, like: torch.Tensor) -> Welford:
        return cls(torch.zeros_like(like), torch.zeros_like(like), 0)

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of ``rows`` (exact for any batch size: sum of (x - old mean)(x - new mean))."""
        self.count += rows.shape[0]
        d = rows - self.mean
        self.mean = self.mean + d.sum(0) / self.count
        self.m2 = self.m2 + self._m2_increment(d, rows - self.mean)

    @staticmethod
    def _m2_increment(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return (old * new).sum(0)

    @property
    def variance(self) -> torch.Tensor:
        """The unbiased sample variance (``numpy.var(..., ddof=1)``)."""
        return self.m2 / max(self.count - 1, 1)

    def regularized_variance(self, prior: float = 1e-3, weight: float = 5.0) -> torch.Tensor:
        """Stan's shrinkage of the variance toward ``prior``: a mass matrix from few draws stays sane."""
        n = self.count
        return (n / (n + weight)) * self.variance + prior * (weight / (n + weight))


@dataclass
class CovarianceWelford(Welford):
    """As :class:`Welford`, with the sum of outer products of deviations: the full covariance."""

    @classmethod
    def empty(cls, like: torch.Tensor) -> CovarianceWelford:
        return cls(torch.zeros_like(like), torch.zeros(*like.shape, *like.shape, dtype=like.dtype, device=like.device))

    @staticmethod
    def _m2_increment(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return old.T @ new

    @property
    def covariance(self) -> torch.Tensor:
        c = self.variance
        return 0.5 * (c + c.T)


def half_turn(covariance: torch.Tensor, inverse_mass: torch.Tensor) -> float:
    """``pi * sqrt(lambda_max)`` with ``lambda_max`` the largest eigenvalue of the covariance in
    the mass matrix's coordinates: half the period with which HMC oscillates along a Gaussian's
    slowest direction. A trajectory of length ``u * L`` with ``u`` uniform in (0, 1) (ChEES's
    jitter) leaves that direction correlated with its start by ``E[cos(u L w)] = sin(L w) / (L w)``,
    zero at ``L = pi / w``; longer only spends gradients. (BlackJAX's ChEES floors its length at
    half of this.)"""
    s = inverse_mass.rsqrt()
    top = torch.linalg.eigvalsh((covariance * s[:, None] * s[None, :]).double())[-1]
    return math.pi * math.sqrt(max(float(top), 1e-6))


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


@dataclass
class TrajectoryAdam:
    """Adam ascent on a scalar (ChEES's log trajectory length) with ``beta1 = 0``: the step is
    ``lr * g / (sqrt(v / (1 - beta2**t)) + eps)`` with ``v`` the running mean of ``g**2``."""

    value: float
    lr: float
    beta2: float = 0.95
    eps: float = 1e-8
    v: float = 0.0
    t: int = 0

    def step(self, grad: float, low: float = -math.inf, high: float = math.inf) -> float:
        """Move ``value`` up the gradient ``grad`` and clip it to ``[low, high]``."""
        self.t += 1
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad * grad
        v_hat = self.v / (1 - self.beta2**self.t)
        self.value = min(max(self.value + self.lr * grad / (math.sqrt(v_hat) + self.eps), low), high)
        return self.value
