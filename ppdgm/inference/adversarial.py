"""Adversarial training of an implicit Pyro model against a critic (Goodfellow et al. 2014).

The generator is any Pyro program called as ``model(batch_size, *conditioning)`` that records
its draws at a site (``"x"`` by default, e.g. ``pyro.deterministic("x", G(z))``); the engine
traces it to get samples and finds the generator's parameters as the trace's param sites, so a
plain function using ``pyro.module`` works as well as a zoo class. The critic is a
``torch.nn.Module`` called as ``critic(x, *conditioning) -> logits[batch]``.

Losses: ``"nonsaturating"`` (the critic is a logistic classifier; the generator maximizes
``log D(G(z))``) or ``"wgan-gp"`` (Wasserstein critic with the gradient penalty of Gulrajani et
al. 2017). Each generator step follows ``n_critic`` critic steps, each with its own optimizer.
Every ``monitor_every`` steps the engine measures sample diversity (mean pairwise distance of
generated points over that of real points) and warns of mode collapse when it drops below
``collapse_threshold``, and of divergence when the critic wins outright.
"""

from __future__ import annotations

import math
import time
import warnings

import pyro
import torch
from pyro import poutine

from ppdgm.data import check_data
from ppdgm.fit import Fit, param_store_state, restore_param_store
from ppdgm import distributed
from ppdgm.inference.base import (
    Checkpointer,
    Engine,
    move_module,
    non_finite_error,
    progress_bar,
    resolve_device,
    set_seed,
    step_timing,
)

LOSSES = ("nonsaturating", "wgan-gp")


class ModeCollapseWarning(RuntimeWarning):
    """Generated samples are far less diverse than the data."""


class DivergenceWarning(RuntimeWarning):
    """The critic separates real from generated data outright, or the Wasserstein loss explodes."""


