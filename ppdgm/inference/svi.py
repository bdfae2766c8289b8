"""Stochastic variational inference for any Pyro model/guide pair.

Minibatches are drawn from tensors (or a torch ``Dataset``) in a seeded order; every sample site
inside the model's data plate (``data_plate``, default ``"data"``) is scaled by ``N / batch``, so a
model with global latents optimizes the full-data ELBO while its plate is sized by the batch, as
in Pyro's tutorials.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ppdgm.data import check_data
from ppdgm.fit import Fit, param_store_state, restore_param_store
from ppdgm.inference.base import move_module, resolve_device
from ppdgm.inference.checks import choice, positive_int, positive_number
from ppdgm.inference.compiled_elbo import CompiledELBO, JitELBO, ScaleDataPlate
from ppdgm.inference.param_optim import PyroOptim, StoreAdam
from ppdgm.inference.schedules import check_schedule
from ppdgm.inference.trainer import Loop, TrainingEngine, train

LOSSES = ("elbo", "meanfield", "enum", "iwae")
OPTIMIZERS = ("adam", "clipped_adam")
COMPILE = ("replay", "jit", "none")


class LogDensity(Messenger):
    """Records, in one pass of a model without latent sites, the sum of its observed sites'
    log-densities (sites in plate ``plate`` multiplied by ``scale``) and the params it touched.

    It is what ``poutine.trace`` plus ``log_prob_sum`` give, without storing a trace: on a
    normalizing flow, whose every step registers dozens of params, tracing is a sixth of the step.
    """

    def __init__(self, plate: str | None = None, scale: float | None = None):
        super().__init__()
        self.plate, self.scale = plate, scale
        self.log_density = 0.0
        self.params: dict[str, torch.Tensor] = {}

    def _pyro_post_param(self, msg):
        self.params[msg["name"]] = msg["value"].unconstrained()

    def _pyro_post_sample(self, msg):
        if site_is_subsample(msg):
            return
        if not msg["is_observed"]:
            raise ValueError(f"site {msg['name']!r} is latent; a model with latent sites needs a guide")
        scale = msg["scale"]
        if self.scale is not None and any(f.name == self.plate for f in msg["cond_indep_stack"]):
            scale = scale * self.scale
        log_p = scale_and_mask(msg["fn"].log_prob(msg["value"]), scale, msg["mask"])
        self.log_density = self.log_density + log_p.sum()


def empty_guide(*args, **kwargs):
    """The guide of a model without latent variables (maximum likelihood)."""


class MaximumLikelihood:
    """``-log p(x)`` of a model without latent sites, and its gradient.

    With an empty guide every ELBO equals the model's log-density; this computes it from one
    pass of the model instead of Pyro's guide-trace, replay and surrogate machinery.
    """

    @staticmethod
    def loss_and_params(model, plate, scale, *args, **kwargs) -> tuple[float, list]:
        """Backpropagate ``-log p`` (sites in ``plate`` scaled by ``scale``); return it and the params."""
        with LogDensity(plate, scale) as ld:
            model(*args, **kwargs)
        loss = -ld.log_density
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        return float(loss.detach() if torch.is_tensor(loss) else loss), list(ld.params.values())

    @staticmethod
    def loss(model, guide, *args, **kwargs) -> float:
        with torch.no_grad(), LogDensity() as ld:
            model(*args, **kwargs)
        return -float(ld.log_density)


def make_elbo(loss, num_particles=1, vectorize_particles=False, max_plate_nesting=None) -> ELBO:
    if isinstance(loss, ELBO):
        return loss
    kw = {"num_particles": num_particles, "vectorize_particles": vectorize_particles}
    if max_plate_nesting is not None:
        kw["max_plate_nesting"] = max_plate_nesting
    if loss == "elbo":
        return Trace_ELBO(**kw)
    if loss == "meanfield":
        return TraceMeanField_ELBO(**kw)
    if loss == "enum":
        return TraceEnum_ELBO(**kw)
    if loss == "iwae":
        # Renyi's alpha -> 0 is the importance-weighted bound (Burda et al. 2016).
        return RenyiELBO(alpha=0.0, **kw)
    raise ValueError(f"loss must be one of {LOSSES} or a pyro.infer.ELBO, got {loss!r}")


def latent_sites(trace) -> dict:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary")
        and not site_is_subsample(site)
    }


def check_guide_matches(model, guide, args, kwargs) -> None:
    """Raise ValueError when the guide's sample sites and the model's latent sites differ."""
    with poutine.block(), poutine.trace(param_only=False) as gtr:
        guide(*args, **kwargs)
    with poutine.block(), poutine.trace() as mtr:
        poutine.replay(model, trace=gtr.trace)(*args, **kwargs)
    guide_sites = set(latent_sites(gtr.trace))
    model_latents = {n for n, s in latent_sites(mtr.trace).items() if s["infer"].get("enumerate") is None}
    observed = {n for n, s in mtr.trace.nodes.items() if s["type"] == "sample" and s["is_observed"]}
    if guide_sites & observed:
        raise ValueError(f"guide samples sites that the model observes: {sorted(guide_sites & observed)}")
    extra = guide_sites - set(latent_sites(mtr.trace))
    missing = model_latents - guide_sites
    if extra or missing:
        raise ValueError(
            "guide does not match the model's latent sites: "
            + (f"model latents without a guide site {sorted(missing)}; " if missing else "")
            + (f"guide sites absent from the model {sorted(extra)}" if extra else "")
        )


def _as_tuple(data):
    if data is None:
        return ()
    if isinstance(data, (tuple, list)):
        return tuple(data)
    return (data,)


@dataclass
class SVIState:
    model: Callable
    guide: Callable
    autoguide: str | None
    optim: PyroOptim | StoreAdam
    elbo: Any  # a pyro ELBO, or MaximumLikelihood for a model without a guide
    compiled: CompiledELBO | JitELBO | None  # Trace_ELBO computed without Pyro's traces
    args: tuple
    kwargs: dict
    fit_args: tuple
    on_device: Callable[[], contextlib.AbstractContextManager]
    device: torch.device


class SVI(TrainingEngine):
    """Stochastic variational inference.

    Args:
        loss: ``"elbo"`` (Trace_ELBO), ``"meanfield"`` (analytic KL where available), ``"enum"``
            (TraceEnum_ELBO, for enumerated discrete latents), ``"iwae"`` (importance-weighted
            bound with ``num_particles`` samples), or any ``pyro.infer.ELBO``.
        num_steps: gradient steps; with ``num_epochs`` the steps are ``num_epochs`` passes.
        batch_size: minibatch size (None: full batch).
        lr, optim, clip_norm: Adam or ClippedAdam learning rate and optional gradient-norm clip.
        lr_schedule: None (constant), ``"linear"``, ``"exponential"`` or ``"cosine"`` decay to
            ``lr * lr_final_factor`` (:mod:`ppdgm.inference.schedules`).
        eval_every, patience: validation loss every ``eval_every`` steps; stop after
            ``patience`` evaluations without improvement and keep the best parameters.
        data_plate: name of the plate over data points, scaled by ``N / batch``.
        checkpoint_every: steps between checkpoints (with ``checkpoint_dir`` in ``run``).
        compile: with ``loss="elbo"``, how ``Trace_ELBO`` is computed
            (:mod:`ppdgm.inference.compiled_elbo`): ``"replay"`` runs the program under one
            light handler instead of Pyro's traces while its structure is static (the same loss
            and gradients, falling back to tracing when it changes); ``"jit"`` records the loss
            as one TorchScript graph per batch shape, faster still but only for programs that
            read no Python value that changes during training (e.g. a KL weight annealed by a
            callback); ``"none"`` traces every step.
    """

    name = "svi"

    def __init__(
        self,
        loss="elbo",
        num_steps: int = 1000,
        num_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float = 1e-3,
        optim: str = "adam",
        clip_norm: float | None = None,
        lr_schedule: str | None = None,
        lr_final_factor: float = 0.1,
        num_particles: int = 1,
        vectorize_particles: bool = False,
        max_plate_nesting: int | None = None,
        data_plate: str = "data",
        eval_every: int | None = None,
        patience: int | None = None,
        checkpoint_every: int | None = None,
        compile: str = "replay",
        seed: int | None = 0,
        device=None,
        progress: bool | None = None,
    ):
        if not isinstance(loss, ELBO) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} or a pyro.infer.ELBO, got {loss!r}")
        positive_int("num_steps", num_steps)
        positive_int("num_particles", num_particles)
        for arg, val in (
            ("num_epochs", num_epochs),
            ("batch_size", batch_size),
            ("eval_every", eval_every),
            ("patience", patience),
            ("checkpoint_every", checkpoint_every),
        ):
            positive_int(arg, val, optional=True)
        self.lr = positive_number("lr", lr)
        self.optim = choice("optim", optim, OPTIMIZERS)
        self.clip_norm = positive_number("clip_norm", clip_norm, optional=True)
        self.lr_schedule, self.lr_final_factor = check_schedule(lr_schedule, lr_final_factor)
        self.loss = loss if isinstance(loss, str) else type(loss).__name__
        self._elbo = make_elbo(loss, num_particles, vectorize_particles, max_plate_nesting)
        self.num_steps, self.num_epochs, self.batch_size = num_steps, num_epochs, batch_size
        self.num_particles, self.vectorize_particles = num_particles, vectorize_particles
        self.max_plate_nesting, self.data_plate = max_plate_nesting, data_plate
        self.eval_every, self.patience, self.checkpoint_every = eval_every, patience, checkpoint_every
        self.compile = choice("compile", compile, COMPILE)
        self.seed, self.device, self.progress = seed, device, progress

    def run(
        self,
        model,
        guide=None,
        data=None,
        *args,
        val_data=None,
        checkpoint_dir=None,
        resume: bool = False,
        callbacks=(),
        **kwargs,
    ) -> Fit:
        """Fit ``guide`` to ``model``'s posterior given ``data``.

        ``data`` is a tensor, a tuple of tensors sharing their first dimension, or a torch
        ``Dataset``; each step calls ``model(*batch, *args, **kwargs)``. ``guide=None`` means an
        ``AutoNormal`` guide, or no guide when the model has no latent sites.
        """
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro program, got {type(model).__name__}")
        device = resolve_device(self.device, *_as_tuple(data))
        data = self._prepare(data, "data", device)
        val_data = self._prepare(val_data, "val_data", device)
        move_module(model, device)
        return train(
            self,
            (model, guide, args, kwargs),
            data,
            device=device,
            val_data=val_data,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            callbacks=callbacks,
        )

    # -----------------------------------------------------------------------------------------
    # the algorithm the driver runs

    def init(self, problem, loop: Loop) -> SVIState:
        model, guide, args, kwargs = problem
        pyro.clear_param_store()
        # off the CPU, tensors a plain model makes (torch.zeros(D) ...) land on the data's device;
        # on the CPU the default device is right already and the mode's per-op cost is skipped
        device = loop.device
        on_device = (lambda: torch.device(device)) if device.type != "cpu" else contextlib.nullcontext
        first = loop.batches[0]
        autoguide = None
        with on_device():
            if guide is None:
                with poutine.block(), poutine.trace() as tr:
                    model(*first, *args, **kwargs)
                guide = AutoNormal(model) if latent_sites(tr.trace) else empty_guide
                autoguide = "AutoNormal" if guide is not empty_guide else "empty"
            check_guide_matches(model, guide, (*first, *args), kwargs)
            if loop.batches.batch:
                self._check_data_plate(model, first, args, kwargs)
        elbo: ELBO | MaximumLikelihood = self._elbo
        if guide is empty_guide and type(elbo) in (Trace_ELBO, TraceMeanField_ELBO) and self.num_particles == 1:
            elbo = MaximumLikelihood()  # the same objective, without tracing a guide that has no sites
        compiled = None
        if self.compile != "none" and type(elbo) is Trace_ELBO and not elbo.vectorize_particles:
            compiled = (CompiledELBO if self.compile == "replay" else JitELBO)(elbo, self.data_plate)
        data = loop.batches.data
        return SVIState(
            model,
            guide,
            autoguide,
            self._make_optim(),
            elbo,
            compiled,
            args,
            kwargs,
            data if isinstance(data, tuple) else (),
            on_device,
            device,
        )

    def step(self, state: SVIState, loop: Loop) -> dict:
        b = loop.batches[loop.step]
        scale = loop.batches.n / b[0].shape[0] if loop.batches.batch else None
        with state.on_device():
            if state.compiled is not None:
                loss, params = state.compiled.loss_and_params(
                    state.model, state.guide, scale, (*b, *state.args), state.kwargs
                )
            else:
                loss, params = self._loss_and_params(
                    state.elbo, state.model, state.guide, scale, (*b, *state.args), state.kwargs
                )
        if loop.world.parallel:
            params = self._named_params(params)
        clip = self.clip_norm if self.optim == "adam" else None  # ClippedAdam clips by itself
        loss, gnorm = loop.descend(params, loss, update=lambda: state.optim(params), clip=clip)
        return {"loss": loss, "grad_norm": gnorm}

    def validate(self, state: SVIState, val_data) -> dict:
        with torch.no_grad(), state.on_device():
            return {"val_loss": state.elbo.loss(state.model, state.guide, *val_data, *state.args, **state.kwargs)}

    def parameters(self, state: SVIState) -> list:
        return self._named_params()

    def optimizers(self, state: SVIState) -> list:
        return [(state.optim, self.lr)]

    def weights(self, state: SVIState) -> dict:
        return param_store_state()

    def load_weights(self, state: SVIState, saved: dict) -> None:
        restore_param_store(saved, state.device)

    def state_dict(self, state: SVIState) -> dict:
        return {"params": param_store_state(), "optim": state.optim.get_state()}

    def load_state_dict(self, state: SVIState, saved: dict) -> None:
        # create params (and their optimizers' slots) before overwriting them
        restore_param_store(saved["params"], state.device)
        state.optim.set_state(saved["optim"])

    def fit_fields(self, state: SVIState) -> dict:
        return {
            "params": param_store_state(),
            "extra": {"autoguide": state.autoguide} if state.autoguide else {},
            "model": state.model,
            "guide": state.guide,
            "args": (*state.fit_args, *state.args),
            "kwargs": state.kwargs,
        }

    # -----------------------------------------------------------------------------------------
    def _make_optim(self):
        if self.optim == "clipped_adam":
            return PyroOptim(pyro.optim.ClippedAdam({"lr": self.lr, "clip_norm": self.clip_norm or 10.0}))
        return StoreAdam(self.lr)

    def _loss_and_params(self, elbo, model, guide, scale, args, kwargs) -> tuple[float, list]:
        """One step's loss, with its gradients accumulated on the params it touched (returned)."""
        if isinstance(elbo, MaximumLikelihood):
            return elbo.loss_and_params(model, self.data_plate, scale, *args, **kwargs)
        if scale is not None:
            model, guide = ScaleDataPlate(self.data_plate, scale)(model), ScaleDataPlate(self.data_plate, scale)(guide)
        with poutine.trace(param_only=True) as cap:
            loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
        return loss, [s["value"].unconstrained() for s in cap.trace.nodes.values() if s["value"] is not None]

    @staticmethod
    def _prepare(data, name, device):
        if data is None:
            return None
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.Tensor):
            if isinstance(data, Sized) and len(data) == 0:
                raise ValueError(f"{name}: expected a non-empty Dataset, got length 0")
            return data
        parts = tuple(
            check_data(d, f"{name}[{i}]") if not _is_int(d) else torch.as_tensor(d)
            for i, d in enumerate(_as_tuple(data))
        )
        lengths = {p.shape[0] if p.dim() else None for p in parts}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(
                f"{name}: expected tensors sharing their first (data) dimension, got shapes "
                f"{[tuple(p.shape) for p in parts]}"
            )
        return tuple(p.to(device) for p in parts)

    @staticmethod
    def _named_params(params=None) -> list[torch.Tensor]:
        """Params in name order, so every rank packs its gradients identically."""
        store = pyro.get_param_store()
        if params is None:
            return [store._params[k] for k in sorted(store._params)]
        return sorted(params, key=lambda p: store.param_name(p) or "")

    def _check_data_plate(self, model, first, args, kwargs):
        with poutine.block(), poutine.trace() as tr:
            model(*first, *args, **kwargs)
        names = {f.name for s in tr.trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]}
        if self.data_plate not in names:
            raise ValueError(
                f"minibatching needs the model's plate over data points to be named {self.data_plate!r} "
                f"(pass data_plate= to SVI); the model's plates are {sorted(names)}"
            )


def _is_int(t):
    return isinstance(t, torch.Tensor) and not t.is_floating_point()
