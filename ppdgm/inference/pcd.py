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
  log-densities (None: use autograd on the two log-density methods instead), and
  ``prepare(data)``: called once on the training data before the chains start (a DBM's greedy
  layer-wise pretraining).

The sampler is the model's: an RBM built with ``temperatures > 1`` keeps its chains at several
inverse temperatures and swaps them (parallel tempering), negative phase on the ``beta = 1`` ones.

Each step advances the chains ``k`` steps, then descends
``-(positive_log_density(batch).mean() - negative_log_density(chains).mean()) + regularizer()``.
The chain energies of ``record_chains`` chains are recorded as ``Fit.samples["chain_energy"]``
shaped ``(chains, draws)`` (every ``record_every`` steps, with the gradient norm and learning
rate; loss and both phases are in the history every step), so ``fit.to_arviz()`` reports R-hat
and ESS of the negative phase: a large R-hat means the persistent chains do not mix and the
gradient is biased.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ppdgm.data import check_data
from ppdgm.fit import Fit
from ppdgm.inference.base import resolve_device, to_device
from ppdgm.inference.checks import choice, is_number, number_in, positive_int, positive_number
from ppdgm.inference.schedules import check_schedule, momentum_switch
from ppdgm.inference.trainer import Loop, TrainingEngine, train

OPTIMIZERS = ("sgd", "adam")
PROTOCOL = ("positive_log_density", "init_chains", "sample_chains", "negative_log_density")


@dataclass
class PCDState:
    model: Any  # a torch module implementing ppdgm.models.family.PersistentChains
    params: list
    optimizer: Any  # a torch optimizer or SGDMomentumSwitch
    chains: Any
    recorded: list
    blocks: int
    per_block: int
    mine: range
    record_every: int
    regularizer: Callable[[], torch.Tensor] | None = None
    contrastive_grads: Callable | None = None
    momentum: float | None = None


