"""Normalizing flows as Pyro programs: ``x ~ TransformedDistribution(N(0, I), transforms)``.

``FlowModel(kind=...)`` stacks Pyro's transform modules into one of five families:

- ``realnvp``: affine coupling layers with batch normalization between them (Dinh et al. 2017);
- ``maf``: masked autoregressive flow (Papamakarios et al. 2017), one pass to score data,
  ``features`` passes to sample;
- ``iaf``: inverse autoregressive flow (Kingma et al. 2016), one pass to sample, ``features`` passes
  to score data (it is the MAF layer used the other way round);
- ``nsf_coupling`` / ``nsf_ar``: neural spline flows (Durkan et al. 2019) with Pyro's monotonic
  linear-rational splines (Dolatabadi et al. 2020), coupling or autoregressive conditioners.

With ``context > 0`` every layer is conditioned on a context vector ``y`` and the model is
p(x | y). Maximum likelihood is SVI with an empty guide: ``model(x)`` has no latent sites.

**Dequantization.** Pixels that take ``levels`` values ``k / (levels - 1)`` (17 for the 0..16
digits intensities, 2 for binarized pixels) are modelled as ``v = (k + u) / levels`` with
``u ~ Uniform(0, 1)^D``, and a logit pre-processing ``v -> logit(alpha + (1 - 2 alpha) v)`` is
the flow's last transform (its Jacobian is in ``log_prob``). The discrete model is
P(k) = integral of p(v) over the cell of k (volume ``levels^-D``), so by Jensen's inequality

    log P(k) >= E_u[log p(v)] - D log(levels)            (Theis et al. 2016)

and ``log mean_j exp(log p(v_j)) - D log(levels)`` over ``j`` draws of ``u`` is a tighter lower
bound. (The logit squeeze puts a little density outside the unit cube; that only loosens it.)
:meth:`FlowModel.log_likelihood` returns that bound in nats per image, so a flow's test NLL is an
upper bound on its exact NLL of the same discrete images: comparable with discrete models and
with VAE bounds on the same pixels (17-level digits; ``levels=2`` flows on the binarized digits
line up with MADE, NADE and RBMs). The training loss carries the ``- D log(levels)`` constant as
a ``pyro.factor``, so SVI's loss per image is that bound too.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar, cast

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import (
    AutoRegressiveNN,
    ConditionalAutoRegressiveNN,
    ConditionalDenseNN,
    DenseNN,
)
from pyro.params import param_with_module_name
from torch import nn

from ppdgm.data import check_data
from ppdgm.models.spec import ConstructorSpec

KINDS = ("realnvp", "maf", "iaf", "nsf_coupling", "nsf_ar")
# Which kinds put Pyro's autoregressive module into the generative direction inverted: Pyro's
# AffineAutoregressive/SplineAutoregressive compute their conditioner from the *input*, so used
# as-is they are IAF layers (fast sampling); inverted, they score data in one pass (MAF).
_SCORES_IN_ONE_PASS = {"maf", "nsf_ar"}


class ConditionalSplineCoupling(ConditionalTransformModule):
    """A spline coupling layer whose upper-half conditioner also sees a context vector.

    Pyro ships conditional affine couplings and conditional autoregressive splines but no
    conditional spline coupling; this one shares its element-wise lower spline between contexts.
    """

    domain = T.SplineCoupling.domain
    codomain = T.SplineCoupling.codomain
    bijective = True

    def __init__(self, input_dim, split_dim, hypernet, count_bins=8, bound=3.0):
        super().__init__()
        self.input_dim, self.split_dim, self.count_bins, self.bound = input_dim, split_dim, count_bins, bound
        self.lower_spline = T.Spline(split_dim, count_bins, bound)
        self.nn = hypernet

    def condition(self, context):
        return _SplineCouplingGiven(self, partial(self.nn, context=context))


class _SplineCouplingGiven(T.SplineCoupling):
    """``SplineCoupling`` reusing its parent's lower spline, with a context-bound hypernet."""

    def __init__(self, parent: ConditionalSplineCoupling, hypernet):
        TransformModule.__init__(self, cache_size=1)
        self.lower_spline = parent.lower_spline
        self.upper_spline = T.ConditionalSpline(
            hypernet, parent.input_dim - parent.split_dim, parent.count_bins, parent.bound
        )
        self.split_dim = parent.split_dim
        self.identity = False


