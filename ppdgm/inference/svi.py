"""Stochastic variational inference for any Pyro model/guide pair.

Minibatches are drawn from tensors (or a torch ``Dataset``) in a seeded order; every sample site
inside the model's data plate (``data_plate``, default ``"data"``) is scaled by ``N / batch``, so a
model with global latents optimizes the full-data ELBO while its plate is sized by the batch, as
in Pyro's tutorials.
"""

from __future__ import annotations

import contextlib
import math
import time

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ppdgm import distributed
from ppdgm.data import check_data
from ppdgm.fit import Fit, param_store_state, restore_param_store
from ppdgm.inference.base import (
    Checkpointer,
    Engine,
    move_module,
    non_finite_error,
    progress_bar,
    resolve_device,
    set_seed,
    step_timing,
    track_validation,
)
from ppdgm.inference.param_optim import PyroOptim, StoreAdam

LOSSES = ("elbo", "meanfield", "enum", "iwae")
OPTIMIZERS = ("adam", "clipped_adam")
SCHEDULES = (None, "exponential", "cosine")


class ScaleDataPlate(Messenger):
    """Multiply the log-density of every site inside plate ``name`` by ``scale``."""

    def __init__(self, name: str, scale: float):
        super().__init__()
        self.name, self.scale = name, scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and any(f.name == self.name for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.scale


class LogDensity(Messenger):
    """Records, in one pass of a model without latent sites, the sum of its observed sites'
    log-densities (sites in plate ``plate`` multiplied by ``scale``) and the params it touched.

    It is what ``poutine.trace`` plus ``log_prob_sum`` give, without storing a trace: on a
    normalizing flow, whose every step registers dozens of params, tracing is a sixth of the step.
    """

    def __init__(self, plate: str | None = None, scale: float | None = None):
        super().__init__()
        self.plate, self.scale = plate, scale
        self.log_density, self.params = 0.0, {}

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


class SVI(Engine):
    """Stochastic variational inference.

    Args:
        loss: ``"elbo"`` (Trace_ELBO), ``"meanfield"`` (analytic KL where available), ``"enum"``
            (TraceEnum_ELBO, for enumerated discrete latents), ``"iwae"`` (importance-weighted
            bound with ``num_particles`` samples), or any ``pyro.infer.ELBO``.
        num_steps: gradient steps; with ``num_epochs`` the steps are ``num_epochs`` passes.
        batch_size: minibatch size (None: full batch).
        lr, optim, clip_norm: Adam or ClippedAdam learning rate and optional gradient-norm clip.
        lr_schedule: None, ``"exponential"`` or ``"cosine"`` decay to ``lr * lr_final_factor``.
        eval_every, patience: validation loss every ``eval_every`` steps; stop after
            ``patience`` evaluations without improvement and keep the best parameters.
        data_plate: name of the plate over data points, scaled by ``N / batch``.
        checkpoint_every: steps between checkpoints (with ``checkpoint_dir`` in ``run``).
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
        seed: int | None = 0,
        device=None,
        progress: bool | None = None,
    ):
        if not isinstance(loss, ELBO) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} or a pyro.infer.ELBO, got {loss!r}")
        for arg, val in (("num_steps", num_steps), ("num_particles", num_particles)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        for arg, val in (("num_epochs", num_epochs), ("batch_size", batch_size), ("eval_every", eval_every),
                         ("patience", patience), ("checkpoint_every", checkpoint_every)):
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"{arg} must be a positive int or None, got {val!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {optim!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {clip_norm!r}")
        self.loss = loss if isinstance(loss, str) else type(loss).__name__
        self._elbo = make_elbo(loss, num_particles, vectorize_particles, max_plate_nesting)
        self.num_steps, self.num_epochs, self.batch_size = num_steps, num_epochs, batch_size
        self.lr, self.optim, self.clip_norm = float(lr), optim, clip_norm
        self.lr_schedule, self.lr_final_factor = lr_schedule, lr_final_factor
        self.num_particles, self.vectorize_particles = num_particles, vectorize_particles
        self.max_plate_nesting, self.data_plate = max_plate_nesting, data_plate
        self.eval_every, self.patience, self.checkpoint_every = eval_every, patience, checkpoint_every
        self.seed, self.device, self.progress = seed, device, progress

    # -----------------------------------------------------------------------------------------
    def _make_optim(self):
        if self.optim == "clipped_adam":
            return PyroOptim(pyro.optim.ClippedAdam({"lr": self.lr, "clip_norm": self.clip_norm or 10.0}))
        return StoreAdam(self.lr)

    def _lr_at(self, step: int, total: int) -> float:
        frac = min(step / max(total, 1), 1.0)
        if self.lr_schedule == "exponential":
            return self.lr * self.lr_final_factor**frac
        if self.lr_schedule == "cosine":
            f = self.lr_final_factor
            return self.lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * frac)))
        return self.lr

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
        n = _length(data)
        self._world = world = distributed.init_from_env(device)
        if world.parallel and n:
            distributed.check_nproc(world.size, n, self.batch_size)
        shard = math.ceil(n / world.size) if n else 0
        batch = self.batch_size if (self.batch_size and self.batch_size < shard) else None
        if world.parallel and n and batch is None:
            batch = shard  # each rank takes its shard of the full batch
        per_epoch = math.ceil(shard / batch) if batch else 1
        total = self.num_epochs * per_epoch if self.num_epochs else self.num_steps

        set_seed(self.seed)
        pyro.clear_param_store()
        # off the CPU, tensors a plain model makes (torch.zeros(D) ...) land on the data's device;
        # on the CPU the default device is right already and the mode's per-op cost is skipped
        on_device = (lambda: torch.device(device)) if device.type != "cpu" else contextlib.nullcontext
        first = self._batch(data, 0, per_epoch, batch)
        autoguide = None
        with on_device():
            if guide is None:
                with poutine.block(), poutine.trace() as tr:
                    model(*first, *args, **kwargs)
                guide = AutoNormal(model) if latent_sites(tr.trace) else empty_guide
                autoguide = "AutoNormal" if guide is not empty_guide else "empty"
            check_guide_matches(model, guide, (*first, *args), kwargs)
            if batch:
                self._check_data_plate(model, first, args, kwargs)

        optim = self._make_optim()
        elbo = self._elbo
        if guide is empty_guide and type(elbo) in (Trace_ELBO, TraceMeanField_ELBO) and self.num_particles == 1:
            elbo = MaximumLikelihood()  # the same objective, without tracing a guide that has no sites
        history = {"loss": [], "grad_norm": []}
        if val_data is not None:
            history.update(val_loss=[], val_step=[])
        start, best, bad_evals = 0, None, 0
        ckpt = Checkpointer(checkpoint_dir, self.checkpoint_every)
        if resume:
            state = ckpt.load()
            if state is not None:
                # create params (and their optimizers' slots) before overwriting them
                restore_param_store(state["params"], device)
                optim.set_state(state["optim"])
                history, start, best, bad_evals = state["history"], state["step"], state["best"], state["bad_evals"]

        if world.parallel:
            distributed.broadcast_params(self._named_params())

        def snapshot(step):
            return {"step": step, "params": param_store_state(), "optim": optim.get_state(),
                    "history": history, "best": best, "bad_evals": bad_evals}

        fit_args = data if isinstance(data, tuple) else ()
        t0 = time.perf_counter()
        bar = progress_bar(total, "svi", self.progress)
        bar.update(start)
        post_every = max(1, total // 200)
        step = start
        stop = False
        for step in range(start, total):
            b = self._batch(data, step, per_epoch, batch)
            scale = n / _length(b) if batch else None
            with on_device():
                loss, params = self._loss_and_params(elbo, model, guide, scale, (*b, *args), kwargs)
            if world.parallel:
                params = self._named_params(params)
                (loss,) = distributed.average_gradients(params, loss)
            grads = [p.grad for p in params if p.grad is not None]
            if self.clip_norm is not None and self.optim == "adam":
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_norm))
            else:
                gnorm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                pyro.infer.util.zero_grads(set(params))
                bar.close()
                fit = self._fit(model, guide, autoguide, history, t0, start, step, fit_args, args, kwargs)
                raise non_finite_error(step, loss, gnorm, fit, checkpoint_dir if world.is_main else None)
            optim(params)
            if self.lr_schedule is not None:
                optim.set_lr(self._lr_at(step + 1, total))
            history["loss"].append(loss)
            history["grad_norm"].append(gnorm)
            done = step + 1
            if val_data is not None and done % (self.eval_every or per_epoch) == 0:
                with torch.no_grad(), on_device():
                    v = elbo.loss(model, guide, *val_data, *args, **kwargs)
                history["val_loss"].append(v)
                history["val_step"].append(done)
                best, bad_evals, stop = track_validation(best, bad_evals, v, done, self.patience,
                                                         lambda: {"params": param_store_state()})
            info = {"loss": loss, "grad_norm": gnorm}
            for cb in callbacks:
                stop = bool(cb(done, info)) or stop
            if world.is_main and (ckpt.due(done) or (stop and ckpt.every)):
                ckpt.save(snapshot(done))
            bar.update(1)
            if done % post_every == 0:
                bar.set_postfix(loss=f"{loss:.4g}")
            if stop:
                break
        bar.close()
        if best is not None and self.patience is not None:
            restore_param_store(best["params"], device)
        fit = self._fit(model, guide, autoguide, history, t0, start, step + 1 if total else 0, fit_args, args, kwargs)
        if best is not None:
            fit.extra["best_val"] = {"loss": best["loss"], "step": best["step"]}
        return fit

    # -----------------------------------------------------------------------------------------
    def _loss_and_params(self, elbo, model, guide, scale, args, kwargs) -> tuple[float, list]:
        """One step's loss, with its gradients accumulated on the params it touched (returned)."""
        if isinstance(elbo, MaximumLikelihood):
            return elbo.loss_and_params(model, self.data_plate, scale, *args, **kwargs)
        if scale is not None:
            model, guide = ScaleDataPlate(self.data_plate, scale)(model), ScaleDataPlate(self.data_plate, scale)(guide)
        with poutine.trace(param_only=True) as cap:
            loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
        return loss, [s["value"].unconstrained() for s in cap.trace.nodes.values()]

    def _fit(self, model, guide, autoguide, history, t0, start, end, fit_args, args, kwargs) -> Fit:
        seconds = time.perf_counter() - t0
        steps = max(end - start, 0)
        return Fit(
            engine=self.name,
            config=self.config,
            history=history,
            timing=step_timing(seconds, steps),
            params=param_store_state(),
            extra={"autoguide": autoguide} if autoguide else {},
            model=model,
            guide=guide,
            args=(*fit_args, *args),
            kwargs=kwargs,
        )

    @staticmethod
    def _prepare(data, name, device):
        if data is None:
            return None
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.Tensor):
            if len(data) == 0:
                raise ValueError(f"{name}: expected a non-empty Dataset, got length 0")
            return data
        parts = tuple(check_data(d, f"{name}[{i}]") if not _is_int(d) else torch.as_tensor(d)
                      for i, d in enumerate(_as_tuple(data)))
        lengths = {p.shape[0] if p.dim() else None for p in parts}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(f"{name}: expected tensors sharing their first (data) dimension, got shapes "
                             f"{[tuple(p.shape) for p in parts]}")
        return tuple(p.to(device) for p in parts)

    def _batch(self, data, step, per_epoch, batch):
        if data is None:
            return ()
        if batch is None:
            return data if isinstance(data, tuple) else _collate(data, range(len(data)))
        epoch, pos = divmod(step, per_epoch)
        idx = self._epoch_order(epoch, _length(data))[pos * batch : (pos + 1) * batch]
        if isinstance(data, tuple):
            idx = idx.to(data[0].device)
            return tuple(d[idx] for d in data)
        return _collate(data, idx.tolist())

    def _epoch_order(self, epoch: int, n: int) -> torch.Tensor:
        """This rank's data order in an epoch: a function of (seed, epoch, rank) alone, so a
        resumed run replays it (``DistributedSampler``'s order; all of it for one process)."""
        if getattr(self, "_order", (None,))[0] != (epoch, n):
            self._order = ((epoch, n), distributed.shard_order(n, epoch, self.seed or 0, self._world))
        return self._order[1]

    @staticmethod
    def _named_params(params=None) -> list[torch.Tensor]:
        """Params in name order, so every rank packs its gradients identically."""
        store = pyro.get_param_store()
        if params is None:
            return [store._params[k] for k in sorted(store._params)]
        return sorted(params, key=store.param_name)

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


def _length(data) -> int:
    if data is None:
        return 0
    return data[0].shape[0] if isinstance(data, tuple) else len(data)


def _collate(dataset, indices):
    items = [dataset[i] for i in indices]
    if isinstance(items[0], (tuple, list)):
        return tuple(torch.stack([torch.as_tensor(it[j]) for it in items]) for j in range(len(items[0])))
    return (torch.stack([torch.as_tensor(it) for it in items]),)
