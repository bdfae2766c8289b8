"""Adversarial training of an implicit Pyro model against a critic (Goodfellow et al. 2014).

The generator is any Pyro program called as ``model(batch_size, *conditioning)`` that records
its draws at a site (``"x"`` by default, e.g. ``pyro.deterministic("x", G(z))``); the engine
traces it to get samples and finds the generator's parameters as the trace's param sites, so a
plain function using ``pyro.module`` works as well as a zoo class. The critic is a
``torch.nn.Module`` called as ``critic(x, *conditioning) -> logits[batch]``.

Losses: ``"nonsaturating"`` (the critic is a logistic classifier; the generator maximizes
``log D(G(z))``), ``"hinge"`` (the critic's margin loss of Miyato et al. 2018 / BigGAN; the
generator maximizes ``D(G(z))``) or ``"wgan-gp"`` (Wasserstein critic with the gradient penalty of
Gulrajani et al. 2017). The first two take an optional R1 penalty on the critic's gradient at the
data (Mescheder et al. 2018). Each generator step follows ``n_critic`` critic steps, each with its
own optimizer, and may update an exponential moving average of the generator's weights that
replaces them when training ends (Yazici et al. 2019: the average samples better than the last
iterate).
Every ``monitor_every`` steps the engine measures sample diversity (mean pairwise distance of
generated points over that of real points) and warns of mode collapse when it drops below
``collapse_threshold``, and of divergence when the critic wins outright.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine

from ppdgm.data import check_data
from ppdgm.fit import Fit, param_store_state, restore_param_store
from ppdgm.inference.base import move_module, resolve_device
from ppdgm.inference.checks import choice, number_in, positive_int, positive_number
from ppdgm.inference.schedules import check_schedule
from ppdgm.inference.trainer import Loop, TrainingEngine, train

LOSSES = ("nonsaturating", "hinge", "wgan-gp")


class ModeCollapseWarning(RuntimeWarning):
    """Generated samples are far less diverse than the data."""


class DivergenceWarning(RuntimeWarning):
    """The critic separates real from generated data outright, or the Wasserstein loss explodes."""


@dataclass
class AdversarialState:
    model: Callable
    critic: torch.nn.Module
    g_params: list
    c_params: list
    g_opt: torch.optim.Optimizer
    c_opt: torch.optim.Optimizer
    x: torch.Tensor
    cond: tuple
    draws: int = 0
    alerts: list = field(default_factory=list)
    averaged: list | None = None


class Adversarial(TrainingEngine):
    """GAN training: ``Adversarial(**config).run(model, critic, data) -> Fit``.

    Args:
        loss: ``"wgan-gp"`` (the default: on digits the non-saturating loss collapsed to a few modes
            at every learning rate tried, which WGAN-GP did not) or ``"nonsaturating"``.
        num_steps: generator updates; batch_size: real and generated points per update.
        lr, critic_lr: Adam learning rates of the generator and critic (critic_lr None: lr).
        lr_schedule, lr_final_factor: the shared learning-rate schedules, applied to both (None: constant).
        betas: Adam betas (None: (0.5, 0.999) nonsaturating, (0.0, 0.9) WGAN-GP).
        n_critic: critic updates per generator update (None: 1 nonsaturating, 5 WGAN-GP).
        gp_weight: weight of the gradient penalty (WGAN-GP).
        r1_weight: weight ``gamma`` of the R1 penalty ``gamma / 2 * E ||grad D(x_real)||^2``
            (nonsaturating and hinge losses; 0: off).
        ema: decay of an exponential moving average of the generator's weights, copied into the
            generator when training ends (None: off; the last iterate is kept). The decay at step
            ``t`` is ``min(ema, (1 + t) / (10 + t))``, so early on it averages about the last
            tenth of the steps taken instead of remembering the initial weights.
        site: the sample/deterministic site that holds the generated data.
        monitor_every, collapse_threshold: diversity checks and the ratio that counts as collapse.
        checkpoint_every: steps between checkpoints (with ``checkpoint_dir`` in ``run``).
    """

    name = "adversarial"
    input = "adversarial"
    history_keys = ("loss", "critic_loss", "grad_norm", "critic_grad_norm", "diversity", "monitor_step")
    progress_keys = ("loss", "critic_loss")
    rank_noise = True
    full_batch = False

    def __init__(
        self,
        loss: str = "wgan-gp",
        num_steps: int = 2000,
        batch_size: int = 128,
        lr: float = 5e-4,
        critic_lr: float | None = None,
        betas=None,
        n_critic: int | None = None,
        gp_weight: float = 10.0,
        r1_weight: float = 0.0,
        ema: float | None = None,
        site: str = "x",
        monitor_every: int = 100,
        collapse_threshold: float = 0.1,
        checkpoint_every: int | None = None,
        seed: int | None = 0,
        device=None,
        progress: bool | None = None,
        lr_schedule: str | None = None,
        lr_final_factor: float = 0.1,
    ):
        choice("loss", loss, LOSSES)
        n_critic = (5 if loss == "wgan-gp" else 1) if n_critic is None else n_critic
        for arg, val in (
            ("num_steps", num_steps),
            ("batch_size", batch_size),
            ("n_critic", n_critic),
            ("monitor_every", monitor_every),
        ):
            positive_int(arg, val)
        positive_int("checkpoint_every", checkpoint_every, optional=True)
        critic_lr = lr if critic_lr is None else critic_lr
        for arg, number in (("lr", lr), ("critic_lr", critic_lr), ("gp_weight", gp_weight)):
            positive_number(arg, number)
        self.r1_weight = number_in("r1_weight", r1_weight, 0, float("inf"), closed_high=False)
        if self.r1_weight and loss == "wgan-gp":
            raise ValueError(
                "r1_weight: the R1 penalty is for the nonsaturating and hinge losses; wgan-gp has gp_weight"
            )
        if ema is not None and not (number_in("ema", ema, 0, 1, closed_high=False) > 0):
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {ema!r}")
        self.ema = None if ema is None else float(ema)
        betas = ((0.0, 0.9) if loss == "wgan-gp" else (0.5, 0.999)) if betas is None else tuple(betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.collapse_threshold = number_in("collapse_threshold", collapse_threshold, 0, 1, closed_high=False)
        self.lr_schedule, self.lr_final_factor = check_schedule(lr_schedule, lr_final_factor)
        self.loss, self.num_steps, self.batch_size = loss, num_steps, batch_size
        self.lr, self.critic_lr, self.betas, self.n_critic = float(lr), float(critic_lr), list(betas), n_critic
        self.gp_weight, self.site = float(gp_weight), site
        self.monitor_every = monitor_every
        self.checkpoint_every, self.seed, self.device, self.progress = checkpoint_every, seed, device, progress

    # -----------------------------------------------------------------------------------------
    def generate(self, model, n: int, cond: tuple) -> torch.Tensor:
        """Trace the generator program once and read its data site."""
        tr = poutine.trace(model).get_trace(n, *cond)
        if self.site not in tr.nodes:
            raise ValueError(
                f"the generator program records no site {self.site!r} (pass site= to the engine); "
                f"its sites are {[k for k, s in tr.nodes.items() if s['type'] == 'sample']}"
            )
        return tr.nodes[self.site]["value"]

    def run(
        self, model, critic, data, *, val_data=None, checkpoint_dir=None, resume: bool = False, callbacks=()
    ) -> Fit:
        """Train the generator program ``model`` against ``critic`` on ``data`` (a tensor, or a
        tuple ``(x, *conditioning)`` whose extra parts are passed to both networks)."""
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro program, got {type(model).__name__}")
        if not isinstance(critic, torch.nn.Module):
            raise TypeError(f"critic must be a torch.nn.Module, got {type(critic).__name__}")
        parts = data if isinstance(data, (tuple, list)) else (data,)
        if not parts or parts[0] is None:
            raise ValueError("data: expected a tensor (or tuple (x, *conditioning)) of training points, got None")
        x = check_data(parts[0], "data", rank=2)
        cond = tuple(torch.as_tensor(c) for c in parts[1:])
        if any(c.shape[0] != x.shape[0] for c in cond):
            raise ValueError(
                f"data: expected conditioning tensors with {x.shape[0]} rows, got {[tuple(c.shape) for c in cond]}"
            )
        device = resolve_device(self.device, x)
        x, cond = x.to(device), tuple(c.to(device) for c in cond)
        move_module(model, device)
        critic.to(device)
        return train(
            self,
            (model, critic),
            (x, *cond),
            device=device,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            callbacks=callbacks,
        )

    # -----------------------------------------------------------------------------------------
    # the algorithm the driver runs

    def init(self, problem, loop: Loop) -> AdversarialState:
        model, critic = problem
        x, *cond = loop.batches.data
        pyro.clear_param_store()
        g_params = self._check_shapes(model, critic, x, tuple(cond))
        c_params = [p for p in critic.parameters() if p.requires_grad]
        if not c_params:
            raise ValueError("critic has no trainable parameters")
        g_opt = torch.optim.Adam(g_params, lr=self.lr, betas=tuple(self.betas))
        c_opt = torch.optim.Adam(c_params, lr=self.critic_lr, betas=tuple(self.betas))
        averaged = [p.detach().clone() for p in g_params] if self.ema is not None else None
        return AdversarialState(model, critic, g_params, c_params, g_opt, c_opt, x, tuple(cond), 0, [], averaged)

    def step(self, state: AdversarialState, loop: Loop) -> dict:
        # a forward pass advances the critic's buffers (spectral norm's power iteration): a step
        # refused as non-finite must leave them as they were, like the weights
        buffers = [b.clone() for b in state.critic.buffers()]
        try:
            return self._step(state, loop)
        except BaseException:
            with torch.no_grad():
                for b, saved in zip(state.critic.buffers(), buffers):
                    b.copy_(saved)
            raise

    def _step(self, state: AdversarialState, loop: Loop) -> dict:
        model, critic = state.model, state.critic
        for _ in range(self.n_critic):
            xr, *cr = loop.batches[state.draws]
            state.draws += 1
            with torch.no_grad():
                xf = self.generate(model, xr.shape[0], cr)
            c_loss = self._critic_loss(critic, xr, xf, cr)
            state.c_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            c_value, c_norm = loop.descend(
                state.c_params, float(c_loss.detach()), update=state.c_opt.step, clip=None, what="critic loss"
            )
        xr, *cr = loop.batches[state.draws - 1]
        g_out = critic(self.generate(model, xr.shape[0], cr), *cr)
        g_loss = torch.nn.functional.softplus(-g_out).mean() if self.loss == "nonsaturating" else -g_out.mean()
        state.g_opt.zero_grad(set_to_none=True)
        state.c_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_value, g_norm = loop.descend(
            state.g_params, float(g_loss.detach()), update=state.g_opt.step, clip=None, what="generator loss"
        )
        state.c_opt.zero_grad(set_to_none=True)
        if state.averaged is not None and self.ema is not None:
            # the decay ramps up to ema, so the average forgets the random initial weights
            decay = min(self.ema, (1 + loop.step) / (10 + loop.step))
            with torch.no_grad():
                torch._foreach_lerp_(state.averaged, [p.detach() for p in state.g_params], 1 - decay)
        metrics = {"loss": g_value, "critic_loss": c_value, "grad_norm": g_norm, "critic_grad_norm": c_norm}
        done = loop.step + 1
        if done % self.monitor_every == 0 or done == loop.total:
            critic_losses = loop.history["critic_loss"] + [c_value]
            ratio, alerts = self._monitor(model, state.x, state.cond, critic_losses, done, state.alerts)
            state.alerts += alerts
            metrics.update(diversity=ratio, monitor_step=done)
        return metrics

    def parameters(self, state: AdversarialState) -> list:
        return state.g_params + state.c_params + (state.averaged or [])

    def finish(self, state: AdversarialState) -> None:
        """The generator keeps the moving average of its weights, the one that samples."""
        if state.averaged is not None:
            with torch.no_grad():
                for p, a in zip(state.g_params, state.averaged):
                    p.copy_(a)

    def optimizers(self, state: AdversarialState) -> list:
        return [(state.g_opt, self.lr), (state.c_opt, self.critic_lr)]

    def state_dict(self, state: AdversarialState) -> dict:
        return {
            "params": param_store_state(),
            "critic": state.critic.state_dict(),
            "g_optim": state.g_opt.state_dict(),
            "c_optim": state.c_opt.state_dict(),
            "draws": state.draws,
            "alerts": state.alerts,
            "ema": [a.clone() for a in state.averaged] if state.averaged is not None else None,
        }

    def load_state_dict(self, state: AdversarialState, saved: dict) -> None:
        restore_param_store(saved["params"], state.x.device)
        state.critic.load_state_dict(saved["critic"])
        state.g_opt.load_state_dict(saved["g_optim"])
        state.c_opt.load_state_dict(saved["c_optim"])
        state.draws, state.alerts = saved["draws"], saved["alerts"]
        if state.averaged is not None:
            if saved.get("ema") is None:
                raise ValueError("resume: the checkpoint holds no generator average, but this engine has ema set")
            for a, s in zip(state.averaged, saved["ema"]):
                a.copy_(s)

    def fit_fields(self, state: AdversarialState) -> dict:
        critic = {k: v.detach().clone() for k, v in state.critic.state_dict().items()}
        module = getattr(state.model, "__self__", None)  # a zoo GAN's bound model method: keep its module
        module = module if isinstance(module, torch.nn.Module) else None
        spec = getattr(module, "spec", None)
        return {
            "params": param_store_state(),
            "extra": {"tensors": {"critic": critic}, "warnings": state.alerts},
            "model": state.model,
            "args": (state.x, *state.cond),
            "module": module,
            "spec": spec if isinstance(spec, dict) else None,
        }

    # -----------------------------------------------------------------------------------------
    def _check_shapes(self, model, critic, x, cond) -> list:
        """Generate two points and score them before training: shapes must agree with the data."""
        k = min(2, x.shape[0])
        c2 = tuple(c[:k] for c in cond)
        with poutine.trace(param_only=True) as cap:
            fake = self.generate(model, k, c2)
        if not isinstance(fake, torch.Tensor) or tuple(fake.shape[1:]) != tuple(x.shape[1:]):
            got = tuple(fake.shape) if isinstance(fake, torch.Tensor) else type(fake).__name__
            raise ValueError(
                f"generator/data shape mismatch: the generator's site {self.site!r} gave shape {got} "
                f"for {k} draws; the data points have shape {tuple(x.shape[1:])}"
            )
        try:
            with torch.no_grad():
                out = critic(fake, *c2)
        except RuntimeError as err:
            raise ValueError(
                f"generator/critic shape mismatch: the critic cannot take generated points shaped "
                f"{tuple(fake.shape)}: {str(err).splitlines()[0]}"
            ) from None
        if out.shape not in ((k,), (k, 1)):
            raise ValueError(f"critic must return one logit per point, shape ({k},); got {tuple(out.shape)}")
        params = [s["value"].unconstrained() for s in cap.trace.nodes.values() if s["value"] is not None]
        if not params:
            raise ValueError(
                "the generator program has no parameters (register its network with pyro.module "
                "or make it a PyroModule)"
            )
        return params

    def _critic_loss(self, critic, xr, xf, cr) -> torch.Tensor:
        if self.loss != "wgan-gp":
            xr = xr.detach().requires_grad_(self.r1_weight > 0)
        real, fake = critic(xr, *cr).reshape(-1), critic(xf, *cr).reshape(-1)
        if self.loss != "wgan-gp":
            if self.loss == "nonsaturating":
                sp = torch.nn.functional.softplus
                loss = sp(-real).mean() + sp(fake).mean()
            else:
                loss = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
            if self.r1_weight > 0:
                (grad,) = torch.autograd.grad(real.sum(), xr, create_graph=True)
                loss = loss + 0.5 * self.r1_weight * grad.flatten(1).square().sum(1).mean()
            return loss
        eps = torch.rand(xr.shape[0], *[1] * (xr.dim() - 1), device=xr.device, dtype=xr.dtype)
        mix = (eps * xr + (1 - eps) * xf).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mix, *cr).sum(), mix, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        return fake.mean() - real.mean() + self.gp_weight * penalty

    def _monitor(self, model, x, cond, critic_losses, done, previous) -> tuple[float, list]:
        """Record sample diversity; warn (once per kind) of mode collapse and divergence.

        Runs on a forked RNG so that monitoring (and so where a run stops) never changes the draws
        of training: a resumed run ends exactly where an uninterrupted one does."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return self._measure(model, x, cond, critic_losses, done, previous)

    def _measure(self, model, x, cond, critic_losses, done, previous) -> tuple[float, list]:
        """The diversity ratio at step ``done`` and the new alerts."""
        m = min(256, x.shape[0])
        gen = torch.Generator().manual_seed(done)
        idx = torch.randperm(x.shape[0], generator=gen)[:m].to(x.device)
        fake = self.generate(model, m, tuple(c[idx] for c in cond)).flatten(1)
        real = x[idx].flatten(1)
        ratio = float(torch.pdist(fake).mean() / torch.pdist(real).mean().clamp_min(1e-12))
        kinds = {a["kind"] for a in previous}
        alerts = []
        if ratio < self.collapse_threshold and "mode_collapse" not in kinds:
            alerts.append(
                {
                    "kind": "mode_collapse",
                    "step": done,
                    "message": f"mode collapse at step {done}: generated samples are {ratio:.3g} times as spread out "
                    f"as the data (threshold {self.collapse_threshold})",
                }
            )
            warnings.warn(alerts[-1]["message"], ModeCollapseWarning, stacklevel=3)
        window = critic_losses[-self.monitor_every :]
        mean_c = sum(window) / len(window)
        first = critic_losses[: self.monitor_every]
        scale = abs(sum(first) / len(first)) + 1.0
        diverged = mean_c < 1e-3 if self.loss == "nonsaturating" else abs(mean_c) > 100 * scale
        if diverged and "divergence" not in kinds:
            alerts.append(
                {
                    "kind": "divergence",
                    "step": done,
                    "message": f"training diverged at step {done}: mean critic loss {mean_c:.3g} over the last "
                    f"{len(window)} steps (the critic separates real from generated data outright)",
                }
            )
            warnings.warn(alerts[-1]["message"], DivergenceWarning, stacklevel=3)
        return ratio, alerts
