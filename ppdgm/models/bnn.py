"""Bayesian neural networks: an MLP whose weights have Normal priors (``PyroModule`` + ``PyroSample``).

The layers multiply as ``x @ W^T`` with a batch of weight draws ``(*batch, 1, out, in)`` on the
left (the 1 is the data plate), one matrix product per draw, so the draws broadcast against the
data: the same model runs under Pyro's NUTS (one draw at a time), under ChEES (all chains as one
batch) and under ``Predictive(parallel=True)``. Priors are N(0, prior_scale^2 / fan_in) on weights
and N(0, prior_scale^2) on biases. ``hidden_features=()`` is Bayesian linear (or logistic) regression.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample

from ppdgm.data import check_data
from ppdgm.models.spec import ConstructorSpec

LIKELIHOODS = ("gaussian", "bernoulli", "categorical")
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "silu": torch.nn.functional.silu}


class BayesianLinear(PyroModule):
    """``y = W x + b`` with Normal priors; weight draws ``(*batch, out, in)`` broadcast over data."""

    # PyroSamples: PyroModule draws them and reading the attribute gives the tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, in_features: int, out_features: int, prior_scale: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = PyroSample(
            lambda m: (
                dist.Normal(m._zero, prior_scale / math.sqrt(in_features))  # type: ignore[assignment]
                .expand([out_features, in_features])
                .to_event(2)
            )
        )
        self.bias = PyroSample(lambda m: dist.Normal(m._zero, prior_scale).expand([out_features]).to_event(1))  # type: ignore[assignment]
        self.register_buffer("_zero", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dim() > 2 and w.shape[-3] != 1:  # weights that vary along the data: one product per point
            return (w @ x.unsqueeze(-1)).squeeze(-1) + self.bias
        # draws padded to the data plate (*batch, 1, out, in): one (n, in) @ (in, out) product per draw,
        # about 100x faster than a matrix-vector product per draw and point
        w = w.squeeze(-3) if w.dim() > 2 else w
        return x @ w.transpose(-1, -2) + self.bias


class BNN(ConstructorSpec, PyroModule):
    """An MLP with priors on its weights, for regression or classification.

    Args:
        features, out_features: input features; outputs (1 for regression/binary, classes for categorical).
        hidden_features: hidden layer widths; ``()`` gives a Bayesian linear model.
        likelihood: ``"gaussian"`` (real ``y``), ``"bernoulli"`` ({0, 1} ``y``) or ``"categorical"``.
        noise_scale: the Gaussian noise sd; None puts a HalfNormal(1) prior on it (site ``sigma``).
        prior_scale: prior sd scale of weights and biases.
    """

    datasets = ("digits",)

    default_engine = "chees"
    # every leapfrog step runs the net on all the data for every chain, so the budget is chains x
    # iterations: 32 chains x (200 warm-up + 200 draws) give digits (1,210 weights) function-space
    # R-hat < 1.01 in about a minute and a half on one CPU core; prior draws start the chains where
    # the weights' N(0, 1/fan_in) scale is, rather than uniform(-2, 2) weights the warm-up must first
    # shrink; the traced potential gives the same draws 14% faster on digits (87 s against 101 s)
    engine_config: ClassVar[dict] = {
        "num_chains": 32,
        "num_warmup": 200,
        "num_samples": 200,
        "init": "prior",
        "jit_compile": True,
    }
    support = "real"
    likelihood_method = "posterior-predictive"

    def __init__(
        self,
        features: int = 1,
        hidden_features=(16,),
        out_features: int = 1,
        likelihood: str = "gaussian",
        noise_scale: float | None = None,
        prior_scale: float = 1.0,
        activation: str = "tanh",
    ):
        super().__init__()
        hidden_features = tuple(hidden_features)
        for arg, val in (
            ("features", features),
            ("out_features", out_features),
            *((f"hidden_features[{i}]", h) for i, h in enumerate(hidden_features)),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "bernoulli" and out_features != 1:
            raise ValueError(f"a bernoulli BNN has out_features=1, got out_features={out_features}")
        if likelihood == "categorical" and out_features < 2:
            raise ValueError(f"a categorical BNN needs out_features >= 2 classes, got {out_features}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if noise_scale is not None and not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive or None, got {noise_scale!r}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale!r}")
        self.features, self.hidden_features, self.out_features, self.likelihood = (
            features,
            hidden_features,
            out_features,
            likelihood,
        )
        self.noise_scale, self.prior_scale, self.activation = noise_scale, prior_scale, activation
        sizes = (features, *hidden_features, out_features)
        layers = [BayesianLinear(a, b, prior_scale) for a, b in itertools.pairwise(sizes)]
        # PyroModule[ModuleList] takes ModuleList's arguments, which pyro's stubs do not know
        self.layers = PyroModule[torch.nn.ModuleList](layers)  # type: ignore[arg-type]
        self.guide = AutoNormal(self.model, init_scale=0.01)
        self.posterior: dict | None = None

    @classmethod
    def from_data(cls, data, **kwargs):
        y = data.y
        if y is not None and not y.is_floating_point():
            classes = int(y.max()) + 1
            kwargs.setdefault("likelihood", "bernoulli" if classes <= 2 else "categorical")
            kwargs.setdefault("out_features", 1 if classes <= 2 else classes)
        return cls(features=data.x.shape[1], **kwargs)

    def data_args(self, dataset) -> tuple:
        if dataset.y is None:
            raise ValueError(f"a BNN needs targets: dataset {dataset.name!r} has y=None")
        return (dataset.x, dataset.y)

    # -- the Pyro program ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Network output ``(*weight_batch, n, out_features)`` at the current weight draws."""
        act = ACTIVATIONS[self.activation]
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = act(h)
        return h

    def _check(self, x, y):
        x = check_data(x, "x", rank=2)
        if x.shape[1] != self.features:
            raise ValueError(f"x: expected {self.features} features, got shape {tuple(x.shape)}")
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
            if y.shape[0] != x.shape[0] or ((self.likelihood != "gaussian" or self.out_features == 1) and y.dim() != 1):
                raise ValueError(f"y: expected shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(y.shape)}")
            if self.likelihood == "bernoulli" and not ((y == 0) | (y == 1)).all():
                raise ValueError("y: a bernoulli BNN expects targets in {0, 1}")
            if self.likelihood == "categorical" and (
                y.is_floating_point() or y.min() < 0 or y.max() >= self.out_features
            ):
                raise ValueError(
                    f"y: a categorical BNN expects integer classes in [0, {self.out_features}), got "
                    f"dtype {y.dtype}, range [{y.min().item()}, {y.max().item()}]"
                )
        return x, y

    def model(self, x, y=None):
        x, y = self._check(x, y)
        f = self(x)
        if self.likelihood == "gaussian":
            sigma = (
                pyro.sample("sigma", dist.HalfNormal(torch.ones((), device=x.device)))
                if self.noise_scale is None
                else torch.tensor(self.noise_scale, device=x.device)
            )
            y = y.to(f.dtype) if y is not None else None
            with pyro.plate("data", x.shape[0]):
                if self.out_features == 1:
                    return pyro.sample("y", dist.Normal(f.squeeze(-1), sigma), obs=y)
                return pyro.sample(
                    "y", dist.Normal(f, sigma.unsqueeze(-1) if sigma.dim() else sigma).to_event(1), obs=y
                )
        with pyro.plate("data", x.shape[0]):
            if self.likelihood == "bernoulli":
                return pyro.sample(
                    "y", dist.Bernoulli(logits=f.squeeze(-1)), obs=y.to(f.dtype) if y is not None else None
                )
            return pyro.sample("y", dist.Categorical(logits=f), obs=y)

    # -- using posterior draws ----------------------------------------------------------------
    def attach_posterior(self, samples: dict) -> None:
        """Keep posterior draws ``{site: (chain, draw, ...)}`` for ``predict``/``log_likelihood``
        (they travel in ``state_dict``, so a saved and reloaded fit still predicts)."""
        self.posterior = {k: v.detach() for k, v in samples.items()}

    def get_extra_state(self) -> dict:
        return {"posterior": self.posterior or {}}

    def set_extra_state(self, state: dict) -> None:
        self.posterior = dict(state.get("posterior") or {}) or None

    def _draws(self, samples):
        samples = samples if samples is not None else self.posterior
        if not samples:
            raise ValueError(
                "no posterior draws: pass samples= (a Fit's samples) or call attach_posterior(fit.samples)"
            )
        return {k: v.reshape(-1, *v.shape[2:]) for k, v in samples.items()}

    def _conditional(self, x, samples):
        """``p(y | x, w_s)`` for every draw s, as a batched distribution ``(S, n)``."""
        flat = self._draws(samples)
        S = next(iter(flat.values())).shape[0]
        from ppdgm.logdensity import BatchedLogDensity

        # y observed (its value is irrelevant here): left out, a discrete y would count as a latent
        density = BatchedLogDensity(self.model, (x, self._placeholder_targets(x)))
        tr = density.trace({k: v.to(x.device) for k, v in flat.items() if k in {s.name for s in density.sites}})
        fn = tr.nodes["y"]["fn"]
        return fn, S

    def _placeholder_targets(self, x) -> torch.Tensor:
        if self.likelihood == "categorical":
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if self.likelihood == "gaussian" and self.out_features > 1:
            return x.new_zeros(x.shape[0], self.out_features)
        return x.new_zeros(x.shape[0])

    @torch.no_grad()
    def function_draws(self, x, samples: dict | None = None) -> torch.Tensor:
        """The mean of y (regression output or class probabilities) under every posterior draw:
        ``(chain, draw, n[, classes])``, e.g. for R-hat of predictions or credible bands."""
        x, _ = self._check(x, None)
        fn, S = self._conditional(x, samples)
        mean = fn.probs if self.likelihood != "gaussian" else fn.mean
        draws = samples if samples is not None else self.posterior
        if draws is None:
            raise ValueError(
                "no posterior draws: pass samples= (a Fit's samples) or call attach_posterior(fit.samples)"
            )
        lead = next(iter(draws.values())).shape[:2]
        return mean.expand(S, *mean.shape[1:]).reshape(*lead, *mean.shape[1:])

    @torch.no_grad()
    def predict(self, x, samples: dict | None = None) -> torch.Tensor:
        """Posterior-predictive mean: regression output, or class probabilities, per point."""
        return self.function_draws(x, samples).flatten(0, 1).mean(0)

    @torch.no_grad()
    def log_likelihood(self, x, y=None, samples: dict | None = None) -> torch.Tensor:
        """Per-point log posterior-predictive density log (1/S) sum_s p(y_i | x_i, w_s) in nats."""
        if y is None:
            raise ValueError("a BNN's log-likelihood is of targets y given inputs x: pass y=")
        x, y = self._check(x, y)
        fn, S = self._conditional(x, samples)
        lp = fn.log_prob(y.to(fn.mean.dtype) if self.likelihood != "categorical" else y)
        lp = lp.expand(S, *lp.shape[1:])
        return torch.logsumexp(lp, 0) - math.log(S)

    @torch.no_grad()
    def sample(self, n: int, x=None, samples: dict | None = None) -> torch.Tensor:
        """``n`` posterior-predictive draws of y at inputs ``x`` (shape ``(n, len(x))``)."""
        if x is None:
            raise ValueError("a BNN samples targets given inputs: pass x=")
        x, _ = self._check(x, None)
        fn, S = self._conditional(x, samples)
        idx = torch.randint(S, (n,), device=x.device)
        draws = fn.sample()
        return draws.expand(S, *draws.shape[1:])[idx]
