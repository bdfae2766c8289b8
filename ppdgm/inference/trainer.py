"""The training driver: one loop for every training engine.

An engine is an algorithm: it builds its state (``init``), takes one ``step`` and says what its
checkpoint holds; :func:`train` owns everything around it: the data order and sharding over
``torch.distributed`` ranks, minibatches, the number of steps, the learning-rate schedule, the
gradient norm, clip and non-finite guard (:meth:`Loop.descend`), validation and early stopping
with the best weights restored, callbacks, atomic checkpoints and exact resume, the progress bar,
timing, and assembling the :class:`~ppdgm.fit.Fit`. A new training engine subclasses
:class:`TrainingEngine`, writes those few methods, and calls :func:`train` from its ``run``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ppdgm import distributed
from ppdgm.fit import Fit, PathLike
from ppdgm.inference.base import Checkpointer, Engine, NonFiniteLossError, set_seed, step_timing
from ppdgm.inference.callbacks import CallbackLike, as_callbacks
from ppdgm.inference.schedules import lr_factor
from ppdgm.progress import progress_bar
from ppdgm.threads import with_threads_of_first_argument

# ---------------------------------------------------------------------------------------------
# data order


class Minibatches:
    """This rank's minibatches of ``data`` in a seeded order (``DistributedSampler``'s: a function of
    seed, epoch and rank alone, so a resumed run replays it).

    ``data`` is a tensor, a tuple of tensors sharing their first dimension, or a torch ``Dataset``
    (collated into a tuple). Tensors are gathered into the epoch's order once per epoch and a
    minibatch is then a slice (a view), which matters when a step costs about as much as indexing.
    ``batch_size`` None, or not smaller than the shard, means the full batch (the shard itself
    under several ranks); ``full_batch=False`` always cuts minibatches of at most ``batch_size``.
    """

    def __init__(
        self, data: Any, batch_size: int | None, seed: int | None, world: distributed.World, full_batch: bool = True
    ) -> None:
        self.data, self.seed, self.world = data, seed or 0, world
        self.n = _length(data)
        shard = math.ceil(self.n / world.size) if self.n else 0
        if not full_batch:
            if batch_size is None:
                raise ValueError("batch_size: minibatches (full_batch=False) need a positive int, got None")
            batch: int | None = min(batch_size, shard)
        else:
            batch = batch_size if (batch_size and batch_size < shard) else None
            if world.parallel and self.n and batch is None:
                batch = shard
        self.batch = batch
        self.per_epoch = math.ceil(shard / batch) if batch else 1
        self._epoch: int | None = None
        self._shard: Any = None
        self._full: Any = None

    def __getitem__(self, i: int) -> Any:
        """Minibatch ``i`` (counting across epochs)."""
        if self.data is None:
            return ()
        if self.batch is None:
            if self._full is None:
                self._full = _collate(self.data, range(self.n)) if _is_dataset(self.data) else self.data
            return self._full
        epoch, pos = divmod(i, self.per_epoch)
        if self._epoch != epoch:
            order = distributed.shard_order(self.n, epoch, self.seed, self.world)
            self._epoch, self._shard = epoch, self._gather(order)
        if _is_dataset(self.data):
            return _collate(self.data, self._shard[pos * self.batch : (pos + 1) * self.batch].tolist())
        return _rows(self._shard, pos * self.batch, (pos + 1) * self.batch)

    def _gather(self, order: torch.Tensor) -> Any:
        if _is_dataset(self.data):
            return order
        if isinstance(self.data, tuple):
            order = order.to(self.data[0].device)
            return tuple(d[order] for d in self.data)
        return self.data[order.to(self.data.device)]


def _is_dataset(data: Any) -> bool:
    return isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.Tensor)


def _length(data: Any) -> int:
    if data is None:
        return 0
    if isinstance(data, tuple):
        return data[0].shape[0]
    return len(data) if _is_dataset(data) else data.shape[0]


def _rows(data: Any, start: int, stop: int) -> Any:
    if isinstance(data, tuple):
        return tuple(d[start:stop] for d in data)
    return data[start:stop]


def _collate(dataset: Any, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
    items = [dataset[i] for i in indices]
    if isinstance(items[0], (tuple, list)):
        return tuple(torch.stack([torch.as_tensor(it[j]) for it in items]) for j in range(len(items[0])))
    return (torch.stack([torch.as_tensor(it) for it in items]),)


# ---------------------------------------------------------------------------------------------
# what a step sees


def non_finite_error(
    step: int,
    loss: float,
    grad_norm: float | None,
    fit: Fit,
    checkpoint_dir: PathLike | None = None,
    what: str = "loss",
) -> NonFiniteLossError:
    """Save the last finite ``fit`` (when a folder is given) and return the error that names the step."""
    if checkpoint_dir is not None:
        fit.save(checkpoint_dir)
    return NonFiniteLossError(
        f"non-finite {what} ({loss}) or gradient norm ({grad_norm}) at step {step}; the fit holds the parameters "
        f"from step {step - 1}" + (f", saved to {checkpoint_dir}" if checkpoint_dir is not None else ""),
        fit,
    )


class _NonFiniteStep(Exception):
    def __init__(self, loss: float, grad_norm: float | None, what: str) -> None:
        super().__init__(what)
        self.loss, self.grad_norm, self.what = loss, grad_norm, what


@dataclass
class Loop:
    """The driver's side of a step: where the run is (``step`` of ``total``, the schedule's
    ``lr_factor``, the ``history`` so far), its data (``batches``), and the gradient update."""

    batches: Minibatches
    total: int
    world: distributed.World
    device: torch.device
    clip_norm: float | None = None
    step: int = 0
    lr_factor: float = 1.0
    history: dict = field(default_factory=dict)

    def descend(
        self,
        params: Sequence[torch.Tensor],
        loss: float,
        *scalars: float,
        update: Callable[[], Any],
        clip: Any = ...,
        norm: bool = True,
        what: str = "loss",
    ) -> tuple[Any, ...]:
        """Finish one gradient update of ``params`` whose gradients the engine has accumulated.

        Averages the gradients (and ``loss``, ``scalars``) over ranks, clips them to ``clip``
        (default: the engine's ``clip_norm``), measures their norm (when ``norm`` or clipping),
        refuses a non-finite loss or norm before anything changes, then calls ``update()``.
        Returns ``(loss, *scalars, grad_norm)`` (grad_norm None when not measured)."""
        if self.world.parallel:
            loss, *averaged = distributed.average_gradients(params, float(loss), *scalars)
            scalars = tuple(averaged)
        clip = self.clip_norm if clip is ... else clip
        if clip is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        elif norm:
            grads = [p.grad for p in params if p.grad is not None]
            gnorm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
        else:
            gnorm = None
        loss = float(loss)
        if not (math.isfinite(loss) and (gnorm is None or math.isfinite(gnorm))):
            for p in params:
                p.grad = None
            raise _NonFiniteStep(loss, gnorm, what)
        update()
        return (loss, *scalars, gnorm)


# ---------------------------------------------------------------------------------------------
# the engine's side


class TrainingEngine(Engine):
    """An engine trained by :func:`train`. Subclasses set the class attributes and write:

    - ``init(problem, loop) -> state``: build the state (parameters, optimizers, chains ...);
    - ``step(state, loop) -> dict``: one update on ``loop.batches[loop.step]``, returning the step's
      metrics (``loss`` at least; a None value is not recorded, for metrics measured now and then);
    - ``parameters(state)``: the trained tensors (broadcast from rank 0 under torch.distributed);
    - ``optimizers(state)``: ``(optimizer, base_lr)`` pairs the schedule scales;
    - ``state_dict(state)`` / ``load_state_dict(state, saved)``: what a checkpoint holds;
    - ``fit_fields(state) -> dict``: the Fit's engine-specific fields (params, module, samples ...);
    - optionally ``validate(state, val_data) -> dict`` (``val_loss`` drives early stopping),
      ``weights(state)`` / ``load_weights(state, saved)`` (the best weights kept for ``patience``),
      ``finish(state)`` (after the last step, e.g. copying an EMA into the model).
    """

    history_keys: tuple = ("loss", "grad_norm")
    validation_keys: tuple = ("val_loss",)
    progress_keys: tuple = ("loss",)
    rank_noise: bool = False
    """Reseed each rank after the broadcast, so ranks draw independent noise."""
    full_batch: bool = True
    """Whether a ``batch_size`` not smaller than the data means the full batch (else: minibatches)."""
    num_epochs: int | None = None
    patience: int | None = None
    eval_every: int | None = None
    clip_norm: float | None = None
    lr_schedule: str | None = None
    lr_final_factor = 0.1
    # set by each engine's constructor
    num_steps: int
    batch_size: int | None
    seed: int | None
    progress: bool | None

    validate: Callable[[Any, Any], dict] | None = None

    def init(self, problem: Any, loop: Loop) -> Any:
        raise NotImplementedError

    def step(self, state: Any, loop: Loop) -> dict:
        raise NotImplementedError

    def parameters(self, state: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def optimizers(self, state: Any) -> list[tuple[Any, float]]:
        raise NotImplementedError

    def state_dict(self, state: Any) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: Any, saved: dict) -> None:
        raise NotImplementedError

    def fit_fields(self, state: Any) -> dict:
        raise NotImplementedError

    def eval_interval(self, per_epoch: int, total: int) -> int:
        return self.eval_every or per_epoch

    def weights(self, state: Any) -> dict:
        raise NotImplementedError

    def load_weights(self, state: Any, saved: dict) -> None:
        raise NotImplementedError

    def finish(self, state: Any) -> None:
        pass


def set_lr(optimizer: Any, lr: float) -> None:
    if hasattr(optimizer, "set_lr"):
        optimizer.set_lr(lr)
    else:
        for group in optimizer.param_groups:
            group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# the loop


def track_validation(
    best: dict | None, bad_evals: int, value: float, step: int, patience: int | None, weights: Callable[[], dict]
) -> tuple[dict, int, bool]:
    """Early-stopping bookkeeping after one validation loss: ``(best, bad_evals, stop)``.

    ``best`` is None or ``{"loss", "step", **weights()}``; ``weights`` snapshots what to keep and is
    called only when ``value`` improves on it."""
    if best is None or value < best["loss"]:
        return {"loss": value, "step": step, **weights()}, 0, False
    bad_evals += 1
    return best, bad_evals, patience is not None and bad_evals >= patience


@with_threads_of_first_argument  # engine.threads (default one: ppdgm.threads)
def train(
    engine: TrainingEngine,
    problem: Any,
    data: Any,
    *,
    device: torch.device,
    val_data: Any = None,
    checkpoint_dir: PathLike | None = None,
    resume: bool = False,
    callbacks: CallbackLike | Iterable[CallbackLike] | None = (),
) -> Fit:
    """Train ``engine`` on ``problem`` (whatever its ``init`` takes) and validated ``data``."""
    hooks = as_callbacks(callbacks)
    world = distributed.init_from_env(device)
    n = _length(data)
    if world.parallel and n:
        distributed.check_nproc(world.size, n, engine.batch_size)
    batches = Minibatches(data, engine.batch_size, engine.seed, world, engine.full_batch)
    total = engine.num_epochs * batches.per_epoch if engine.num_epochs else engine.num_steps
    loop = Loop(batches, total, world, device, engine.clip_norm)

    set_seed(engine.seed)
    state = engine.init(problem, loop)
    if world.parallel:
        distributed.broadcast_params(engine.parameters(state))
        if engine.rank_noise:
            set_seed((engine.seed or 0) + 7919 * world.rank)
    validate = engine.validate if val_data is not None else None
    history: dict[str, list] = {k: [] for k in engine.history_keys}
    if validate is not None:
        history.update({k: [] for k in engine.validation_keys}, val_step=[])
    start, bad_evals = 0, 0
    best: dict | None = None
    ckpt = Checkpointer(checkpoint_dir, getattr(engine, "checkpoint_every", None))
    saved = ckpt.load() if resume else None
    if saved is not None:
        engine.load_state_dict(state, saved["engine"])
        history, start, best, bad_evals = saved["history"], saved["step"], saved["best"], saved["bad_evals"]
    loop.history = history
    eval_every = engine.eval_interval(batches.per_epoch, total)

    def make_fit(end: int) -> Fit:
        fit = Fit(
            engine=engine.name,
            config=engine.config,
            history=history,
            timing=step_timing(time.perf_counter() - t0, max(end - start, 0)),
            **engine.fit_fields(state),
        )
        if best is not None:
            fit.extra["best_val"] = {"loss": best["loss"], "step": best["step"]}
        return fit

    for cb in hooks:
        cb.on_start(engine.config)
    pairs = engine.optimizers(state)
    constant = engine.lr_schedule in (None, "constant")
    t0 = time.perf_counter()
    bar = progress_bar(total, engine.name, engine.progress)
    bar.update(start)
    post_every = max(1, total // 200)
    step, stop, factor = start, False, None
    for step in range(start, total):
        if not constant or factor is None:
            now = lr_factor(engine.lr_schedule, step, total, engine.lr_final_factor)
            if now != factor:
                for opt, lr in pairs:
                    set_lr(opt, lr * now)
                factor = loop.lr_factor = now
        loop.step = step
        try:
            metrics = engine.step(state, loop)
        except _NonFiniteStep as err:
            bar.close()
            raise non_finite_error(
                step, err.loss, err.grad_norm, make_fit(step), checkpoint_dir if world.is_main else None, what=err.what
            ) from None
        for k, v in metrics.items():
            if v is not None:
                history.setdefault(k, []).append(v)
        done = step + 1
        if validate is not None and done % eval_every == 0:
            values = validate(state, val_data)
            for k, v in values.items():
                history[k].append(v)
            history["val_step"].append(done)
            if "val_loss" in values:
                best, bad_evals, stop = track_validation(
                    best,
                    bad_evals,
                    values["val_loss"],
                    done,
                    engine.patience,
                    lambda: {"weights": engine.weights(state)},
                )
            for cb in hooks:
                stop = bool(cb.on_validation(done, values)) or stop
        info = {**metrics, "lr": (pairs[0][1] * factor) if pairs else None}
        for cb in hooks:
            stop = bool(cb.on_step(done, info)) or stop
        if ckpt.due(done) or (stop and ckpt.every):
            snapshot = {
                "step": done,
                "engine": engine.state_dict(state),
                "history": history,
                "best": best,
                "bad_evals": bad_evals,
            }  # every rank builds it (some states gather), rank 0 writes
            if world.is_main:
                ckpt.save(snapshot)
        bar.update(1)
        if done % post_every == 0:
            bar.set_postfix({k: f"{history[k][-1]:.4g}" for k in engine.progress_keys if history[k]})
        if stop:
            break
    bar.close()
    engine.finish(state)
    if best is not None and engine.patience is not None:
        engine.load_weights(state, best["weights"])
    fit = make_fit(step + 1 if total > start else start)
    for cb in hooks:
        cb.on_end(fit)
    return fit
