"""Persistent contrastive divergence (Tieleman 2008) for any energy model that opts in.

The gradient of an energy model's log-likelihood is a positive phase on data minus a negative
phase under the model; the negative phase is estimated on persistent chains that a sampler
advances a few steps per update instead of restarting. One engine serves RBMs (positive phase
``-F(v)``, block Gibbs), DBMs (positive phase the mean-field variational bound, Gibbs over the
layer graph's colours) and neural energy models (positive phase ``-E(x)``, Langevin dynamics).

Protocol. ``model`` is a ``torch.nn.Module`` (usually a ``PyroModule``) implementing:

- ``positive_log_density(batch) -> Tensor[batch]``: unnormalized log-density of data points
  (the batch is a tensor, or a tuple of tensors when ``data`` is a tuple);
- ``init_chains(num_chains, data) -> state``: initial persistent chain states;
- ``sample_chains(state, steps) -> state``: advance the chains ``steps`` steps, without grad;
- ``negative_log_density(state) -> Tensor[num_chains]``: the same unnormalized log-density on the
  chain states, with grad w.r.t. the parameters;
- optional ``chain_energy(state) -> Tensor[num_chains]`` for diagnostics (default
  ``-negative_log_density``), ``regularizer() -> scalar`` added to the loss,
  ``check_data(x, name) -> Tensor`` validating the data before anything runs, and
  ``contrastive_grads(batch, state) -> (positive, negative) | None``: a closed-form fast path that
  writes the loss's gradient into the parameters' ``.grad`` and returns both phases' detached
  log-densities (None: use autograd on the two log-density methods instead).

The sampler is the model's: an RBM built with ``temperatures > 1`` keeps its chains at several
inverse temperatures and swaps them (parallel tempering), negative phase on the ``beta = 1`` ones.

Each step advances the chains ``k`` steps, then descends
``-(positive_log_density(batch).mean() - negative_log_density(chains).mean()) + regularizer()``.
The chain energies of ``record_chains`` chains are recorded as ``Fit.samples["chain_energy"]``
shaped ``(chains, draws)`` (every ``record_every`` steps, with the gradient norm and learning
rate; loss and both phases are in the history every step), so ``fit.to_arviz()`` reports R-hat and ESS of the negative phase: a
large R-hat means the persistent chains do not mix and the gradient is biased.
"""

from __future__ import annotations

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
)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = (None, "linear", "exponential")
PROTOCOL = ("positive_log_density", "init_chains", "sample_chains", "negative_log_density")


