"""Small network builders that the model zoo shares: an MLP and conv blocks for small images.

They are plain ``torch.nn.Module`` s; a ``PyroModule`` registers them as submodules so their
weights land in Pyro's param store like any other module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (``relu``, ``softplus``, ...)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _check_sizes(in_dim, hidden, out_dim):
    if not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be a positive int, got {in_dim!r}")
    if not isinstance(out_dim, int) or out_dim < 1:
        raise ValueError(f"out_dim must be a positive int, got {out_dim!r}")
    if isinstance(hidden, int) or not all(isinstance(h, int) and h >= 1 for h in hidden):
        raise ValueError(f"hidden must be a list of positive ints, got {hidden!r}")


class MLP(nn.Sequential):
    """``in_dim -> hidden[0] -> ... -> out_dim`` with ``activation`` between layers, none at the end.

    Inputs may carry any leading batch dims (``(..., in_dim) -> (..., out_dim)``).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "relu"):
        _check_sizes(in_dim, hidden, out_dim)
        sizes = [in_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(make_activation(activation))
        super().__init__(*layers)
        self.in_dim, self.hidden, self.out_dim = in_dim, list(hidden), out_dim


def concat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the leading (batch) dims."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*batch, t.shape[-1]) for t in tensors], dim=-1)


def _flat_apply(net: nn.Module, x: torch.Tensor, event_shape: tuple) -> torch.Tensor:
    """Apply ``net`` to ``x`` shaped ``(..., *event_shape)`` by folding the leading dims into one."""
    lead = x.shape[: x.dim() - len(event_shape)]
    out = net(x.reshape(-1, *event_shape))
    return out.reshape(*lead, *out.shape[1:])


class ConvEncoder(nn.Module):
    """Flat images ``(..., c*h*w)`` -> features ``(..., out_dim)`` by two stride-1 3x3 convs and a linear map.

    Sized for small images (8x8 digits, 28x28 MNIST): convolutions keep the resolution and a
    2x2 max-pool halves it once.
    """

    def __init__(
        self,
        image_shape: tuple[int, int],
        out_dim: int,
        channels: Sequence[int] = (16, 32),
        in_channels: int = 1,
        activation: str = "relu",
    ):
        super().__init__()
        h, w = _check_image(image_shape)
        if len(channels) != 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"channels must be two positive ints, got {channels!r}")
        c1, c2 = channels
        self.image_shape, self.in_channels = (h, w), in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            make_activation(activation),
            nn.Conv2d(c1, c2, 3, padding=1),
            make_activation(activation),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (h // 2) * (w // 2), out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.image_shape
        img = x.reshape(*x.shape[:-1], self.in_channels, h, w)
        return _flat_apply(self.net, img, (self.in_channels, h, w))


class ConvDecoder(nn.Module):
    """Features ``(..., in_dim)`` -> flat image parameters ``(..., c*h*w)``: a linear map to a half-size
    grid, a 2x nearest upsample and two 3x3 convs (mirrors :class:`ConvEncoder`)."""

    def __init__(
        self,
        in_dim: int,
        image_shape: tuple[int, int],
        channels: Sequence[int] = (32, 16),
        out_channels: int = 1,
        activation: str = "relu",
    ):
        super().__init__()
        h, w = _check_image(image_shape)
        if len(channels) != 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"channels must be two positive ints, got {channels!r}")
        c1, c2 = channels
        self.image_shape, self.out_channels = (h, w), out_channels
        self.net = nn.Sequential(
            nn.Linear(in_dim, c1 * (h // 2) * (w // 2)),
            make_activation(activation),
            nn.Unflatten(1, (c1, h // 2, w // 2)),
            nn.Upsample(size=(h, w), mode="nearest"),
            nn.Conv2d(c1, c2, 3, padding=1),
            make_activation(activation),
            nn.Conv2d(c2, out_channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = _flat_apply(self.net, z, (z.shape[-1],))
        return out.reshape(*out.shape[:-3], -1)


def _check_image(image_shape):
    if (
        not isinstance(image_shape, (tuple, list))
        or len(image_shape) != 2
        or not all(isinstance(s, int) and s >= 2 for s in image_shape)
    ):
        raise ValueError(f"image_shape must be (height, width) with both >= 2, got {image_shape!r}")
    return tuple(image_shape)


def image_side(d: int) -> tuple[int, int] | None:
    """``(s, s)`` when ``d`` is a perfect square ``s*s``, else None (for flat image data)."""
    s = math.isqrt(d)
    return (s, s) if s * s == d else None
