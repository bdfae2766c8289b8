"""``Trace_ELBO``'s loss and gradients without Pyro's traces, for programs whose structure is static.

Pyro's ``Trace_ELBO`` builds two full traces every step (the guide's, then the model's replayed
against it), prunes and copies them, computes score parts and checks shapes: on the tutorial VAE
that bookkeeping costs as much as the networks. :class:`CompiledELBO` runs ``Trace_ELBO``'s own
traces once, without gradients and with the random number generators put back (so its checks
run), recording the program's *structure*: per sample site its name, whether it is observed, its
distribution type, batch and event shapes and plates. Every step, the first included, then
replays the program under one light messenger that draws each guide site, replays it in the
model, sums the scaled log-densities and compares every site with the record. The replayed loss
is ``-(log p(x, z) - log q(z | x))`` at the same draws, so loss and gradients equal
``Trace_ELBO``'s. The recording runs Pyro's argument and support checks; the replays skip them
(each check is a host sync): a parameter that goes invalid later gives a non-finite loss, which
the training driver names with its step.

When a site differs from the record (a data-dependent number of sites, new shapes, another
distribution), the replay is dropped before any gradient is taken, the structure is recorded
again and the step replayed; if it differs again, ``Trace_ELBO`` computes the step. A program
whose structure keeps changing stops being replayed.
"""

from __future__ import annotations

import warnings
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


