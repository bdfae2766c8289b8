"""The sampling driver: the one loop every posterior sampler runs in (as Pyro's ``_gen_samples``
drives every MCMC kernel).

A sampler hands the driver its chains as :class:`ChainGroup` objects: a group advances one or
more chains together by one iteration per ``step`` (Pyro's NUTS: one chain; ChEES: every chain
as one batch). The driver owns the rest: the warm-up and sampling phases, draws written into
preallocated tensors (memory is the final result's, never a list of copies), checkpoints (every
finished group, and every ``checkpoint_every`` iterations for groups that can save their state),
exact resume, refusal of a checkpoint written with other settings, callbacks, the progress bar,
timing, and the Fit with its ``sample_stats``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyro
import torch

from ppdgm.fit import Device, Fit
from ppdgm.inference.base import Checkpointer, Engine, move_module, resolve_device, set_seed, to_device
from ppdgm.inference.callbacks import Callback, as_callbacks
from ppdgm.logdensity import check_continuous_latents, latent_sites, prototype_trace
from ppdgm.progress import progress_bar


@dataclass
class Step:
    """What one iteration of a group reports: scalars for the history, ``{stat: (chains,)}`` for
    ``sample_stats`` (kept in the sampling phase), and the gradient evaluations it cost."""

    history: dict
    stats: dict
    grad_evals: int


class ChainGroup(Protocol):
    """Chains that advance together. ``state_dict``/``load_state_dict`` (optional) make a group
    resumable in the middle of its run; without them it is saved once finished."""

    width: int

    def start(self, state: dict | None) -> None:
        """Initial point and step size, or the saved ``state`` of a resumed run."""

    def step(self, iteration: int, warmup: bool) -> Step:
        """Advance every chain by one iteration."""

    def end_warmup(self) -> None:
        """Freeze the adaptation: the sampling phase starts."""

    def draw(self) -> dict:
        """The chains' current constrained values, ``{site: (width, *shape)}``."""


@dataclass
class Draws:
    """Draws and per-draw statistics of some chains, written in place: ``{name: (chains, draws, ...)}``."""

    num_chains: int
    num_samples: int
    samples: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def write(self, chains: slice, index: int, samples: dict, stats: dict) -> None:
        for into, values in ((self.samples, samples), (self.stats, stats)):
            for name, value in values.items():
                if name not in into:
                    into[name] = value.new_empty((self.num_chains, self.num_samples, *value.shape[1:]))
                into[name][chains, index] = value

    def rows(self, chains: slice, until: int) -> dict:
        """The first ``until`` draws of ``chains`` on the host (for a checkpoint)."""
        return {
            group: {k: v[chains, :until].cpu() for k, v in getattr(self, group).items()}
            for group in ("samples", "stats")
        }

    def restore(self, chains: slice, saved: dict, device) -> None:
        until = next(iter(saved["samples"].values())).shape[1] if saved["samples"] else 0
        for group in ("samples", "stats"):
            into = getattr(self, group)
            for name, value in saved[group].items():
                if name not in into:
                    into[name] = value.new_empty((self.num_chains, self.num_samples, *value.shape[2:])).to(device)
                into[name][chains, :until] = value.to(device)


@dataclass
class SamplingRun:
    """What the driver hands back: the draws, and per group its history and final state
    (``state_dict()``, None for a group without one), and the timing."""

    draws: Draws
    history: list
    states: list
    timing: dict


