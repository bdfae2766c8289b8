"""Autoregressive models of binary vectors with an exact ``log_prob``: MADE and NADE.

Both factor p(x) = prod_d p(x_{o(d)} | x_{o(<d)}) into Bernoulli conditionals whose logits a
network computes from the already-seen coordinates, so ``log_prob`` is exact and normalized
(it sums to one over all 2^D states) and ``sample`` runs D network passes.

- :class:`MADE` (Germain et al. 2015) masks a feed-forward network's weights so that output d
  sees only inputs earlier in the ordering. With ``num_masks > 1`` it is trained order- and
  connectivity-agnostically (each step draws one of ``num_masks`` orderings/masks) and scored as
  the uniform mixture over those masks, which is still an exact, normalized density.
- :class:`NADE` (Larochelle & Murray 2011) shares one weight matrix across conditionals:
  h_d = sigmoid(c + W_{:, <d} x_{<d}), p(x_d = 1 | x_{<d}) = sigmoid(b_d + V_d . h_d).

As Pyro programs both are ``pyro.sample("x", dist, obs=x)`` in a plate named ``data``, trained
by maximum likelihood with SVI and an empty guide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import ClassVar

import pyro
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn
from torch.nn import functional as F

from ppdgm.data import check_data
from ppdgm.models.spec import ConstructorSpec

# ---------------------------------------------------------------------------------------------
# the distribution both models hand to pyro.sample


class AutoregressiveBernoulli(TorchDistribution):
    """A distribution over ``{0, 1}^D`` defined by an autoregressive model's ``log_prob``/``sample``.

    ``owner`` provides ``log_prob(x) -> (n,)`` and ``sample(n) -> (n, D)``; the batch shape is the
    plate's size.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = False

    def __init__(self, owner, batch_size: int, validate_args=None):
        self.owner = owner
        super().__init__(torch.Size([batch_size]), torch.Size([owner.features]), validate_args=validate_args)

    def log_prob(self, value):
        return self.owner._log_prob(value)

    def sample(self, sample_shape=()):
        n = int(torch.Size(sample_shape).numel()) * self.batch_shape.numel()
        with torch.no_grad():
            x = self.owner._sample(n)
        return x.reshape(*sample_shape, *self.batch_shape, self.owner.features)

    def expand(self, batch_shape, _instance=None):
        if len(batch_shape) != 1:
            raise ValueError(f"AutoregressiveBernoulli supports one batch dim, got {tuple(batch_shape)}")
        return AutoregressiveBernoulli(self.owner, batch_shape[0])