class PersistentCD(Engine):
    """Persistent contrastive divergence.

    Args:
        num_steps: parameter updates; with ``num_epochs`` the updates are that many passes.
        batch_size: data points per update (None: full batch).
        lr, optim: learning rate of ``sgd`` (with momentum) or ``adam``.
        momentum: SGD momentum, a number or ``(start, end)``: ``start`` for the first
            ``momentum_switch`` fraction of the steps, then ``end`` (Hinton's 0.5 -> 0.9).
        weight_decay: L2 penalty on all parameters.
        k: sampler steps per update; num_chains: persistent chains.
        lr_schedule: None, ``"linear"`` or ``"exponential"`` decay to ``lr * lr_final_factor``.
        clip_norm: optional gradient-norm clip.
        record_chains, record_every: how many chains' energies to record, and how often.
        eval_every: steps between validation positive-phase evaluations (default: each epoch).
        checkpoint_every: steps between checkpoints (with ``checkpoint_dir`` in ``run``).
        chain_blocks: split the chains into this many blocks, each advanced with its own random
            stream seeded by (seed, step, block), so the chains' trajectories do not depend on
            how many processes share them (default: one block per torch.distributed rank).

    Under torch.distributed each rank takes its shard of the data order and its blocks of chains;
    gradients (and the loss, positive and negative phases) are averaged by one all-reduce per
    step, chain energies are gathered for the record, and rank 0 checkpoints the full chain set.
    """

    name = "pcd"
    input = "energy"

    def __init__(
        self,
        num_steps: int = 1000,
        num_epochs: int | None = None,
        batch_size: int | None = 100,
        lr: float = 1e-3,
        optim: str = "sgd",
        momentum=(0.5, 0.9),
        momentum_switch: float = 0.1,
        weight_decay: float = 0.0,
        k: int = 1,
        num_chains: int = 100,
        lr_schedule: str | None = None,
        lr_final_factor: float = 0.1,
        clip_norm: float | None = None,
        record_chains: int = 4,
        record_every: int | None = None,
        eval_every: int | None = None,
        checkpoint_every: int | None = None,
        chain_blocks: int | None = None,
        seed: int | None = 0,
        device=None,
        progress: bool | None = None,
    ):
        if chain_blocks is not None and (isinstance(chain_blocks, bool) or not isinstance(chain_blocks, int)
                                         or chain_blocks < 1 or num_chains % chain_blocks):
            raise ValueError(f"chain_blocks must be a positive int dividing num_chains={num_chains}, got {chain_blocks!r}")
        for arg, val in (("num_steps", num_steps), ("k", k), ("num_chains", num_chains),
                         ("record_chains", record_chains)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        for arg, val in (("num_epochs", num_epochs), ("batch_size", batch_size), ("record_every", record_every),
                         ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{arg} must be a positive int or None, got {val!r}")
        if not (_number(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {optim!r}")
        moms = momentum if isinstance(momentum, (tuple, list)) else (momentum, momentum)
        if len(moms) != 2 or not all(_number(m) and 0 <= m < 1 for m in moms):
            raise ValueError(f"momentum must be a number in [0, 1) or a (start, end) pair of them, got {momentum!r}")
        if not (_number(momentum_switch) and 0 <= momentum_switch <= 1):
            raise ValueError(f"momentum_switch must be a fraction in [0, 1], got {momentum_switch!r}")
        if not (_number(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if not (_number(lr_final_factor) and lr_final_factor > 0):
            raise ValueError(f"lr_final_factor must be a positive number, got {lr_final_factor!r}")
        if clip_norm is not None and not (_number(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
        self.num_steps, self.num_epochs, self.batch_size = num_steps, num_epochs, batch_size
        self.lr, self.optim, self.momentum = float(lr), optim, [float(m) for m in moms]
        self.momentum_switch, self.weight_decay = float(momentum_switch), float(weight_decay)
        self.k, self.num_chains = k, num_chains
        self.lr_schedule, self.lr_final_factor, self.clip_norm = lr_schedule, float(lr_final_factor), clip_norm
        self.record_chains, self.record_every = min(record_chains, num_chains), record_every
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.chain_blocks = chain_blocks
        self.seed, self.device, self.progress = seed, device, progress

    # -----------------------------------------------------------------------------------------
    def _lr_at(self, step: int, total: int) -> float:
        frac = min(step / max(total, 1), 1.0)
        if self.lr_schedule == "linear":
            return self.lr * (1 - (1 - self.lr_final_factor) * frac)
        if self.lr_schedule == "exponential":
            return self.lr * self.lr_final_factor**frac
        return self.lr

    def _momentum_at(self, step: int, total: int) -> float:
        return self.momentum[0] if step < self.momentum_switch * total else self.momentum[1]

    def _make_optimizer(self, params):
        if self.optim == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return MomentumSGD(params, lr=self.lr, momentum=self.momentum[0], weight_decay=self.weight_decay)

    def run_zoo(self, obj, train_args, valid_args=None, checkpoint_dir=None, resume: bool = False) -> Fit:
        """How the CLI drives this engine on a zoo object."""
        def unpack(args):
            if args is None:
                return None
            args = tuple(args)
            return args[0] if len(args) == 1 else args

        return self.run(obj, unpack(train_args), val_data=unpack(valid_args), checkpoint_dir=checkpoint_dir,
                        resume=resume)

    def run(self, model, data, *, val_data=None, checkpoint_dir=None, resume: bool = False, callbacks=()) -> Fit:
        """Train ``model`` (see the module docstring for the protocol) on ``data``."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module implementing {PROTOCOL}, got {type(model).__name__}")
        missing = [m for m in PROTOCOL if not callable(getattr(model, m, None))]
        if missing:
            raise TypeError(f"model {type(model).__name__} does not implement the persistent-CD protocol: "
                            f"missing {missing}")
        if data is None:
            raise ValueError("data: expected a tensor (or tuple of tensors) of training points, got None")
        data = self._check(model, data, "data")
        val_data = self._check(model, val_data, "val_data") if val_data is not None else None
        device = resolve_device(self.device, *_parts(data))
        model.to(device)
        data = _to(data, device)
        val_data = _to(val_data, device) if val_data is not None else None
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model {type(model).__name__} has no trainable parameters")

        n = _length(data)
        world = distributed.init_from_env(device)
        if world.parallel:
            distributed.check_nproc(world.size, n, self.batch_size)
        blocks = self.chain_blocks or world.size
        if blocks % world.size or self.num_chains % blocks:
            raise ValueError(f"chain_blocks={blocks} must be a multiple of the {world.size} ranks and divide "
                             f"num_chains={self.num_chains}")
        per_block = self.num_chains // blocks
        mine = range(world.rank * blocks // world.size, (world.rank + 1) * blocks // world.size)
        shard = math.ceil(n / world.size)
        batch = self.batch_size if (self.batch_size and self.batch_size < shard) else None
        if world.parallel and batch is None:
            batch = shard
        per_epoch = math.ceil(shard / batch) if batch else 1
        total = self.num_epochs * per_epoch if self.num_epochs else self.num_steps
        record_every = self.record_every or max(1, total // 500)
        eval_every = self.eval_every or per_epoch

        set_seed(self.seed)
        optimizer = self._make_optimizer(params)
        history = {"loss": [], "positive": [], "negative": [], "chain_energy": [], "grad_norm": [], "lr": [],
                   "record_step": []}
        if val_data is not None:
            history.update(val_positive=[], val_step=[])
        recorded: list[torch.Tensor] = []
        start = 0
        ckpt = Checkpointer(checkpoint_dir, self.checkpoint_every)
        state = ckpt.load() if resume else None
        if state is not None:
            model.load_state_dict(state["module"])
            optimizer.load_state_dict(state["optim"])
            chains = _to(state["chains"], device)
            history, start = state["history"], state["step"]
            recorded = list(state["recorded"].unbind(1)) if state["recorded"] is not None else []
        else:
            with torch.no_grad():
                chains = model.init_chains(self.num_chains, data)
        if blocks > 1:  # every rank built or loaded the full chain set; keep this rank's blocks
            if any(t.shape[0] != self.num_chains for t in _leaves(chains)):
                raise ValueError(f"chain blocks (and distributed PCD) need chain states with the {self.num_chains} "
                                 f"chains on dim 0; {type(model).__name__} has shapes "
                                 f"{[tuple(t.shape) for t in _leaves(chains)]}")
            chains = _rows(chains, mine.start * per_block, mine.stop * per_block)
        if world.parallel:
            distributed.broadcast_params(params)

        def snapshot(step):
            rec = torch.stack(recorded, 1) if recorded else None
            return {"step": step, "module": model.state_dict(), "optim": optimizer.state_dict(),
                    "chains": _gather_rows(chains) if world.parallel else chains, "history": history,
                    "recorded": rec}

        def advance(chains, step):
            if blocks == 1:
                return model.sample_chains(chains, self.k)
            out = []
            for i, b in enumerate(mine):
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(((self.seed or 0) * 1_000_003 + step) * 1_009 + b)
                    out.append(model.sample_chains(_rows(chains, i * per_block, (i + 1) * per_block), self.k))
            return _cat_rows(out)

        energy_of = getattr(model, "chain_energy", None)
        regularizer = getattr(model, "regularizer", None)
        closed_form = getattr(model, "contrastive_grads", None)
        t0 = time.perf_counter()
        bar = progress_bar(total, "pcd", self.progress)
        bar.update(start)
        post_every = max(1, total // 200)
        step, stop, schedule, order = start, False, None, {}
        for step in range(start, total):
            now = (self._lr_at(step, total), self._momentum_at(step, total))
            if now != schedule:
                for group in optimizer.param_groups:
                    group["lr"] = now[0]
                    if self.optim == "sgd":
                        group["momentum"] = now[1]
                schedule = now
            b = self._batch(data, step, per_epoch, batch, order, world)
            chains = advance(chains, step)
            phases = closed_form(b, chains) if closed_form is not None else None
            if phases is None:
                optimizer.zero_grad(set_to_none=True)
                pos = model.positive_log_density(b)
                neg = model.negative_log_density(chains)
                loss = -(pos.mean() - neg.mean())
                if regularizer is not None:
                    loss = loss + regularizer()
                loss.backward()
                pos_mean, neg_mean, loss = float(pos.detach().mean()), float(neg.detach().mean()), loss.detach()
            else:
                pos, neg = phases
                pos_mean, neg_mean = float(pos.mean()), float(neg.mean())
                loss = neg_mean - pos_mean
                if regularizer is not None:
                    penalty = regularizer()
                    penalty.backward()
                    loss = loss + float(penalty)
            if world.parallel:
                loss_value, pos_mean, neg_mean = distributed.average_gradients(
                    params, float(loss), pos_mean, neg_mean)
                loss = loss_value
            done = step + 1
            due = done % record_every == 0
            gnorm = None
            if self.clip_norm is not None:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_norm))
            elif due:
                grads = [p.grad for p in params if p.grad is not None]
                gnorm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
            loss_value = float(loss)
            if not (math.isfinite(loss_value) and (gnorm is None or math.isfinite(gnorm))):
                bar.close()
                fit = self._fit(model, history, recorded, chains, t0, start, step)
                raise non_finite_error(step, loss_value, gnorm, fit, checkpoint_dir if world.is_main else None)
            optimizer.step()
            history["loss"].append(loss_value)
            history["positive"].append(pos_mean)
            history["negative"].append(neg_mean)
            if due:  # chain energies cost a pass over the chains: measured at record steps only
                if energy_of is not None:
                    with torch.no_grad():
                        energy = energy_of(chains).detach()
                else:
                    energy = -neg.detach()
                history["chain_energy"].append(float(energy.mean()))
                history["grad_norm"].append(gnorm)
                history["lr"].append(now[0])
                history["record_step"].append(done)
                if blocks == 1:
                    mine_recorded = energy[: self.record_chains].detach()
                else:  # the first chains of every block, so the record does not depend on the ranks
                    r = math.ceil(self.record_chains / blocks)
                    mine_recorded = torch.cat([energy[i * per_block : i * per_block + r] for i in range(len(mine))])
                if world.parallel:
                    mine_recorded = _gather_rows(mine_recorded)
                recorded.append(mine_recorded.to("cpu", torch.float64))
            if val_data is not None and done % eval_every == 0:
                with torch.no_grad():
                    history["val_positive"].append(float(model.positive_log_density(val_data).mean()))
                history["val_step"].append(done)
            info = {"loss": loss_value, "grad_norm": gnorm,
                    "chain_energy": history["chain_energy"][-1] if history["chain_energy"] else None}
            for cb in callbacks:
                stop = bool(cb(done, info)) or stop
            if ckpt.due(done) or (stop and ckpt.every):
                snap = snapshot(done)  # every rank joins the gather; rank 0 writes
                if world.is_main:
                    ckpt.save(snap)
            bar.update(1)
            if done % post_every == 0:
                bar.set_postfix(loss=f"{loss_value:.4g}")
            if stop:
                break
        bar.close()
        return self._fit(model, history, recorded, chains, t0, start, step + 1 if total else 0)

    # -----------------------------------------------------------------------------------------
    def _fit(self, model, history, recorded, chains, t0, start, end) -> Fit:
        seconds = time.perf_counter() - t0
        steps = max(end - start, 0)
        samples = {"chain_energy": torch.stack(recorded, 1)} if recorded else None
        spec = getattr(model, "spec", None)
        return Fit(
            engine=self.name,
            config=self.config,
            history=history,
            timing=step_timing(seconds, steps),
            samples=samples,
            spec=spec if isinstance(spec, dict) else None,
            extra={"tensors": {"chains": _detach(chains)}},
            model=getattr(model, "model", None),
            guide=getattr(model, "guide", None),
            module=model,
        )

    @staticmethod
    def _check(model, data, name):
        checker = getattr(model, "check_data", None)
        if isinstance(data, (tuple, list)):
            if checker is not None:
                return checker(tuple(data), name)
            parts = tuple(check_data(d, f"{name}[{i}]") for i, d in enumerate(data))
        else:
            if checker is not None:
                return checker(data, name)
            parts = (check_data(data, name),)
        if len({p.shape[0] for p in parts}) != 1:
            raise ValueError(f"{name}: expected tensors sharing their first (data) dimension, got shapes "
                             f"{[tuple(p.shape) for p in parts]}")
        return parts if isinstance(data, (tuple, list)) else parts[0]

    def _batch(self, data, step, per_epoch, batch, order: dict, world):
        """Minibatch ``step`` of this rank's shard of the epoch's order (``DistributedSampler``'s).

        The shard is gathered once per epoch; a minibatch is then a slice of it (a view, no copy),
        which matters when an RBM step costs about as much as indexing its batch."""
        if batch is None:
            return data
        epoch, pos = divmod(step, per_epoch)
        if order.get("epoch") != epoch:
            device = data[0].device if isinstance(data, tuple) else data.device
            perm = distributed.shard_order(_length(data), epoch, self.seed or 0, world).to(device)
            order["epoch"] = epoch
            order["data"] = tuple(d[perm] for d in data) if isinstance(data, tuple) else data[perm]
        shard = order["data"]
        if isinstance(shard, tuple):
            return tuple(d[pos * batch : (pos + 1) * batch] for d in shard)
        return shard[pos * batch : (pos + 1) * batch]


class MomentumSGD:
    """SGD with momentum and L2 weight decay (``torch.optim.SGD``'s update, first buffer = first
    gradient) without torch.optim's per-step hooks, which cost more than an RBM's PCD step."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0):
        self.params, self.weight_decay = list(params), weight_decay
        self.param_groups = [{"lr": lr, "momentum": momentum}]
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr, momentum = self.param_groups[0]["lr"], self.param_groups[0]["momentum"]
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        d = [p.grad for p in params]
        if self.weight_decay:
            d = torch._foreach_add(d, params, alpha=self.weight_decay)
        if momentum:
            if any(self.buffers[i] is None for i in live):
                for i, g in zip(live, d):
                    self.buffers[i] = g.clone() if self.buffers[i] is None else self.buffers[i].mul_(momentum).add_(g)
            else:
                bufs = [self.buffers[i] for i in live]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d)
            d = [self.buffers[i] for i in live]
        torch._foreach_add_(params, d, alpha=-lr)

    def state_dict(self) -> dict:
        return {"param_groups": [dict(g) for g in self.param_groups], "buffers": list(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        self.param_groups = [dict(g) for g in state["param_groups"]]
        self.buffers = [None if b is None else b.to(p.device) for b, p in zip(state["buffers"], self.params)]


def _rows(x, start, stop):
    """Chains ``start:stop`` of a chain state (a tensor, or a tuple/dict of per-layer tensors)."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(v, start, stop) for v in x)
    return {k: _rows(v, start, stop) for k, v in x.items()}


def _leaves(x):
    if isinstance(x, torch.Tensor):
        return [x]
    values = x.values() if isinstance(x, dict) else x
    return [t for v in values for t in _leaves(v)]


def _cat_rows(parts):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_rows([p[i] for p in parts]) for i in range(len(first)))
    return {k: _cat_rows([p[k] for p in parts]) for k in first}


def _gather_rows(x):
    """Every rank's chains, concatenated in rank order."""
    if isinstance(x, torch.Tensor):
        out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(out, x.contiguous())
        return torch.cat(out)
    if isinstance(x, (tuple, list)):
        return type(x)(_gather_rows(v) for v in x)
    return {k: _gather_rows(v) for k, v in x.items()}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parts(data):
    return tuple(data) if isinstance(data, tuple) else (data,)


def _length(data) -> int:
    return data[0].shape[0] if isinstance(data, tuple) else data.shape[0]


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x
