"""Denoising score matching (Vincent 2011; Song et al. 2021) for any model that opts in.

Protocol: ``model`` is a ``torch.nn.Module`` with ``denoising_loss(batch) -> Tensor[batch]`` (the
per-point weighted regression of the score onto the noise, with its own random times and noise)
and optionally ``check_data(x, name) -> Tensor`` to validate data before anything runs. The
engine minimizes the mean loss with Adam over seeded minibatches, optionally keeps an exponential
moving average of the weights (copied into the model at the end), evaluates a validation loss
under fixed noise, and checkpoints/resumes.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ppdgm.data import check_data
from ppdgm.fit import Fit
from ppdgm import distributed
from ppdgm.inference.base import (
    Checkpointer,
    Engine,
    non_finite_error,
    progress_bar,
    resolve_device,
    set_seed,
    step_timing,
    track_validation,
)

PROTOCOL = ("denoising_loss",)


class ScoreMatching(Engine):
    """``ScoreMatching(**config).run(model, data) -> Fit``.

    Args:
        num_steps, batch_size, lr: Adam updates on minibatches (batch_size None: full batch).
        clip_norm: optional gradient-norm clip.
        ema: decay of an exponential moving average of the weights (None: off).
        eval_every: steps between validation losses (with ``val_data``).
        patience: stop after this many validation losses without improvement and keep the
            weights of the best one (score models on small data grow overconfident with long
            training: their test likelihood falls apart while the training loss still improves).
        checkpoint_every: steps between checkpoints (with ``checkpoint_dir`` in ``run``).
    """

    name = "score_matching"
    input = "denoising"

    def __init__(self, num_steps: int = 2000, batch_size: int | None = 256, lr: float = 1e-3,
                 clip_norm: float | None = None, ema: float | None = None, eval_every: int | None = None,
                 patience: int | None = None, checkpoint_every: int | None = None, seed: int | None = 0,
                 device=None, progress: bool | None = None):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        for arg, val in (("batch_size", batch_size), ("eval_every", eval_every), ("patience", patience),
                         ("checkpoint_every", checkpoint_every)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{arg} must be a positive int or None, got {val!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {clip_norm!r}")
        if ema is not None and not 0 < ema < 1:
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {ema!r}")
        self.num_steps, self.batch_size, self.lr, self.clip_norm, self.ema = num_steps, batch_size, float(lr), \
            clip_norm, ema
        self.eval_every, self.patience, self.checkpoint_every = eval_every, patience, checkpoint_every
        self.seed, self.device, self.progress = seed, device, progress

    def run_zoo(self, obj, train_args, valid_args=None, checkpoint_dir=None, resume: bool = False) -> Fit:
        """How the CLI drives this engine on a zoo object."""
        val = valid_args[0] if valid_args else None
        return self.run(obj, train_args[0], val_data=val, checkpoint_dir=checkpoint_dir, resume=resume)

    def run(self, model, data, *, val_data=None, checkpoint_dir=None, resume: bool = False, callbacks=()) -> Fit:
        if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "denoising_loss", None)):
            raise TypeError(f"model must be a torch.nn.Module with denoising_loss(batch), got {type(model).__name__}")
        checker = getattr(model, "check_data", None) or (lambda x, name: check_data(x, name))
        if data is None:
            raise ValueError("data: expected a tensor of training points, got None")
        data = checker(data, "data")
        val_data = checker(val_data, "val_data") if val_data is not None else None
        device = resolve_device(self.device, data)
        model.to(device)
        data = data.to(device)
        val_data = val_data.to(device) if val_data is not None else None
        params = [p for p in model.parameters() if p.requires_grad]
        set_seed(self.seed)
        world = distributed.init_from_env(device)
        if world.parallel:
            distributed.check_nproc(world.size, data.shape[0], self.batch_size)
            distributed.broadcast_params(params)
            set_seed((self.seed or 0) + 7919 * world.rank)  # independent noise per rank
        optimizer = torch.optim.Adam(params, lr=self.lr)
        averaged = copy.deepcopy(model).requires_grad_(False) if self.ema else None
        n = data.shape[0]
        shard = math.ceil(n / world.size)
        batch = self.batch_size if self.batch_size and self.batch_size < shard else (shard if world.parallel else None)
        per_epoch = math.ceil(shard / batch) if batch else 1
        eval_every = self.eval_every or max(1, self.num_steps // 20)
        history = {"loss": [], "grad_norm": []}
        if val_data is not None:
            history.update(val_loss=[], val_step=[])
        start, best, bad_evals = 0, None, 0
        ckpt = Checkpointer(checkpoint_dir, self.checkpoint_every)
        state = ckpt.load() if resume else None
        if state is not None:
            model.load_state_dict(state["module"])
            optimizer.load_state_dict(state["optim"])
            if averaged is not None and state.get("ema") is not None:
                averaged.load_state_dict(state["ema"])
            history, start = state["history"], state["step"]
            best, bad_evals = state.get("best"), state.get("bad_evals", 0)

        def snapshot(step):
            return {"step": step, "module": model.state_dict(), "optim": optimizer.state_dict(), "history": history,
                    "ema": averaged.state_dict() if averaged is not None else None, "best": best,
                    "bad_evals": bad_evals}

        t0 = time.perf_counter()
        bar = progress_bar(self.num_steps, "score matching", self.progress)
        bar.update(start)
        post_every = max(1, self.num_steps // 200)
        step, stop = start, False
        for step in range(start, self.num_steps):
            if batch:
                epoch, pos = divmod(step, per_epoch)
                order = distributed.shard_order(n, epoch, self.seed or 0, world)
                b = data[order[pos * batch:(pos + 1) * batch].to(device)]
            else:
                b = data
            loss = model.denoising_loss(b).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            if world.parallel:
                (value,) = distributed.average_gradients(params, value)
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_norm or math.inf))
            if not (math.isfinite(value) and math.isfinite(gnorm)):
                bar.close()
                fit = self._fit(model, history, t0, start, step)
                raise non_finite_error(step, value, gnorm, fit, checkpoint_dir if world.is_main else None)
            optimizer.step()
            if averaged is not None:
                with torch.no_grad():
                    for a, p in zip(averaged.parameters(), model.parameters()):
                        a.lerp_(p, 1 - self.ema)
            done = step + 1
            history["loss"].append(value)
            history["grad_norm"].append(gnorm)
            if val_data is not None and done % eval_every == 0:
                v = self._val_loss(averaged or model, val_data, done)
                history["val_loss"].append(v)
                history["val_step"].append(done)
                best, bad_evals, stop = track_validation(
                    best, bad_evals, v, done, self.patience,
                    lambda: {"module": {k: t.detach().clone() for k, t in (averaged or model).state_dict().items()}})
            for cb in callbacks:
                stop = bool(cb(done, {"loss": value, "grad_norm": gnorm})) or stop
            if world.is_main and (ckpt.due(done) or (stop and ckpt.every)):
                ckpt.save(snapshot(done))
            bar.update(1)
            if done % post_every == 0:
                bar.set_postfix(loss=f"{value:.4g}")
            if stop:
                break
        bar.close()
        if averaged is not None:
            model.load_state_dict(averaged.state_dict())
        if best is not None and self.patience is not None:
            model.load_state_dict(best["module"])
        fit = self._fit(model, history, t0, start, step + 1)
        fit.args = (data,)
        if best is not None:
            fit.extra["best_val"] = {"loss": best["loss"], "step": best["step"]}
        return fit

    @staticmethod
    def _val_loss(model, val_data, step) -> float:
        """Validation loss under noise fixed by a seed, so evaluations are comparable across steps."""
        rng = torch.get_rng_state()
        torch.manual_seed(12345)
        try:
            with torch.no_grad():
                return float(model.denoising_loss(val_data).mean())
        finally:
            torch.set_rng_state(rng)

    def _fit(self, model, history, t0, start, end) -> Fit:
        seconds = time.perf_counter() - t0
        steps = max(end - start, 0)
        spec = getattr(model, "spec", None)
        return Fit(engine=self.name, config=self.config, history=history,
                   timing=step_timing(seconds, steps),
                   spec=spec if isinstance(spec, dict) else None, module=model)