class _BinaryAutoregressive(ConstructorSpec, nn.Module):
    """What MADE and NADE share: the zoo protocol, input checks, the Pyro program, sampling."""

    default_engine = "svi"
    support = "binary"
    likelihood_method = "exact"
    guide = None  # no latent sites: SVI runs the model with an empty guide (maximum likelihood)
    name = ""
    features: int

    @classmethod
    def from_data(cls, data, **kwargs):
        return cls(features=data.x.shape[1], **kwargs)

    def data_args(self, dataset) -> tuple:
        return (self._check(dataset.x),)

    def _device_tensor(self) -> torch.Tensor:
        return next(self.parameters())

    def _check(self, x, name="x") -> torch.Tensor:
        x = check_data(x, name, support="binary", rank=2)
        if x.shape[1] != self.features:
            raise ValueError(f"{name}: this model has {self.features} features, got shape {tuple(x.shape)}")
        p = self._device_tensor()
        return x.to(p.device, p.dtype)

    def model(self, x=None, n: int | None = None):
        """``x ~ p(x)`` for each row, in a plate named ``data``."""
        pyro.module(self.name, self)
        if x is not None:
            x = self._check(x)
            n = x.shape[0]
        elif n is None:
            raise ValueError("model: give the data x or the number of draws n")
        with pyro.plate("data", n):
            return pyro.sample("x", AutoregressiveBernoulli(self, n), obs=x)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's exact log p(x) (MADE and NADE compute it their own way)."""
        raise NotImplementedError

    def _sample(self, n: int) -> torch.Tensor:
        """``n`` exact draws."""
        raise NotImplementedError

    def log_prob(self, x) -> torch.Tensor:
        """Exact per-row log p(x) in nats."""
        return self._log_prob(self._check(x))

    @torch.no_grad()
    def log_likelihood(self, x) -> torch.Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` exact draws by ancestral sampling, one network pass per dimension."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return self._sample(n)


# ---------------------------------------------------------------------------------------------
# MADE


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` of shape (out, in)."""

    masks: torch.Tensor  # a buffer

    def __init__(self, in_features: int, out_features: int, num_masks: int = 1):
        super().__init__(in_features, out_features)
        self.register_buffer("masks", torch.ones(num_masks, out_features, in_features))
        self.mask_index = 0

    def forward(self, x):
        return F.linear(x, self.weight * self.masks[self.mask_index], self.bias)


def made_degrees(features: int, hidden_features, order: torch.Tensor, generator: torch.Generator | None):
    """MADE's degrees: inputs get their position in ``order`` (1..D); hidden units get degrees
    in [min of previous layer, D - 1], cycled when ``generator`` is None, drawn otherwise."""
    degrees = [torch.empty(features, dtype=torch.long)]
    degrees[0][order] = torch.arange(1, features + 1)
    for h in hidden_features:
        low = int(degrees[-1].min())
        if generator is None:
            degrees.append(low + torch.arange(h) % (features - low))
        else:
            degrees.append(torch.randint(low, features, (h,), generator=generator))
    return degrees


def made_masks(degrees: list[torch.Tensor]) -> list[torch.Tensor]:
    """Masks (out, in) that connect a unit only to units of lower-or-equal degree (strictly lower
    for the output layer), which makes output d depend on inputs earlier than d only."""
    masks = [(d_out[:, None] >= d_in[None, :]).float() for d_in, d_out in pairwise(degrees)]
    masks.append((degrees[0][:, None] > degrees[-1][None, :]).float())
    return masks


class MADE(_BinaryAutoregressive):
    """Masked autoencoder for distribution estimation over binary vectors.

    Args:
        features: number of binary features.
        hidden_features: widths of the masked hidden layers.
        num_masks: 1 for a single ordering; > 1 for order/connectivity-agnostic training over
            that many (ordering, mask) pairs, scored as their uniform mixture.
        order: ``"natural"`` (0..D-1) or ``"random"`` for the first (or only) ordering.
        seed: seeds the orderings and masks, so ``spec`` rebuilds the same network.
    """

    datasets = ("digits-binary",)

    name = "made"
    # minibatches: 2,000 steps on the digits give 17.69 nats in 3.5 s (full batch: 18.91 in 7.8 s)
    engine_config: ClassVar[dict] = {"batch_size": 100, "lr": 3e-3}
    orders: torch.Tensor  # a buffer: each mask's ordering of the features

    def __init__(
        self, features: int = 64, hidden_features=(256,), num_masks: int = 1, order: str = "natural", seed: int = 0
    ):
        super().__init__()
        if not isinstance(features, int) or features < 2:
            raise ValueError(f"features must be an int >= 2, got {features!r}")
        hidden_features = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
        if not hidden_features or any(not isinstance(h, int) or h < 1 for h in hidden_features):
            raise ValueError(f"hidden_features must be a non-empty list of positive ints, got {hidden_features!r}")
        if not isinstance(num_masks, int) or num_masks < 1:
            raise ValueError(f"num_masks must be a positive int, got {num_masks!r}")
        if order not in ("natural", "random"):
            raise ValueError(f"order must be 'natural' or 'random', got {order!r}")
        self.features, self.hidden_features, self.num_masks, self.order, self.seed = (
            features,
            hidden_features,
            num_masks,
            order,
            seed,
        )

        sizes = [features, *hidden_features, features]
        # an nn.ModuleList, typed by what it holds (torch's ModuleList is not generic)
        self.layers: Sequence[MaskedLinear] = nn.ModuleList(  # type: ignore[assignment]
            MaskedLinear(a, b, num_masks) for a, b in pairwise(sizes)
        )
        self.register_buffer("orders", torch.empty(num_masks, features, dtype=torch.long))
        gen = torch.Generator().manual_seed(seed)
        for k in range(num_masks):
            agnostic = num_masks > 1
            perm = torch.randperm(features, generator=gen) if (order == "random" or k > 0) else torch.arange(features)
            masks = made_masks(made_degrees(features, hidden_features, perm, gen if agnostic else None))
            for layer, mask in zip(self.layers, masks):
                layer.masks[k] = mask
            self.orders[k] = perm

    def logits(self, x, mask: int = 0) -> torch.Tensor:
        """Bernoulli logits of every coordinate given the coordinates before it under ``mask``."""
        for layer in self.layers:
            layer.mask_index = mask
        h = x
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        return self.layers[-1](h)

    def _log_prob_mask(self, x, k):
        return -F.binary_cross_entropy_with_logits(self.logits(x, k), x, reduction="none").sum(-1)

    def _log_prob(self, x):
        if self.num_masks == 1:
            return self._log_prob_mask(x, 0)
        if self.training and torch.is_grad_enabled():
            # order-agnostic training: one (ordering, mask) pair per step
            k = int(torch.randint(self.num_masks, ()))
            return self._log_prob_mask(x, k)
        lps = torch.stack([self._log_prob_mask(x, k) for k in range(self.num_masks)])
        return torch.logsumexp(lps, 0) - math.log(self.num_masks)

    def _sample(self, n):
        p = self._device_tensor()
        ks = torch.randint(self.num_masks, (n,), device=p.device)
        x = p.new_zeros(n, self.features)
        for k in ks.unique().tolist():
            rows = (ks == k).nonzero().squeeze(-1)
            xk = x[rows]
            for d in self.orders[k].tolist():
                xk[:, d] = torch.bernoulli(torch.sigmoid(self.logits(xk, k)[:, d]))
            x[rows] = xk
        return x


# ---------------------------------------------------------------------------------------------
# NADE


class NADE(_BinaryAutoregressive):
    """Neural autoregressive distribution estimator over binary vectors (natural order)."""

    datasets = ("digits-binary",)

    name = "nade"
    # a step costs O(batch x features x hidden) element-wise work (no matmul to hide it in): 2,000 full-batch
    # steps on the digits took 400 s for 17.29 nats, 2,000 minibatches of 100 take 14 s for 17.16
    engine_config: ClassVar[dict] = {"batch_size": 100, "lr": 3e-3}

    def __init__(self, features: int = 64, hidden_features: int = 100):
        super().__init__()
        if not isinstance(features, int) or features < 2:
            raise ValueError(f"features must be an int >= 2, got {features!r}")
        if not isinstance(hidden_features, int) or hidden_features < 1:
            raise ValueError(f"hidden_features must be a positive int, got {hidden_features!r}")
        self.features, self.hidden_features = features, hidden_features
        self.W = nn.Parameter(torch.randn(hidden_features, features) / math.sqrt(features))
        self.c = nn.Parameter(torch.zeros(hidden_features))
        self.V = nn.Parameter(torch.randn(features, hidden_features) / math.sqrt(hidden_features))
        self.b = nn.Parameter(torch.zeros(features))

    def logits(self, x) -> torch.Tensor:
        """All D conditional logits in one pass: a_d = c + sum_{j<d} W_j x_j by an exclusive cumsum."""
        contrib = x.unsqueeze(-1) * self.W.t()  # (n, D, H)
        a = self.c + torch.cumsum(contrib, dim=-2) - contrib
        h = torch.sigmoid(a)
        return (h * self.V).sum(-1) + self.b

    def _log_prob(self, x):
        return -F.binary_cross_entropy_with_logits(self.logits(x), x, reduction="none").sum(-1)

    def _sample(self, n):
        x = self.W.new_zeros(n, self.features)
        a = self.c.expand(n, self.hidden_features).clone()
        for d in range(self.features):
            h = torch.sigmoid(a)
            p = torch.sigmoid(h @ self.V[d] + self.b[d])
            x[:, d] = torch.bernoulli(p)
            a = a + x[:, d : d + 1] * self.W[:, d]
        return x
