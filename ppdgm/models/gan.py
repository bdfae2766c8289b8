"""Generative adversarial network: an implicit model ``z ~ N(0, I); x = G(z)`` as a Pyro program.

The generator is the Pyro program :meth:`GAN.model` (``pyro.deterministic("x", G(z))`` in the
data plate, optionally conditioned on a class label ``y``); the discriminator (critic) is a plain
module that :class:`ppdgm.inference.adversarial.Adversarial` trains against it. A GAN has no
density of its own: :meth:`GAN.log_likelihood` is the Parzen-window estimate of Goodfellow et al.
(2014), a Gaussian kernel density on generator draws. It is biased and loose in high dimensions;
compare GANs with the sample-quality metrics of :mod:`ppdgm.evaluate` as well.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ppdgm.data import check_data
from ppdgm.models.spec import ConstructorSpec
from ppdgm.nn import MLP, concat

OUTPUTS = ("identity", "sigmoid")


class Critic(torch.nn.Module):
    """``(x, y) -> logit``: an MLP on ``x`` (and the one-hot label, when conditional).

    With ``spectral_norm`` every linear map is divided by its largest singular value (one power
    iteration per training forward; Miyato et al. 2018), so with 1-Lipschitz activations the critic
    is 1-Lipschitz: it cannot sharpen without bound against the generator."""

    def __init__(
        self,
        features: int,
        hidden_features,
        classes: int = 0,
        activation: str = "leaky_relu",
        spectral_norm: bool = False,
    ):
        super().__init__()
        self.features, self.classes = features, classes
        self.net = MLP(features + classes, list(hidden_features), 1, activation)
        if spectral_norm:
            for i, layer in enumerate(self.net):
                if isinstance(layer, torch.nn.Linear):
                    self.net[i] = torch.nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.classes:
            x = concat(x, _one_hot(y, self.classes, x))
        return self.net(x).squeeze(-1)


def _one_hot(y, classes, like):
    if y is None:
        raise ValueError(f"this model is conditional on a label y in [0, {classes}); got y=None")
    return torch.nn.functional.one_hot(y.long(), classes).to(like.dtype)


class GAN(ConstructorSpec, PyroModule):
    """A GAN with MLP generator and critic.

    Args:
        features, latent_features: data and noise dimensions.
        hidden_features, critic_hidden_features: hidden widths of the generator and the critic.
        output: ``"identity"`` for real data, ``"sigmoid"`` for data in [0, 1] (digit intensities).
        classes: > 0 makes both networks conditional on a label ``y``.
        spectral_norm: spectral normalization of the critic's linear maps (see :class:`Critic`).
    """

    datasets = ("moons", "digits")

    default_engine = "adversarial"
    # Measured on dequantized 8x8 digits (benchmarks/bench_samplers.py, seeds 0-2), from WGAN-GP's
    # defaults (1000 steps of 5 critic steps, lr 5e-4: precision 0.46, recall 0.71, Fréchet 2.7x the
    # held-out floor, means): the moving average of the generator with lr 1e-3 gave 0.67, 0.64,
    # 1.6x; the two time-scale rule (2 critic steps at twice the generator's lr) over 3000 steps,
    # about the default's cost, gave precision 0.73, recall 0.70, Fréchet 1.4x; at lr 7e-4 (critic
    # 1.4e-3) precision 0.758/0.758/0.768, recall 0.707/0.768/0.751, Fréchet 1.0-1.2x. Linear lr
    # decay, spectral norm, wider networks, and the hinge or R1 losses scored lower (seed 0).
    engine_config: ClassVar[dict] = {"ema": 0.999, "n_critic": 2, "lr": 7e-4, "critic_lr": 1.4e-3, "num_steps": 3000}
    support = "real"
    likelihood_method = "Parzen window on generator draws (Goodfellow et al. 2014)"

    def __init__(
        self,
        features: int = 2,
        latent_features: int = 2,
        hidden_features=(128, 128),
        critic_hidden_features=(128, 128),
        activation: str = "relu",
        output: str = "identity",
        classes: int = 0,
        spectral_norm: bool = False,
    ):
        super().__init__()
        for arg, val in (("features", features), ("latent_features", latent_features)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
            raise ValueError(f"classes must be a non-negative int, got {classes!r}")
        self.features, self.latent_features, self.output, self.classes = features, latent_features, output, classes
        self.hidden_features, self.critic_hidden_features, self.activation = (
            list(hidden_features),
            list(critic_hidden_features),
            activation,
        )
        self.generator = MLP(latent_features + classes, self.hidden_features, features, activation)
        if not isinstance(spectral_norm, bool):
            raise TypeError(f"spectral_norm must be a bool, got {spectral_norm!r}")
        self.spectral_norm = spectral_norm
        self.critic = Critic(features, self.critic_hidden_features, classes, spectral_norm=spectral_norm)

    @classmethod
    def from_data(cls, data, conditional: bool = False, **kwargs):
        x = data.x
        if float(x.min()) >= 0 and float(x.max()) <= 1 and x.shape[1] > 2:
            kwargs.setdefault("output", "sigmoid")
        if conditional:
            if data.y is None:
                raise ValueError("conditional=True needs labels, but the dataset has y=None")
            kwargs.setdefault("classes", int(data.y.max()) + 1)
        kwargs.setdefault("latent_features", min(32, max(2, x.shape[1] // 4)))
        return cls(features=x.shape[1], **kwargs)

    def data_args(self, dataset) -> tuple:
        return (dataset.x, dataset.y) if self.classes else (dataset.x,)

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = concat(z, _one_hot(y, self.classes, z)) if self.classes else z
        out = self.generator(h)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def model(self, n: int, y: torch.Tensor | None = None):
        """The generator as a Pyro program: ``n`` draws (one per label when ``y`` is given)."""
        pyro.module("generator", self.generator)
        p = next(self.generator.parameters())
        if y is not None:
            n = y.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(p.new_zeros(self.latent_features), 1.0).to_event(1))
            return pyro.deterministic("x", self.generate(z, y), event_dim=1)

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` draws; a conditional GAN draws labels uniformly unless ``y`` is given."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if self.classes and y is None:
            y = torch.randint(self.classes, (n,), device=next(self.generator.parameters()).device)
        with pyro.poutine.block():
            return self.model(n, y)

    @torch.no_grad()
    def log_likelihood(
        self, x, y=None, num_samples: int = 10000, bandwidth: float | None = None, batch_size: int = 500
    ) -> torch.Tensor:
        """Per-point Parzen-window log density in nats: ``log mean_j N(x; G(z_j), bandwidth^2 I)`` over
        ``num_samples`` generator draws (of the point's label ``y`` for a conditional GAN).
        ``bandwidth`` None takes Silverman's rule of thumb on the draws."""
        x = check_data(x, "x", rank=2)
        if x.shape[1] != self.features:
            raise ValueError(f"x: expected {self.features} columns, got shape {tuple(x.shape)}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive or None, got {bandwidth!r}")
        if self.classes:
            if y is None or torch.as_tensor(y).shape != (x.shape[0],):
                raise ValueError(f"y: a conditional GAN scores x given its {x.shape[0]} labels, got {y!r}")
            y = torch.as_tensor(y).long()
            out = x.new_empty(x.shape[0])
            for label in y.unique().tolist():
                rows = y == label
                draws = self.sample(num_samples, torch.full((num_samples,), label, device=x.device))
                out[rows] = _parzen(x[rows], draws.to(x), bandwidth, batch_size)
            return out
        return _parzen(x, self.sample(num_samples).to(x), bandwidth, batch_size)


def _parzen(x, draws, bandwidth, batch_size):
    n, d = draws.shape
    if bandwidth is None:  # Silverman: (4 / (d + 2))^(1 / (d + 4)) n^(-1 / (d + 4)) times the draws' mean sd
        bandwidth = float(draws.std(0).mean()) * (4 / (d + 2)) ** (1 / (d + 4)) * n ** (-1 / (d + 4))
        bandwidth = max(bandwidth, 1e-3)
    norm = math.log(n) + 0.5 * d * math.log(2 * math.pi * bandwidth**2)
    out = [
        torch.logsumexp(-torch.cdist(chunk, draws).square() / (2 * bandwidth**2), -1) - norm
        for chunk in x.split(batch_size)
    ]
    return torch.cat(out)