class Adversarial(Engine):
    """GAN training: ``Adversarial(**config).run(model, critic, data) -> Fit``.

    Args:
        loss: ``"wgan-gp"`` (the default: on digits the non-saturating loss collapsed to a few modes
            at every learning rate tried, which WGAN-GP did not) or ``"nonsaturating"``.
        num_steps: generator updates; batch_size: real and generated points per update.
        lr, critic_lr: Adam learning rates of the generator and critic (critic_lr None: lr).
        betas: Adam betas (None: (0.5, 0.999) nonsaturating, (0.0, 0.9) WGAN-GP).
        n_critic: critic updates per generator update (None: 1 nonsaturating, 5 WGAN-GP).
        gp_weight: weight of the gradient penalty (WGAN-GP).
        site: the sample/deterministic site that holds the generated data.
        monitor_every, collapse_threshold: diversity checks and the ratio that counts as collapse.
        checkpoint_every: steps between checkpoints (with ``checkpoint_dir`` in ``run``).
    """

    name = "adversarial"
    input = "adversarial"

    def __init__(self, loss: str = "wgan-gp", num_steps: int = 2000, batch_size: int = 128,
                 lr: float = 5e-4, critic_lr: float | None = None, betas=None, n_critic: int | None = None,
                 gp_weight: float = 10.0, site: str = "x", monitor_every: int = 100,
                 collapse_threshold: float = 0.1, checkpoint_every: int | None = None, seed: int | None = 0,
                 device=None, progress: bool | None = None):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        n_critic = (5 if loss == "wgan-gp" else 1) if n_critic is None else n_critic
        for arg, val in (("num_steps", num_steps), ("batch_size", batch_size), ("n_critic", n_critic),
                         ("monitor_every", monitor_every)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
        critic_lr = lr if critic_lr is None else critic_lr
        for arg, val in (("lr", lr), ("critic_lr", critic_lr), ("gp_weight", gp_weight)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
                raise ValueError(f"{arg} must be a positive number, got {val!r}")
        betas = ((0.0, 0.9) if loss == "wgan-gp" else (0.5, 0.999)) if betas is None else tuple(betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not 0 <= collapse_threshold < 1:
            raise ValueError(f"collapse_threshold must be in [0, 1), got {collapse_threshold!r}")
        self.loss, self.num_steps, self.batch_size = loss, num_steps, batch_size
        self.lr, self.critic_lr, self.betas, self.n_critic = float(lr), float(critic_lr), list(betas), n_critic
        self.gp_weight, self.site = float(gp_weight), site
        self.monitor_every, self.collapse_threshold = monitor_every, float(collapse_threshold)
        self.checkpoint_every, self.seed, self.device, self.progress = checkpoint_every, seed, device, progress

    # -----------------------------------------------------------------------------------------
    def run_zoo(self, obj, train_args, valid_args=None, checkpoint_dir=None, resume: bool = False) -> Fit:
        """How the CLI drives this engine on a zoo GAN (its ``model`` and ``critic``)."""
        fit = self.run(obj.model, obj.critic, tuple(train_args), val_data=valid_args,
                       checkpoint_dir=checkpoint_dir, resume=resume)
        fit.module, fit.spec = obj, obj.spec
        return fit

    def generate(self, model, n: int, cond: tuple) -> torch.Tensor:
        """Trace the generator program once and read its data site."""
        tr = poutine.trace(model).get_trace(n, *cond)
        if self.site not in tr.nodes:
            raise ValueError(f"the generator program records no site {self.site!r} (pass site= to the engine); "
                             f"its sites are {[k for k, s in tr.nodes.items() if s['type'] == 'sample']}")
        return tr.nodes[self.site]["value"]

    def run(self, model, critic, data, *, val_data=None, checkpoint_dir=None, resume: bool = False,
            callbacks=()) -> Fit:
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
            raise ValueError(f"data: expected conditioning tensors with {x.shape[0]} rows, got "
                             f"{[tuple(c.shape) for c in cond]}")
        device = resolve_device(self.device, x)
        x, cond = x.to(device), tuple(c.to(device) for c in cond)
        move_module(model, device)
        critic.to(device)

        set_seed(self.seed)
        pyro.clear_param_store()
        g_params = self._check_shapes(model, critic, x, cond)
        c_params = [p for p in critic.parameters() if p.requires_grad]
        if not c_params:
            raise ValueError("critic has no trainable parameters")
        world = distributed.init_from_env(device)
        if world.parallel:
            distributed.check_nproc(world.size, x.shape[0], self.batch_size)
            distributed.broadcast_params(g_params + c_params)
            set_seed((self.seed or 0) + 7919 * world.rank)  # independent generator noise per rank
        g_opt = torch.optim.Adam(g_params, lr=self.lr, betas=tuple(self.betas))
        c_opt = torch.optim.Adam(c_params, lr=self.critic_lr, betas=tuple(self.betas))
        n = x.shape[0]
        batch = min(self.batch_size, math.ceil(n / world.size))
        history = {"loss": [], "critic_loss": [], "grad_norm": [], "critic_grad_norm": [], "diversity": [],
                   "monitor_step": []}
        start, draws, alerts = 0, 0, []
        ckpt = Checkpointer(checkpoint_dir, self.checkpoint_every)
        if resume:
            state = ckpt.load()
            if state is not None:
                restore_param_store(state["params"], device)
                critic.load_state_dict(state["critic"])
                g_opt.load_state_dict(state["g_optim"])
                c_opt.load_state_dict(state["c_optim"])
                history, start, draws, alerts = state["history"], state["step"], state["draws"], state["alerts"]

        def snapshot(step):
            return {"step": step, "params": param_store_state(), "critic": critic.state_dict(),
                    "g_optim": g_opt.state_dict(), "c_optim": c_opt.state_dict(), "history": history,
                    "draws": draws, "alerts": alerts}

        def real_batch(i):
            """Draw ``i`` of this rank's shard of the epoch's order (``DistributedSampler``'s)."""
            per_epoch = max(1, math.ceil(n / world.size) // batch)
            epoch, pos = divmod(i, per_epoch)
            idx = distributed.shard_order(n, epoch, self.seed or 0, world)[pos * batch:(pos + 1) * batch].to(device)
            return x[idx], tuple(c[idx] for c in cond)

        t0 = time.perf_counter()
        bar = progress_bar(self.num_steps, "adversarial", self.progress)
        bar.update(start)
        post_every = max(1, self.num_steps // 200)
        step, stop = start, False
        for step in range(start, self.num_steps):
            for _ in range(self.n_critic):
                xr, cr = real_batch(draws)
                draws += 1
                with torch.no_grad():
                    xf = self.generate(model, xr.shape[0], cr)
                c_loss = self._critic_loss(critic, xr, xf, cr)
                c_opt.zero_grad(set_to_none=True)
                c_loss.backward()
                if world.parallel:
                    (c_value,) = distributed.average_gradients(c_params, float(c_loss.detach()))
                    c_loss = c_loss.new_tensor(c_value)
                c_norm = _grad_norm(c_params)
                if not (math.isfinite(float(c_loss.detach())) and math.isfinite(c_norm)):
                    self._fail(step, "critic", float(c_loss.detach()), history, t0, start, model, critic,
                               checkpoint_dir if world.is_main else None, bar)
                c_opt.step()
            xr, cr = real_batch(draws - 1)
            xf = self.generate(model, xr.shape[0], cr)
            g_out = critic(xf, *cr)
            g_loss = -g_out.mean() if self.loss == "wgan-gp" else torch.nn.functional.softplus(-g_out).mean()
            g_opt.zero_grad(set_to_none=True)
            c_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            if world.parallel:
                (g_value,) = distributed.average_gradients(g_params, float(g_loss.detach()))
                g_loss = g_loss.new_tensor(g_value)
            g_norm = _grad_norm(g_params)
            if not (math.isfinite(float(g_loss.detach())) and math.isfinite(g_norm)):
                self._fail(step, "generator", float(g_loss.detach()), history, t0, start, model, critic,
                           checkpoint_dir if world.is_main else None, bar)
            g_opt.step()
            c_opt.zero_grad(set_to_none=True)
            done = step + 1
            history["loss"].append(float(g_loss.detach()))
            history["critic_loss"].append(float(c_loss.detach()))
            history["grad_norm"].append(g_norm)
            history["critic_grad_norm"].append(c_norm)
            if done % self.monitor_every == 0 or done == self.num_steps:
                alerts += self._monitor(model, x, cond, history, done, alerts)
            info = {"loss": history["loss"][-1], "critic_loss": history["critic_loss"][-1]}
            for cb in callbacks:
                stop = bool(cb(done, info)) or stop
            if world.is_main and (ckpt.due(done) or (stop and ckpt.every)):
                ckpt.save(snapshot(done))
            bar.update(1)
            if done % post_every == 0:
                bar.set_postfix(g=f"{history['loss'][-1]:.3g}", d=f"{history['critic_loss'][-1]:.3g}")
            if stop:
                break
        bar.close()
        fit = self._fit(history, t0, start, step + 1 if self.num_steps else 0, model, critic)
        fit.extra["warnings"] = alerts
        fit.args = (x, *cond)
        return fit

    # -----------------------------------------------------------------------------------------
    def _check_shapes(self, model, critic, x, cond) -> list:
        """Generate two points and score them before training: shapes must agree with the data."""
        k = min(2, x.shape[0])
        c2 = tuple(c[:k] for c in cond)
        with poutine.trace(param_only=True) as cap:
            fake = self.generate(model, k, c2)
        if not isinstance(fake, torch.Tensor) or tuple(fake.shape[1:]) != tuple(x.shape[1:]):
            got = tuple(fake.shape) if isinstance(fake, torch.Tensor) else type(fake).__name__
            raise ValueError(f"generator/data shape mismatch: the generator's site {self.site!r} gave shape {got} "
                             f"for {k} draws; the data points have shape {tuple(x.shape[1:])}")
        try:
            with torch.no_grad():
                out = critic(fake, *c2)
        except RuntimeError as err:
            raise ValueError(f"generator/critic shape mismatch: the critic cannot take generated points shaped "
                             f"{tuple(fake.shape)}: {str(err).splitlines()[0]}") from None
        if out.shape not in ((k,), (k, 1)):
            raise ValueError(f"critic must return one logit per point, shape ({k},); got {tuple(out.shape)}")
        params = [s["value"].unconstrained() for s in cap.trace.nodes.values()]
        if not params:
            raise ValueError("the generator program has no parameters (register its network with pyro.module "
                             "or make it a PyroModule)")
        return params

    def _critic_loss(self, critic, xr, xf, cr) -> torch.Tensor:
        real, fake = critic(xr, *cr).reshape(-1), critic(xf, *cr).reshape(-1)
        if self.loss == "nonsaturating":
            sp = torch.nn.functional.softplus
            return sp(-real).mean() + sp(fake).mean()
        eps = torch.rand(xr.shape[0], *[1] * (xr.dim() - 1), device=xr.device, dtype=xr.dtype)
        mix = (eps * xr + (1 - eps) * xf).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mix, *cr).sum(), mix, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        return fake.mean() - real.mean() + self.gp_weight * penalty

    def _monitor(self, model, x, cond, history, done, previous) -> list:
        """Record sample diversity; warn (once per kind) of mode collapse and divergence.

        Runs on a forked RNG so that monitoring (and so where a run stops) never changes the draws
        of training: a resumed run ends exactly where an uninterrupted one does."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return self._measure(model, x, cond, history, done, previous)

    def _measure(self, model, x, cond, history, done, previous) -> list:
        m = min(256, x.shape[0])
        gen = torch.Generator().manual_seed(done)
        idx = torch.randperm(x.shape[0], generator=gen)[:m].to(x.device)
        fake = self.generate(model, m, tuple(c[idx] for c in cond)).flatten(1)
        real = x[idx].flatten(1)
        ratio = float(torch.pdist(fake).mean() / torch.pdist(real).mean().clamp_min(1e-12))
        history["diversity"].append(ratio)
        history["monitor_step"].append(done)
        kinds = {a["kind"] for a in previous}
        alerts = []
        if ratio < self.collapse_threshold and "mode_collapse" not in kinds:
            alerts.append({"kind": "mode_collapse", "step": done, "message":
                           f"mode collapse at step {done}: generated samples are {ratio:.3g} times as spread out "
                           f"as the data (threshold {self.collapse_threshold})"})
            warnings.warn(alerts[-1]["message"], ModeCollapseWarning, stacklevel=3)
        window = history["critic_loss"][-self.monitor_every:]
        mean_c = sum(window) / len(window)
        first = history["critic_loss"][: self.monitor_every]
        scale = abs(sum(first) / len(first)) + 1.0
        diverged = mean_c < 1e-3 if self.loss == "nonsaturating" else abs(mean_c) > 100 * scale
        if diverged and "divergence" not in kinds:
            alerts.append({"kind": "divergence", "step": done, "message":
                           f"training diverged at step {done}: mean critic loss {mean_c:.3g} over the last "
                           f"{len(window)} steps (the critic separates real from generated data outright)"})
            warnings.warn(alerts[-1]["message"], DivergenceWarning, stacklevel=3)
        return alerts

    def _fail(self, step, which, value, history, t0, start, model, critic, checkpoint_dir, bar):
        bar.close()
        fit = self._fit(history, t0, start, step, model, critic)
        raise non_finite_error(step, value, None, fit, checkpoint_dir, what=f"{which} loss")

    def _fit(self, history, t0, start, end, model, critic) -> Fit:
        seconds = time.perf_counter() - t0
        steps = max(end - start, 0)
        return Fit(
            engine=self.name,
            config=self.config,
            history=history,
            timing=step_timing(seconds, steps),
            params=param_store_state(),
            extra={"tensors": {"critic": {k: v.detach().clone() for k, v in critic.state_dict().items()}}},
            model=model,
        )


def _grad_norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
