"""Denoising score matching (Vincent 2011; Song et al. 2021) for any model that opts in.

Protocol: ``model`` is a ``torch.nn.Module`` with ``denoising_loss(batch) -> Tensor[batch]`` (the
per-point weighted regression of the score onto the noise, with its own random times and noise)
and optionally ``check_data(x, name) -> Tensor`` to validate data before anything runs. The
engine minimizes the mean loss with Adam (under any of the shared learning-rate schedules) over
seeded minibatches, optionally keeps an exponential moving average of the weights (copied into the
model at the end), evaluates a validation loss under fixed noise, and checkpoints/resumes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ppdgm.data import check_data
from ppdgm.fit import Fit
from ppdgm.inference.base import resolve_device
from ppdgm.inference.checks import number_in, positive_int, positive_number
from ppdgm.inference.schedules import check_schedule
from ppdgm.inference.trainer import Loop, TrainingEngine, train

PROTOCOL = ("denoising_loss",)


@dataclass
class ScoreState:
    model: Any  # a torch module implementing ppdgm.models.family.Denoising
    params: list
    optimizer: torch.optim.Optimizer
    averaged: torch.nn.Module | None


class ScoreMatching(TrainingEngine):
    """``ScoreMatching(**config).run(model, data) -> Fit``.

    Args:
        num_steps, batch_size, lr: Adam updates on minibatches (batch_size None: full batch).
        lr_schedule, lr_final_factor: the shared learning-rate schedules (None: constant).
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
    rank_noise = True

    def __init__(
        self,
        num_steps: int = 2000,
        batch_size: int | None = 256,
        lr: float = 1e-3,
        clip_norm: float | None = None,
        ema: float | None = None,
        eval_every: int | None = None,
        patience: int | None = None,
        checkpoint_every: int | None = None,
        seed: int | None = 0,
        device=None,
        progress: bool | None = None,
        lr_schedule: str | None = None,
        lr_final_factor: float = 0.1,
    ):
        positive_int("num_steps", num_steps)
        for arg, val in (
            ("batch_size", batch_size),
            ("eval_every", eval_every),
            ("patience", patience),
            ("checkpoint_every", checkpoint_every),
        ):
            positive_int(arg, val, optional=True)
        self.lr = positive_number("lr", lr)
        self.clip_norm = positive_number("clip_norm", clip_norm, optional=True)
        if ema is not None:
            number_in("ema", ema, 0, 1, closed_high=False)
            if ema == 0:
                raise ValueError(f"ema must be a decay in (0, 1) or None, got {ema!r}")
        self.lr_schedule, self.lr_final_factor = check_schedule(lr_schedule, lr_final_factor)
        self.num_steps, self.batch_size, self.ema = num_steps, batch_size, ema
        self.eval_every, self.patience, self.checkpoint_every = eval_every, patience, checkpoint_every
        self.seed, self.device, self.progress = seed, device, progress

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
        fit = train(
            self,
            model,
            data.to(device),
            device=device,
            val_data=val_data.to(device) if val_data is not None else None,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            callbacks=callbacks,
        )
        fit.args = (data.to(device),)
        return fit

    # -----------------------------------------------------------------------------------------
    # the algorithm the driver runs

    def eval_interval(self, per_epoch: int, total: int) -> int:
        return self.eval_every or max(1, self.num_steps // 20)

    def init(self, model, loop: Loop) -> ScoreState:
        params = [p for p in model.parameters() if p.requires_grad]
        averaged = copy.deepcopy(model).requires_grad_(False) if self.ema else None
        return ScoreState(model, params, torch.optim.Adam(params, lr=self.lr), averaged)

    def step(self, state: ScoreState, loop: Loop) -> dict:
        loss = state.model.denoising_loss(loop.batches[loop.step]).mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss, gnorm = loop.descend(state.params, float(loss.detach()), update=state.optimizer.step)
        if state.averaged is not None and self.ema is not None:
            with torch.no_grad():
                for a, p in zip(state.averaged.parameters(), state.model.parameters()):
                    a.lerp_(p, 1 - self.ema)
        return {"loss": loss, "grad_norm": gnorm}

    def validate(self, state: ScoreState, val_data) -> dict:
        return {"val_loss": fixed_noise_loss(state.averaged or state.model, val_data)}

    def parameters(self, state: ScoreState) -> list:
        return state.params + (list(state.averaged.parameters()) if state.averaged is not None else [])

    def optimizers(self, state: ScoreState) -> list:
        return [(state.optimizer, self.lr)]

    def weights(self, state: ScoreState) -> dict:
        return {k: t.detach().clone() for k, t in (state.averaged or state.model).state_dict().items()}

    def load_weights(self, state: ScoreState, saved: dict) -> None:
        state.model.load_state_dict(saved)

    def finish(self, state: ScoreState) -> None:
        if state.averaged is not None:
            state.model.load_state_dict(state.averaged.state_dict())

    def state_dict(self, state: ScoreState) -> dict:
        return {
            "module": state.model.state_dict(),
            "optim": state.optimizer.state_dict(),
            "ema": state.averaged.state_dict() if state.averaged is not None else None,
        }

    def load_state_dict(self, state: ScoreState, saved: dict) -> None:
        state.model.load_state_dict(saved["module"])
        state.optimizer.load_state_dict(saved["optim"])
        if state.averaged is not None and saved["ema"] is not None:
            state.averaged.load_state_dict(saved["ema"])

    def fit_fields(self, state: ScoreState) -> dict:
        spec = getattr(state.model, "spec", None)
        return {"spec": spec if isinstance(spec, dict) else None, "module": state.model}


def fixed_noise_loss(model, data) -> float:
    """The mean denoising loss under noise fixed by a seed, so validations are comparable across
    steps (the training RNG is left as it was)."""
    rng = torch.get_rng_state()
    torch.manual_seed(12345)
    try:
        with torch.no_grad():
            return float(model.denoising_loss(data).mean())
    finally:
        torch.set_rng_state(rng)
