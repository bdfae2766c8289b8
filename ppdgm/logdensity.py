"""The log density of a Pyro program, for one point or a batch of points, and the trace checks
every gradient-based sampler makes first.

This module sits low in the house: it imports Pyro and torch only, so models (e.g. the BNN's
posterior predictive) and engines (NUTS/HMC, ChEES, diagnostics) share it without importing one
another.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to


def prototype_trace(model, args=(), kwargs=None):
    """One validated run of ``model`` (parameters and latents drawn from the prior)."""
    with poutine.block(), torch.no_grad():
        return poutine.trace(model).get_trace(*args, **(kwargs or {}))


def latent_sites(trace) -> dict:
    """``{name: site}`` of the unobserved sample sites of ``trace`` (subsample sites left out)."""
    return {
        n: s
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }


def max_plate_nesting(trace) -> int:
    """How many batch dimensions the vectorized plates of ``trace`` use on the left."""
    dims = [
        f.dim
        for s in trace.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return -min(dims) if dims else 0


def check_continuous_latents(trace, allow_enumerated: bool) -> None:
    """Raise ValueError naming every discrete latent site HMC cannot move."""
    bad = []
    for name, site in latent_sites(trace).items():
        discrete = site["fn"].support.is_discrete or getattr(site["fn"], "has_enumerate_support", False)
        if discrete and not (allow_enumerated and site["infer"].get("enumerate")):
            bad.append(name)
    if bad:
        how = "mark them infer={'enumerate': 'parallel'} so NUTS/HMC sum them out, or " if allow_enumerated else ""
        raise ValueError(
            f"HMC needs continuous latent sites, but {bad} {'is' if len(bad) == 1 else 'are'} discrete "
            f"(support {latent_sites(trace)[bad[0]]['fn'].support}); {how}observe them, or marginalize them "
            "in the model"
        )


def nonfinite_sites(trace) -> dict:
    """``{site: log_prob sum}`` for sample sites (and factors) whose log density is not finite."""
    bad = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"])
        total = float(lp.sum()) if torch.is_tensor(lp) else float(lp)
        if not torch.isfinite(torch.tensor(total)):
            bad[name] = total
    return bad


@dataclass
class _Site:
    name: str
    shape: torch.Size  # one chain's value
    event_dim: int
    transform: torch.distributions.Transform
    ushape: torch.Size  # one chain's unconstrained value
    offset: int
    numel: int


class BatchedLogDensity:
    """log p(latents, data) of a Pyro model for a batch of latent values, in one model call.

    Values live in unconstrained space as rows of a ``(batch, dim)`` matrix; the model runs
    under an outer plate at dim ``-(max_plate_nesting + 1)`` with each site's constrained value
    padded to that depth, and the log-Jacobians of the transforms are added.
    """

    plate_name = "_chains"

    def __init__(self, model, args=(), kwargs=None, trace=None):
        self.model, self.args, self.kwargs = model, args, kwargs or {}
        trace = trace if trace is not None else prototype_trace(model, args, kwargs)
        self.nesting = max_plate_nesting(trace)
        self.sites, offset = [], 0
        for name, site in latent_sites(trace).items():
            value, fn = site["value"], site["fn"]
            t = biject_to(fn.support)
            ushape = torch.Size(t.inv.forward_shape(value.shape))
            numel = max(1, ushape.numel())
            self.sites.append(_Site(name, value.shape, fn.event_dim, t, ushape, offset, numel))
            offset += numel
        self.dim = offset
        self.dtype = (
            next(iter(latent_sites(trace).values()))["value"].dtype if self.sites else torch.get_default_dtype()
        )

    # -- unconstrained <-> constrained --------------------------------------------------------
    def split(self, u: torch.Tensor) -> dict:
        return {s.name: u[:, s.offset : s.offset + s.numel].reshape(u.shape[0], *s.ushape) for s in self.sites}

    def constrain(self, u: torch.Tensor) -> dict:
        """``{site: (batch, *site_shape)}`` constrained values."""
        return {s.name: s.transform(v) for s, v in zip(self.sites, self.split(u).values())}

    def unconstrain(self, values: dict) -> torch.Tensor:
        parts = [s.transform.inv(values[s.name]).reshape(values[s.name].shape[0], -1) for s in self.sites]
        return torch.cat(parts, dim=1)

    def pad(self, site: _Site, value: torch.Tensor) -> torch.Tensor:
        batch_ndim = len(site.shape) - site.event_dim
        return value.reshape(value.shape[0], *([1] * (self.nesting - batch_ndim)), *site.shape)

    # -- densities ----------------------------------------------------------------------------
    def trace(self, values: dict):
        """A trace of the model with ``values`` ``{site: (batch, *shape)}`` under the batch plate."""
        batch = next(iter(values.values())).shape[0]
        padded = {s.name: self.pad(s, values[s.name]) for s in self.sites if s.name in values}
        with poutine.block(), pyro.plate(self.plate_name, batch, dim=-(self.nesting + 1)):
            return poutine.trace(poutine.condition(self.model, data=padded)).get_trace(*self.args, **self.kwargs)

    def site_log_probs(self, tr, batch: int) -> dict:
        """``{site: (batch,)}`` summed log densities of every sample site of a batched trace."""
        out = {}
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or name == self.plate_name or site.get("is_subsample"):
                continue
            if type(site["fn"]).__name__ == "_Subsample":
                continue
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
            if not torch.is_tensor(lp) or lp.dim() == 0:
                lp = torch.as_tensor(lp, dtype=self.dtype).expand(batch)
            elif lp.dim() != self.nesting + 1 or lp.shape[0] not in (1, batch):
                raise ValueError(
                    f"site {name!r} has batch shape {tuple(lp.shape)} when {batch} draws run as an outer plate "
                    f"at dim {-(self.nesting + 1)}: the model does not broadcast over a batch dimension on its "
                    "left. Write it as for Predictive(parallel=True), e.g. (x * w).sum(-1) instead of x @ w"
                )
            out[name] = lp.reshape(lp.shape[0], -1).sum(1).expand(batch)
        return out

    def log_density(self, u: torch.Tensor, per_site: bool = False):
        """``(batch,)`` log joint density at unconstrained ``u`` (plus ``{site: (batch,)}`` terms)."""
        batch = u.shape[0]
        values, ladj = {}, u.new_zeros(batch)
        for s, v in zip(self.sites, self.split(u).values()):
            x = s.transform(v)
            values[s.name] = x
            j = s.transform.log_abs_det_jacobian(v, x)
            if torch.is_tensor(j) and j.dim() > 0:
                ladj = ladj + j.reshape(batch, -1).sum(1)
        terms = self.site_log_probs(self.trace(values), batch)
        total = ladj + sum(terms.values())
        return (total, terms) if per_site else total

    def compile(self, u: torch.Tensor) -> None:
        """Trace ``log_density`` with the PyTorch JIT for batches shaped like ``u`` (the model's
        Python then runs once; later calls replay the recorded tensor program)."""
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("ignore")
            self._jit = torch.jit.trace(self.log_density, (u.detach(),), check_trace=False)
        self._jit_shape = u.shape

    def potential_and_grad(self, u: torch.Tensor):
        """Potential ``-log density`` ``(batch,)`` and its gradient ``(batch, dim)``."""
        fn = self._jit if getattr(self, "_jit_shape", None) == u.shape else self.log_density
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            logp = fn(u)
            (grad,) = torch.autograd.grad(logp.sum(), u)
        return -logp.detach(), -grad