class PersistentCD(TrainingEngine):
    """Persistent contrastive divergence.

    Args:
        num_steps: parameter updates; with ``num_epochs`` the updates are that many passes.
        batch_size: data points per update (None: full batch).
        lr, optim: learning rate of ``sgd`` (with momentum) or ``adam``.
        momentum: SGD momentum, a number or ``(start, end)``: ``start`` for the first
            ``momentum_switch`` fraction of the steps, then ``end`` (Hinton's 0.5 -> 0.9).
        weight_decay: L2 penalty on all parameters.
        k: sampler steps per update; num_chains: persistent chains.
        lr_schedule: None (constant), ``"linear"``, ``"exponential"`` or ``"cosine"`` decay to
            ``lr * lr_final_factor`` (:mod:`ppdgm.inference.schedules`).
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
    history_keys = ("loss", "positive", "negative", "chain_energy", "grad_norm", "lr", "record_step")
    validation_keys = ("val_positive",)

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
        if chain_blocks is not None and (
            isinstance(chain_blocks, bool)
            or not isinstance(chain_blocks, int)
            or chain_blocks < 1
            or num_chains % chain_blocks
        ):
            raise ValueError(
                f"chain_blocks must be a positive int dividing num_chains={num_chains}, got {chain_blocks!r}"
            )
        for arg, val in (
            ("num_steps", num_steps),
            ("k", k),
            ("num_chains", num_chains),
            ("record_chains", record_chains),
        ):
            positive_int(arg, val)
        for arg, optional in (
            ("num_epochs", num_epochs),
            ("batch_size", batch_size),
            ("record_every", record_every),
            ("eval_every", eval_every),
            ("checkpoint_every", checkpoint_every),
        ):
            positive_int(arg, optional, optional=True)
        self.lr = positive_number("lr", lr)
        self.optim = choice("optim", optim, OPTIMIZERS)
        moms = momentum if isinstance(momentum, (tuple, list)) else (momentum, momentum)
        if len(moms) != 2 or not all(is_number(m) and 0 <= m < 1 for m in moms):
            raise ValueError(f"momentum must be a number in [0, 1) or a (start, end) pair of them, got {momentum!r}")
        self.momentum = [float(m) for m in moms]
        self.momentum_switch = number_in("momentum_switch", momentum_switch, 0, 1)
        if not (is_number(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        self.lr_schedule, self.lr_final_factor = check_schedule(lr_schedule, lr_final_factor)
        self.clip_norm = positive_number("clip_norm", clip_norm, optional=True)
        self.num_steps, self.num_epochs, self.batch_size = num_steps, num_epochs, batch_size
        self.k, self.num_chains = k, num_chains
        self.record_chains, self.record_every = min(record_chains, num_chains), record_every
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.chain_blocks = chain_blocks
        self.seed, self.device, self.progress = seed, device, progress

    def run(self, model, data, *, val_data=None, checkpoint_dir=None, resume: bool = False, callbacks=()) -> Fit:
        """Train ``model`` (see the module docstring for the protocol) on ``data``."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module implementing {PROTOCOL}, got {type(model).__name__}")
        missing = [m for m in PROTOCOL if not callable(getattr(model, m, None))]
        if missing:
            raise TypeError(
                f"model {type(model).__name__} does not implement the persistent-CD protocol: missing {missing}"
            )
        if data is None:
            raise ValueError("data: expected a tensor (or tuple of tensors) of training points, got None")
        data = self._check(model, data, "data")
        val_data = self._check(model, val_data, "val_data") if val_data is not None else None
        device = resolve_device(self.device, *_parts(data))
        model.to(device)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"model {type(model).__name__} has no trainable parameters")
        return train(
            self,
            model,
            to_device(data, device),
            device=device,
            val_data=to_device(val_data, device) if val_data is not None else None,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            callbacks=callbacks,
        )

    # -----------------------------------------------------------------------------------------
    # the algorithm the driver runs

    def init(self, model, loop: Loop) -> PCDState:
        world = loop.world
        blocks = self.chain_blocks or world.size
        if blocks % world.size or self.num_chains % blocks:
            raise ValueError(
                f"chain_blocks={blocks} must be a multiple of the {world.size} ranks and divide "
                f"num_chains={self.num_chains}"
            )
        prepare = getattr(model, "prepare", None)
        if callable(prepare):
            with torch.no_grad():
                prepare(loop.batches.data)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = self._make_optimizer(params)
        with torch.no_grad():
            chains = model.init_chains(self.num_chains, loop.batches.data)
        state = PCDState(
            model,
            params,
            optimizer,
            None,
            [],
            blocks,
            self.num_chains // blocks,
            range(world.rank * blocks // world.size, (world.rank + 1) * blocks // world.size),
            self.record_every or max(1, loop.total // 500),
            getattr(model, "regularizer", None),
            getattr(model, "contrastive_grads", None),
        )
        state.chains = self._my_blocks(state, chains)
        return state

    def step(self, state: PCDState, loop: Loop) -> dict:
        model, step = state.model, loop.step
        if self.optim == "sgd":
            momentum = momentum_switch(step, loop.total, self.momentum, self.momentum_switch)
            if momentum != state.momentum:
                state.optimizer.param_groups[0]["momentum"] = state.momentum = momentum
        b = loop.batches[step]
        state.chains = chains = self._advance(state, step)
        regularizer = state.regularizer
        phases = state.contrastive_grads(b, chains) if state.contrastive_grads is not None else None
        if phases is None:
            state.optimizer.zero_grad(set_to_none=True)
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
                if penalty.requires_grad:  # a model's penalty may be off (a constant 0)
                    penalty.backward()
                loss = loss + float(penalty.detach())
        done = step + 1
        due = done % state.record_every == 0
        loss, pos_mean, neg_mean, gnorm = loop.descend(
            state.params, loss, pos_mean, neg_mean, update=state.optimizer.step, norm=due
        )
        metrics = {"loss": loss, "positive": pos_mean, "negative": neg_mean}
        if due:  # chain energies cost a pass over the chains: measured at record steps only
            energy = self._record(state, neg, loop.world)
            metrics.update(chain_energy=energy, grad_norm=gnorm, lr=self.lr * loop.lr_factor, record_step=done)
        return metrics

    def validate(self, state: PCDState, val_data) -> dict:
        with torch.no_grad():
            return {"val_positive": float(state.model.positive_log_density(val_data).mean())}

    def parameters(self, state: PCDState) -> list:
        return state.params

    def optimizers(self, state: PCDState) -> list:
        return [(state.optimizer, self.lr)]

    def state_dict(self, state: PCDState) -> dict:
        parallel = (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        return {
            "module": state.model.state_dict(),
            "optim": state.optimizer.state_dict(),
            "chains": _gather_rows(state.chains) if parallel else state.chains,
            "recorded": torch.stack(state.recorded, 1) if state.recorded else None,
        }

    def load_state_dict(self, state: PCDState, saved: dict) -> None:
        # a checkpoint from before a model kept extra state (an RBM's chains) still resumes
        missing, unexpected = state.model.load_state_dict(saved["module"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint: its module does not match the model (missing {missing}, unexpected {unexpected})"
            )
        state.optimizer.load_state_dict(saved["optim"])
        device = state.params[0].device
        state.chains = self._my_blocks(state, to_device(saved["chains"], device))
        state.recorded = list(saved["recorded"].unbind(1)) if saved["recorded"] is not None else []

    def fit_fields(self, state: PCDState) -> dict:
        model = state.model
        spec = getattr(model, "spec", None)
        return {
            "samples": {"chain_energy": torch.stack(state.recorded, 1)} if state.recorded else None,
            "spec": spec if isinstance(spec, dict) else None,
            "extra": {"tensors": {"chains": _detach(state.chains)}},
            "model": getattr(model, "model", None),
            "guide": getattr(model, "guide", None),
            "module": model,
        }

    # -----------------------------------------------------------------------------------------
    def _make_optimizer(self, params):
        if self.optim == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return MomentumSGD(params, lr=self.lr, momentum=self.momentum[0], weight_decay=self.weight_decay)

    def _my_blocks(self, state: PCDState, chains):
        """This rank's blocks of the full chain set (all of it with one block)."""
        if state.blocks == 1:
            return chains
        if any(t.shape[0] != self.num_chains for t in _leaves(chains)):
            raise ValueError(
                f"chain blocks (and distributed PCD) need chain states with the {self.num_chains} "
                f"chains on dim 0; {type(state.model).__name__} has shapes "
                f"{[tuple(t.shape) for t in _leaves(chains)]}"
            )
        return _rows(chains, state.mine.start * state.per_block, state.mine.stop * state.per_block)

    def _advance(self, state: PCDState, step: int):
        if state.blocks == 1:
            return state.model.sample_chains(state.chains, self.k)
        device = state.params[0].device
        out = []
        for i, b in enumerate(state.mine):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(((self.seed or 0) * 1_000_003 + step) * 1_009 + b)
                out.append(
                    state.model.sample_chains(
                        _rows(state.chains, i * state.per_block, (i + 1) * state.per_block), self.k
                    )
                )
        return _cat_rows(out)

    def _record(self, state: PCDState, neg, world) -> float:
        """Append the recorded chains' energies; return the mean energy of this rank's chains."""
        energy_of = getattr(state.model, "chain_energy", None)
        if energy_of is not None:
            with torch.no_grad():
                energy = energy_of(state.chains).detach()
        else:
            energy = -neg.detach()
        if state.blocks == 1:
            mine = energy[: self.record_chains]
        else:  # the first chains of every block, so the record does not depend on the ranks
            r = math.ceil(self.record_chains / state.blocks)
            mine = torch.cat([energy[i * state.per_block : i * state.per_block + r] for i in range(len(state.mine))])
        if world.parallel:
            mine = _gather_rows(mine)
        state.recorded.append(mine.to("cpu", torch.float64))
        return float(energy.mean())

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
            raise ValueError(
                f"{name}: expected tensors sharing their first (data) dimension, got shapes "
                f"{[tuple(p.shape) for p in parts]}"
            )
        return parts if isinstance(data, (tuple, list)) else parts[0]


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
        d = [g for p in params if (g := p.grad) is not None]
        if self.weight_decay:
            d = list(torch._foreach_add(d, params, alpha=self.weight_decay))
        if momentum:
            bufs = [b for i in live if (b := self.buffers[i]) is not None]
            if len(bufs) == len(live):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d)
            else:  # the first step: a buffer starts as the gradient
                bufs = []
                for i, g in zip(live, d):
                    buf = self.buffers[i]
                    buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
                    self.buffers[i] = buf
                    bufs.append(buf)
            d = bufs
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


def _parts(data):
    return tuple(data) if isinstance(data, tuple) else (data,)


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x
