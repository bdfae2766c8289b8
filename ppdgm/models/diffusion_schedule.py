"""Noise schedules of a diffusion ``x_t = alpha(t) x_0 + sigma(t) z`` over ``t`` in [0, 1].

Each schedule gives the marginal ``(alpha(t), sigma(t))``, the SDE's drift and diffusion
``f(x, t), g(t)`` and its Gaussian prior at ``t = 1``:

- :class:`VESDE`, variance exploding (Song & Ermon 2020): ``sigma`` geometric, ``alpha = 1``;
- :class:`VPSDE`, variance preserving (Ho et al. 2020; Song et al. 2021): ``beta(t)`` linear;
- :class:`LogSNRSchedule`, variance preserving with a log signal-to-noise ratio linear in ``t``
  between learnable endpoints (Kingma et al. 2021, VDM): ``sigma^2 = sigmoid(gamma(t))``,
  ``gamma(t) = gamma_min + (gamma_max - gamma_min) t``. Its likelihood-weighted denoising loss
  (``lambda(t) = g(t)^2``) is ``gamma'(t) / 2 |eps - eps_hat|^2``, and sampling ``t`` uniformly is
  the importance sampling of times ``p(t) ~ g(t)^2 / sigma(t)^2`` that Song et al. (2021) use to cut
  that loss's variance: here it is constant, so no time costs more variance than another.
"""

from __future__ import annotations

import math

import torch


def std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """``log N(x; 0, I)`` summed over the last dimension."""
    return -0.5 * (x**2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


class VESDE:
    """Variance exploding: ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, no drift."""

    def __init__(self, sigma_min: float, sigma_max: float):
        if not (sigma_min > 0 and sigma_max > sigma_min):
            raise ValueError(
                "the noise schedule must decrease from sigma_max to sigma_min > 0 along the reverse "
                f"process; got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def marginal(self, t: torch.Tensor):
        """``(mean coefficient, std)`` of ``x_t | x_0``."""
        return torch.ones_like(t), self.sigma_min * torch.exp(t * self._log_ratio)

    def drift_diffusion(self, x: torch.Tensor, t: torch.Tensor):
        sigma = self.marginal(t)[1]
        return torch.zeros_like(x), sigma * math.sqrt(2 * self._log_ratio)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return std_normal_log_prob(x / self.sigma_max) - x.shape[-1] * math.log(self.sigma_max)

    def prior_sample(self, shape, like: torch.Tensor) -> torch.Tensor:
        return self.sigma_max * torch.randn(shape, device=like.device, dtype=like.dtype)


class VPSDE:
    """Variance preserving: ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw``, ``beta`` linear in ``t``."""

    def __init__(self, beta_min: float, beta_max: float):
        if not (beta_min > 0 and beta_max >= beta_min):
            raise ValueError(
                "the noise schedule must have 0 < beta_min <= beta_max so the noise decreases "
                f"along the reverse process; got beta_min={beta_min!r}, beta_max={beta_max!r}"
            )
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def marginal(self, t: torch.Tensor):
        log_mean = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return torch.exp(log_mean), torch.sqrt(-torch.expm1(2 * log_mean))

    def drift_diffusion(self, x: torch.Tensor, t: torch.Tensor):
        beta = self.beta(t)
        return -0.5 * beta.unsqueeze(-1) * x, beta.sqrt()

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return std_normal_log_prob(x)

    def prior_sample(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, device=like.device, dtype=like.dtype)


class LogSNRSchedule(torch.nn.Module):
    """Variance preserving with ``gamma(t) = -log SNR(t)`` linear from ``gamma_min`` to ``gamma_max``.

    ``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``, ``beta(t) = sigma^2 gamma'``. With
    ``learn=True`` the endpoints are parameters that the variational bound trains (VDM): the
    prior term pushes ``gamma_max`` up, the reconstruction term pulls ``gamma_min`` down until the
    diffusion loss at the data's own noise level (its quantization) costs more than it saves.
    """

    def __init__(self, gamma_min: float, gamma_max: float, learn: bool = True):
        super().__init__()
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(
                "the log-SNR schedule needs finite gamma_min < gamma_max (noise grows with t); "
                f"got gamma_min={gamma_min!r}, gamma_max={gamma_max!r}"
            )
        self.gamma_min = torch.nn.Parameter(torch.tensor(float(gamma_min)), requires_grad=learn)
        self.gamma_max = torch.nn.Parameter(torch.tensor(float(gamma_max)), requires_grad=learn)

    def slope(self) -> torch.Tensor:
        """``gamma'(t)``, constant."""
        return self.gamma_max - self.gamma_min

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_min + self.slope() * t

    def marginal(self, t: torch.Tensor):
        g = self.gamma(t)
        return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()

    def drift_diffusion(self, x: torch.Tensor, t: torch.Tensor):
        beta = torch.sigmoid(self.gamma(t)) * self.slope()
        return -0.5 * beta.unsqueeze(-1) * x, beta.sqrt()

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return std_normal_log_prob(x)

    def prior_sample(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
