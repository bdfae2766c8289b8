"""Score-based generative model (Song et al. 2021): a noise-conditional score network.

Data are diffused by an SDE ``dx = f(x, t) dt + g(t) dw`` over ``t`` in [0, 1]: ``"ve"`` (variance
exploding, ``x_t = x_0 + sigma(t) z`` with ``sigma`` geometric from ``sigma_min`` to ``sigma_max``)
or ``"vp"`` (variance preserving, ``beta(t)`` linear from ``beta_min`` to ``beta_max``). The
network ``s(x, t)`` estimates ``grad log p_t(x)`` and is trained by denoising score matching
(:class:`ppdgm.inference.score_matching.ScoreMatching` calls :meth:`ScoreModel.denoising_loss`).

Sampling runs the reverse SDE with a predictor-corrector scheme (Euler-Maruyama predictor,
Langevin corrector), or annealed Langevin dynamics over decreasing noise levels (Song & Ermon
2019) with the shared :class:`~ppdgm.langevin.Langevin` sampler. The exact
log-likelihood integrates the probability-flow ODE ``dx/dt = f - g^2 s / 2`` from the data to the
Gaussian prior with a fixed-step RK4, the divergence by Hutchinson's estimator (or exactly), so
the model lands in the same nats table as the likelihood families.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ppdgm.data import check_data
from ppdgm.langevin import Langevin, check_step_size
from ppdgm.models.spec import ConstructorSpec
from ppdgm.nn import MLP
from ppdgm.progress import progress_bar

SDES = ("ve", "vp")
DIVERGENCES = ("hutchinson", "exact")


# ---------------------------------------------------------------------------------------------
# noise schedules


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
        return _std_normal_log_prob(x / self.sigma_max) - x.shape[-1] * math.log(self.sigma_max)

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
        return _std_normal_log_prob(x)

    def prior_sample(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, device=like.device, dtype=like.dtype)


def _std_normal_log_prob(x):
    return -0.5 * (x**2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


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
        sde: ``"ve"`` or ``"vp"``; sigma_min, sigma_max (VE) and beta_min, beta_max (VP) its schedule.
        eps: smallest diffusion time (training, sampling and likelihood start there).
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
    engine_config: ClassVar[dict] = {}
    support = "real"
    likelihood_method = "probability-flow ODE (RK4, Hutchinson trace)"

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
        self.sde_kind = sde
        self.sde = VESDE(sigma_min, sigma_max) if sde == "ve" else VPSDE(beta_min, beta_max)
        self.features, self.hidden_features, self.activation, self.embed_dim = (
            features,
            list(hidden_features),
            activation,
            embed_dim,
        )
        self.sigma_min, self.sigma_max, self.beta_min, self.beta_max = sigma_min, sigma_max, beta_min, beta_max
        self.eps, self.low, self.high, self.num_scales, self.snr = float(eps), low, high, num_scales, float(snr)
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
        x = data.x if hasattr(data, "x") else data
        if kwargs.get("sde") == "ve" and "sigma_max" not in kwargs:
            # Song & Ermon (2020): sigma_max about the largest distance between training points
            sub = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:1000]]
            kwargs["sigma_max"] = float(torch.pdist(sub).max()) / kwargs.get("scale", float(x.std()))
        if float(x.min()) >= 0 and float(x.max()) <= 1 and x.shape[1] > 2:
            kwargs.setdefault("low", 0.0)
            kwargs.setdefault("high", 1.0)
        kwargs.setdefault("loc", float(x.mean()))
        kwargs.setdefault("scale", float(x.std()))
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
        z = (self.check_data(x, "x").double() - self.loc) / self.scale
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
        """Denoising score matching per point, weighted by ``std(t)^2``: ``|std s(x_t, t) + z|^2``."""
        x = (x - self.loc) / self.scale
        t = self.eps + (1 - self.eps) * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        mean, std = self.sde.marginal(t)
        z = torch.randn_like(x)
        xt = mean.unsqueeze(-1) * x + std.unsqueeze(-1) * z
        return (std.unsqueeze(-1) * self.score(xt, t) + z).pow(2).sum(-1)

    def _finish(self, u):
        """Standardized diffusion states at time ``eps`` -> data (clamped to ``[low, high]`` if set)."""
        x = self.loc + self.scale * u
        return x.clamp(self.low, self.high) if self.low is not None else x

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, method: str = "pc", num_scales: int | None = None, **kwargs) -> torch.Tensor:
        """``n`` draws by ``"pc"`` (reverse-SDE predictor-corrector), ``"annealed_langevin"`` or ``"ode"``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        methods: dict[str, Callable[..., torch.Tensor]] = {
            "pc": self.sample_pc,
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
        ts = torch.linspace(1.0, self.eps, steps, device=p.device, dtype=p.dtype)
        dt = (1.0 - self.eps) / steps
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
            ts = torch.linspace(1.0, self.eps, num_scales or max(10, self.num_scales // 5), dtype=torch.float64)
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
        if isinstance(self.sde, VESDE):
            t = torch.log(sigmas / self.sde.sigma_min) / self.sde._log_ratio
        else:
            # solve -(1/4) t^2 (bmax - bmin) - (1/2) t bmin = log sqrt(1 - std^2)
            c = 0.5 * torch.log1p(-(sigmas.clamp(max=1 - 1e-12) ** 2))
            a, b = 0.25 * (self.sde.beta_max - self.sde.beta_min), 0.5 * self.sde.beta_min
            t = -c / b if a == 0 else (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)
        return t.clamp(self.eps, 1.0)

    @torch.no_grad()
    def sample_ode(self, n: int, num_scales: int | None = None) -> torch.Tensor:
        """Deterministic draws: the probability-flow ODE from the prior back to ``eps`` by RK4."""
        return self.decode(self.sde.prior_sample((n, self.features), self._param()), num_scales or 100)

    def decode(self, z: torch.Tensor, num_steps: int = 100) -> torch.Tensor:
        """Map prior draws ``z`` (time 1) to data (time ``eps``) along the probability-flow ODE."""
        x = z
        ts = torch.linspace(1.0, self.eps, num_steps + 1, device=z.device, dtype=z.dtype)
        for t0, t1 in itertools.pairwise(ts):
            x = _rk4(lambda y, t: self.flow(y, t), x, t0, t1)
        return self._finish(x)

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

    def _divergence(self, x, t, probe):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = self.flow(x, t)
            if probe is None:  # exact: one backward pass per dimension
                div = sum(
                    torch.autograd.grad(v[:, i].sum(), x, retain_graph=i < x.shape[1] - 1)[0][:, i]
                    for i in range(x.shape[1])
                )
            else:
                (vjp,) = torch.autograd.grad((v * probe).sum(), x)
                div = (vjp * probe).sum(-1)
        return v.detach(), div.detach()

    @torch.no_grad()
    def log_likelihood(
        self, x, num_steps: int = 100, divergence: str = "hutchinson", num_probes: int = 1, seed: int = 0
    ) -> torch.Tensor:
        """Per-point log p(x) in nats by the probability-flow ODE from ``eps`` to 1 (RK4, ``num_steps``):
        ``log p_eps(x) = log p_1(x_1) + int div v dt``, the divergence by Hutchinson's estimator with
        Rademacher probes (averaged over ``num_probes`` solves) or ``"exact"``."""
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        x0 = (self._check(x) - self.loc) / self.scale
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        for _ in range(num_probes if divergence == "hutchinson" else 1):
            probe = None
            if divergence == "hutchinson":
                probe = (torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1).to(x0)
            state = torch.cat([x0, torch.zeros_like(x0[:, :1])], -1)

            def rhs(z, t, probe=probe):
                v, div = self._divergence(z[:, :-1], t, probe)
                return torch.cat([v, div.unsqueeze(-1)], -1)

            ts = torch.linspace(self.eps, 1.0, num_steps + 1, device=x0.device, dtype=x0.dtype)
            with progress_bar(num_steps, "probability-flow ODE") as bar:
                for t0, t1 in itertools.pairwise(ts):
                    state = _rk4(rhs, state, t0, t1)
                    bar.update(1)
            total += (self.sde.prior_log_prob(state[:, :-1]) + state[:, -1]).double()
        total = total / (num_probes if divergence == "hutchinson" else 1) - self.features * math.log(self.scale)
        return total.to(x0.dtype)


def _rk4(f, x, t0, t1):
    h = t1 - t0
    k1 = f(x, t0)
    k2 = f(x + 0.5 * h * k1, t0 + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t0 + 0.5 * h)
    k4 = f(x + h * k3, t1)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
