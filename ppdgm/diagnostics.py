"""ArviZ conversion for every engine's Fit, with plate names as dims.

Draws come from the Fit (``samples``, shaped ``(chain, draw, ...)``, as samplers return them) or,
for optimized fits, from the guide via ``pyro.infer.Predictive``. The model is traced once on its
data to learn which plate each batch dimension belongs to; pointwise log-likelihoods of the
observed sites are added so ``az.loo``/``az.waic`` work on any engine's result.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.util import site_is_subsample

if TYPE_CHECKING:
    import arviz as az

# the pointwise log-likelihood is chains x draws x data points: above this it is skipped, with a warning
LOG_LIKELIHOOD_MAX_BYTES = 1 << 30
# draws evaluated per model call hold at most this many bytes of log-likelihood values
LOG_LIKELIHOOD_CHUNK_BYTES = 1 << 28


def trace_model(model, args=(), kwargs=None, condition: dict | None = None):
    """Run ``model`` once, with the latent sites in ``condition`` set to the given values.

    (``poutine.substitute`` only replaces params, so conditioning is what sets latents; the
    conditioned sites are then marked latent again so they are not reported as observed.)
    """
    kwargs = kwargs or {}
    fn = poutine.condition(model, data=condition) if condition else model
    with poutine.block(), torch.no_grad():
        tr = poutine.trace(fn).get_trace(*args, **kwargs)
    for name in condition or ():
        if name in tr.nodes and tr.nodes[name]["type"] == "sample":
            tr.nodes[name]["is_observed"] = False
    return tr


def site_dims(site) -> list[str]:
    """Names for each dimension of a site's value: plate names for batch dims, else positional."""
    value = site["value"]
    # pyro.deterministic makes every dim an event dim; its plates still name them
    event_dim = 0 if site["infer"].get("_deterministic") else getattr(site["fn"], "event_dim", 0)
    batch_ndim = value.dim() - event_dim
    by_dim = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
    names = []
    for i in range(value.dim()):
        d = i - batch_ndim
        names.append(by_dim.get(d, f"{site['name']}_dim_{i}") if i < batch_ndim else f"{site['name']}_dim_{i}")
    return names


def _sample_sites(trace, observed: bool):
    return {
        n: s
        for n, s in trace.nodes.items()
        if s["type"] == "sample"
        and bool(s["is_observed"]) == observed
        and not s["infer"].get("is_auxiliary")
        and not site_is_subsample(s)
    }


