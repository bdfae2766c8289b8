"""ArviZ conversion for every engine's Fit, with plate names as dims.

Draws come from the Fit (``samples``, shaped ``(chain, draw, ...)``, as samplers return them) or,
for optimized fits, from the guide via ``pyro.infer.Predictive``. The model is traced once on its
data to learn which plate each batch dimension belongs to; pointwise log-likelihoods of the
observed sites are added so ``az.loo``/``az.waic`` work on any engine's result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.util import site_is_subsample


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


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def samples_to_inference_data(
    model,
    samples: dict,
    args=(),
    kwargs=None,
    log_likelihood: bool = True,
    posterior_predictive: bool = False,
    max_draws_for_loglik: int = 200_000,
    sample_stats: dict | None = None,
) -> az.InferenceData:
    """Build InferenceData from draws ``{site: (chain, draw, ...)}`` of a Pyro ``model``.

    ``sample_stats`` (e.g. ``diverging``, ``acceptance_rate``, ``energy``, each ``(chain, draw)``)
    becomes the ``sample_stats`` group that ArviZ's divergence and energy plots read.
    """
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
    posterior = {k: _np(v) for k, v in samples.items()}
    observed = {n: s for n, s in _sample_sites(trace, observed=True).items()
                if n not in samples and not s["infer"].get("_deterministic")}
    deterministic = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n not in samples
                     and s["infer"].get("_deterministic")]
    if deterministic:
        posterior.update(deterministic_draws(model, samples, args, kwargs, deterministic))
    groups = {"posterior": posterior}
    if observed:
        groups["observed_data"] = {n: _np(s["value"]) for n, s in observed.items()}
    chains, draws = next(iter(samples.values())).shape[:2]
    if log_likelihood and observed and chains * draws <= max_draws_for_loglik:
        groups["log_likelihood"] = pointwise_log_likelihood(model, samples, args, kwargs, list(observed))
    if sample_stats:
        groups["sample_stats"] = {k: _np(v) for k, v in sample_stats.items()}
    if posterior_predictive and observed:
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in samples.items()}
        with torch.no_grad():
            # uncondition: the observed sites are drawn anew, not returned as the data
            pred = Predictive(poutine.uncondition(model), posterior_samples=flat,
                              return_sites=list(observed))(*args, **kwargs)
        groups["posterior_predictive"] = {
            n: _np(v).reshape(chains, draws, *observed[n]["value"].shape) for n, v in pred.items() if n in observed
        }
    # pointwise log-likelihoods drop the event dims of their site
    ll_dims = {}
    for n, site in observed.items():
        ev = getattr(site["fn"], "event_dim", 0)
        ll_dims[n] = dims[n][: len(dims[n]) - ev]
    return _from_groups(groups, dims, ll_dims, coords)


def pointwise_log_likelihood(model, samples: dict, args=(), kwargs=None, observed=(), chunk: int = 2000) -> dict:
    """``{site: (chain, draw, *batch)}`` log p(y_i | draw) of each observed site, per data point.

    Draws are evaluated ``chunk`` at a time in one model call under an outer plate; a model
    that does not broadcast over that plate is evaluated one draw at a time instead.
    """
    kwargs = kwargs or {}
    samples = {k: torch.as_tensor(v) for k, v in samples.items()}
    chains, draws = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape(chains * draws, *v.shape[2:]) for k, v in samples.items()}
    try:
        out = _batched_log_likelihood(model, flat, args, kwargs, observed, chunk)
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
    shapes = {n: trace_model(model, args, kwargs, condition={k: v[0] for k, v in flat.items()}).nodes[n]["value"].shape
              for n in names}
    with torch.no_grad():
        try:
            out = Predictive(model, posterior_samples=flat, return_sites=list(names), parallel=True)(*args, **kwargs)
            out = {n: v.reshape(chains * draws, *shapes[n]) for n, v in out.items()}
        except (ValueError, RuntimeError):
            out = Predictive(model, posterior_samples=flat, return_sites=list(names))(*args, **kwargs)
    return {n: _np(out[n]).reshape(chains, draws, *shapes[n]) for n in names}


def _observed_log_prob(site):
    return site["fn"].log_prob(site["value"])


def _looped_log_likelihood(model, flat, args, kwargs, observed):
    n = next(iter(flat.values())).shape[0]
    ll: dict[str, list[torch.Tensor]] = {o: [] for o in observed}
    for i in range(n):
        tr = trace_model(model, args, kwargs, condition={k: v[i] for k, v in flat.items()})
        for o in observed:
            ll[o].append(_np(_observed_log_prob(tr.nodes[o])))
    return {o: np.stack(v) for o, v in ll.items()}


def _batched_log_likelihood(model, flat, args, kwargs, observed, chunk):
    from ppdgm.logdensity import BatchedLogDensity

    first = {k: v[0] for k, v in flat.items()}
    single = trace_model(model, args, kwargs, condition=first)
    density = BatchedLogDensity(model, args, kwargs, trace=trace_model(model, args, kwargs))
    expect = {o: _observed_log_prob(single.nodes[o]) for o in observed}
    n = next(iter(flat.values())).shape[0]
    parts: dict[str, list[torch.Tensor]] = {o: [] for o in observed}
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
                parts[o].append(lp.expand(padded).reshape(m, *shape))
    out = {o: torch.cat(v) for o, v in parts.items()}
    for o in observed:  # the batched evaluation must agree with a plain run of the model
        if not torch.allclose(out[o][0], expect[o], rtol=1e-4, atol=1e-4):
            return None
    return {o: _np(v) for o, v in out.items()}


def _from_groups(groups, dims, ll_dims, coords):
    data = {}
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


def fit_to_inference_data(fit, num_samples: int = 500, log_likelihood: bool = True,
                          posterior_predictive: bool = False) -> az.InferenceData:
    """What ``Fit.to_arviz()`` returns (draws from ``fit.samples`` or from the guide)."""
    if fit.engine in ("pcd", "greedy"):
        return chain_energy_inference_data(fit)
    # a model with no posterior to draw from (a GAN, a score model, a flow or MADE fit by maximum
    # likelihood) but a sampler converts to its draws of the data
    drawable = callable(getattr(fit.module, "sample", None))
    if fit.model is None and not drawable:
        raise ValueError("this Fit has no model attached; pass model= (and guide=) to ppdgm.load")
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
        fit.model, samples, fit.args, fit.kwargs, log_likelihood=log_likelihood,
        posterior_predictive=posterior_predictive, sample_stats=stats,
    )


# ---------------------------------------------------------------------------------------------
# persistent chains (the PersistentCD engine)


def predictive_inference_data(fit, num_samples: int = 500) -> az.InferenceData:
    """A model without a posterior (a flow, MADE, GAN or score model) as its draws of the data:
    ``posterior_predictive.x`` shaped ``(1, num_samples, feature)``, beside ``observed_data.x``
    when the Fit holds its training data, so ``az.plot_ppc`` compares the two."""
    with torch.no_grad():
        draws = fit.module.sample(num_samples)
    dims = {"x": ["feature"]}
    groups = {"posterior_predictive": {"x": _np(draws)[None]}}
    observed = fit.args[0] if fit.args and torch.is_tensor(fit.args[0]) else None
    if observed is not None and observed.shape[1:] == draws.shape[1:]:
        groups["observed_data"] = {"x": _np(observed)}
    return az.from_dict(posterior_predictive=groups["posterior_predictive"], observed_data=groups.get("observed_data"),
                        dims=dims)


def chain_energy_inference_data(fit) -> az.InferenceData:
    """The energies of a persistent-CD run's recorded chains as ``posterior.chain_energy``
    shaped ``(chain, draw)``, so ``az.rhat``/``az.ess`` say whether the negative phase mixes."""
    if not fit.samples or "chain_energy" not in fit.samples:
        raise ValueError("this pcd Fit recorded no chain energies (the run took fewer steps than record_every)")
    energy = _np(fit.samples["chain_energy"])
    return az.from_dict(posterior={"chain_energy": energy})


# ---------------------------------------------------------------------------------------------
# amortized guides against HMC (posterior mismatch of a VAE-style encoder)


@dataclass
class AmortizationCheck:
    """Per chosen data point: how far the guide q(z | x) is from the HMC posterior p(z | x).

    ``gap`` = ``log_evidence - elbo`` estimates KL(q(z|x) || p(z|x)) in nats (amortization plus
    approximation gap; ``elbo_se`` is the Monte-Carlo standard error of the ELBO);
    ``log_evidence`` is an importance-sampling estimate of log p(x_i) whose proposal is a
    Gaussian fitted to the HMC draws mixed with the guide (``log_evidence_se`` its standard error);
    ``energy_distance`` compares the HMC and guide draws directly (0 when they agree).
    ``hmc_draws`` are ``(chain, draw, point, *event)``, ``guide_draws`` ``(draw, point, *event)``.
    """

    points: list
    latent: str
    elbo: torch.Tensor
    elbo_se: torch.Tensor
    iwae: torch.Tensor
    log_evidence: torch.Tensor
    log_evidence_se: torch.Tensor
    gap: torch.Tensor
    energy_distance: torch.Tensor
    hmc_draws: torch.Tensor
    guide_draws: torch.Tensor
    hmc_fit: object = None

    def summary(self) -> str:
        rows = [f"{'point':>6} {'ELBO':>10} {'IWAE':>10} {'log p(x)':>10} {'gap (nats)':>11} {'energy dist':>12}"]
        for i, p in enumerate(self.points):
            rows.append(f"{p:>6} {self.elbo[i]:>10.3f} {self.iwae[i]:>10.3f} {self.log_evidence[i]:>10.3f} "
                        f"{self.gap[i]:>11.3f} {self.energy_distance[i]:>12.4f}")
        rows.append(f"mean gap {self.gap.mean():.3f} nats over {len(self.points)} points")
        return "\n".join(rows)

    def to_arviz(self) -> dict:
        """``{"HMC": InferenceData, "guide": InferenceData}`` with dims ``(point, <latent>_dim)``."""
        coords = {"point": np.asarray(self.points)}
        dims = {self.latent: ["point"] + [f"{self.latent}_dim_{i}" for i in range(self.hmc_draws.dim() - 3)]}
        return {
            "HMC": az.from_dict(posterior={self.latent: _np(self.hmc_draws)}, coords=coords, dims=dims),
            "guide": az.from_dict(posterior={self.latent: _np(self.guide_draws)[None]}, coords=coords, dims=dims),
        }

    def plot(self, points=None, **kwargs):
        """Overlaid marginal densities of HMC and guide draws (``az.plot_density``) for ``points``."""
        data = self.to_arviz()
        sel = {"point": list(points if points is not None else self.points[:4])}
        return az.plot_density([data["HMC"].sel(**sel), data["guide"].sel(**sel)], data_labels=["HMC", "guide"],
                               shade=0.1, **kwargs)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Energy distance 2E|A-B| - E|A-A'| - E|B-B'| between samples ``(n, d)`` and ``(m, d)``."""
    a, b = a.double(), b.double()
    return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()


