"""Amortized guides against HMC: how far a VAE-style encoder q(z | x) is from the posterior p(z | x).

The check runs the vectorized sampler on chosen data points and compares its draws with the
guide's (a gap in nats and an energy distance). It lives apart from :mod:`ppdgm.diagnostics`
because it runs an engine, and ArviZ conversion (which every Fit calls) must not import engines.
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
from pyro.poutine.util import site_is_subsample

from ppdgm.diagnostics import posterior_data, trace_model


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
            rows.append(
                f"{p:>6} {self.elbo[i]:>10.3f} {self.iwae[i]:>10.3f} {self.log_evidence[i]:>10.3f} "
                f"{self.gap[i]:>11.3f} {self.energy_distance[i]:>12.4f}"
            )
        rows.append(f"mean gap {self.gap.mean():.3f} nats over {len(self.points)} points")
        return "\n".join(rows)

    def to_arviz(self) -> dict:
        """``{"HMC": InferenceData, "guide": InferenceData}`` with dims ``(point, <latent>_dim)``."""
        coords = {"point": np.asarray(self.points)}
        dims = {self.latent: ["point"] + [f"{self.latent}_dim_{i}" for i in range(self.hmc_draws.dim() - 3)]}
        return {
            "HMC": posterior_data({self.latent: self.hmc_draws}, coords=coords, dims=dims),
            "guide": posterior_data({self.latent: self.guide_draws[None]}, coords=coords, dims=dims),
        }

    def plot(self, points=None, **kwargs):
        """Overlaid marginal densities of HMC and guide draws (``az.plot_density``) for ``points``."""
        data = self.to_arviz()
        sel = {"point": list(points if points is not None else self.points[:4])}
        return az.plot_density(
            [data["HMC"].sel(**sel), data["guide"].sel(**sel)], data_labels=["HMC", "guide"], shade=0.1, **kwargs
        )


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
        raise ValueError(
            f"latent: site {latent!r} is not inside the plate {data_plate!r} (its plates: {sorted(frames)})"
        )
    support = site["fn"].support
    if getattr(support, "base_constraint", support) is not torch.distributions.constraints.real:
        raise ValueError(
            f"latent: site {latent!r} must have real support for the Gaussian proposal, got {site['fn'].support}"
        )
    latents = {
        n for n, s in mtr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }
    local = {n for n in latents if any(f.name == data_plate for f in mtr.nodes[n]["cond_indep_stack"])}
    if local != {latent}:
        raise ValueError(
            f"latent: expected {latent!r} to be the only latent site in plate {data_plate!r}, found {sorted(local)}"
        )
    fixed = {n: gtr.nodes[n]["value"] for n in latents - local if n in gtr.nodes}
    cond_model = poutine.condition(model, data=fixed) if fixed else model
    cond_guide = poutine.condition(guide, data=fixed) if fixed else guide
    plate_dim = frames[data_plate].dim
    event_shape = site["value"].shape[site["value"].dim() - site["fn"].event_dim :]
    if site["value"].dim() - site["fn"].event_dim != -plate_dim or site["value"].shape[0] != m:
        raise ValueError(
            f"latent: expected site {latent!r} shaped (points, *event) with plate {data_plate!r} "
            f"leftmost, got shape {tuple(site['value'].shape)}"
        )

    # HMC on latent | x_sub, every chain one batch
    hmc = ChEES(
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        seed=seed,
        jit_compile=jit_compile,
        progress=False,
    ).run(cond_model, x_sub, *args, **kwargs)
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
        names = [
            n
            for n, s in tr.nodes.items()
            if s["type"] == "sample"
            and n != density.plate_name
            and not site_is_subsample(s)
            and any(f.name == data_plate for f in s["cond_indep_stack"])
        ]
        return per_point(tr, names, k)

    def guide_trace(k, z=None):
        fn = (
            poutine.condition(cond_guide, data={latent: z.reshape(k, *[1] * (nest + plate_dim), m, *event_shape)})
            if z is not None
            else cond_guide
        )
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
        points=points,
        latent=latent,
        elbo=elbo.cpu(),
        elbo_se=elbo_se.cpu(),
        iwae=iwae.cpu(),
        log_evidence=log_evidence.cpu(),
        log_evidence_se=se.cpu(),
        gap=(log_evidence - elbo).cpu(),
        energy_distance=ed.float().cpu(),
        hmc_draws=hmc_z.cpu(),
        guide_draws=gz.cpu(),
        hmc_fit=hmc,
    )
