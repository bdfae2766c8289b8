"""Held-out log-likelihood in nats, so every family lands in one table.

``log_likelihood(model, x)`` asks the model for per-point log p(x) (each zoo class implements
``log_likelihood(x, **kw)`` with its own exact or estimated method) and returns the mean, its
standard error and the method used. The factorized-Bernoulli baseline is the number every model
of binary digits must beat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppdgm.data import check_data


@dataclass(frozen=True)
class NatsEstimate:
    """Mean log-likelihood per data point in nats with its standard error."""

    mean: float
    stderr: float
    n: int
    method: str

    @property
    def nll(self) -> float:
        return -self.mean

    def __str__(self) -> str:
        return f"{self.method}: log p(x) = {self.mean:.3f} +/- {self.stderr:.3f} nats (NLL {self.nll:.3f}, n={self.n})"


def summarize(per_point: torch.Tensor, method: str) -> NatsEstimate:
    per_point = per_point.detach().double().flatten()
    n = per_point.numel()
    sd = per_point.std().item() if n > 1 else float("nan")
    return NatsEstimate(per_point.mean().item(), sd / math.sqrt(n), n, method)


def log_likelihood(model, x, method: str | None = None, **kwargs) -> NatsEstimate:
    """Mean held-out log p(x) in nats of a zoo model, by the model's own (or the named) method."""
    if not hasattr(model, "log_likelihood"):
        raise TypeError(f"{type(model).__name__} has no log_likelihood(x); cannot evaluate it in nats")
    if method is not None:
        kwargs["method"] = method
    ll = model.log_likelihood(x, **kwargs)
    return summarize(ll, method or getattr(model, "likelihood_method", type(model).__name__))


def bernoulli_baseline(train, test, eps: float = 1e-3) -> NatsEstimate:
    """Factorized Bernoulli with per-pixel means fitted on ``train``: log p of ``test`` in nats."""
    train = check_data(train, "train", support="binary", rank=2)
    test = check_data(test, "test", support="binary", rank=2)
    p = train.mean(0).clamp(eps, 1 - eps)
    ll = (test * p.log() + (1 - test) * (1 - p).log()).sum(-1)
    return summarize(ll, "factorized-bernoulli")