class SoftClampedScale(nn.Module):
    """Wraps an affine layer's conditioner and squashes its log-scale smoothly into (-3, 3).

    Pyro's affine coupling/autoregressive layers hard-clamp the log-scale to [-5, 3] with
    straight-through gradients, so a raw log-scale past the clamp keeps being pushed and the
    network's weights can run off until the loss overflows (seen on sharp 2-D mixtures). With
    ``bound * tanh(s / bound)`` the clamp never acts and gradients are honest; near zero this is
    the identity (zuko soft-clamps its affine layers in the same spirit).
    """

    def __init__(self, net: nn.Module, bound: float = 3.0):
        super().__init__()
        # a pyro conditioner; the (conditional) autoregressive ones also have a permutation
        self.net: Any = net
        self.bound = bound

    def forward(self, *args, **kwargs):
        shift, log_scale = self.net(*args, **kwargs)
        return shift, self.bound * torch.tanh(log_scale / self.bound)

    @property
    def permutation(self):  # what Pyro's autoregressive layers read off their network
        return self.net.permutation

    def get_permutation(self):
        return self.net.get_permutation()


def _spline_param_dims(width: int, count_bins: int) -> list[int]:
    return [width * count_bins, width * count_bins, width * (count_bins - 1), width * count_bins]


