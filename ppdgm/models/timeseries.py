"""A DeepAR-style recurrent forecaster as a Pyro program, with CRPS/MAE backtesting.

``DeepAR`` (Salinas et al. 2020) models a univariate series one step at a time: a GRU reads the
lagged values (``lags``, e.g. ``(1, 12)``) and, with ``period``, the phase of the season as
sin/cos features, and emits the location and scale of a Normal or Student-t for the next value.
Training is maximum likelihood on windows cut from the series (SVI with an empty guide: the
model has no latent sites). Forecasts are ancestral samples: the GRU reads the observed
context, then feeds its own draws back as lags; :meth:`DeepAR.forecast` runs the program under
``pyro.infer.Predictive`` (vectorized over samples) and returns draws of the future path, from
which predictive intervals are quantiles.

Values are standardized with the training series' mean and standard deviation (``loc``,
``scale``, kept in ``spec``), and likelihoods are reported in the series' own units.

Evaluation follows ``pyro.contrib.forecast``: :func:`crps` (continuous ranked probability
score of the sample forecast, via ``pyro.ops.stats.crps_empirical``), :func:`mae` of the
median forecast, and :func:`backtest`, which refits at each forecast origin and scores the next
``horizon`` values against the seasonal-naive forecast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from pyro.ops.stats import crps_empirical
from torch import nn
from torch.nn import functional as F

from ppdgm.data import check_data

LIKELIHOODS = ("normal", "studentt")


def check_series(series, name: str = "series") -> torch.Tensor:
    """A univariate series as a 1-D float tensor (``(T,)``, ``(T, 1)`` or ``(1, T)``)."""
    series = check_data(series, name)
    if series.dim() == 2 and 1 in series.shape:
        series = series.reshape(-1)
    if series.dim() != 1:
        raise ValueError(f"{name}: expected a univariate series of shape (T,), got shape {tuple(series.shape)}")
    return series


def load_sunspots() -> torch.Tensor:
    """Yearly mean sunspot numbers 1700-2008 (309 values) as shipped with ``statsmodels``."""
    try:
        from statsmodels.datasets import sunspots
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the sunspots series ships with statsmodels: pip install statsmodels") from err
    return torch.tensor(sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)


def seasonal_naive(history, horizon: int, period: int) -> torch.Tensor:
    """Repeat the last observed season: y_hat[T + s] = y[T + s - period * (s // period + 1)]."""
    history = check_series(history, "history")
    _check_horizon(horizon)
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive int, got {period!r}")
    if len(history) < period:
        raise ValueError(f"history: the seasonal-naive forecast needs at least period={period} values, got {len(history)}")
    T = len(history)
    return torch.stack([history[T + s - period * (s // period + 1)] for s in range(horizon)])


def crps(samples: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean continuous ranked probability score of sample forecasts ``(num_samples, ...)``."""
    return float(crps_empirical(samples, truth.to(samples)).mean())


def mae(samples: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean absolute error of the median of sample forecasts ``(num_samples, ...)``."""
    return float((samples.median(0).values - truth.to(samples)).abs().mean())


def _check_horizon(horizon):
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")


class DeepAR(nn.Module):
    """An autoregressive recurrent forecaster p(y_t | y_{<t}) of one series.

    Args:
        context: how many past values a forecast conditions on (and the minimum history).
        window: length of the training windows cut from the series (default ``2 * context``).
        lags: which past values feed each step (all >= 1, each < ``context``).
        period: season length; adds sin/cos of the phase as inputs (None: no seasonal features).
        hidden_dim, num_layers: GRU size.
        likelihood: ``"normal"`` or ``"studentt"`` (learned degrees of freedom > 2).
        loc, scale: standardization of the values (set by :meth:`from_series`).
    """

    default_engine = "svi"
    support = "real"
    likelihood_method = "exact one-step-ahead log-likelihood of each window"
    guide = None  # no latent sites: SVI runs it with an empty guide (maximum likelihood)

    def __init__(self, context: int = 24, window: int | None = None, lags: Sequence[int] = (1,),
                 period: int | None = None, hidden_dim: int = 32, num_layers: int = 1,
                 likelihood: str = "normal", loc: float = 0.0, scale: float = 1.0):
        super().__init__()
        lags = [lags] if isinstance(lags, int) else list(lags)
        if not lags or any(not isinstance(l, int) or l < 1 for l in lags):
            raise ValueError(f"lags must be a non-empty list of ints >= 1, got {lags!r}")
        if not isinstance(context, int) or context <= max(lags):
            raise ValueError(f"context must be an int > the largest lag ({max(lags)}), got {context!r}")
        window = 2 * context if window is None else window
        if not isinstance(window, int) or window <= max(lags):
            raise ValueError(f"window must be an int > the largest lag ({max(lags)}), got {window!r}")
        if period is not None and (not isinstance(period, int) or period < 2):
            raise ValueError(f"period must be None or an int >= 2, got {period!r}")
        for arg, val in (("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(loc)):
            raise ValueError(f"loc must be finite and scale positive, got loc={loc!r}, scale={scale!r}")
        self.context, self.window, self.lags, self.period = context, window, lags, period
        self.hidden_dim, self.num_layers, self.likelihood = hidden_dim, num_layers, likelihood
        self.loc, self.scale = float(loc), float(scale)
        self.max_lag = max(lags)
        num_features = len(lags) + (2 if period else 0)
        self.rnn = nn.GRU(num_features, hidden_dim, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_dim, 3 if likelihood == "studentt" else 2)

    # -- zoo protocol ------------------------------------------------------------------------
    @classmethod
    def from_series(cls, series, **kwargs) -> DeepAR:
        """A model standardized to ``series`` (its mean and standard deviation)."""
        series = check_series(series)
        kwargs.setdefault("loc", float(series.mean()))
        kwargs.setdefault("scale", float(series.std().clamp_min(1e-6)))
        return cls(**kwargs)

    @classmethod
    def from_data(cls, data, **kwargs) -> DeepAR:
        return cls.from_series(data.x, **kwargs)

    def data_args(self, data) -> tuple:
        return self.windows(data.x)

    @property
    def spec(self) -> dict:
        return {"name": "timeseries", "kwargs": {
            "context": self.context, "window": self.window, "lags": self.lags, "period": self.period,
            "hidden_dim": self.hidden_dim, "num_layers": self.num_layers, "likelihood": self.likelihood,
            "loc": self.loc, "scale": self.scale}}

    def windows(self, series, stride: int = 1, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """All length-``window`` slices of ``series`` and their start times (``start`` + offset):
        the training data ``(y, t0)`` for ``model``."""
        series = check_series(series)
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
            return dist.StudentT(2.0 + F.softplus(out[..., 2]), self.loc + self.scale * loc, self.scale * scale)
        return dist.Normal(self.loc + self.scale * loc, self.scale * scale)

    def _step(self, features, state):
        """One GRU step for inputs with any leading dims ``(..., F)`` and state ``(L, ..., H)``."""
        lead = features.shape[:-1]
        state = state.expand(self.num_layers, *lead, self.hidden_dim)
        out, new = self.rnn(features.reshape(-1, 1, features.shape[-1]),
                            state.reshape(self.num_layers, -1, self.hidden_dim).contiguous())
        return out.reshape(*lead, self.hidden_dim), new.reshape(self.num_layers, *lead, self.hidden_dim)

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
        z = (y - self.loc) / self.scale
        m = self.max_lag
        steps = torch.arange(m, L, device=p.device, dtype=p.dtype)
        feats = torch.stack([z[:, m - l : L - l] for l in self.lags]
                            + self._time_features(t0[:, None] + steps), -1)
        out, state = self.rnn(feats)
        with pyro.plate("data", N):
            pyro.sample("y", self._output(out).to_event(1), obs=y[:, m:])
            if not horizon:
                return None
            hist = list(z.unbind(-1))
            future = []
            for s in range(horizon):
                t = L + s
                f = torch.broadcast_tensors(*[hist[t - l] for l in self.lags], *self._time_features(t0 + t))
                h, state = self._step(torch.stack(f, -1), state)
                value = pyro.sample(f"y_{t}", self._output(h))
                future.append(value)
                hist.append((value - self.loc) / self.scale)
            return pyro.deterministic("forecast", torch.stack(torch.broadcast_tensors(*future), -1))

    # -- forecasting and evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def forecast(self, history, horizon: int, num_samples: int = 200, start: int = 0) -> torch.Tensor:
        """``num_samples`` draws of the next ``horizon`` values after ``history`` (its last
        ``context`` values), shaped ``(num_samples, horizon)``; ``start`` is the time index of
        ``history[0]`` (for the seasonal phase)."""
        _check_horizon(horizon)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        history = check_series(history, "history")
        if len(history) < self.context:
            raise ValueError(f"history: expected at least context={self.context} values, got {len(history)}")
        ctx = history[-self.context :][None]
        t0 = torch.tensor([start + len(history) - self.context])
        predictive = Predictive(self.model, num_samples=num_samples, return_sites=["forecast"], parallel=True)
        return predictive(ctx, t0, horizon=horizon)["forecast"].reshape(num_samples, horizon)

    @torch.no_grad()
    def log_likelihood(self, y, t0=None) -> torch.Tensor:
        """Exact one-step-ahead log p(y_t | y_{<t}) summed over each window's scored steps
        (steps ``max_lag`` onwards); a whole series (``(T,)`` or ``(T, 1)``) counts as one window."""
        y = check_data(y, "y")
        if y.dim() == 1 or (y.dim() == 2 and y.shape[1] == 1):
            y = y.reshape(1, -1)
        if y.dim() != 2:
            raise ValueError(f"y: expected windows (N, L) or a series (T,), got shape {tuple(y.shape)}")
        tr = pyro.poutine.trace(self.model).get_trace(y, t0)
        return tr.nodes["y"]["fn"].log_prob(tr.nodes["y"]["value"])

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` synthetic windows: start from the series mean for ``max_lag`` steps and roll on."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        seed = torch.full((1, self.context), self.loc)
        draws = self.forecast(seed[0], self.window, num_samples=n)
        return draws

    def fit(self, series, **svi_kwargs):
        """Maximum likelihood on the windows of ``series`` with :class:`ppdgm.inference.SVI`."""
        from ppdgm.inference.svi import SVI

        return SVI(**svi_kwargs).run(self.model, None, self.windows(series))


def backtest(series, make_model: Callable[[torch.Tensor], DeepAR], *, horizon: int, origins: Sequence[int],
             train: Callable[[DeepAR, torch.Tensor], object] | None = None, period: int | None = None,
             num_samples: int = 200) -> list[dict]:
    """Rolling-origin evaluation: for each origin T, build ``make_model(series[:T])``, train it on
    ``series[:T]`` (``train(model, train_series)``; default ``model.fit(train_series)``), forecast
    ``series[T:T + horizon]`` and score it. Rows hold ``origin``, ``crps``, ``mae`` and, with
    ``period``, the seasonal-naive ``naive_mae``."""
    series = check_series(series)
    _check_horizon(horizon)
    rows = []
    for origin in origins:
        if not isinstance(origin, int) or not 0 < origin <= len(series) - horizon:
            raise ValueError(f"origins: each origin must be an int in (0, {len(series) - horizon}], got {origin!r}")
        past, truth = series[:origin], series[origin : origin + horizon]
        model = make_model(past)
        if len(past) < model.context:
            raise ValueError(f"series: the history before origin {origin} is shorter than context={model.context}")
        (train or (lambda m, s: m.fit(s)))(model, past)
        samples = model.forecast(past, horizon, num_samples=num_samples)
        row = {"origin": origin, "crps": crps(samples, truth), "mae": mae(samples, truth)}
        if period:
            row["naive_mae"] = float((seasonal_naive(past, horizon, period) - truth).abs().mean())
        rows.append(row)
    return rows
