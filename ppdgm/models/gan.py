"""Generative adversarial network: an implicit model ``z ~ N(0, I); x = G(z)`` as a Pyro program.

The generator is the Pyro program :meth:`GAN.model` (``pyro.deterministic("x", G(z))`` in the
data plate, optionally conditioned on a class label ``y``); the discriminator (critic) is a plain
module that :class:`ppdgm.inference.adversarial.Adversarial` trains against it. A GAN has no
density, so it has no ``log_likelihood``: compare it to likelihood models with the sample-quality
metrics of :mod:`ppdgm.evaluate`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ppdgm.nn import MLP, concat

OUTPUTS = ("identity", "sigmoid")


class Critic(torch.nn.Module):
    """``(x, y) -> logit``: an MLP on ``x`` (and the one-hot label, when conditional)."""

    def __init__(self, x_dim: int, hidden, num_classes: int = 0, activation: str = "leaky_relu"):
        super().__init__()
        self.x_dim, self.num_classes = x_dim, num_classes
        self.net = MLP(x_dim + num_classes, list(hidden), 1, activation)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            x = concat(x, _one_hot(y, self.num_classes, x))
        return self.net(x).squeeze(-1)


def _one_hot(y, num_classes, like):
    if y is None:
        raise ValueError(f"this model is conditional on a label y in [0, {num_classes}); got y=None")
    return torch.nn.functional.one_hot(y.long(), num_classes).to(like.dtype)


class GAN(PyroModule):
    """A GAN with MLP generator and critic.

    Args:
        x_dim, latent_dim: data and noise dimensions.
        hidden, critic_hidden: hidden widths of the generator and the critic.
        output: ``"identity"`` for real data, ``"sigmoid"`` for data in [0, 1] (digit intensities).
        num_classes: > 0 makes both networks conditional on a label ``y``.
    """
    datasets = ('moons', 'digits')

    default_engine = "adversarial"
    support = "real"

    def __init__(self, x_dim: int = 2, latent_dim: int = 2, hidden=(128, 128), critic_hidden=(128, 128),
                 activation: str = "relu", output: str = "identity", num_classes: int = 0):
        super().__init__()
        for arg, val in (("x_dim", x_dim), ("latent_dim", latent_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        self.x_dim, self.latent_dim, self.output, self.num_classes = x_dim, latent_dim, output, num_classes
        self.hidden, self.critic_hidden, self.activation = list(hidden), list(critic_hidden), activation
        self.generator = MLP(latent_dim + num_classes, self.hidden, x_dim, activation)
        self.critic = Critic(x_dim, self.critic_hidden, num_classes)

    @classmethod
    def from_data(cls, data, conditional: bool = False, **kwargs):
        x = data.x
        if float(x.min()) >= 0 and float(x.max()) <= 1 and x.shape[1] > 2:
            kwargs.setdefault("output", "sigmoid")
        if conditional:
            if data.y is None:
                raise ValueError("conditional=True needs labels, but the dataset has y=None")
            kwargs.setdefault("num_classes", int(data.y.max()) + 1)
        kwargs.setdefault("latent_dim", min(32, max(2, x.shape[1] // 4)))
        return cls(x_dim=x.shape[1], **kwargs)

    @property
    def spec(self) -> dict:
        return {"name": "gan", "kwargs": {
            "x_dim": self.x_dim, "latent_dim": self.latent_dim, "hidden": self.hidden,
            "critic_hidden": self.critic_hidden, "activation": self.activation, "output": self.output,
            "num_classes": self.num_classes}}

    def data_args(self, dataset) -> tuple:
        return (dataset.x, dataset.y) if self.num_classes else (dataset.x,)

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = concat(z, _one_hot(y, self.num_classes, z)) if self.num_classes else z
        out = self.generator(h)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def model(self, n: int, y: torch.Tensor | None = None):
        """The generator as a Pyro program: ``n`` draws (one per label when ``y`` is given)."""
        pyro.module("generator", self.generator)
        p = next(self.generator.parameters())
        if y is not None:
            n = y.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(p.new_zeros(self.latent_dim), 1.0).to_event(1))
            return pyro.deterministic("x", self.generate(z, y), event_dim=1)

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` draws; a conditional GAN draws labels uniformly unless ``y`` is given."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if self.num_classes and y is None:
            y = torch.randint(self.num_classes, (n,), device=next(self.generator.parameters()).device)
        with pyro.poutine.block():
            return self.model(n, y)