def build_layer(kind: str, features: int, hidden_features: list[int], context: int, count_bins: int, bound: float):
    """One flow layer of ``kind`` (a Pyro ``TransformModule`` or ``ConditionalTransformModule``)."""
    split = features // 2
    # fixed order; the flips between layers mix the dimensions (pyro types it as the legacy LongTensor)
    order = cast(torch.LongTensor, torch.arange(features))
    if kind == "realnvp":
        dims = [features - split, features - split]
        if context:
            return T.ConditionalAffineCoupling(
                split, SoftClampedScale(ConditionalDenseNN(split, context, hidden_features, dims))
            )
        return T.AffineCoupling(split, SoftClampedScale(DenseNN(split, hidden_features, dims)))
    if kind in ("maf", "iaf"):
        if context:
            return T.ConditionalAffineAutoregressive(
                SoftClampedScale(ConditionalAutoRegressiveNN(features, context, hidden_features, permutation=order))
            )
        return T.AffineAutoregressive(SoftClampedScale(AutoRegressiveNN(features, hidden_features, permutation=order)))
    if kind == "nsf_coupling":
        dims = _spline_param_dims(features - split, count_bins)
        if context:
            return ConditionalSplineCoupling(
                features, split, ConditionalDenseNN(split, context, hidden_features, dims), count_bins, bound
            )
        return T.SplineCoupling(features, split, DenseNN(split, hidden_features, dims), count_bins, bound)
    if kind == "nsf_ar":
        dims = _spline_param_dims(1, count_bins)
        if context:
            arn = ConditionalAutoRegressiveNN(features, context, hidden_features, param_dims=dims, permutation=order)
            return T.ConditionalSplineAutoregressive(features, arn, count_bins=count_bins, bound=bound)
        arn = AutoRegressiveNN(features, hidden_features, param_dims=dims, permutation=order)
        return T.SplineAutoregressive(features, arn, count_bins=count_bins, bound=bound)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class FlowModel(ConstructorSpec, nn.Module):
    """A normalizing flow p(x) (or p(x | y) with ``context``) trained by maximum likelihood.

    Args:
        features: data dimension (>= 2).
        kind: one of ``realnvp``, ``maf``, ``iaf``, ``nsf_coupling``, ``nsf_ar``.
        num_layers: number of coupling/autoregressive layers (a flip of the dimensions between
            consecutive layers; RealNVP adds a batch-norm layer after each coupling but the last).
        hidden_features: hidden widths of each layer's conditioner network.
        context: size of the conditioning vector ``y`` (0: unconditional).
        levels: number of discrete pixel levels to dequantize (None: continuous data).
        count_bins, bound: spline bins and the half-width of the spline's box (identity outside).
        alpha: the logit squeeze used with ``levels``.
    """

    datasets = ("moons", "digits")

    default_engine = "svi"
    # minibatches: 1,500 steps on the 17-level digits give 100.6 nats in 10 s (full batch: 104.2 in 24 s)
    engine_config: ClassVar[dict] = {"batch_size": 200}
    support = "real"
    likelihood_method = "exact"
    guide = None  # no latent sites: SVI runs it with an empty guide (maximum likelihood)
    # buffers
    flip: torch.Tensor
    base_loc: torch.Tensor
    base_scale: torch.Tensor

    def __init__(
        self,
        features: int = 2,
        kind: str = "maf",
        num_layers: int = 5,
        hidden_features=(64, 64),
        context: int = 0,
        levels: int | None = None,
        count_bins: int = 8,
        bound: float = 3.0,
        alpha: float = 0.05,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for arg, val, low in (("features", features, 2), ("num_layers", num_layers, 1), ("count_bins", count_bins, 2)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise ValueError(f"{arg} must be an int >= {low}, got {val!r}")
        if not isinstance(context, int) or context < 0:
            raise ValueError(f"context must be a non-negative int, got {context!r}")
        hidden_features = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
        if not hidden_features or any(not isinstance(h, int) or h < 1 for h in hidden_features):
            raise ValueError(f"hidden_features must be a non-empty list of positive ints, got {hidden_features!r}")
        if levels is not None and (not isinstance(levels, int) or levels < 2):
            raise ValueError(f"levels must be None or an int >= 2 (number of pixel values), got {levels!r}")
        if not (isinstance(bound, (int, float)) and bound > 0):
            raise ValueError(f"bound must be a positive number, got {bound!r}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
        self.features, self.kind, self.num_layers, self.hidden_features = features, kind, num_layers, hidden_features
        self.context, self.levels, self.count_bins, self.bound, self.alpha = (
            context,
            levels,
            count_bins,
            float(bound),
            float(alpha),
        )
        self.support = "unit_interval" if levels else "real"
        if levels:
            self.likelihood_method = f"uniform-dequantization bound ({levels} levels)"

        self.layers = nn.ModuleList()
        for i in range(num_layers):
            self.layers.append(build_layer(kind, features, hidden_features, context, count_bins, float(bound)))
            if kind == "realnvp" and i < num_layers - 1:
                self.layers.append(T.BatchNorm(features))
        self.register_buffer("flip", torch.arange(features - 1, -1, -1))
        self.register_buffer("base_loc", torch.zeros(features))
        self.register_buffer("base_scale", torch.ones(features))
        self._unconditional: tuple | None = None
        self._pyro_params: list | None = None

    # -- zoo protocol ------------------------------------------------------------------------
    @classmethod
    def from_data(cls, data, **kwargs):
        """Size the flow from a ``Dataset``; digits whose pixels are on their grid of levels get
        those levels (dequantized by the flow), and ``conditional=True`` adds a one-hot label context."""
        conditional = kwargs.pop("conditional", False)
        if "levels" not in kwargs and data.name.startswith("digits"):
            levels = 2 if "binary" in data.name else 17
            k = data.x * (levels - 1)
            if torch.allclose(k, k.round(), atol=1e-4):  # pixels still on their grid: dequantize them here
                kwargs["levels"] = levels
        if conditional:
            if data.y is None:
                raise ValueError(f"conditional=True needs labels, but dataset {data.name!r} has none")
            kwargs.setdefault("context", int(data.y.max()) + 1)
        return cls(features=data.x.shape[1], **kwargs)

    def data_args(self, data) -> tuple:
        if not self.context:
            return (data.x,)
        if data.y is None:
            raise ValueError(f"this flow is conditional (context={self.context}) but {data.name!r} has no labels")
        return (data.x, nn.functional.one_hot(data.y.long(), self.context).float())

    # -- the distribution --------------------------------------------------------------------
    def transforms(self, y=None) -> list:
        """The transforms from the base N(0, I) to data space, conditioned on ``y`` if needed."""
        if y is None and self._unconditional is not None and self._unconditional[0] is self.flip:
            return self._unconditional[1]  # built once per device: saves rebuilding every step
        out = []
        for i, layer in enumerate(self.layers):
            t = layer.condition(y) if isinstance(layer, ConditionalTransformModule) else layer
            if self.kind in _SCORES_IN_ONE_PASS:
                t = t.inv
            out.append(t)
            if not isinstance(layer, T.BatchNorm) and i < len(self.layers) - 1:
                out.append(T.Permute(self.flip))
        if self.levels:
            a = self.alpha
            out += [T.SigmoidTransform(), T.AffineTransform(-a / (1 - 2 * a), 1 / (1 - 2 * a), event_dim=1)]
        if y is None:
            self._unconditional = (self.flip, out)
        return out

    def distribution(self, y=None) -> dist.TransformedDistribution:
        """The flow's distribution over (dequantized) data, p(x) or p(x | y)."""
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        if y is not None:
            base = base.expand(y.shape[:-1])
        return dist.TransformedDistribution(base, self.transforms(y))

    def to_latent(self, x, y=None) -> torch.Tensor:
        """Map data to the base space (the inverse of the generative transforms)."""
        for t in reversed(self.transforms(y)):
            x = t.inv(x)
        return x

    # -- Pyro program ------------------------------------------------------------------------
    def model(self, x=None, y=None, n: int | None = None):
        """``x ~ flow`` in a plate named ``data``; discrete pixels are dequantized first."""
        self._register_params()
        if x is not None:
            x = self._check(x, "x")
            n = x.shape[0]
        y = self._check_context(y, n)
        with pyro.plate("data", n):
            if x is not None and self.levels:
                pyro.factor("dequantization", x.new_full((n,), -self.features * math.log(self.levels)))
                x = self.dequantize(x)
            elif x is not None:
                # a fresh tensor each call: Pyro's transform caches key on tensor identity, and the same
                # full batch passed again would replay the previous step's (freed) autograd graph
                x = x.clone()
            return pyro.sample("x", self.distribution(y), obs=x)

    def _register_params(self) -> None:
        """What ``pyro.module("flow", self)`` does, without walking the module tree every step
        (the parameters are fixed once built; ``.to()`` and ``load_state_dict`` keep them)."""
        if self._pyro_params is None:
            self._pyro_params = [
                (param_with_module_name("flow", n), p) for n, p in self.named_parameters() if p.requires_grad
            ]
        for name, p in self._pyro_params:
            pyro.param(name, p)

    def dequantize(self, x) -> torch.Tensor:
        """Pixel values ``k / (levels - 1)`` -> ``(k + u) / levels`` with ``u ~ U(0, 1)``."""
        assert self.levels is not None  # only discrete (levels) data is dequantized
        k = (x * (self.levels - 1)).round()
        return (k + torch.rand_like(x)) / self.levels

    # -- evaluation and sampling ---------------------------------------------------------------
    def log_prob(self, x, y=None) -> torch.Tensor:
        """Exact per-point log density of continuous ``x`` (dequantized pixels for ``levels``)."""
        x = self._check(x, "x", support="real")
        with _eval_mode(self):
            return self.distribution(self._check_context(y, x.shape[0])).log_prob(x)

    @torch.no_grad()
    def log_likelihood(self, x, y=None, num_samples: int = 1) -> torch.Tensor:
        """Per-point log p(x) in nats.

        Continuous data: the exact log density. Discrete pixels (``levels``): the dequantization
        lower bound on log P(x) of the discrete image, importance-weighted over ``num_samples``
        draws of the uniform noise (``num_samples=1`` is the usual bound).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        x = self._check(x, "x")
        if not self.levels:
            return self.log_prob(x, y)
        draws = torch.stack([self.log_prob(self.dequantize(x), y) for _ in range(num_samples)])
        return torch.logsumexp(draws, 0) - math.log(num_samples) - self.features * math.log(self.levels)

    @torch.no_grad()
    def sample(self, n: int, y=None) -> torch.Tensor:
        """``n`` draws; discrete pixels come back quantized to ``k / (levels - 1)``.

        A conditional flow given no ``y`` cycles through the one-hot contexts 0, 1, ...,
        ``context - 1`` (the class labels that ``from_data(conditional=True)`` encodes).
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if y is None and self.context:
            classes = torch.arange(n, device=self.base_loc.device) % self.context
            y = nn.functional.one_hot(classes, self.context).to(self.base_loc.dtype)
        y = self._check_context(y, n)
        with _eval_mode(self):
            d = self.distribution(y)
            v = d.sample() if y is not None else d.sample((n,))
        if self.levels:
            v = (v * self.levels).floor().clamp(0, self.levels - 1) / (self.levels - 1)
        return v

    # -- input checks ----------------------------------------------------------------------------
    def _check(self, x, name, support=None):
        x = check_data(x, name, support=support or self.support, rank=2)
        if x.shape[1] != self.features:
            raise ValueError(f"{name}: this flow models {self.features} features, got shape {tuple(x.shape)}")
        return x.to(self.base_loc.device, self.base_loc.dtype)

    def _check_context(self, y, n):
        if not self.context:
            if y is not None:
                raise ValueError("y: this flow is unconditional (context=0), got a context")
            return None
        if y is None:
            raise ValueError(f"y: this flow is conditional; expected a context of shape ({n}, {self.context})")
        y = check_data(y, "y", rank=2)
        if y.shape != (n, self.context):
            raise ValueError(f"y: expected shape ({n}, {self.context}), got {tuple(y.shape)}")
        return y.to(self.base_loc.device, self.base_loc.dtype)


class _eval_mode:
    """Batch norm uses its running statistics (not the batch's) while scoring and sampling."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)