def to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def samples_to_inference_data(
    model,
    samples: dict,
    args=(),
    kwargs=None,
    log_likelihood: bool = True,
    posterior_predictive: bool = False,
    sample_stats: dict | None = None,
    log_likelihood_max_bytes: int = LOG_LIKELIHOOD_MAX_BYTES,
    log_likelihood_chunk_bytes: int = LOG_LIKELIHOOD_CHUNK_BYTES,
) -> az.InferenceData:
    """Build InferenceData from draws ``{site: (chain, draw, ...)}`` of a Pyro ``model``.

    ``sample_stats`` (e.g. ``diverging``, ``acceptance_rate``, ``energy``, each ``(chain, draw)``)
    becomes the ``sample_stats`` group that ArviZ's divergence and energy plots read.

    The ``log_likelihood`` group holds chains x draws x data points values: when that is more
    than ``log_likelihood_max_bytes`` (1 GiB) it is left out with a warning saying how to get it,
    and it is computed ``log_likelihood_chunk_bytes`` (256 MiB) of values at a time, so the
    memory it takes is the result's plus one chunk's (and the model's own intermediates for it).
    """
    for arg, val in (
        ("log_likelihood_max_bytes", log_likelihood_max_bytes),
        ("log_likelihood_chunk_bytes", log_likelihood_chunk_bytes),
    ):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{arg} must be a positive int (bytes), got {val!r}")
    kwargs = kwargs or {}
    samples = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in samples.items()}
    first = {k: v[0, 0] for k, v in samples.items()}
    trace = trace_model(model, args, kwargs, condition=first)
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        dims[name] = site_dims(site)
        for f in site["cond_indep_stack"]:
            if f.vectorized:
                coords.setdefault(f.name, np.arange(f.size))
    posterior = {k: to_numpy(v) for k, v in samples.items()}
    observed = {
        n: s
        for n, s in _sample_sites(trace, observed=True).items()
        if n not in samples and not s["infer"].get("_deterministic")
    }
    deterministic = [
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and n not in samples and s["infer"].get("_deterministic")
    ]
    if deterministic:
        posterior.update(deterministic_draws(model, samples, args, kwargs, deterministic))
    groups = {"posterior": posterior}
    if observed:
        groups["observed_data"] = {n: to_numpy(s["value"]) for n, s in observed.items()}
    chains, draws = next(iter(samples.values())).shape[:2]
    if log_likelihood and observed:
        size = chains * draws * log_likelihood_bytes_per_draw(observed.values())
        if size <= log_likelihood_max_bytes:
            groups["log_likelihood"] = pointwise_log_likelihood(
                model, samples, args, kwargs, list(observed), chunk_bytes=log_likelihood_chunk_bytes
            )
        else:
            warnings.warn(
                f"log_likelihood group left out: {chains} chains x {draws} draws of the pointwise "
                f"log-likelihood of {sorted(observed)} take {size / 2**20:,.0f} MiB, more than "
                f"log_likelihood_max_bytes={log_likelihood_max_bytes:,} ({log_likelihood_max_bytes / 2**20:,.0f} MiB); "
                f"pass to_arviz(log_likelihood_max_bytes={size}) to compute it anyway, or convert fewer "
                f"draws (e.g. every k-th: {{site: v[:, ::k]}})",
                stacklevel=2,
            )
    if sample_stats:
        groups["sample_stats"] = {k: to_numpy(v) for k, v in sample_stats.items()}
    if posterior_predictive and observed:
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in samples.items()}
        with torch.no_grad():
            # uncondition: the observed sites are drawn anew, not returned as the data
            pred = Predictive(poutine.uncondition(model), posterior_samples=flat, return_sites=list(observed))(
                *args, **kwargs
            )
        groups["posterior_predictive"] = {
            n: to_numpy(v).reshape(chains, draws, *observed[n]["value"].shape) for n, v in pred.items() if n in observed
        }
    # pointwise log-likelihoods drop the event dims of their site
    ll_dims = {}
    for n, site in observed.items():
        ev = getattr(site["fn"], "event_dim", 0)
        ll_dims[n] = dims[n][: len(dims[n]) - ev]
    return _from_groups(groups, dims, ll_dims, coords)


def log_likelihood_bytes_per_draw(sites) -> int:
    """Bytes of one draw's pointwise log-likelihood of the observed ``sites`` (of a trace)."""
    return sum(_observed_log_prob(s).numel() * _observed_log_prob(s).element_size() for s in sites)


def pointwise_log_likelihood(
    model, samples: dict, args=(), kwargs=None, observed=(), chunk_bytes: int = LOG_LIKELIHOOD_CHUNK_BYTES
) -> dict:
    """``{site: (chain, draw, *batch)}`` log p(y_i | draw) of each observed site, per data point.

    Draws are evaluated in one model call per chunk under an outer plate, as many per chunk as
    keep its log-likelihood values within ``chunk_bytes``, and written into the preallocated
    result; a model that does not broadcast over that plate is evaluated one draw at a time.
    """
    kwargs = kwargs or {}
    samples = {k: torch.as_tensor(v) for k, v in samples.items()}
    chains, draws = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape(chains * draws, *v.shape[2:]) for k, v in samples.items()}
    try:
        out = _batched_log_likelihood(model, flat, args, kwargs, observed, chunk_bytes)
    except (ValueError, RuntimeError, IndexError):
        out = None
    if out is None:
        out = _looped_log_likelihood(model, flat, args, kwargs, observed)
    return {n: v.reshape(chains, draws, *v.shape[1:]) for n, v in out.items()}


