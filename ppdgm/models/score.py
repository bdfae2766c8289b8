"""Score-based generative model (Song et al. 2021): a noise-conditional score network.

Data are diffused by an SDE ``dx = f(x, t) dt + g(t) dw`` over ``t`` in [0, 1]
(:mod:`ppdgm.models.diffusion_schedule`): ``"ve"`` (variance exploding), ``"vp"`` (variance
preserving, ``beta(t)`` linear) or ``"vdm"`` (variance preserving with a log-SNR linear between
learnable endpoints, Kingma et al. 2021). The network ``s(x, t)`` estimates ``grad log p_t(x)``.
VE and VP train by denoising score matching weighted by ``sigma(t)^2``; VDM trains on its
variational bound on ``-log p(x)`` (prior + likelihood-weighted diffusion loss + reconstruction),
which is the likelihood weighting ``lambda(t) = g(t)^2`` with importance-sampled times, and trains
the schedule's endpoints with it. With ``dequantization_levels`` the data are pixels on a grid,
seen as ``(k + u) / levels`` and dequantized afresh every step.

Sampling runs the DDPM ancestral sampler, the reverse SDE with a predictor-corrector scheme
(Euler-Maruyama predictor, Langevin corrector), annealed Langevin dynamics over decreasing noise
levels (Song & Ermon 2019) with the shared :class:`~ppdgm.langevin.Langevin` sampler, or the
probability-flow ODE. The log-likelihood integrates that ODE from the data to the prior with
torchdiffeq's adaptive ``dopri5`` (:mod:`ppdgm.probability_flow`), so the model lands in the same
nats table as the likelihood families; :meth:`ScoreModel.vdm_bound` is a cheap second estimate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from ppdgm.data import check_data
from ppdgm.langevin import Langevin, check_step_size
from ppdgm.models.diffusion_schedule import VESDE, VPSDE, LogSNRSchedule
from ppdgm.models.spec import ConstructorSpec
from ppdgm.nn import MLP
from ppdgm.probability_flow import DIVERGENCES, flow_log_likelihood

SDES = ("ve", "vp", "vdm")


def quantization_gamma(levels: int, scale: float, logit_squeeze: float | None = None) -> float:
    """VDM's ``gamma_min`` for pixels on a grid of ``levels`` values standardized by ``scale``: the
    noise std at ``t = 0`` equals that of the uniform dequantization noise, ``1 / (levels sqrt(12))``
    (the narrowest cell after a logit squeeze ``a``: ``4 (1 - 2a) / levels``, at 0.5), so the model
    is not asked to resolve the data finer than its quantization."""
    width = 1 / levels if logit_squeeze is None else 4 * (1 - 2 * logit_squeeze) / levels
    var = (width / scale) ** 2 / 12
    return math.log(var / (1 - var))


def squeezed_logit(x: torch.Tensor, squeeze: float):
    """``logit(a + (1 - 2a) x)`` of data in [0, 1] and its log-Jacobian per point (``a = squeeze``)."""
    if bool((x < 0).any()) or bool((x > 1).any()):
        raise ValueError(f"x: a logit squeeze needs data in [0, 1], got values in [{float(x.min())}, {float(x.max())}]")
    s = squeeze + (1 - 2 * squeeze) * x
    y = torch.log(s) - torch.log1p(-s)
    return y, (math.log(1 - 2 * squeeze) - torch.log(s) - torch.log1p(-s)).sum(-1)


def check_decreasing(levels, name: str = "sigmas") -> torch.Tensor:
    """Noise levels for annealed sampling must be positive and strictly decreasing."""
    levels = torch.as_tensor(levels, dtype=torch.float64).flatten()
    if levels.numel() < 1 or not bool((levels > 0).all()) or not bool((levels[1:] < levels[:-1]).all()):
        raise ValueError(f"{name} must be a positive, strictly decreasing noise schedule, got {levels.tolist()}")
    return levels


# ---------------------------------------------------------------------------------------------


class TimeEmbedding(torch.nn.Module):
    """Random Fourier features of ``t`` (fixed at construction from a seeded generator)."""

    w: torch.Tensor  # a buffer

    def __init__(self, dim: int, scale: float = 4.0):
        super().__init__()
        w = torch.randn(dim // 2, generator=torch.Generator().manual_seed(0)) * scale
        self.register_buffer("w", w)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * t.unsqueeze(-1) * self.w
        return torch.cat([proj.sin(), proj.cos()], -1)


class ScoreModel(ConstructorSpec, PyroModule):
    """Noise-conditional score network ``s(x, t) = net(x, emb(t)) / std(t)`` over an SDE.

    Args:
        features: data dimension.
        hidden_features, activation, embed_dim: the network and the size of its time embedding.
        sde: ``"ve"``, ``"vp"`` or ``"vdm"``; sigma_min, sigma_max (VE), beta_min, beta_max (VP) and
            gamma_min, gamma_max (VDM: the log noise-to-signal ratio at t = 0 and 1) its schedule.
        learn_schedule: VDM only: train gamma_min and gamma_max on the variational bound.
        eps: smallest diffusion time of VE and VP (training, sampling and likelihood start there;
            VDM starts at t = 0, where gamma_min already sets a positive noise level).
        dequantization_levels: the data are pixels ``(k + u) / levels`` on a grid of ``levels``
            values per pixel (``u`` uniform): training redraws ``u`` every step (None: continuous
            data, used as given).
        logit_squeeze: data in [0, 1] diffuse as ``logit(a + (1 - 2a) x)`` with ``a = logit_squeeze``
            (Dinh et al. 2017), the Jacobian in every likelihood: the edges of the box, where pixels
            pile up at 0 and 1, move far out instead of being cliffs that the noise would blur.
        low, high: optional box that final samples are clamped to (e.g. 0 and 1 for intensities).
        num_scales, snr: default reverse-SDE discretization and corrector signal-to-noise ratio.
        loc, scale: the diffusion runs on ``(x - loc) / scale`` (``from_data`` standardizes the data,
            so one noise schedule suits data of any scale); likelihoods include the Jacobian.
        gaussian_base: the score is the exact score of a Gaussian fitted to the data
            (:meth:`fit_gaussian_base`; ``from_data`` does it for data of more than two dimensions)
            plus the network's correction. An untrained model is that Gaussian, and the network
            need not learn the data's small-variance directions, where likelihoods are decided.
    """

    datasets = ("moons", "digits")

    default_engine = "score_matching"
    engine_config: ClassVar[dict] = {"ema": 0.999}
    support = "real"
    likelihood_method = "probability-flow ODE (dopri5, exact divergence)"

    def __init__(
        self,
        features: int = 2,
        hidden_features=(256, 256),
        activation: str = "silu",
        embed_dim: int = 16,
        sde: str = "vp",
        sigma_min: float = 0.01,
        sigma_max: float = 5.0,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        eps: float = 1e-3,
        low: float | None = None,
        high: float | None = None,
        num_scales: int = 500,
        snr: float = 0.16,
        loc: float = 0.0,
        scale: float = 1.0,
        gaussian_base: bool = False,
        gamma_min: float = -10.0,
        gamma_max: float = 10.0,
        learn_schedule: bool = True,
        dequantization_levels: int | None = None,
        logit_squeeze: float | None = None,
    ):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        if sde not in SDES:
            raise ValueError(f"sde must be one of {SDES}, got {sde!r}")
        if not isinstance(embed_dim, int) or embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be an even int >= 2, got {embed_dim!r}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps!r}")
        if not isinstance(num_scales, int) or num_scales < 1:
            raise ValueError(f"num_scales must be a positive int, got {num_scales!r}")
        if (low is None) != (high is None) or (low is not None and high is not None and not low < high):
            raise ValueError(f"low and high must both be None or low < high, got low={low!r}, high={high!r}")
        if dequantization_levels is not None and (
            isinstance(dequantization_levels, bool)
            or not isinstance(dequantization_levels, int)
            or dequantization_levels < 2
        ):
            raise ValueError(f"dequantization_levels must be None or an int >= 2, got {dequantization_levels!r}")
        self.sde_kind = sde
        self.sde: VESDE | VPSDE | LogSNRSchedule
        if sde == "vdm":
            self.sde = LogSNRSchedule(gamma_min, gamma_max, learn=bool(learn_schedule))
        else:
            self.sde = VESDE(sigma_min, sigma_max) if sde == "ve" else VPSDE(beta_min, beta_max)
        self.dequantization_levels = dequantization_levels
        if logit_squeeze is not None and not 0 < logit_squeeze < 0.5:
            raise ValueError(f"logit_squeeze must be None or in (0, 0.5), got {logit_squeeze!r}")
        self.logit_squeeze = logit_squeeze
        self.features, self.hidden_features, self.activation, self.embed_dim = (
            features,
            list(hidden_features),
            activation,
            embed_dim,
        )
        self.sigma_min, self.sigma_max, self.beta_min, self.beta_max = sigma_min, sigma_max, beta_min, beta_max
        self.eps, self.low, self.high, self.num_scales, self.snr = float(eps), low, high, num_scales, float(snr)
        self.t0 = 0.0 if sde == "vdm" else self.eps  # where the data sit: training, sampling, likelihood
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(loc)):
            raise ValueError(f"scale must be positive and loc finite, got loc={loc!r}, scale={scale!r}")
        self.loc, self.scale = float(loc), float(scale)
        self.embed = TimeEmbedding(embed_dim)
        self.net = MLP(features + embed_dim, self.hidden_features, features, activation)
        self.gaussian_base = bool(gaussian_base)
        if self.gaussian_base:  # N(mean, U diag(eigvals) U^T) in standardized units, set by fit_gaussian_base
            self.register_buffer("base_mean", torch.zeros(features))
            self.register_buffer("base_eigvecs", torch.eye(features))
            self.register_buffer("base_eigvals", torch.ones(features))

    @classmethod
    def from_data(cls, data, **kwargs):
        """Size the model from data: standardize, clamp samples to [0, 1] for intensities, fit the
        Gaussian base (more than two dimensions) and, for dequantized digits, train on the VDM bound
        with ``gamma_min`` at the pixels' quantization noise (see :func:`quantization_gamma`)."""
        x = data.x if hasattr(data, "x") else data
        name = getattr(data, "name", None) or ""
        if name.startswith("digits") and "dequantized" in name:
            kwargs.setdefault("dequantization_levels", 17)
        if kwargs.get("dequantization_levels") and x.shape[1] > 2:
            kwargs.setdefault("sde", "vdm")
            kwargs.setdefault("logit_squeeze", 0.05)
        squeeze = kwargs.get("logit_squeeze")
        y = x if squeeze is None else squeezed_logit(x, squeeze)[0]
        kwargs.setdefault("loc", float(y.mean()))
        kwargs.setdefault("scale", float(y.std()))
        if kwargs.get("dequantization_levels") and kwargs.get("sde") == "vdm":
            levels = kwargs["dequantization_levels"]
            kwargs.setdefault("gamma_min", quantization_gamma(levels, kwargs["scale"], squeeze))
        if kwargs.get("sde") == "ve" and "sigma_max" not in kwargs:
            # Song & Ermon (2020): sigma_max about the largest distance between training points
            sub = y[torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0))[:1000]]
            kwargs["sigma_max"] = float(torch.pdist(sub).max()) / kwargs["scale"]
        if float(x.min()) >= 0 and float(x.max()) <= 1 and x.shape[1] > 2:
            kwargs.setdefault("low", 0.0)
            kwargs.setdefault("high", 1.0)
        kwargs.setdefault("gaussian_base", x.shape[1] > 2)
        model = cls(features=x.shape[1], **kwargs)
        if model.gaussian_base:
            model.fit_gaussian_base(x)
        return model

    @torch.no_grad()
    def fit_gaussian_base(self, x: torch.Tensor) -> None:
        """Set the Gaussian whose exact diffused score the network corrects: the mean and
        covariance of ``x`` (standardized), so an untrained model is already that Gaussian."""
        if not self.gaussian_base:
            raise ValueError("this model was built with gaussian_base=False")
        z = self._to_diffusion_space(self.check_data(x, "x").double())[0]
        if z.shape[0] < 2:
            raise ValueError(f"x: a Gaussian base needs at least 2 points, got {z.shape[0]}")
        eigvals, eigvecs = torch.linalg.eigh(torch.atleast_2d(torch.cov(z.T)))
        self.base_mean.copy_(z.mean(0))
        self.base_eigvecs.copy_(eigvecs)
        self.base_eigvals.copy_(eigvals.clamp_min(1e-6))

    def _param(self):
        return next(self.net.parameters())

    def data_args(self, dataset) -> tuple:
        return (self.check_data(dataset.x, "x"),)

    def check_data(self, x, name: str = "data") -> torch.Tensor:
        """Validate data before an engine runs: finite values shaped ``(n, features)`` (device kept)."""
        x = check_data(x, name, rank=2)
        if x.shape[1] != self.features:
            raise ValueError(f"{name}: expected {self.features} columns, got shape {tuple(x.shape)}")
        return x

    def _check(self, x, name="x"):
        p = self._param()
        return self.check_data(x, name).to(p.device, p.dtype)

    # -- the score and its training loss ----------------------------------------------------------
    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``grad_x log p_t(x)`` for states ``x`` (n, d) at times ``t`` (n,) or a scalar."""
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        mean, std = (v.unsqueeze(-1) for v in self.sde.marginal(t))
        out = self.net(torch.cat([x, self.embed(t)], -1)) / std
        if self.gaussian_base:
            # the exact score of the base Gaussian diffused to time t, N(m mu, m^2 Sigma + std^2 I),
            # in Sigma's eigenbasis; the network learns only what the data adds to it
            y = (x - mean * self.base_mean) @ self.base_eigvecs
            out = out - (y / (mean**2 * self.base_eigvals + std**2)) @ self.base_eigvecs.T
        return out

    def denoising_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The per-point training loss. VDM: its variational bound on ``-log p(x)`` in nats, one
        diffusion time per point, the batch's times spread evenly over [0, 1] from one random
        offset (Kingma et al. 2021). VE, VP: denoising score matching weighted by ``std(t)^2``,
        ``|std s(x_t, t) + z|^2``. Dequantized pixels get fresh noise ``u`` every call."""
        x = self._dequantize(x)
        if isinstance(self.sde, LogSNRSchedule):
            n = x.shape[0]
            t = (torch.rand((), device=x.device, dtype=x.dtype) + torch.arange(n, device=x.device) / n) % 1
            return -self._vdm_elbo(x, t, torch.randn_like(x))
        x = self._to_diffusion_space(x)[0]
        t = self.eps + (1 - self.eps) * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        mean, std = self.sde.marginal(t)
        z = torch.randn_like(x)
        xt = mean.unsqueeze(-1) * x + std.unsqueeze(-1) * z
        return (std.unsqueeze(-1) * self.score(xt, t) + z).pow(2).sum(-1)

    def _to_diffusion_space(self, x: torch.Tensor):
        """Data -> the standardized states the diffusion starts from, and ``log |du/dx|`` per point."""
        log_det = x.new_full(x.shape[:1], -self.features * math.log(self.scale))
        if self.logit_squeeze is not None:
            x, log_det_logit = squeezed_logit(x, self.logit_squeeze)
            log_det = log_det + log_det_logit
        return (x - self.loc) / self.scale, log_det

    def _dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``(k + u) / levels`` with a fresh ``u``: the cell ``k`` is kept, the noise redrawn."""
        if self.dequantization_levels is None:
            return x
        levels = self.dequantization_levels
        k = (x * levels).floor().clamp(0, levels - 1)
        return (k + torch.rand_like(x)) / levels

    def _vdm_elbo(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One-sample VDM lower bound on ``log p(x)`` (Kingma et al. 2021, continuous time):
        ``-KL(q(z_1|x) || N(0, I)) - gamma' / 2 |eps - eps_hat(z_t, t)|^2 + E log p(x | z_0)`` with
        the Gaussian decoder ``p(x | z_0) = N(z_0 / alpha_0, (sigma_0 / alpha_0)^2)``, in data units."""
        assert isinstance(self.sde, LogSNRSchedule)
        u, log_det = self._to_diffusion_space(x)
        d = u.shape[-1]
        alpha, sigma = (v.unsqueeze(-1) for v in self.sde.marginal(t))
        zt = alpha * u + sigma * noise
        eps_hat = -sigma * self.score(zt, t)
        diffusion = 0.5 * self.sde.slope() * (noise - eps_hat).pow(2).sum(-1)
        g1, g0 = self.sde.gamma_max, self.sde.gamma_min
        # KL(N(alpha_1 u, sigma_1^2) || N(0, 1)), with sigma^2 = sigmoid(gamma), alpha^2 = sigmoid(-gamma)
        prior = 0.5 * (torch.sigmoid(g1) + torch.sigmoid(-g1) * u.pow(2) - 1 - F.logsigmoid(g1)).sum(-1)
        # E -log N(u; z_0 / alpha_0, (sigma_0 / alpha_0)^2) over z_0, where log(sigma_0 / alpha_0) = gamma_0 / 2
        reconstruction = d * (0.5 + 0.5 * g0 + 0.5 * math.log(2 * math.pi))
        return -(prior + diffusion + reconstruction) + log_det

    @torch.no_grad()
    def vdm_bound(self, x, num_times: int = 64, seed: int = 0) -> torch.Tensor:
        """Per-point lower bound on ``log p(x)`` in nats by the VDM variational bound (``sde="vdm"``),
        its diffusion term averaged over ``num_times`` times spread evenly over [0, 1] (seeded):
        a second likelihood estimate beside :meth:`log_likelihood`, at a fraction of its cost."""
        if not isinstance(self.sde, LogSNRSchedule):
            raise ValueError(f"vdm_bound needs sde='vdm', this model has sde={self.sde_kind!r}")
        if isinstance(num_times, bool) or not isinstance(num_times, int) or num_times < 1:
            raise ValueError(f"num_times must be a positive int, got {num_times!r}")
        x = self._check(x)
        gen = torch.Generator().manual_seed(seed)
        offset = torch.rand((), generator=gen)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(num_times):
            t = ((offset + i / num_times) % 1).to(x).expand(x.shape[0])
            noise = torch.randn(x.shape, generator=gen).to(x)
            total += self._vdm_elbo(x, t, noise).double()
        return (total / num_times).to(x.dtype)

    def _finish(self, u):
        """Standardized diffusion states at the data's time ``t0`` -> data (clamped to ``[low, high]`` if set)."""
        x = self.loc + self.scale * u
        if self.logit_squeeze is not None:
            x = (torch.sigmoid(x) - self.logit_squeeze) / (1 - 2 * self.logit_squeeze)
        return x.clamp(self.low, self.high) if self.low is not None else x

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, method: str = "ddpm", num_scales: int | None = None, **kwargs) -> torch.Tensor:
        """``n`` draws by ``"ddpm"`` (ancestral: the distribution :meth:`log_likelihood` scores),
        ``"pc"`` (reverse-SDE predictor-corrector), ``"annealed_langevin"`` or ``"ode"``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        methods: dict[str, Callable[..., torch.Tensor]] = {
            "pc": self.sample_pc,
            "ddpm": self.sample_ddpm,
            "annealed_langevin": self.sample_annealed_langevin,
            "ode": self.sample_ode,
        }
        if method not in methods:
            raise ValueError(f"method must be one of {tuple(methods)}, got {method!r}")
        return methods[method](n, num_scales=num_scales, **kwargs)

    @torch.no_grad()
    def sample_pc(
        self, n: int, num_scales: int | None = None, snr: float | None = None, corrector_steps: int = 1
    ) -> torch.Tensor:
        """Reverse-SDE Euler-Maruyama predictor with ``corrector_steps`` Langevin corrections per level,
        step sizes from the signal-to-noise ratio ``snr`` (Song et al. 2021, Algorithm 5)."""
        steps = num_scales or self.num_scales
        snr = self.snr if snr is None else snr
        p = self._param()
        x = self.sde.prior_sample((n, self.features), p)
        ts = torch.linspace(1.0, self.t0, steps, device=p.device, dtype=p.dtype)
        dt = (1.0 - self.t0) / steps
        langevin = Langevin(step_size=1.0, num_steps=1)
        x_mean = x
        for t in ts:
            for _ in range(corrector_steps if snr > 0 else 0):
                s = self.score(x, t)
                ratio = snr * torch.randn_like(x).norm(dim=-1).mean() / s.norm(dim=-1).mean().clamp_min(1e-12)
                step = float(2 * ratio**2)
                x = langevin.step(x, lambda _, s=s: s, step_size=step, noise_scale=math.sqrt(2 * step))
            f, g = self.sde.drift_diffusion(x, t.expand(n))
            g = g.unsqueeze(-1)
            x_mean = x - (f - g**2 * self.score(x, t)) * dt
            x = x_mean + g * math.sqrt(dt) * torch.randn_like(x)
        return self._finish(x_mean)

    @torch.no_grad()
    def sample_annealed_langevin(
        self, n: int, num_scales: int | None = None, sigmas=None, steps_per_level: int = 5, step_size: float = 2e-5
    ) -> torch.Tensor:
        """Annealed Langevin dynamics (Song & Ermon 2019): ``steps_per_level`` Langevin steps at each
        noise level, step ``step_size * (std_i / std_last)^2``, then one denoising (Tweedie) step.

        ``sigmas`` (the marginal std at each level, strictly decreasing) defaults to ``num_scales``
        levels evenly spaced in diffusion time."""
        check_step_size(step_size)
        p = self._param()
        if sigmas is None:
            ts = torch.linspace(1.0, self.t0, num_scales or max(10, self.num_scales // 5), dtype=torch.float64)
            sigmas = self.sde.marginal(ts)[1]
        levels = check_decreasing(sigmas)
        ts = self._time_of_std(levels).to(p.device, p.dtype)
        x = self.sde.prior_sample((n, self.features), p)
        langevin = Langevin(step_size=step_size, num_steps=steps_per_level)
        last = float(levels[-1])
        for t, sd in zip(ts, levels.tolist()):
            eps = step_size * (sd / last) ** 2
            for _ in range(steps_per_level):
                x = langevin.step(x, lambda z, t=t: self.score(z, t), step_size=eps, noise_scale=math.sqrt(2 * eps))
        mean, std = self.sde.marginal(ts[-1])
        x = (x + std**2 * self.score(x, ts[-1])) / mean
        return self._finish(x)

    def _time_of_std(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Diffusion time at which the marginal std equals each of ``sigmas``."""
        if isinstance(self.sde, LogSNRSchedule):
            gamma = torch.log(sigmas**2) - torch.log1p(-(sigmas.clamp(max=1 - 1e-12) ** 2))
            t = (gamma - float(self.sde.gamma_min)) / float(self.sde.slope())
        elif isinstance(self.sde, VESDE):
            t = torch.log(sigmas / self.sde.sigma_min) / self.sde._log_ratio
        else:
            # solve -(1/4) t^2 (bmax - bmin) - (1/2) t bmin = log sqrt(1 - std^2)
            c = 0.5 * torch.log1p(-(sigmas.clamp(max=1 - 1e-12) ** 2))
            a, b = 0.25 * (self.sde.beta_max - self.sde.beta_min), 0.5 * self.sde.beta_min
            t = -c / b if a == 0 else (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)
        return t.clamp(self.t0, 1.0)

    @torch.no_grad()
    def sample_ddpm(self, n: int, num_scales: int | None = None) -> torch.Tensor:
        """Ancestral sampling (Ho et al. 2020; Kingma et al. 2021) over ``num_scales`` steps from 1 to
        the data's time: ``z_s ~ q(z_s | z_t, x = x_hat(z_t))`` with Tweedie's denoised ``x_hat``,
        noise included down to the last step, so the draws are the model's ``p_t0`` (the
        density that :meth:`log_likelihood` scores) mapped back by ``1 / alpha(t0)``."""
        steps = num_scales or self.num_scales
        p = self._param()
        z = self.sde.prior_sample((n, self.features), p)
        ts = torch.linspace(1.0, self.t0, steps + 1, device=p.device, dtype=p.dtype)
        for t, s in itertools.pairwise(ts):
            a_t, s_t = self.sde.marginal(t)
            a_s, s_s = self.sde.marginal(s)
            x_hat = (z + s_t**2 * self.score(z, t)) / a_t
            a_ts = a_t / a_s
            var_ts = s_t**2 - a_ts**2 * s_s**2  # of z_t given z_s
            mean = (a_ts * s_s**2 * z + a_s * var_ts * x_hat) / s_t**2
            z = mean + (var_ts * s_s**2 / s_t**2).sqrt() * torch.randn_like(z)
        return self._finish(z / self.sde.marginal(ts[-1])[0])

    @torch.no_grad()
    def sample_ode(self, n: int, num_scales: int | None = None) -> torch.Tensor:
        """Deterministic draws: the probability-flow ODE from the prior back to ``eps`` by RK4."""
        return self.decode(self.sde.prior_sample((n, self.features), self._param()), num_scales or 100)

    def decode(self, z: torch.Tensor, num_steps: int = 100) -> torch.Tensor:
        """Map prior draws ``z`` (time 1) to data (time ``eps``) along the probability-flow ODE."""
        x = z
        ts = torch.linspace(1.0, self.t0, num_steps + 1, device=z.device, dtype=z.dtype)
        for t0, t1 in itertools.pairwise(ts):
            x = _rk4(lambda y, t: self.flow(y, t), x, t0, t1)
        return self._finish(x / self.sde.marginal(ts[-1])[0])

    def model(self, n: int, num_steps: int = 100):
        """The model as a Pyro program: ``z ~ p_1`` (the SDE's Gaussian prior) and
        ``x = pyro.deterministic("x", ODE(z))``, the probability-flow map that the likelihood inverts."""
        pyro.module("score_net", self.net)
        p = self._param()
        scale = self.sde.sigma_max if isinstance(self.sde, VESDE) else 1.0
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(p.new_zeros(self.features), scale).to_event(1))
            return pyro.deterministic("x", self.decode(z, num_steps), event_dim=1)

    # -- likelihood ----------------------------------------------------------------------------------
    def flow(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Probability-flow velocity ``f(x, t) - g(t)^2 s(x, t) / 2``."""
        f, g = self.sde.drift_diffusion(x, t.expand(x.shape[0]))
        return f - 0.5 * g.unsqueeze(-1) ** 2 * self.score(x, t)

    @torch.no_grad()
    def log_likelihood(
        self,
        x,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        divergence: str = "exact",
        num_probes: int = 1,
        seed: int = 0,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """Per-point ``log p(x)`` in nats by the probability-flow ODE from the data's time to 1
        (:func:`ppdgm.probability_flow.flow_log_likelihood`): adaptive ``dopri5`` with tolerances
        ``rtol``, ``atol``, or fixed-step RK4 when ``num_steps`` is given. The divergence is
        ``"exact"`` or Hutchinson's estimate with Rademacher probes (averaged over ``num_probes``
        solves, seeded). ``p`` is the model's marginal at ``t0`` mapped back by ``1 / alpha(t0)``
        (the distribution :meth:`sample_ddpm` draws from), with the standardization's Jacobian."""
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be None or a positive int, got {num_steps!r}")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
        x, log_det = self._to_diffusion_space(self._check(x))
        alpha0 = self.sde.marginal(torch.tensor(self.t0, dtype=x.dtype, device=x.device))[0]
        gen = torch.Generator().manual_seed(seed)
        solves = num_probes if divergence == "hutchinson" else 1
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        self.last_nfe = 0
        for _ in range(solves):
            probe = None
            if divergence == "hutchinson":
                probe = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)
            out = flow_log_likelihood(
                self.flow,
                alpha0 * x,
                self.t0,
                1.0,
                self.sde.prior_log_prob,
                probe=probe,
                method="dopri5" if num_steps is None else "rk4",
                rtol=rtol,
                atol=atol,
                num_steps=num_steps,
            )
            total += out.log_prob.double()
            self.last_nfe += out.nfe
        log_jacobian = self.features * torch.log(alpha0).double() + log_det.double()
        return (total / solves + log_jacobian).to(x.dtype)


def _rk4(f, x, t0, t1):
    h = t1 - t0
    k1 = f(x, t0)
    k2 = f(x + 0.5 * h * k1, t0 + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t0 + 0.5 * h)
    k4 = f(x + h * k3, t1)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