class ScaleDataPlate(Messenger):
    """Multiply the log-density of every site inside plate ``name`` by ``scale``."""

    def __init__(self, name: str, scale: float):
        super().__init__()
        self.name, self.scale = name, scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and any(f.name == self.name for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.scale


class StructureChanged(Exception):
    """A replayed site differs from the recorded program."""


def site_signature(msg) -> tuple:
    """What must not change between steps for a replay to equal the traced ELBO."""
    fn = msg["fn"]
    frames = tuple((f.name, f.dim, f.size) for f in msg["cond_indep_stack"])
    return (msg["name"], msg["is_observed"], type(fn), fn.batch_shape, fn.event_shape, frames)


def replayable(msg, in_guide: bool) -> bool:
    """Whether the replay computes this site's share of ``Trace_ELBO`` exactly.

    A guide site without ``rsample`` needs Trace_ELBO's score-function surrogate, whose weights
    are the downstream costs Rao-Blackwellized over plates (``pyro.infer.trace_elbo._compute_log_r``);
    the replay does not rebuild that, so such a program is always traced. Enumerated sites are
    the business of ``TraceEnum_ELBO``.
    """
    if msg["infer"].get("enumerate") is not None:
        return False
    return not in_guide or bool(getattr(msg["fn"], "has_rsample", False))


class RecordStructure(Messenger):
    """Records the signature of every sample site of one traced run, and whether all replay."""

    def __init__(self, in_guide: bool):
        super().__init__()
        self.in_guide = in_guide
        self.sites: list[tuple] = []
        self.replayable = True

    def __enter__(self):
        self.sites, self.replayable = [], True
        return super().__enter__()

    def _pyro_post_sample(self, msg):
        if site_is_subsample(msg):
            return
        self.sites.append(site_signature(msg))
        self.replayable = self.replayable and replayable(msg, self.in_guide)


class ReplayELBO(Messenger):
    """One run of the guide (``values=None``) or of the model against the guide's ``values``:
    sums its sites' log-densities (sites in plate ``plate`` scaled by ``scale``), collects the
    params it reads, and raises :class:`StructureChanged` at the first site unlike ``record``."""

    def __init__(self, record: list[tuple], plate: str, scale: float | None, values: dict | None = None):
        super().__init__()
        self.record, self.plate, self.scale = record, plate, scale
        self.in_guide = values is None
        self.values: dict[str, torch.Tensor] = {} if values is None else values
        self.log_density: Any = None
        self.params: dict[str, torch.Tensor] = {}
        self.count = 0

    def _pyro_sample(self, msg):
        # poutine.replay's rule: a latent model site takes the guide's value of the same name
        if not self.in_guide and not msg["is_observed"] and msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True

    def _pyro_post_sample(self, msg):
        if site_is_subsample(msg):
            return
        if self.count >= len(self.record) or site_signature(msg) != self.record[self.count]:
            raise StructureChanged(msg["name"])
        self.count += 1
        scale = msg["scale"]
        if self.scale is not None and any(f.name == self.plate for f in msg["cond_indep_stack"]):
            scale = scale * self.scale
        log_p = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        if msg["mask"] is None and isinstance(scale, (int, float)):
            # a number scales the sum: one scalar product instead of one per element
            log_p = log_p.sum() if scale == 1.0 else log_p.sum() * scale
        else:
            log_p = scale_and_mask(log_p, scale, msg["mask"]).sum()
        self.log_density = log_p if self.log_density is None else self.log_density + log_p
        if self.in_guide and not msg["is_observed"]:
            self.values[msg["name"]] = msg["value"]

    def _pyro_post_param(self, msg):
        self.params[msg["name"]] = msg["value"].unconstrained()

    def finish(self) -> None:
        if self.count != len(self.record):
            raise StructureChanged(f"{len(self.record) - self.count} recorded sites missing")


class CompiledELBO:
    """``Trace_ELBO`` (``elbo``) for static programs at the cost of one pass of model and guide.

    ``loss_and_params`` backpropagates the loss of one step (sites in plate ``plate`` scaled by
    ``scale``) and returns it with the unconstrained params it touched, as
    ``Trace_ELBO.loss_and_grads`` under ``poutine.trace(param_only=True)`` would.
    ``recorded``, ``traced``, ``replayed`` and ``changes`` count the recordings, the steps of each
    kind and the structure changes seen.
    """

    #: after this many structure changes, and if they are over a tenth of the steps, stop replaying
    max_changes = 10

    def __init__(self, elbo: Trace_ELBO, plate: str):
        if type(elbo) is not Trace_ELBO or elbo.vectorize_particles:
            raise ValueError(f"elbo: expected a Trace_ELBO without vectorized particles, got {elbo!r}")
        self.elbo, self.plate = elbo, plate
        self.program: tuple[list, list] | None = None  # the guide's and the model's site signatures
        self.enabled = True
        self.traced = self.replayed = self.changes = self.recorded = 0

    def loss_and_params(self, model, guide, scale, args, kwargs) -> tuple[float, list]:
        # every step's numbers come from the replay, the first one's too: a run resumed from a
        # checkpoint (which records again) takes the very steps of an uninterrupted one
        for _ in range(2):  # a structure change records again and retries once
            if self.enabled and self.program is None:
                self._record(model, guide, scale, args, kwargs)
            if not self.enabled or self.program is None:
                break
            try:
                return self._replay(model, guide, scale, args, kwargs)
            except StructureChanged:
                self.changes += 1
                self.program = None
                steps = self.traced + self.replayed + self.changes
                if self.changes > self.max_changes and 10 * self.changes > steps:
                    self.enabled = False
        return self._trace(model, guide, scale, args, kwargs)

    def _record(self, model, guide, scale, args, kwargs) -> None:
        """Record the program's structure from ``Trace_ELBO``'s own traces, with its checks
        (site shapes against the plates, model/guide agreement), without gradients and without
        moving the random number generators."""
        if isinstance(poutine.unwrap(guide), Messenger):
            self.enabled = False
            return
        if scale is not None:
            model, guide = ScaleDataPlate(self.plate, scale)(model), ScaleDataPlate(self.plate, scale)(guide)
        in_guide, in_model = RecordStructure(in_guide=True), RecordStructure(in_guide=False)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            next(iter(self.elbo._get_traces(in_model(model), in_guide(guide), args, kwargs)))
        self.recorded += 1
        if in_guide.replayable and in_model.replayable:
            self.program = (in_guide.sites, in_model.sites)
        else:
            self.enabled = False

    def _trace(self, model, guide, scale, args, kwargs) -> tuple[float, list]:
        if scale is not None:
            model, guide = ScaleDataPlate(self.plate, scale)(model), ScaleDataPlate(self.plate, scale)(guide)
        with poutine.trace(param_only=True) as cap:
            loss = self.elbo.loss_and_grads(model, guide, *args, **kwargs)
        self.traced += 1
        return loss, [s["value"].unconstrained() for s in cap.trace.nodes.values() if s["value"] is not None]

    def _replay(self, model, guide, scale, args, kwargs) -> tuple[float, list]:
        assert self.program is not None
        guide_sites, model_sites = self.program
        n = self.elbo.num_particles
        particles = []
        # every particle is checked before the first backward, so a change leaves no gradient;
        # the recording ran the argument and support checks, which cost a host sync per check
        with pyro.validation_enabled(False):
            for _ in range(n):
                with ReplayELBO(guide_sites, self.plate, scale) as q:
                    guide(*args, **kwargs)
                q.finish()
                with ReplayELBO(model_sites, self.plate, scale, values=q.values) as p:
                    model(*args, **kwargs)
                p.finish()
                particles.append((p, q))
        loss = 0.0
        params: dict[str, torch.Tensor] = {}
        for p, q in particles:
            particle = (0.0 if q.log_density is None else q.log_density) - (
                0.0 if p.log_density is None else p.log_density
            )
            particle = particle / n if n > 1 else particle
            params.update(q.params)
            params.update(p.params)
            if params and torch.is_tensor(particle) and particle.requires_grad:
                particle.backward()
            loss += float(particle.detach() if torch.is_tensor(particle) else particle)
        self.replayed += 1
        return loss, list(params.values())


class JitELBO:
    """``Trace_ELBO`` run as one TorchScript graph per batch shape and data scale.

    Pyro's ``JitTrace_ELBO`` records the whole loss (guide, model, log-densities) with
    ``torch.jit.trace`` at its first call and replays the graph afterwards, so the Python of the
    program and of Pyro's handlers runs once. The graph freezes every Python value the program
    reads: a KL weight changed by a callback, a module's ``training`` flag, a control-flow
    decision. It is exact only for programs whose structure and constants depend on nothing but
    their tensor arguments and params; :class:`CompiledELBO` has no such condition. A program that
    ``torch.jit.trace`` refuses (e.g. a ``PyroModule`` whose ``PyroParam`` reaches the graph as
    a constant) is replayed by :class:`CompiledELBO` instead, with a warning.
    """

    def __init__(self, elbo: Trace_ELBO, plate: str):
        if type(elbo) is not Trace_ELBO or elbo.vectorize_particles:
            raise ValueError(f"elbo: expected a Trace_ELBO without vectorized particles, got {elbo!r}")
        self.elbo, self.plate = elbo, plate
        self.graphs: dict[tuple, tuple] = {}
        self.fallback: CompiledELBO | None = None

    def loss_and_params(self, model, guide, scale, args, kwargs) -> tuple[float, list]:
        if self.fallback is not None:
            return self.fallback.loss_and_params(model, guide, scale, args, kwargs)
        for i, a in enumerate(args):
            if not torch.is_tensor(a):
                raise TypeError(f"compile='jit' needs tensor arguments, got {type(a).__name__} at position {i}")
        key = (scale, tuple((a.shape, a.dtype, a.device) for a in args))
        first = key not in self.graphs
        if first:
            if scale is not None:
                model, guide = ScaleDataPlate(self.plate, scale)(model), ScaleDataPlate(self.plate, scale)(guide)
            jit = JitTrace_ELBO(num_particles=self.elbo.num_particles, ignore_jit_warnings=True)
            self.graphs[key] = (jit, model, guide)
        jit, scaled_model, scaled_guide = self.graphs[key]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace. is deprecated")
                with poutine.trace(param_only=True) as cap:
                    loss = jit.loss_and_grads(scaled_model, scaled_guide, *args, **kwargs)
        except RuntimeError as err:
            if not first:  # a failure of a recorded graph, not of its recording
                raise
            reason = str(err).splitlines()[0]
            warnings.warn(
                f"compile='jit': torch.jit.trace refused the program ({reason}); replaying it instead", stacklevel=2
            )
            self.fallback = CompiledELBO(self.elbo, self.plate)
            return self.fallback.loss_and_params(model, guide, scale, args, kwargs)
        return loss, [s["value"].unconstrained() for s in cap.trace.nodes.values() if s["value"] is not None]