def deterministic_draws(model, samples: dict, args=(), kwargs=None, names=()) -> dict:
    """``{name: (chain, draw, ...)}`` values of ``pyro.deterministic`` sites at each draw."""
    kwargs = kwargs or {}
    chains, draws = next(iter(samples.values())).shape[:2]
    flat = {k: torch.as_tensor(v).reshape(chains * draws, *v.shape[2:]) for k, v in samples.items()}
    shapes = {
        n: trace_model(model, args, kwargs, condition={k: v[0] for k, v in flat.items()}).nodes[n]["value"].shape
        for n in names
    }
    with torch.no_grad():
        try:
            out = Predictive(model, posterior_samples=flat, return_sites=list(names), parallel=True)(*args, **kwargs)
            out = {n: v.reshape(chains * draws, *shapes[n]) for n, v in out.items()}
        except (ValueError, RuntimeError):
            out = Predictive(model, posterior_samples=flat, return_sites=list(names))(*args, **kwargs)
    return {n: to_numpy(out[n]).reshape(chains, draws, *shapes[n]) for n in names}


def _observed_log_prob(site):
    return site["fn"].log_prob(site["value"])


def _looped_log_likelihood(model, flat, args, kwargs, observed):
    n = next(iter(flat.values())).shape[0]
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        tr = trace_model(model, args, kwargs, condition={k: v[i] for k, v in flat.items()})
        for o in observed:
            lp = to_numpy(_observed_log_prob(tr.nodes[o]))
            if o not in out:
                out[o] = np.empty((n, *lp.shape), dtype=lp.dtype)
            out[o][i] = lp
    return out