def amortized_posterior_check(
    model,
    guide,
    x: torch.Tensor,
    points=None,
    latent: str = "z",
    data_plate: str = "data",
    args=(),
    kwargs=None,
    num_chains: int = 32,
    num_warmup: int = 300,
    num_samples: int = 200,
    num_importance: int = 2000,
    max_draws_for_distance: int = 500,
    seed: int = 0,
    jit_compile: bool = True,
) -> AmortizationCheck:
    """Run HMC on ``latent | x_i`` for chosen points with the decoder (all params) fixed and compare
    with the amortized guide ``q(latent | x_i)``: ELBO, importance-sampled log-evidence and their
    gap per point, and the energy distance between the two sets of draws.

    ``model(x, *args, **kwargs)`` and ``guide(x, ...)`` must put ``latent`` inside the plate
    ``data_plate`` over the rows of ``x`` (as a VAE does). Other latent sites outside that plate
    are fixed at one guide draw. Both programs must broadcast over a batch dimension on the left.
    """
    from ppdgm.inference.chees import ChEES
    from ppdgm.logdensity import BatchedLogDensity

    kwargs = kwargs or {}
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of data points, got {type(x).__name__}")
    points = list(range(min(8, x.shape[0]))) if points is None else [int(p) for p in points]
    if not points or min(points) < 0 or max(points) >= x.shape[0]:
        raise ValueError(f"points: expected indices into the {x.shape[0]} rows of x, got {points}")
    x_sub = x[torch.as_tensor(points, device=x.device)]
    m = len(points)
    gtr = trace_model(guide, (x_sub, *args), kwargs)
    mtr = trace_model(poutine.replay(model, trace=gtr), (x_sub, *args), kwargs)
    if latent not in mtr.nodes or mtr.nodes[latent]["type"] != "sample" or mtr.nodes[latent]["is_observed"]:
        raise ValueError(f"latent: the model has no latent sample site {latent!r}")
    site = mtr.nodes[latent]
    frames = {f.name: f for f in site["cond_indep_stack"]}
    if data_plate not in frames:
        raise ValueError(f"latent: site {latent!r} is not inside the plate {data_plate!r} (its plates: {sorted(frames)})")
    support = site["fn"].support
    if getattr(support, "base_constraint", support) is not torch.distributions.constraints.real:
        raise ValueError(f"latent: site {latent!r} must have real support for the Gaussian proposal, got {site['fn'].support}")
    latents = {n for n, s in mtr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
               and not site_is_subsample(s)}
    local = {n for n in latents if any(f.name == data_plate for f in mtr.nodes[n]["cond_indep_stack"])}
    if local != {latent}:
        raise ValueError(f"latent: expected {latent!r} to be the only latent site in plate {data_plate!r}, found {sorted(local)}")
    fixed = {n: gtr.nodes[n]["value"] for n in latents - local if n in gtr.nodes}
    cond_model = poutine.condition(model, data=fixed) if fixed else model
    cond_guide = poutine.condition(guide, data=fixed) if fixed else guide
    plate_dim = frames[data_plate].dim
    event_shape = site["value"].shape[site["value"].dim() - site["fn"].event_dim:]
    if site["value"].dim() - site["fn"].event_dim != -plate_dim or site["value"].shape[0] != m:
        raise ValueError(f"latent: expected site {latent!r} shaped (points, *event) with plate {data_plate!r} "
                         f"leftmost, got shape {tuple(site['value'].shape)}")

    # HMC on latent | x_sub, every chain one batch
    hmc = ChEES(num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples, seed=seed,
                jit_compile=jit_compile, progress=False).run(cond_model, x_sub, *args, **kwargs)
    hmc_z = (hmc.samples or {})[latent]  # (chain, draw, m, *event)

    density = BatchedLogDensity(cond_model, (x_sub, *args), kwargs)
    nest = density.nesting

    def per_point(tr, names, k):
        """Sum of log densities of ``names`` per data point: ``(k, m)``."""
        total = 0.0
        for n in names:
            s = tr.nodes[n]
            lp = s["fn"].log_prob(s["value"])
            lp = lp.expand(k, *lp.shape[1:]) if lp.shape[0] == 1 else lp
            lp = lp.movedim(plate_dim, 1).reshape(k, m, -1).sum(-1)
            total = total + lp
        return total

    def model_lp(z):  # log p(x_i, z_i) for z (k, m, *event)
        k = z.shape[0]
        tr = density.trace({latent: z})
        names = [n for n, s in tr.nodes.items() if s["type"] == "sample" and n != density.plate_name
                 and not site_is_subsample(s) and any(f.name == data_plate for f in s["cond_indep_stack"])]
        return per_point(tr, names, k)

    def guide_trace(k, z=None):
        fn = poutine.condition(cond_guide, data={latent: z.reshape(k, *[1] * (nest + plate_dim), m, *event_shape)}) \
            if z is not None else cond_guide
        with poutine.block(), pyro.plate("_particles", k, dim=-(nest + 1)):
            return poutine.trace(fn).get_trace(x_sub, *args, **kwargs)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        k = num_importance
        gz = guide_trace(k).nodes[latent]["value"].reshape(k, m, *event_shape)
        log_q_g = per_point(guide_trace(k, gz), [latent], k)
        log_p_g = model_lp(gz)
        elbo = (log_p_g - log_q_g).mean(0)
        elbo_se = (log_p_g - log_q_g).std(0) / math.sqrt(k)
        iwae = torch.logsumexp(log_p_g - log_q_g, 0) - math.log(k)

        # proposal: 1/2 Gaussian fitted to the HMC draws (sd inflated 1.2x) + 1/2 guide (defensive mixture)
        flat = hmc_z.reshape(-1, m, *event_shape).flatten(2).transpose(0, 1).double()  # (m, S, d)
        mu = flat.mean(1)
        cov = torch.einsum("msi,msj->mij", flat - mu[:, None], flat - mu[:, None]) / (flat.shape[1] - 1)
        d = cov.shape[-1]
        cov = 1.44 * cov + 1e-6 * torch.eye(d, dtype=cov.dtype, device=cov.device)
        gauss = dist.MultivariateNormal(mu, covariance_matrix=cov)
        half = k // 2
        eps = torch.randn(half, m, d, generator=gen, dtype=cov.dtype).to(cov.device)
        zg = (mu + (gauss.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)).to(gz.dtype).reshape(half, m, *event_shape)
        z_all = torch.cat([zg, gz[:half]], 0)
        log_gauss = gauss.log_prob(z_all.reshape(2 * half, m, d).double()).to(gz.dtype)
        log_q_all = per_point(guide_trace(2 * half, z_all), [latent], 2 * half)
        log_r = torch.logaddexp(log_gauss, log_q_all) - math.log(2)
        log_w = model_lp(z_all) - log_r
        log_evidence = torch.logsumexp(log_w, 0) - math.log(2 * half)
        w = torch.exp(log_w - log_w.max(0).values)
        se = w.std(0) / (w.mean(0) * math.sqrt(2 * half))

        n_dist = max_draws_for_distance
        hz = flat.transpose(0, 1)  # (S, m, d)
        sel_h = hz[torch.linspace(0, hz.shape[0] - 1, min(n_dist, hz.shape[0])).long()]
        sel_g = gz.reshape(k, m, d)[:n_dist]
        ed = torch.stack([energy_distance(sel_h[:, i], sel_g[:, i]) for i in range(m)])
    return AmortizationCheck(
        points=points, latent=latent, elbo=elbo.cpu(), elbo_se=elbo_se.cpu(), iwae=iwae.cpu(), log_evidence=log_evidence.cpu(),
        log_evidence_se=se.cpu(), gap=(log_evidence - elbo).cpu(), energy_distance=ed.float().cpu(),
        hmc_draws=hmc_z.cpu(), guide_draws=gz.cpu(), hmc_fit=hmc,
    )


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
    return {k: v for k, v in guide_draws(fit.model, fit.guide, fit.args, fit.kwargs, num_samples).items()
            if k in names}


def per_point_summary(draws: dict) -> str:
    """One row per per-datapoint latent: how many points, and the spread over points of each
    point's posterior mean, standard deviation and (with several chains) R-hat."""
    rows = []
    for name, v in draws.items():
        v = v.detach().double()
        flat = v.reshape(v.shape[0], v.shape[1], v.shape[2], -1)  # chain, draw, point, element
        mean, sd = flat.mean((0, 1)), flat.std(1).mean(0) if flat.shape[1] > 1 else torch.zeros(flat.shape[2:])
        row = (f"{name:<12} points {flat.shape[2]:>6}  elements/point {flat.shape[3]:>4}  "
               f"posterior mean [{mean.min():.3g}, {mean.max():.3g}]  posterior sd median {sd.median():.3g} "
               f"[{sd.min():.3g}, {sd.max():.3g}]")
        if flat.shape[0] > 1 and flat.shape[1] > 3:
            rhat = az.rhat(az.convert_to_dataset({"x": _np(flat.reshape(*flat.shape[:2], -1))}))["x"].values
            row += f"  R-hat max {np.nanmax(rhat):.3f}, {np.mean(rhat > 1.01):.1%} of elements > 1.01"
        rows.append(row)
    return "\n".join(rows) + ("\n" if rows else "")
