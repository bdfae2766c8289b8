"""A DeepAR-style recurrent forecaster as a Pyro program, with CRPS/MAE backtesting.

``DeepAR`` (Salinas et al. 2020) models a univariate series one step at a time: a GRU reads the
lagged values (``lags``, e.g. ``(1, 12)``) and, with ``period``, the phase of the season as
sin/cos features, and emits the location and scale of a Normal or Student-t for the next value.
Training is maximum likelihood on windows cut from the series (SVI with an empty guide: the
model has no latent sites). Forecasts are ancestral samples: the GRU reads the observed
context_length, then feeds its own draws back as lags; :meth:`DeepAR.forecast` runs the program under
``pyro.infer.Predictive`` (vectorized over samples) and returns draws of the future path, from
which predictive intervals are quantiles.

Values are standardized with the training series' mean and standard deviation (``loc``,
``scale``, kept in ``spec``), and likelihoods are reported in the series' own units. With
``transform="sqrt1p"`` or ``"log1p"`` the Normal/Student-t is put on the transformed values (the
variance-stabilizing square root suits skewed positive series such as sunspots); the sample sites
stay in the series' units as ``TransformedDistribution``s, so forecasts and log-likelihoods are in
those units, Jacobian included. ``weight_decay`` adds an L2 penalty on the weights (MAP under a
Gaussian prior): one short series is too little data for an unregularized GRU, which memorizes it.

Evaluation follows ``pyro.contrib.forecast``: :func:`crps` (continuous ranked probability
score of the sample forecast, via ``pyro.ops.stats.crps_empirical``), :func:`mae` of the
median forecast, and :func:`backtest`, which refits at each forecast origin and scores the next
``horizon`` values against the seasonal-naive forecast and, with ``ar_order``, a least-squares
autoregression (:func:`ar_forecast`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, cast

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import constraints
from pyro.infer import Predictive
from pyro.ops.stats import crps_empirical
from torch import nn
from torch.nn import functional as F

from ppdgm.data import check_data
from ppdgm.models.spec import ConstructorSpec

LIKELIHOODS = ("normal", "studentt")
TRANSFORMS = (None, "sqrt1p", "log1p")


class Sqrt1pInverse(T.Transform):
    """``y = u (|u| + 2)``, the inverse of ``u = sign(y) (sqrt(1 + |y|) - 1)``: a bijection of the reals."""

    domain = codomain = constraints.real
    bijective = True
    sign = 1

    def _call(self, u):
        return u * (u.abs() + 2)

    def _inverse(self, y):
        return y.sign() * ((1 + y.abs()).sqrt() - 1)

    def log_abs_det_jacobian(self, u, y):
        return (2 * (u.abs() + 1)).log()


def untransform(transform: str | None):
    """The map from the modelled scale back to the series' units (None: no transform)."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if transform == "sqrt1p":
        return Sqrt1pInverse()
    if transform == "log1p":
        return T.ComposeTransform([T.ExpTransform(), T.AffineTransform(-1.0, 1.0)])
    return None


def _check_domain(series, transform, name):
    if transform == "log1p" and bool((series <= -1).any()):
        raise ValueError(f"{name}: transform='log1p' needs values > -1, got a minimum of {float(series.min())}")
    return series


def check_series(series, name: str = "series") -> torch.Tensor:
    """A univariate series as a 1-D float tensor (``(T,)``, ``(T, 1)`` or ``(1, T)``)."""
    series = check_data(series, name)
    if series.dim() == 2 and 1 in series.shape:
        series = series.reshape(-1)
    if series.dim() != 1:
        raise ValueError(f"{name}: expected a univariate series of shape (T,), got shape {tuple(series.shape)}")
    return series


def load_sunspots() -> torch.Tensor:
    """Yearly mean sunspot numbers 1700-2008 (309 values), the whole series of ``ppdgm.data``'s ``sunspots``."""
    from ppdgm.data import load_dataset

    return load_dataset("sunspots", "all").x


