"""The energy of a layered Boltzmann machine, shared by the RBM, DBN, DBM and AIS.

A layered machine has layers of units (``bernoulli``, ``gaussian`` or ``softmax``) and weight
matrices between pairs of layers that never share a colour of the graph's 2-colouring, so each
layer is conditionally independent given its neighbours:

    E(x) = sum_layers own_i(x_i) - sum_edges (x_i / sigma_i)^T W_ij (x_j / sigma_j)

with ``own_i = -b_i . x_i`` for bernoulli and softmax units and ``(x_i - b_i)^2 / (2 sigma_i^2)``
for gaussian units. ``softmax`` units are counts over ``size`` categories (one-hot when the count
is 1, the replicated softmax of documents otherwise).

:class:`LayeredEnergy` holds the tensors (it owns no parameters, so models build one per call and
gradients flow to their own parameters) and gives the energy, each layer's conditional given its
neighbours at an inverse temperature ``beta``, layer samples, and the closed-form sum over one
layer's states, which is what free energies, exact partition functions and AIS need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

UNITS = ("bernoulli", "gaussian", "softmax")
LOG_2PI = math.log(2 * math.pi)


@dataclass
class LayeredEnergy:
    """Tensors of a layered Boltzmann machine. ``edges`` are ``(i, j, W)`` with ``W`` shaped
    ``(sizes[i], sizes[j])``; ``log_sigmas[i]`` is a tensor for gaussian layers, else None;
    ``counts[i]`` is the number of draws of a softmax layer (a document's length)."""

    names: list[str]
    units: list[str]
    visible: list[bool]
    biases: list[torch.Tensor]
    edges: list[tuple[int, int, torch.Tensor]]
    log_sigmas: list[torch.Tensor | None] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # draws per row of softmax layers (default 1: one-hot)

    def __post_init__(self):
        if not self.log_sigmas:
            self.log_sigmas = [None] * len(self.names)
        for u in self.units:
            if u not in UNITS:
                raise ValueError(f"units must be one of {UNITS}, got {u!r}")

    @property
    def sizes(self) -> list[int]:
        return [b.shape[-1] for b in self.biases]

    def sigma(self, i: int) -> torch.Tensor:
        """The standard deviation of gaussian layer ``i`` (the only kind of layer that has one)."""
        log_sigma = self.log_sigmas[i]
        if log_sigma is None:
            raise ValueError(f"layer {i}: {self.units[i]} units have no sigma; only gaussian units do")
        return log_sigma.exp()

    def scaled(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """``x_i / sigma_i`` (what layer i sends through its weights)."""
        return x / self.sigma(i) if self.units[i] == "gaussian" else x

    def neighbours(self, i: int) -> list[int]:
        return [j for a, b, _ in self.edges for j in ((b,) if a == i else (a,) if b == i else ())]

    def input(self, i: int, state: dict) -> torch.Tensor:
        """Total input ``sum_j W_ij (x_j / sigma_j)`` to layer ``i`` from the layers in ``state``."""
        total = None
        for a, b, W in self.edges:
            if a == i and b in state:
                term = self.scaled(b, state[b]) @ W.T
            elif b == i and a in state:
                term = self.scaled(a, state[a]) @ W
            else:
                continue
            total = term if total is None else total + term
        if total is None:
            raise ValueError(f"layer {self.names[i]!r} has no neighbour in the given state")
        return total

    # -- energy -----------------------------------------------------------------------------
    def own_log_density(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """``-own_i(x_i)`` summed over units: the bias (and gaussian quadratic) term."""
        b = self.biases[i]
        if self.units[i] == "gaussian":
            return -(((x - b) / self.sigma(i)) ** 2).sum(-1) / 2
        return (x * b).sum(-1)

    def log_density(self, state: dict) -> torch.Tensor:
        """``-E(x)`` of a full state ``{layer: (n, size)}``."""
        out = sum((self.own_log_density(i, x) for i, x in state.items()), torch.zeros(()))
        for a, b, W in self.edges:
            out = out + ((self.scaled(a, state[a]) @ W) * self.scaled(b, state[b])).sum(-1)
        return out

    # -- conditionals -----------------------------------------------------------------------
    def natural(self, i: int, inp: torch.Tensor, beta=1.0, base_bias=None) -> torch.Tensor:
        """Natural parameter of layer ``i`` given input ``inp`` at inverse temperature ``beta``,
        mixing in ``(1 - beta) * base_bias`` (AIS's base-rate model) for non-gaussian units."""
        if self.units[i] == "gaussian":
            return inp * beta  # the quadratic and bias are not annealed
        eta = (self.biases[i] + inp) * beta
        if base_bias is not None:
            eta = eta + (1 - beta) * base_bias
        return eta

    def mean(self, i: int, eta: torch.Tensor) -> torch.Tensor:
        """``E[x_i]`` under layer i's conditional with natural parameter ``eta``."""
        u = self.units[i]
        if u == "bernoulli":
            return torch.sigmoid(eta)
        if u == "gaussian":
            return self.biases[i] + self.sigma(i) * eta
        return torch.softmax(eta, -1) * self.counts.get(i, 1)

    def sample(self, i: int, eta: torch.Tensor) -> torch.Tensor:
        """A draw of layer i; a softmax layer draws ``counts[i]`` categories per row (one-hot for 1)."""
        u = self.units[i]
        if u == "bernoulli":
            return bernoulli(torch.sigmoid(eta))
        if u == "gaussian":
            return self.mean(i, eta) + self.sigma(i) * torch.randn_like(eta)
        n = self.counts.get(i, 1)
        if n == 1:
            idx = torch.multinomial(torch.softmax(eta, -1).reshape(-1, eta.shape[-1]), 1).reshape(eta.shape[:-1])
            return F.one_hot(idx, eta.shape[-1]).to(eta.dtype)
        probs = torch.softmax(eta, -1)
        return _multinomial_counts(probs, torch.full(probs.shape[:-1], n, device=probs.device))

    def log_marginal(self, i: int, eta: torch.Tensor) -> torch.Tensor:
        """``log sum_{x_i} exp(-own_i(x_i) + x_i . (eta - b_i))``: layer i summed out in closed form.

        ``eta`` is the natural parameter from :meth:`natural` (it holds the bias for bernoulli
        and softmax units; for gaussian units it is the annealed input)."""
        u = self.units[i]
        if u == "bernoulli":
            return F.softplus(eta).sum(-1)
        if u == "gaussian":
            sigma, b = self.sigma(i), self.biases[i]
            t = eta / sigma
            return (0.5 * LOG_2PI + sigma.log() + b * t + (sigma * t) ** 2 / 2).sum(-1)
        # a sum over sequences of counts[i] draws (the replicated softmax's words are exchangeable)
        return self.counts.get(i, 1) * torch.logsumexp(eta, -1)


def check_sparsity(cost, target, num_hidden: int) -> tuple[float, tuple]:
    """``(cost, one target per hidden layer)`` from a model's ``sparsity_cost`` and
    ``sparsity_target`` (a number, or one per hidden layer), or a ValueError saying what was expected."""
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0:
        raise ValueError(f"sparsity_cost must be a non-negative number, got {cost!r}")
    targets = (target,) * num_hidden if isinstance(target, (int, float)) else tuple(target)
    if len(targets) != num_hidden or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1 for t in targets
    ):
        raise ValueError(
            f"sparsity_target: expected a number in (0, 1) or one per hidden layer ({num_hidden}), got {target!r}"
        )
    return float(cost), tuple(float(t) for t in targets)


def sparsity_penalty(cost: float, means, targets) -> torch.Tensor:
    """The sparsity penalty of Boltzmann machine training (Lee, Ekanadham & Ng 2008; Nair & Hinton
    2009): ``cost`` times the cross-entropy between each hidden unit's target activation and its
    activation averaged over the batch, summed over units. ``means`` are ``(batch, units)`` posterior
    means, one per hidden layer; for a logistic unit the gradient on its input is ``cost * (q - t)``
    averaged over the batch, which pulls its mean activation ``q`` to the target ``t``."""
    penalty = means[0].new_zeros(())
    for q, t in zip(means, targets):
        q = q.mean(0).clamp(1e-6, 1 - 1e-6)
        penalty = penalty + F.binary_cross_entropy(q, torch.full_like(q, t), reduction="sum")
    return cost * penalty


def cycled_rows(n: int, rows: int, device=None) -> torch.Tensor:
    """``n`` indices into ``rows`` rows: a random permutation, cycled when ``n`` is larger, so
    draws that continue kept chains use every chain as evenly as possible."""
    return torch.randperm(rows, device=device).repeat(-(-n // rows))[:n]


def bernoulli(p: torch.Tensor) -> torch.Tensor:
    """Bernoulli draws as ``uniform < p``: on CPU a third of ``torch.bernoulli``'s time."""
    return torch.rand_like(p).lt_(p)


def _multinomial_counts(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of counts: row r draws ``counts[r]`` categories from ``probs[r]``."""
    counts = counts.long()
    total = int(counts.max().item()) if counts.numel() else 0
    if total == 0:
        return torch.zeros_like(probs)
    draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), total, replacement=True)
    keep = (torch.arange(total, device=probs.device) < counts.reshape(-1, 1)).to(probs.dtype)
    out = torch.zeros_like(probs.reshape(-1, probs.shape[-1]))
    out.scatter_add_(1, draws, keep)
    return out.reshape(probs.shape)


def two_colouring(num_layers: int, edges) -> list[int]:
    """Colour 0/1 of each layer so that every edge joins different colours (ValueError if none)."""
    colour = [-1] * num_layers
    adj: dict[int, list[int]] = {i: [] for i in range(num_layers)}
    for a, b, *_ in edges:
        adj[a].append(b)
        adj[b].append(a)
    for start in range(num_layers):
        if colour[start] >= 0:
            continue
        colour[start] = 0
        stack = [start]
        while stack:
            i = stack.pop()
            for j in adj[i]:
                if colour[j] < 0:
                    colour[j] = 1 - colour[i]
                    stack.append(j)
                elif colour[j] == colour[i]:
                    raise ValueError(f"layers {i} and {j} share a colour: the layer graph is not bipartite")
    return colour
