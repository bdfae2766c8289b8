"""The log density of a Pyro program, for one point or a batch of points, and the trace checks
every gradient-based sampler makes first.

This module sits low in the house: it imports Pyro and torch only, so models (e.g. the BNN's
posterior predictive) and engines (NUTS/HMC, ChEES, diagnostics) share it without importing one
another.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.ops.integrator import _EXCEPTION_HANDLERS
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to


def prototype_trace(model, args=(), kwargs=None, tries: int = 100):
    """One validated run of ``model`` (parameters and latents drawn from the prior); a draw where
    the model raises a numerical error (:func:`is_numerical_error`) is drawn again."""
    for _ in range(tries - 1):
        try:
            with poutine.block(), torch.no_grad():
                return poutine.trace(model).get_trace(*args, **(kwargs or {}))
        except Exception as e:
            if not is_numerical_error(e):
                raise
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


def batch_dims_declared(trace) -> bool:
    """Whether every batch dimension of every sample site's log density belongs to a vectorized
    plate (then the chains can run as one more plate on the left of them)."""
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"])
        plates = {f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
        shape = lp.shape if torch.is_tensor(lp) else ()
        if any(size != 1 and d - len(shape) not in plates for d, size in enumerate(shape)):
            return False
    return True


def is_numerical_error(error: Exception) -> bool:
    """An error Pyro's HMC turns into an infinite potential (``pyro.ops.integrator``'s registry:
    e.g. the Cholesky factor of a covariance that is not positive-definite)."""
    return any(handles(error) for handles in _EXCEPTION_HANDLERS.values())


class BatchedLogDensity:
    """log p(latents, data) of a Pyro model for a batch of latent values.

    Values live in unconstrained space as rows of a ``(batch, dim)`` matrix, and the log-Jacobians
    of the transforms are added. The batch is evaluated one of three ways, chosen at the first
    call by checking two rows against a plain run of the model:

    - ``"plate"``: one model call under an outer plate at dim ``-(max_plate_nesting + 1)``, each
      site's constrained value padded to that depth (the fastest; needs every batch dimension
      declared by a plate and a model that broadcasts over a dimension on its left);
    - ``"vmap"``: ``torch.func.vmap`` over one chain's log density, whatever the model's shapes
      (needs no Python control flow on the values);
    - ``"loop"``: one model call per row.

    A numerical error of one row (:func:`is_numerical_error`) gives that row an infinite potential
    and leaves the others' values alone.
    """

    plate_name = "_chains"
    paths = ("plate", "vmap", "loop")

    def __init__(self, model, args=(), kwargs=None, trace=None):
        self.model, self.args, self.kwargs = model, args, kwargs or {}
        trace = trace if trace is not None else prototype_trace(model, args, kwargs)
        self.nesting = max_plate_nesting(trace)
        self.declared = batch_dims_declared(trace)
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
        self._prototype = {s.name: trace.nodes[s.name]["value"].detach() for s in self.sites}
        self.path: str | None = None

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

    def prior_draws(self, n: int) -> torch.Tensor:
        """``(n, dim)`` unconstrained latent values drawn from the prior (one plated model call
        when the plate path is valid, else ``n`` calls)."""
        if self.declared:
            try:  # block outside the plate: the plate must see the sites to batch them
                with poutine.block(), pyro.plate("_init", n, dim=-(self.nesting + 1)):
                    tr = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
                return self.unconstrain({s.name: tr.nodes[s.name]["value"].reshape(n, *s.shape) for s in self.sites})
            except (RuntimeError, ValueError):
                pass
        draws = [prototype_trace(self.model, self.args, self.kwargs) for _ in range(n)]
        return self.unconstrain({s.name: torch.stack([tr.nodes[s.name]["value"] for tr in draws]) for s in self.sites})

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

    def _plate_log_density(self, u: torch.Tensor):
        batch = u.shape[0]
        values, ladj = {}, u.new_zeros(batch)
        for s, v in zip(self.sites, self.split(u).values()):
            x = s.transform(v)
            values[s.name] = x
            j = s.transform.log_abs_det_jacobian(v, x)
            if torch.is_tensor(j) and j.dim() > 0:
                ladj = ladj + j.reshape(batch, -1).sum(1)
        terms = self.site_log_probs(self.trace(values), batch)
        return ladj + sum(terms.values()), terms

    def single_log_density(self, u: torch.Tensor):
        """The log density at one unconstrained point ``u`` ``(dim,)`` from a plain run of the
        model (no batch dimension anywhere), and its ``{site: scalar}`` terms."""
        values, ladj = {}, u.new_zeros(())
        for s in self.sites:
            v = u[s.offset : s.offset + s.numel].reshape(s.ushape)
            x = s.transform(v)
            values[s.name] = x
            j = s.transform.log_abs_det_jacobian(v, x)
            ladj = ladj + (j.sum() if torch.is_tensor(j) else j)
        with poutine.block(), pyro.validation_enabled(False):
            tr = poutine.trace(poutine.condition(self.model, data=values)).get_trace(*self.args, **self.kwargs)
        terms = {}
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            fn: Any = site["fn"]  # a distribution at a sample site
            lp = scale_and_mask(fn.log_prob(site["value"]), site["scale"], site["mask"])
            terms[name] = lp.sum() if torch.is_tensor(lp) else u.new_tensor(float(lp))
        return ladj + sum(terms.values()), terms

    def _evaluate(self, path: str, u: torch.Tensor):
        if path == "plate":
            return self._plate_log_density(u)
        if path == "vmap":
            return torch.func.vmap(self.single_log_density)(u)
        rows = [self.single_log_density(row) for row in u]
        names = dict.fromkeys(k for r in rows for k in r[1])  # a branch may skip a site
        terms = {k: torch.stack([r[1].get(k, u.new_zeros(())) for r in rows]) for k in names}
        return torch.stack([r[0] for r in rows]), terms

    def choose_path(self) -> str:
        """The fastest path whose values equal a plain run's at two points near the prior draw."""
        if self.path is not None:
            return self.path
        proto = self.unconstrain({k: v.unsqueeze(0) for k, v in self._prototype.items()})
        probe = torch.cat([proto, proto + 0.01 * torch.arange(1, self.dim + 1, dtype=proto.dtype) / self.dim])
        with torch.no_grad():
            expect = []
            for row in probe:
                try:
                    expect.append(self.single_log_density(row)[0])
                except Exception as e:
                    if not is_numerical_error(e):
                        raise
                    expect.append(None)
            for path in self.paths[:-1] if self.declared else self.paths[1:-1]:
                try:
                    got = self._evaluate(path, probe)[0]
                except Exception:  # any failure of a fast path: try the next one
                    continue
                if got.shape == (2,) and all(
                    e is None or torch.allclose(g, e, rtol=1e-4, atol=1e-4, equal_nan=True) for g, e in zip(got, expect)
                ):
                    self.path = path
                    return path
        self.path = "loop"
        return self.path

    def log_density(self, u: torch.Tensor, per_site: bool = False):
        """``(batch,)`` log joint density at unconstrained ``u`` (plus ``{site: (batch,)}`` terms)."""
        total, terms = self._evaluate(self.choose_path(), u)
        return (total, terms) if per_site else total

    def compile(self, u: torch.Tensor, backend: str = "trace") -> None:
        """Compile the potential and its gradient for batches shaped like ``u``.

        ``backend="trace"``: trace ``log_density`` with the PyTorch JIT (the model's Python then
        runs once; later calls replay the recorded tensor program, and autograd differentiates it).
        ``backend="inductor"``: record forward and backward as one graph and compile it with
        TorchInductor (:class:`~ppdgm.compiled_density.CompiledPotential`; seconds to tens of
        seconds once, several times faster per gradient); where that fails it warns and traces.
        A model the JIT cannot trace, or whose replay differs from the eager value at another
        point (a branch on the values), stays eager."""
        if backend not in ("trace", "inductor"):
            raise ValueError(f"backend must be 'trace' or 'inductor', got {backend!r}")
        self.choose_path()
        u = u.detach()
        if backend == "inductor":
            from ppdgm.compiled_density import CompiledPotential

            try:
                self._compiled = CompiledPotential.build(self.log_density, self._eager_potential_and_grad, u)
                return
            except Exception as e:  # the traced and the eager functions are always there
                warnings.warn(
                    f"Inductor could not compile the potential ({type(e).__name__}: {str(e)[:200]}); "
                    "using the TorchScript trace",
                    stacklevel=2,
                )
        other = 0.5 * u + 0.1
        with warnings.catch_warnings(), pyro.validation_enabled(False), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                jit = torch.jit.trace(self.log_density, (u,), check_trace=False)
                same = torch.allclose(jit(other), self.log_density(other), rtol=1e-4, atol=1e-4, equal_nan=True)
            except Exception:  # the eager function is always there
                return
        if same:
            self._jit, self._jit_shape = jit, u.shape

    @property
    def compile_seconds(self) -> float | None:
        """How long the Inductor compile took (None without one)."""
        compiled = getattr(self, "_compiled", None)
        return compiled.seconds if compiled is not None else None

    def potential_and_grad(self, u: torch.Tensor):
        """Potential ``-log density`` ``(batch,)`` and its gradient ``(batch, dim)``; a row whose
        evaluation raises a numerical error gets potential ``+inf`` and gradient 0, found by
        halving the batch (a few failing rows cost a few evaluations per halving level)."""
        try:
            return self._potential_and_grad(u)
        except Exception as e:
            if not is_numerical_error(e):
                raise
        if u.shape[0] == 1:
            return u.new_full((1,), math.inf), torch.zeros_like(u)
        half = u.shape[0] // 2
        (p1, g1), (p2, g2) = self.potential_and_grad(u[:half]), self.potential_and_grad(u[half:])
        return torch.cat([p1, p2]), torch.cat([g1, g2])

    def _potential_and_grad(self, u: torch.Tensor):
        compiled = getattr(self, "_compiled", None)
        if compiled is not None and compiled.shape == u.shape:
            return compiled(u)
        return self._eager_potential_and_grad(u)

    def _eager_potential_and_grad(self, u: torch.Tensor):
        fn = self._jit if getattr(self, "_jit_shape", None) == u.shape else self.log_density
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            logp = fn(u)
            (grad,) = torch.autograd.grad(logp.sum(), u)
        return -logp.detach(), -grad
