"""Variational autoencoders (Kingma & Welling 2014) and their conditional form, as Pyro programs.

``model(x)`` draws a local latent ``z ~ p(z)`` per data point inside the plate ``"data"`` and
observes ``x ~ p(x | z)`` through a decoder network; ``guide(x)`` is the amortized posterior
``q(z | x)`` of an encoder network. Train them with :class:`ppdgm.inference.SVI`:
``loss="elbo"`` (Monte Carlo), ``"meanfield"`` (analytic KL where it exists) or ``"iwae"``
(importance-weighted bound, ``num_particles=k``). ``beta`` weighs the KL term (beta-VAE);
:meth:`VAE.kl_annealing` gives an SVI callback that ramps it from 0 to ``beta``.

Options: MLP or small conv encoder/decoder (``network``), Bernoulli / continuous Bernoulli /
Gaussian-with-learned-scale likelihoods, an inverse-autoregressive-flow posterior
(``posterior="iaf"``, conditioned on the encoder's features) and a masked-autoregressive-flow
prior (``prior="flow"``), both built from ``pyro.distributions.transforms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.distributions import ConditionalTransformModule
from pyro.nn import PyroModule
from torch import nn
from torch.nn.functional import one_hot, softplus

from ppdgm.data import check_data
from ppdgm.evaluate import iwae_log_likelihood
from ppdgm.models.spec import ConstructorSpec
from ppdgm.nn import MLP, ConvDecoder, ConvEncoder, concat, image_side, make_activation

LIKELIHOODS = {"bernoulli": "binary", "continuous_bernoulli": "unit_interval", "gaussian": "real"}
NETWORKS = ("mlp", "conv")
POSTERIORS = ("normal", "iaf")
PRIORS = ("normal", "flow")


def _positive_int(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


class VAE(ConstructorSpec, PyroModule):
    """A VAE with a local latent ``z`` (``latent_features``) per data point.

    Args:
        features: data dimension (flat; images are flattened row-major).
        latent_features: size of ``z`` (>= 1).
        hidden_features: hidden layer sizes of the encoder (the decoder mirrors them).
        likelihood: ``"bernoulli"`` (binary data), ``"continuous_bernoulli"`` (data in [0, 1]) or
            ``"gaussian"`` (real data, a learned per-dimension scale).
        network: ``"mlp"`` or ``"conv"`` (needs ``image_shape`` or a square ``features``).
        posterior: ``"normal"`` (diagonal) or ``"iaf"`` (``num_flows`` conditional affine
            autoregressive layers on top of it).
        prior: ``"normal"`` (standard) or ``"flow"`` (``num_flows`` masked autoregressive layers).
        beta: weight of the KL term (1 is the ELBO).
    """

    datasets: ClassVar[tuple[str, ...]] = ("digits-binary", "digits")

    default_engine = "svi"
    engine_config: ClassVar[dict] = {}
    support = "binary"
    likelihood_method = "iwae"

    def __init__(
        self,
        features: int = 64,
        latent_features: int = 16,
        hidden_features=(256,),
        likelihood: str = "bernoulli",
        network: str = "mlp",
        image_shape=None,
        activation: str = "softplus",
        posterior: str = "normal",
        prior: str = "normal",
        num_flows: int = 2,
        beta: float = 1.0,
    ):
        super().__init__()
        self._init(
            features,
            latent_features,
            hidden_features,
            likelihood,
            network,
            image_shape,
            activation,
            posterior,
            prior,
            num_flows,
            beta,
            cond_dim=0,
        )

    # -- construction ---------------------------------------------------------------------------
    def _init(
        self,
        features,
        latent_features,
        hidden_features,
        likelihood,
        network,
        image_shape,
        act,
        posterior,
        prior,
        num_flows,
        beta,
        cond_dim,
    ):
        _positive_int("features", features)
        _positive_int("latent_features", latent_features)
        _positive_int("num_flows", num_flows)
        hidden_features = list(hidden_features) if isinstance(hidden_features, (list, tuple)) else hidden_features
        if (
            not isinstance(hidden_features, list)
            or not hidden_features
            or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden_features)
        ):
            raise ValueError(f"hidden_features must be a non-empty list of positive ints, got {hidden_features!r}")
        _choice("likelihood", likelihood, LIKELIHOODS)
        _choice("network", network, NETWORKS)
        _choice("posterior", posterior, POSTERIORS)
        _choice("prior", prior, PRIORS)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta >= 0:
            raise ValueError(f"beta must be a non-negative number, got {beta!r}")
        make_activation(act)
        if network == "conv":
            image_shape = tuple(image_shape) if image_shape is not None else image_side(features)
            if image_shape is None or image_shape[0] * image_shape[1] != features:
                raise ValueError(
                    f"network='conv' needs image_shape (h, w) with h*w == features={features}, got {image_shape!r}"
                )
        self.features, self.latent_features, self.hidden_features, self.likelihood = (
            features,
            latent_features,
            hidden_features,
            likelihood,
        )
        self.network, self.image_shape, self.activation = network, image_shape, act
        self.posterior, self.prior, self.num_flows, self.beta = posterior, prior, num_flows, float(beta)
        self.cond_dim = cond_dim
        self.support = LIKELIHOODS[likelihood]
        self.kl_weight = float(beta)

        feat = hidden_features[-1]
        if network == "mlp":
            body: nn.Module = MLP(features + cond_dim, hidden_features[:-1], feat, act)
            self.decoder: nn.Module = MLP(latent_features + cond_dim, hidden_features[::-1], features, act)
        else:
            body = ConvEncoder(image_shape, feat, activation=act)
            self.decoder = nn.Sequential(
                MLP(latent_features + cond_dim, hidden_features[::-1][:1], feat, act),
                make_activation(act),
                ConvDecoder(feat, image_shape, activation=act),
            )
        self.encoder = nn.Sequential(body, make_activation(act))
        self.cond_encoder = nn.Linear(cond_dim, feat) if (network == "conv" and cond_dim) else None
        self.encoder_head = nn.Linear(feat, 2 * latent_features)
        self.x_log_scale = nn.Parameter(torch.zeros(features)) if likelihood == "gaussian" else None
        # an nn.ModuleList, typed by what it holds (torch's ModuleList is not generic)
        self.posterior_flows: Sequence[ConditionalTransformModule] | None = (
            nn.ModuleList(  # type: ignore[assignment]
                T.conditional_affine_autoregressive(latent_features, feat, hidden_dims=[2 * max(latent_features, 8)])
                for _ in range(num_flows)
            )
            if posterior == "iaf"
            else None
        )
        self.prior_flows = (
            nn.ModuleList(
                T.affine_autoregressive(latent_features, hidden_dims=[2 * max(latent_features, 8)])
                for _ in range(num_flows)
            )
            if prior == "flow"
            else None
        )

    @classmethod
    def from_data(cls, data, **kwargs):
        if data.image_shape is not None and kwargs.get("network") == "conv":
            kwargs.setdefault("image_shape", tuple(data.image_shape))
        return cls(features=data.x.shape[1], **kwargs)

    def data_args(self, dataset) -> tuple:
        return (check_data(dataset.x, "x", support=self.support, rank=2),)

    # -- distributions --------------------------------------------------------------------------
    def _features(self, x, c=None):
        if c is None:
            return self.encoder(x)
        if self.network == "mlp":
            return self.encoder(concat(x, c))
        assert self.cond_encoder is not None  # a conditional conv encoder has one
        return self.encoder(x) + self.cond_encoder(c)

    def prior_dist(self, like: torch.Tensor):
        """p(z): a standard normal, or a masked autoregressive flow on top of it."""
        base = dist.Normal(like.new_zeros(self.latent_features), like.new_ones(self.latent_features)).to_event(1)
        if self.prior_flows is None:
            return base
        # MAF direction: density evaluation is one network pass per layer
        return dist.TransformedDistribution(base, [f.inv for f in self.prior_flows])

    def posterior_dist(self, x, c=None):
        """q(z | x): a diagonal normal from the encoder, optionally pushed through IAF layers."""
        h = self._features(x, c)
        loc, raw = self.encoder_head(h).chunk(2, dim=-1)
        base = dist.Normal(loc, softplus(raw) + 1e-4).to_event(1)
        if self.posterior_flows is None:
            return base
        return dist.TransformedDistribution(base, [f.condition(h) for f in self.posterior_flows])

    def likelihood_dist(self, z, c=None):
        """p(x | z) with one batch dim per leading dim of ``z`` and the data as the event."""
        out = self.decoder(z if c is None else concat(z, c))
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=out).to_event(1)
        assert self.x_log_scale is not None  # a gaussian likelihood has a scale
        return dist.Normal(out, self.x_log_scale.exp()).to_event(1)

    # -- Pyro programs ---------------------------------------------------------------------------
    def model(self, x=None, n: int | None = None):
        return self._model(x, None, n)

    def guide(self, x=None, n: int | None = None):
        return self._guide(x, None)

    def _model(self, x, c, n):
        pyro.module("vae", self)
        if x is not None:
            x = check_data(x, "x", support=self.support, rank=2)
            if x.shape[-1] != self.features:
                raise ValueError(f"x: expected {self.features} columns, got shape {tuple(x.shape)}")
        n = x.shape[0] if x is not None else (c.shape[0] if c is not None else n)
        if n is None:
            raise ValueError("model needs data x or a number of points n")
        like = self.encoder_head.weight
        with pyro.plate("data", n):
            with poutine.scale(scale=self.kl_weight):
                z = pyro.sample("z", self.prior_dist(like))
            return pyro.sample("x", self.likelihood_dist(z, c), obs=x)

    def _guide(self, x, c):
        pyro.module("vae", self)
        if x is None:  # generating: the model's prior is the proposal
            return None
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.kl_weight):
            return pyro.sample("z", self.posterior_dist(x, c))

    def kl_annealing(self, num_steps: int):
        """An SVI callback that ramps the KL weight linearly from 0 to ``beta`` over ``num_steps``."""
        _positive_int("num_steps", num_steps)
        self.kl_weight = 0.0

        def anneal(step, info):
            self.kl_weight = self.beta * min(1.0, step / num_steps)

        return anneal

    # -- use ----------------------------------------------------------------------------------
    def _device(self):
        return self.encoder_head.weight.device

    def _mean(self, z, c=None):
        d = self.likelihood_dist(z, c).base_dist
        return d.mean if self.likelihood != "gaussian" else d.loc

    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> torch.Tensor:
        """``n`` draws ``x ~ p(x | z), z ~ p(z)`` (``mean=True``: the decoder's means instead)."""
        _positive_int("n", n)
        z = self.prior_dist(self.encoder_head.weight).sample((n,))
        return self._mean(z) if mean else self.likelihood_dist(z).sample()

    @torch.no_grad()
    def encode(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's base location and scale of each row of ``x`` (``(n, latent_features)`` each)."""
        x = self._check_x(x)
        base = self.posterior_dist(x)
        base = base.base_dist if self.posterior_flows is not None else base
        return base.base_dist.loc, base.base_dist.scale

    @torch.no_grad()
    def decode(self, z) -> torch.Tensor:
        """The decoder's mean of ``x`` for each latent row ``z``."""
        z = torch.as_tensor(z, dtype=torch.float32, device=self._device())
        if z.shape[-1] != self.latent_features:
            raise ValueError(f"z: expected last dim {self.latent_features}, got shape {tuple(z.shape)}")
        return self._mean(z)

    @torch.no_grad()
    def reconstruct(self, x) -> torch.Tensor:
        """Decoder mean at the posterior location: ``E[x | z = loc(x)]``."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def interpolate(self, x1, x2, steps: int = 8) -> torch.Tensor:
        """Decoded means along the straight line between the posterior locations of ``x1`` and ``x2``
        (``(steps, features)``, first and last rows the reconstructions of the endpoints)."""
        _positive_int("steps", steps, 2)
        z = self.encode(torch.stack([self._row(x1, "x1"), self._row(x2, "x2")]))[0]
        t = torch.linspace(0, 1, steps, device=z.device).unsqueeze(-1)
        return self.decode((1 - t) * z[0] + t * z[1])

    def log_likelihood(self, x, k: int = 1000, batch_size: int = 100) -> torch.Tensor:
        """Per-point log p(x) in nats: the importance-weighted bound with ``k`` guide samples."""
        x = self._check_x(x)
        return iwae_log_likelihood(self.model, self.guide, x, k=k, batch_size=batch_size)

    def _check_x(self, x):
        x = check_data(x, "x", support=self.support, rank=2).to(self._device())
        if x.shape[1] != self.features:
            raise ValueError(f"x: expected {self.features} columns, got shape {tuple(x.shape)}")
        return x

    def _row(self, x, name):
        x = torch.as_tensor(x).reshape(1, -1)
        return self._check_x(check_data(x, name))[0]


class ConditionalVAE(VAE):
    """p(x | y, z) p(z) with q(z | x, y): a VAE whose encoder and decoder also see a one-hot label ``y``.

    ``model(x, y)`` and ``guide(x, y)`` take integer labels in ``[0, classes)``;
    ``sample(n, y)`` draws digits of chosen classes; ``log_likelihood(x, y)`` is log p(x | y).
    """

    datasets = ("digits-binary",)

    def __init__(
        self,
        features: int = 64,
        classes: int = 10,
        latent_features: int = 16,
        hidden_features=(256,),
        likelihood: str = "bernoulli",
        network: str = "mlp",
        image_shape=None,
        activation: str = "softplus",
        posterior: str = "normal",
        prior: str = "normal",
        num_flows: int = 2,
        beta: float = 1.0,
    ):
        PyroModule.__init__(self)
        self.classes = _positive_int("classes", classes, 2)
        self._init(
            features,
            latent_features,
            hidden_features,
            likelihood,
            network,
            image_shape,
            activation,
            posterior,
            prior,
            num_flows,
            beta,
            cond_dim=classes,
        )

    @classmethod
    def from_data(cls, data, **kwargs):
        if data.y is None:
            raise ValueError(f"{data.name}: a conditional VAE needs labels y, the dataset has none")
        kwargs.setdefault("classes", int(data.y.max()) + 1)
        return super().from_data(data, **kwargs)

    def data_args(self, dataset) -> tuple:
        return (*super().data_args(dataset), self._check_y(dataset.y, dataset.x.shape[0]))

    def _check_y(self, y, n):
        if y is None:
            raise ValueError("y: a conditional VAE needs integer labels, got None")
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y: expected {n} integer labels, got dtype {y.dtype} and shape {tuple(y.shape)}")
        if y.min() < 0 or y.max() >= self.classes:
            raise ValueError(f"y: expected labels in [0, {self.classes}), got range [{y.min()}, {y.max()}]")
        return y.long()

    def _onehot(self, y):
        return one_hot(y.long(), self.classes).to(self.encoder_head.weight)

    def model(self, x=None, y=None):
        if y is None:
            raise ValueError("y: the conditional VAE's model needs labels")
        if x is not None:
            self._check_y(y, x.shape[0])
        return self._model(x, self._onehot(y), None)

    def guide(self, x=None, y=None):
        return self._guide(x, None if x is None else self._onehot(self._check_y(y, x.shape[0])))

    # the label y comes second, where a caller of a conditional model gives it (so a CVAE's
    # sample and log_likelihood are not a VAE's: mypy's override check says so, rightly)
    @torch.no_grad()
    def sample(self, n: int, y=None, mean: bool = False) -> torch.Tensor:  # type: ignore[override]
        """``n`` draws of p(x | y); ``y`` an int, ``n`` labels, or None for classes in turn."""
        _positive_int("n", n)
        dev = self._device()
        if y is None:
            y = torch.arange(n, device=dev) % self.classes
        y = torch.as_tensor(y, device=dev)
        c = self._onehot(self._check_y(y.expand(n) if y.dim() == 0 else y, n))
        z = self.prior_dist(self.encoder_head.weight).sample((n,))
        return self._mean(z, c) if mean else self.likelihood_dist(z, c).sample()

    @torch.no_grad()
    def encode(self, x, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_x(x)
        base = self.posterior_dist(x, self._onehot(self._check_y(y, x.shape[0]).to(x.device)))
        base = base.base_dist if self.posterior_flows is not None else base
        return base.base_dist.loc, base.base_dist.scale

    @torch.no_grad()
    def decode(self, z, y=None) -> torch.Tensor:
        z = torch.as_tensor(z, dtype=torch.float32, device=self._device())
        y = self._check_y(torch.as_tensor(y, device=z.device).expand(z.shape[:-1]).reshape(-1), z[..., 0].numel())
        return self._mean(z, self._onehot(y).reshape(*z.shape[:-1], -1))

    @torch.no_grad()
    def reconstruct(self, x, y=None) -> torch.Tensor:
        return self.decode(self.encode(x, y)[0], y)

    @torch.no_grad()
    def interpolate(self, x1, x2, steps: int = 8, y1=0, y2=None) -> torch.Tensor:
        """Interpolate the latents of ``(x1, y1)`` and ``(x2, y2)``, decoded with label ``y1``."""
        _positive_int("steps", steps, 2)
        y2 = y1 if y2 is None else y2
        xs = torch.stack([self._row(x1, "x1"), self._row(x2, "x2")])
        z = self.encode(xs, torch.tensor([int(y1), int(y2)], device=xs.device))[0]
        t = torch.linspace(0, 1, steps, device=z.device).unsqueeze(-1)
        return self.decode((1 - t) * z[0] + t * z[1], int(y1))

    def log_likelihood(self, x, y=None, k: int = 1000, batch_size: int = 100) -> torch.Tensor:  # type: ignore[override]
        """Per-point log p(x | y) in nats (importance-weighted bound with ``k`` samples)."""
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0]).to(x.device)
        return iwae_log_likelihood(self.model, self.guide, x, y, k=k, batch_size=batch_size)