class SamplingDriver:
    """Runs chain groups through warm-up and sampling, checkpointing and resuming them.

    ``callbacks`` (:class:`~ppdgm.inference.callbacks.Callback`) get ``on_start(config)`` and, per
    iteration of a group, ``on_step(step, history)`` with the group's history scalars (step size,
    acceptance ...); ``step`` counts iterations across groups (group ``g``'s iteration ``i`` is
    ``g * (num_warmup + num_samples) + i + 1``). Their return value is ignored: a sampler does not
    stop early, since its draws are preallocated and an ArviZ posterior needs them all."""

    def __init__(
        self,
        name: str,
        num_warmup: int,
        num_samples: int,
        settings: dict,
        progress: bool | None,
        checkpoint: Checkpointer,
        callbacks: Sequence[Callback] = (),
        config: dict | None = None,
    ):
        self.name, self.num_warmup, self.num_samples = name, num_warmup, num_samples
        self.settings, self.progress, self.checkpoint = settings, progress, checkpoint
        self.callbacks, self.config = list(callbacks), config if config is not None else settings

    def load(self) -> dict:
        """The saved run (random state restored), or an empty one; refuses other settings by name."""
        saved = self.checkpoint.load()
        if saved is None:
            return {"finished": {}, "current": None}
        if saved["settings"] != self.settings:
            changed = sorted(k for k in self.settings if saved["settings"].get(k) != self.settings[k])
            raise ValueError(
                f"{self.checkpoint.path}: the checkpoint was written with other sampler settings "
                f"({changed}); rerun without resume or with the same settings"
            )
        return saved

    def run(self, groups: list, device, resume: bool = False) -> SamplingRun:
        saved = self.load() if resume else {"finished": {}, "current": None}
        total = self.num_warmup + self.num_samples
        draws = Draws(sum(g.width for g in groups), self.num_samples)
        histories, states, timing = (
            [],
            [],
            {"init_seconds": 0.0, "warmup_seconds": 0.0, "sample_seconds": 0.0, "grad_evals": 0},
        )
        for cb in self.callbacks:
            cb.on_start(self.config)
        bar = progress_bar(len(groups) * total, self.name, self.progress)
        t_start, first = time.perf_counter(), 0
        for index, group in enumerate(groups):
            chains = slice(first, first + group.width)
            first += group.width
            if index in saved["finished"]:
                done = saved["finished"][index]
                draws.restore(chains, done["draws"], device)
                histories.append(done["history"])
                states.append(done["state"])
                timing["grad_evals"] += done["grad_evals"]
                bar.update(total)
                continue
            current = saved["current"] if saved["current"] and saved["current"]["group"] == index else None
            saved["current"] = None
            history, grad_evals = self._run_group(index, group, chains, draws, device, current, saved, bar, timing)
            histories.append(history)
            states.append(group.state_dict() if hasattr(group, "state_dict") else None)
            saved["finished"][index] = {
                "draws": draws.rows(chains, self.num_samples),
                "history": history,
                "grad_evals": grad_evals,
                "state": states[-1],
            }
            self.checkpoint.save({"settings": self.settings, **saved})
        bar.close()
        timing["seconds"] = time.perf_counter() - t_start
        timing["ms_per_grad"] = 1e3 * timing["seconds"] / max(timing["grad_evals"], 1)
        timing["ms_per_iteration"] = 1e3 * timing["seconds"] / max(len(groups) * total, 1)
        return SamplingRun(draws, histories, states, timing)

    def _run_group(self, index, group, chains, draws, device, current, saved, bar, timing) -> tuple[dict, int]:
        t = time.perf_counter()
        start, history, grad_evals = 0, {}, 0
        if current is not None:
            draws.restore(chains, current["draws"], device)
            start, history, grad_evals = current["iteration"], current["history"], current["grad_evals"]
            timing["grad_evals"] += grad_evals
            group.start(to_device(current["state"], device))
        else:
            group.start(None)
        timing["init_seconds"] += time.perf_counter() - t
        bar.update(start)
        W, t = self.num_warmup, time.perf_counter()
        for it in range(start, W + self.num_samples):
            if it == W:
                timing["warmup_seconds"] += time.perf_counter() - t
                t = time.perf_counter()
                group.end_warmup()
            out = group.step(it, warmup=it < W)
            for k, v in out.history.items():
                history.setdefault(k, []).append(v)
            grad_evals += out.grad_evals
            timing["grad_evals"] += out.grad_evals
            if it >= W:
                draws.write(chains, it - W, group.draw(), out.stats)
            for cb in self.callbacks:
                cb.on_step(index * (W + self.num_samples) + it + 1, out.history)
            if self.checkpoint.due(it + 1) and hasattr(group, "state_dict") and it + 1 < W + self.num_samples:
                self.checkpoint.save(
                    {
                        "settings": self.settings,
                        "finished": saved["finished"],
                        "current": {
                            "group": index,
                            "iteration": it + 1,
                            "state": group.state_dict(),
                            "history": history,
                            "grad_evals": grad_evals,
                            "draws": draws.rows(chains, max(it + 1 - W, 0)),
                        },
                    }
                )
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in out.history.items() if isinstance(v, float)}, refresh=False)
        timing["sample_seconds"] += time.perf_counter() - t
        return history, grad_evals


# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_device(device: torch.device):
    """New tensors (e.g. ``dist.Normal(0., 1.)`` in a plain model) land on ``device``."""
    if device.type == "cpu":
        yield
    else:
        with torch.device(device):
            yield


def move_args(args, kwargs, device):
    def mv(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    return tuple(mv(a) for a in args), {k: mv(v) for k, v in kwargs.items()}


class Sampler(Engine):
    """A posterior sampler: ``run(model, *args, checkpoint_dir=None, resume=False, callbacks=(), **kwargs)``
    returns a Fit of draws from the posterior of ``model(*args, **kwargs)``."""

    input = "posterior"
    # set by each sampler's constructor
    device: Device
    seed: int | None
    num_warmup: int
    num_samples: int
    progress: bool | None

    def _setup(self, model, args, kwargs, allow_enumerated: bool):
        """Checks and placement every sampler does first: ``(device, args, kwargs, prototype trace)``."""
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro program, got {type(model).__name__}")
        device = resolve_device(self.device, *args, *kwargs.values())
        args, kwargs = move_args(args, kwargs, device)
        move_module(model, device)
        set_seed(self.seed)
        with default_device(device):
            trace = prototype_trace(model, args, kwargs)
        check_continuous_latents(trace, allow_enumerated=allow_enumerated)
        if not latent_sites(trace):
            raise ValueError("the model has no latent sample sites: there is nothing for HMC to sample")
        return device, args, kwargs, trace

    def _settings(self) -> dict:
        """What decides the draws: a checkpoint from other settings cannot be resumed."""
        return {k: v for k, v in self.config.items() if k not in ("device", "progress", "checkpoint_every")}

    def _driver(self, checkpoint_dir, every: int | None = None, callbacks=()) -> SamplingDriver:
        return SamplingDriver(
            self.name,
            self.num_warmup,
            self.num_samples,
            self._settings(),
            self.progress,
            Checkpointer(checkpoint_dir, every),
            as_callbacks(callbacks),
            self.config,
        )

    def _fit(self, run: SamplingRun, history: dict, extra: dict, model, args, kwargs, callbacks=()) -> Fit:
        """The Fit every sampler returns: draws ``(chain, draw, ...)``, ``sample_stats`` for ArviZ;
        handed to the ``callbacks``' ``on_end``."""
        fit = Fit(
            engine=self.name,
            config=self.config,
            history=history,
            timing=run.timing,
            samples=run.draws.samples,
            extra={**extra, "tensors": {"sample_stats": run.draws.stats}},
            model=model,
            args=args,
            kwargs=kwargs,
        )
        for cb in as_callbacks(callbacks):
            cb.on_end(fit)
        return fit


@contextlib.contextmanager
def frozen_params():
    """Pyro params (e.g. a trained decoder's weights) are constants while HMC moves the latents:
    no gradient flows into them, and the JIT may bake them into its trace."""
    params = [p for _, p in pyro.get_param_store().named_parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