def _batched_log_likelihood(model, flat, args, kwargs, observed, chunk_bytes):
    from ppdgm.logdensity import BatchedLogDensity

    first = {k: v[0] for k, v in flat.items()}
    single = trace_model(model, args, kwargs, condition=first)
    density = BatchedLogDensity(model, args, kwargs, trace=trace_model(model, args, kwargs))
    expect = {o: _observed_log_prob(single.nodes[o]) for o in observed}
    chunk = max(1, chunk_bytes // max(log_likelihood_bytes_per_draw(single.nodes[o] for o in observed), 1))
    n = next(iter(flat.values())).shape[0]
    out = {o: np.empty((n, *e.shape), dtype=to_numpy(e).dtype) for o, e in expect.items()}
    with torch.no_grad(), pyro.validation_enabled(False):
        for start in range(0, n, chunk):
            values = {k: v[start : start + chunk] for k, v in flat.items()}
            m = next(iter(values.values())).shape[0]
            tr = density.trace(values)
            for o in observed:
                lp = _observed_log_prob(tr.nodes[o])
                shape = expect[o].shape
                padded = (m, *([1] * (density.nesting - len(shape))), *shape)
                if lp.dim() != len(padded):
                    return None
                out[o][start : start + m] = to_numpy(lp.expand(padded).reshape(m, *shape))
    for o in observed:  # the batched evaluation must agree with a plain run of the model
        if not np.allclose(out[o][0], to_numpy(expect[o]), rtol=1e-4, atol=1e-4):
            return None
    return out


@contextlib.contextmanager
def chain_draw_layout():
    """Silences ArviZ's "More chains than draws" guess: ppdgm's draws are always shaped
    ``(chain, draw, ...)``, so a short run of many chains (ChEES, 32 x 10) is not a transposed array."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"More chains \(\d+\) than draws", category=UserWarning)
        yield


def posterior_data(posterior: dict, **kwargs) -> az.InferenceData:
    """``az.from_dict(posterior=...)`` of draws shaped ``(chain, draw, ...)`` (tensors or arrays),
    under :func:`chain_draw_layout`."""
    import arviz as az  # seconds to import: only where an InferenceData is made

    with chain_draw_layout():
        return az.from_dict(posterior={k: to_numpy(v) for k, v in posterior.items()}, **kwargs)


def _from_groups(groups, dims, ll_dims, coords):
    import arviz as az  # seconds to import: only where an InferenceData is made

    data = {}
    with chain_draw_layout():
        for group, values in groups.items():
            gd = ll_dims if group == "log_likelihood" else dims
            data[group] = az.dict_to_dataset(
                values,
                dims={k: gd[k] for k in values if k in gd},
                coords=coords,
                library=pyro,
                default_dims=[] if group == "observed_data" else None,
            )
    return az.InferenceData(**data)


def guide_draws(model, guide, args=(), kwargs=None, num_samples: int = 500) -> dict:
    """Posterior draws ``{site: (1, num_samples, ...)}`` of the model's latents from the guide."""
    kwargs = kwargs or {}
    tr = trace_model(model, args, kwargs)
    shapes = {n: s["value"].shape for n, s in _sample_sites(tr, observed=False).items()}
    with torch.no_grad():
        pred = Predictive(model, guide=guide, num_samples=num_samples, return_sites=list(shapes))(*args, **kwargs)
    # Predictive may pad draws with singleton plate dims; give each site the model's own shape
    return {k: v.reshape(1, num_samples, *shapes[k]) for k, v in pred.items() if k in shapes}


def _check_data_given(fit) -> None:
    """The model's required arguments must be in ``fit.args``/``fit.kwargs``: a Fit read back by
    ``ppdgm.load`` from a Python-API run has no data (none is saved), and running the model without
    it fails deep inside Pyro."""
    try:
        params = list(inspect.signature(fit.model).parameters.values())
    except (TypeError, ValueError):  # a callable inspect cannot read: let the model speak
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    missing = [
        p.name
        for i, p in enumerate(params)
        if p.kind in positional and p.default is p.empty and i >= len(fit.args) and p.name not in fit.kwargs
    ]
    if missing:
        raise ValueError(
            f"to_arviz: the model takes {missing} but this Fit holds no data for them (a saved Fit keeps "
            f"none): set fit.args = (...) to the data it was fit on, then convert"
        )


def fit_to_inference_data(
    fit,
    num_samples: int = 500,
    log_likelihood: bool = True,
    posterior_predictive: bool = False,
    log_likelihood_max_bytes: int = LOG_LIKELIHOOD_MAX_BYTES,
    log_likelihood_chunk_bytes: int = LOG_LIKELIHOOD_CHUNK_BYTES,
) -> az.InferenceData:
    """What ``Fit.to_arviz()`` returns (draws from ``fit.samples`` or from the guide); the
    ``log_likelihood_*`` caps are :func:`samples_to_inference_data`'s."""

    if fit.engine in ("pcd", "greedy"):
        return chain_energy_inference_data(fit)
    # a model with no posterior to draw from (a GAN, a score model, a flow or MADE fit by maximum
    # likelihood) but a sampler converts to its draws of the data
    drawable = callable(getattr(fit.module, "sample", None))
    if fit.model is None and not drawable:
        raise ValueError("this Fit has no model attached; pass model= (and guide=) to ppdgm.load")
    if fit.model is not None and (fit.samples or fit.guide is not None):
        _check_data_given(fit)  # both ways below run the model on the fit's data
    if fit.samples and fit.model is not None:
        samples = fit.samples
    elif fit.guide is not None and fit.model is not None:
        fit.restore()
        samples = guide_draws(fit.model, fit.guide, fit.args, fit.kwargs, num_samples)
    elif drawable:
        return predictive_inference_data(fit, num_samples)
    else:
        raise ValueError(f"this {fit.engine} Fit holds neither draws nor a guide to draw from")
    if not samples:
        if drawable:
            return predictive_inference_data(fit, num_samples)
        raise ValueError("the model has no latent sites: there is no posterior to convert")
    stats = (fit.extra.get("tensors") or {}).get("sample_stats") if fit.samples else None
    return samples_to_inference_data(
        fit.model,
        samples,
        fit.args,
        fit.kwargs,
        log_likelihood=log_likelihood,
        posterior_predictive=posterior_predictive,
        sample_stats=stats,
        log_likelihood_max_bytes=log_likelihood_max_bytes,
        log_likelihood_chunk_bytes=log_likelihood_chunk_bytes,
    )


# ---------------------------------------------------------------------------------------------
# persistent chains (the PersistentCD engine)


def predictive_inference_data(fit, num_samples: int = 500) -> az.InferenceData:
    """A model without a posterior (a flow, MADE, GAN or score model) as its draws of the data:
    ``posterior_predictive.x`` shaped ``(1, num_samples, feature)``, beside ``observed_data.x``
    when the Fit holds its training data, so ``az.plot_ppc`` compares the two."""
    import arviz as az  # seconds to import: only where an InferenceData is made

    with torch.no_grad():
        draws = fit.module.sample(num_samples)
    dims = {"x": ["feature"]}
    groups = {"posterior_predictive": {"x": to_numpy(draws)[None]}}
    observed = fit.args[0] if fit.args and torch.is_tensor(fit.args[0]) else None
    if observed is not None and observed.shape[1:] == draws.shape[1:]:
        groups["observed_data"] = {"x": to_numpy(observed)}
    return az.from_dict(
        posterior_predictive=groups["posterior_predictive"], observed_data=groups.get("observed_data"), dims=dims
    )


def chain_energy_inference_data(fit) -> az.InferenceData:
    """The energies of a persistent-CD run's recorded chains as ``posterior.chain_energy``
    shaped ``(chain, draw)``, so ``az.rhat``/``az.ess`` say whether the negative phase mixes."""
    if not fit.samples or "chain_energy" not in fit.samples:
        raise ValueError("this pcd Fit recorded no chain energies (the run took fewer steps than record_every)")
    return posterior_data({"chain_energy": fit.samples["chain_energy"]})


# ---------------------------------------------------------------------------------------------
# what a user diagnoses: global latents in full, per-datapoint latents summarized per point


def split_latents(fit) -> tuple[list[str], list[str]]:
    """The fit's latent sites as ``(global, per_datapoint)``: a site is per-datapoint when a plate
    over it is as large as the data (so its draws grow with the data set)."""
    if fit.model is None:
        return [], []
    condition = {k: v[0, 0] for k, v in fit.samples.items()} if fit.samples else None
    fit.restore()
    tr = trace_model(fit.model, fit.args, fit.kwargs, condition=condition)
    n = len(fit.args[0]) if fit.args and torch.is_tensor(fit.args[0]) else None
    global_: list[str] = []
    local: list[str] = []
    for name, site in _sample_sites(tr, observed=False).items():
        per_point = n is not None and any(f.size == n for f in site["cond_indep_stack"])
        (local if per_point else global_).append(name)
    return global_, local


def latent_draws(fit, names, num_samples: int = 200) -> dict:
    """``{site: (chain, draw, ...)}`` of the named latents: the sampler's draws or the guide's."""
    if fit.samples:
        return {k: v for k, v in fit.samples.items() if k in names}
    if fit.guide is None or not names:
        return {}
    fit.restore()
    return {k: v for k, v in guide_draws(fit.model, fit.guide, fit.args, fit.kwargs, num_samples).items() if k in names}


def per_point_summary(draws: dict) -> str:
    """One row per per-datapoint latent: how many points, and the spread over points of each
    point's posterior mean, standard deviation and (with several chains) R-hat."""
    import arviz as az  # seconds to import: only where an InferenceData is made

    rows = []
    for name, v in draws.items():
        v = v.detach().double()
        flat = v.reshape(v.shape[0], v.shape[1], v.shape[2], -1)  # chain, draw, point, element
        mean, sd = flat.mean((0, 1)), flat.std(1).mean(0) if flat.shape[1] > 1 else torch.zeros(flat.shape[2:])
        row = (
            f"{name:<12} points {flat.shape[2]:>6}  elements/point {flat.shape[3]:>4}  "
            f"posterior mean [{mean.min():.3g}, {mean.max():.3g}]  posterior sd median {sd.median():.3g} "
            f"[{sd.min():.3g}, {sd.max():.3g}]"
        )
        if flat.shape[0] > 1 and flat.shape[1] > 3:
            rhat = az.rhat(posterior_data({"x": flat.reshape(*flat.shape[:2], -1)}))["x"].values
            row += f"  R-hat max {np.nanmax(rhat):.3f}, {np.mean(rhat > 1.01):.1%} of elements > 1.01"
        rows.append(row)
    return "\n".join(rows) + ("\n" if rows else "")