def seasonal_naive(history, horizon: int, period: int) -> torch.Tensor:
    """Repeat the last observed season: y_hat[T + s] = y[T + s - period * (s // period + 1)]."""
    history = check_series(history, "history")
    _check_horizon(horizon)
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive int, got {period!r}")
    if len(history) < period:
        raise ValueError(
            f"history: the seasonal-naive forecast needs at least period={period} values, got {len(history)}"
        )
    T = len(history)
    return torch.stack([history[T + s - period * (s // period + 1)] for s in range(horizon)])


def crps(samples: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean continuous ranked probability score of sample forecasts ``(num_samples, ...)``."""
    return float(crps_empirical(samples, truth.to(samples)).mean())


def mae(samples: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean absolute error of the median of sample forecasts ``(num_samples, ...)``."""
    return float((samples.median(0).values - truth.to(samples)).abs().mean())


def ar_forecast(history, horizon: int, order: int, num_samples: int = 200, seed: int = 0) -> torch.Tensor:
    """A least-squares AR(``order``) with intercept fitted to ``history``: ``num_samples`` simulated
    paths of the next ``horizon`` values, ``(num_samples, horizon)``, with Gaussian noise of the
    residuals' standard deviation (parameter uncertainty ignored)."""
    history = check_series(history, "history")
    _check_horizon(horizon)
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise ValueError(f"order must be a positive int, got {order!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if len(history) < 2 * order + 2:
        raise ValueError(f"history: AR({order}) needs at least {2 * order + 2} values, got {len(history)}")
    x = history.double()
    X = torch.stack([x[order - lag : len(x) - lag] for lag in range(1, order + 1)] + [torch.ones_like(x[order:])], -1)
    coef = torch.linalg.lstsq(X, x[order:, None]).solution[:, 0]
    sd = ((x[order:] - X @ coef).pow(2).sum() / (len(X) - order - 1)).sqrt()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    path = x[-order:].expand(num_samples, order)
    for _ in range(horizon):
        noise = torch.randn(num_samples, generator=gen, device=x.device, dtype=x.dtype)
        step = path[:, -order:].flip(-1) @ coef[:-1] + coef[-1] + sd * noise
        path = torch.cat([path, step[:, None]], -1)
    return path[:, order:].to(history.dtype)


def _check_horizon(horizon):
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")


class DeepAR(ConstructorSpec, nn.Module):
    """An autoregressive recurrent forecaster p(y_t | y_{<t}) of one series.

    Args:
        context_length: how many past values a forecast conditions on (and the minimum history).
        window: length of the training windows cut from the series (default ``2 * context_length``).
        lags: which past values feed each step (all >= 1, each < ``context_length``).
        period: season length; adds sin/cos of the phase as inputs (None: no seasonal features).
        hidden_features, num_layers: GRU size.
        likelihood: ``"normal"`` or ``"studentt"`` (learned degrees of freedom > 2).
        loc, scale: standardization of the (transformed) values (set by :meth:`from_series`).
        weight_decay: L2 penalty on the weights per scored value, so its strength does not depend
            on the number of windows (MAP under a Gaussian prior on the weights). Without it the
            GRU memorizes a short series: on sunspots, 0 forecasts worse than seasonal-naive.
        transform: None, ``"sqrt1p"`` (``u = sign(y) (sqrt(1 + |y|) - 1)``) or ``"log1p"``
            (u = log(1 + y), values > -1): the likelihood is put on u; sample sites, forecasts and
            log-likelihoods stay in the series' units.
    """

    datasets = ("sunspots",)

    default_engine = "svi"
    engine_config: ClassVar[dict] = {}
    support = "real"
    likelihood_method = "exact one-step-ahead log-likelihood of each window"
    guide = None  # no latent sites: SVI runs it with an empty guide (maximum likelihood)

    def __init__(
        self,
        context_length: int = 24,
        window: int | None = None,
        lags: Sequence[int] = (1,),
        period: int | None = None,
        hidden_features: int = 32,
        num_layers: int = 1,
        likelihood: str = "normal",
        loc: float = 0.0,
        scale: float = 1.0,
        weight_decay: float = 0.1,
        transform: str | None = None,
    ):
        super().__init__()
        lags = [lags] if isinstance(lags, int) else list(lags)
        if not lags or any(not isinstance(lag, int) or lag < 1 for lag in lags):
            raise ValueError(f"lags must be a non-empty list of ints >= 1, got {lags!r}")
        if not isinstance(context_length, int) or context_length <= max(lags):
            raise ValueError(f"context_length must be an int > the largest lag ({max(lags)}), got {context_length!r}")
        window = 2 * context_length if window is None else window
        if not isinstance(window, int) or window <= max(lags):
            raise ValueError(f"window must be an int > the largest lag ({max(lags)}), got {window!r}")
        if period is not None and (not isinstance(period, int) or period < 2):
            raise ValueError(f"period must be None or an int >= 2, got {period!r}")
        for arg, val in (("hidden_features", hidden_features), ("num_layers", num_layers)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(loc)):
            raise ValueError(f"loc must be finite and scale positive, got loc={loc!r}, scale={scale!r}")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        self.context_length, self.window, self.lags, self.period = context_length, window, lags, period
        self.hidden_features, self.num_layers, self.likelihood = hidden_features, num_layers, likelihood
        self.loc, self.scale = float(loc), float(scale)
        self.weight_decay, self.transform = float(weight_decay), transform
        self._untransform = untransform(transform)
        self.max_lag = max(lags)
        num_features = len(lags) + (2 if period else 0)
        self.rnn = nn.GRU(num_features, hidden_features, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_features, 3 if likelihood == "studentt" else 2)

    # -- zoo protocol ------------------------------------------------------------------------
    @classmethod
    def from_series(cls, series, **kwargs) -> DeepAR:
        """A model standardized to ``series`` (mean and standard deviation of its transformed values)."""
        series = _check_domain(check_series(series), kwargs.get("transform"), "series")
        inv = untransform(kwargs.get("transform"))
        u = series if inv is None else inv.inv(series)
        kwargs.setdefault("loc", float(u.mean()))
        kwargs.setdefault("scale", float(u.std().clamp_min(1e-6)))
        return cls(**kwargs)

    @classmethod
    def from_data(cls, data, **kwargs) -> DeepAR:
        return cls.from_series(data.x, **kwargs)

    def data_args(self, data) -> tuple:
        return self.windows(data.x)

    def windows(self, series, stride: int = 1, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """All length-``window`` slices of ``series`` and their start times (``start`` + offset):
        the training data ``(y, t0)`` for ``model``."""
        series = _check_domain(check_series(series), self.transform, "series")
        if len(series) < self.window:
            raise ValueError(f"series: expected at least window={self.window} values to train on, got {len(series)}")
        y = series.unfold(0, self.window, stride)
        t0 = start + torch.arange(0, len(series) - self.window + 1, stride)
        return y, t0

    # -- the network ---------------------------------------------------------------------------
    def _time_features(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.period:
            return []
        phase = 2 * math.pi * t / self.period
        return [phase.sin(), phase.cos()]

    def _output(self, h):
        """Distribution of the next (standardized) value from the GRU output."""
        out = self.head(h)
        loc, scale = out[..., 0], F.softplus(out[..., 1]) + 1e-3
        if self.likelihood == "studentt":
            d = dist.StudentT(2.0 + F.softplus(out[..., 2]), self.loc + self.scale * loc, self.scale * scale)
        else:
            d = dist.Normal(self.loc + self.scale * loc, self.scale * scale)
        return d if self._untransform is None else dist.TransformedDistribution(d, self._untransform)

    def _forward(self, y):
        """Series values on the modelled scale (the inverse of ``_untransform``)."""
        return y if self._untransform is None else self._untransform.inv(y)

    def _step(self, features, state):
        """One GRU step for inputs with any leading dims ``(..., F)`` and state ``(L, ..., H)``."""
        lead = features.shape[:-1]
        state = state.expand(self.num_layers, *lead, self.hidden_features)
        out, new = self.rnn(
            features.reshape(-1, 1, features.shape[-1]),
            state.reshape(self.num_layers, -1, self.hidden_features).contiguous(),
        )
        return out.reshape(*lead, self.hidden_features), new.reshape(self.num_layers, *lead, self.hidden_features)

    # -- Pyro program ----------------------------------------------------------------------------
    def model(self, y, t0=None, horizon: int = 0):
        """Score each window ``y`` (``(N, L)``) one step ahead, then sample ``horizon`` more values.

        Site ``"y"`` observes steps ``max_lag..L-1`` of each window; sites ``"y_L"``, ``"y_{L+1}"``
        ... are the future values, and ``"forecast"`` stacks them as ``(..., N, horizon)``.
        """
        pyro.module("deepar", self)
        p = self.head.weight
        y = check_data(y, "y", rank=2).to(p.device, p.dtype)
        N, L = y.shape
        if L <= self.max_lag:
            raise ValueError(f"y: windows must be longer than the largest lag ({self.max_lag}), got length {L}")
        t0 = torch.zeros(N, device=p.device) if t0 is None else torch.as_tensor(t0, device=p.device)
        if t0.shape != (N,):
            raise ValueError(f"t0: expected one start time per window, shape ({N},), got {tuple(t0.shape)}")
        t0 = t0.to(p.dtype)
        z = (self._forward(y) - self.loc) / self.scale
        m = self.max_lag
        steps = torch.arange(m, L, device=p.device, dtype=p.dtype)
        feats = torch.stack(
            [z[:, m - lag : L - lag] for lag in self.lags] + self._time_features(t0[:, None] + steps), -1
        )
        out, state = self.rnn(feats)
        with pyro.plate("data", N):
            if self.weight_decay:
                sq = sum((w.pow(2).sum() for name, w in self.named_parameters() if "bias" not in name), torch.zeros(()))
                pyro.factor("weight_decay", -0.5 * self.weight_decay * (L - m) * sq.expand(N))
            pyro.sample("y", self._output(out).to_event(1), obs=y[:, m:])
            if not horizon:
                return None
            hist = list(z.unbind(-1))
            future = []
            for s in range(horizon):
                t = L + s
                f = torch.broadcast_tensors(*[hist[t - lag] for lag in self.lags], *self._time_features(t0 + t))
                h, state = self._step(torch.stack(f, -1), state)
                value = pyro.sample(f"y_{t}", self._output(h))
                future.append(value)
                hist.append((self._forward(value) - self.loc) / self.scale)
            return pyro.deterministic("forecast", torch.stack(torch.broadcast_tensors(*future), -1))

    # -- forecasting and evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def forecast(self, history, horizon: int, num_samples: int = 200, start: int = 0) -> torch.Tensor:
        """``num_samples`` draws of the next ``horizon`` values after ``history`` (its last
        ``context_length`` values), shaped ``(num_samples, horizon)``; ``start`` is the time index of
        ``history[0]`` (for the seasonal phase)."""
        _check_horizon(horizon)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        history = _check_domain(check_series(history, "history"), self.transform, "history")
        if len(history) < self.context_length:
            raise ValueError(
                f"history: expected at least context_length={self.context_length} values, got {len(history)}"
            )
        ctx = history[-self.context_length :][None]
        t0 = torch.tensor([start + len(history) - self.context_length])
        predictive = Predictive(self.model, num_samples=num_samples, return_sites=["forecast"], parallel=True)
        return predictive(ctx, t0, horizon=horizon)["forecast"].reshape(num_samples, horizon)

    @torch.no_grad()
    def log_likelihood(self, y, t0=None) -> torch.Tensor:
        """Exact one-step-ahead log p(y_t | y_{<t}) in the series' units, summed over each window's
        scored steps (steps ``max_lag`` onwards); a whole series (``(T,)`` or ``(T, 1)``) counts as
        one window."""
        y = check_data(y, "y")
        if y.dim() == 1 or (y.dim() == 2 and y.shape[1] == 1):
            y = y.reshape(1, -1)
        if y.dim() != 2:
            raise ValueError(f"y: expected windows (N, L) or a series (T,), got shape {tuple(y.shape)}")
        _check_domain(y, self.transform, "y")
        tr = pyro.poutine.trace(self.model).get_trace(y, t0)
        likelihood = cast(dist.Distribution, tr.nodes["y"]["fn"])  # a sample site's fn is its distribution
        return likelihood.log_prob(tr.nodes["y"]["value"])

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` synthetic windows: start from the series mean (on the modelled scale) and roll on."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        seed = torch.full((1, self.context_length), self.loc)
        seed = seed if self._untransform is None else self._untransform(seed)
        draws = self.forecast(seed[0], self.window, num_samples=n)
        return draws


def backtest(
    series,
    make_model: Callable[[torch.Tensor], DeepAR],
    *,
    horizon: int,
    origins: Sequence[int],
    train: Callable[[DeepAR, torch.Tensor], object],
    period: int | None = None,
    ar_order: int | None = None,
    num_samples: int = 200,
) -> list[dict]:
    """Rolling-origin evaluation: for each origin T, build ``make_model(series[:T])``, train it on
    ``series[:T]`` (``train(model, train_series)``, e.g. SVI on ``model.windows(train_series)``), forecast
    ``series[T:T + horizon]`` and score it. Rows hold ``origin``, ``crps``, ``mae``; with
    ``period``, the seasonal-naive ``naive_mae`` (a point forecast: its CRPS is its MAE); with
    ``ar_order``, ``ar_mae`` and ``ar_crps`` of :func:`ar_forecast`."""
    series = check_series(series)
    _check_horizon(horizon)
    if ar_order is not None and (not isinstance(ar_order, int) or isinstance(ar_order, bool) or ar_order < 1):
        raise ValueError(f"ar_order must be None or a positive int, got {ar_order!r}")
    rows = []
    for origin in origins:
        if not isinstance(origin, int) or not 0 < origin <= len(series) - horizon:
            raise ValueError(f"origins: each origin must be an int in (0, {len(series) - horizon}], got {origin!r}")
        past, truth = series[:origin], series[origin : origin + horizon]
        model = make_model(past)
        if len(past) < model.context_length:
            raise ValueError(
                f"series: the history before origin {origin} is shorter than context_length={model.context_length}"
            )
        train(model, past)
        samples = model.forecast(past, horizon, num_samples=num_samples)
        row = {"origin": origin, "crps": crps(samples, truth), "mae": mae(samples, truth)}
        if period:
            row["naive_mae"] = float((seasonal_naive(past, horizon, period) - truth).abs().mean())
        if ar_order:
            ar = ar_forecast(past, horizon, ar_order, num_samples=num_samples)
            row["ar_mae"], row["ar_crps"] = mae(ar, truth), crps(ar, truth)
        rows.append(row)
    return rows
