"""The sampling driver: the one loop every posterior sampler runs in (as Pyro's ``_gen_samples``
drives every MCMC kernel).

A sampler hands the driver its chains as :class:`ChainGroup` objects: a group advances one or
more chains together by one iteration per ``step`` (Pyro's NUTS: one chain; ChEES: every chain
as one batch). The driver owns the rest: the warm-up and sampling phases, draws written into
preallocated tensors (memory is the final result's, never a list of copies), checkpoints (every
finished group, and every ``checkpoint_every`` iterations for groups that can save their state),
exact resume, refusal of a checkpoint written with other settings, callbacks, the progress bar,
timing, and the Fit with its ``sample_stats``.

By default the draws stay on the run's device. :meth:`Sampler.stream_draws` bounds the device
memory they take instead (many chains, long runs): each group's draws go into a buffer of
``chunk_draws`` draws per chain, moved off the device each time it fills, to host memory (pinned
on CUDA) or to one file per chunk that the Fit reads on access (:class:`~ppdgm.fit.LazyDraws`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyro
import torch

from ppdgm.fit import DRAW_GROUPS, Device, DrawFiles, Fit, LazyDraws, PathLike, check_writable
from ppdgm.inference.base import Checkpointer, Engine, move_module, resolve_device, set_seed, to_device
from ppdgm.inference.callbacks import Callback, as_callbacks
from ppdgm.logdensity import check_continuous_latents, latent_sites, prototype_trace
from ppdgm.progress import progress_bar
from ppdgm.threads import check_threads, with_threads_of_first_argument

DRAWS_TO = ("device", "host", "disk")


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
        if "chunks" in saved:
            raise ValueError(
                "the checkpoint's draws were streamed to chunk files; resume with the same "
                "stream_draws('disk', ...) as the run that wrote it"
            )
        until = next(iter(saved["samples"].values())).shape[1] if saved["samples"] else 0
        for group in ("samples", "stats"):
            into = getattr(self, group)
            for name, value in saved[group].items():
                if name not in into:
                    into[name] = value.new_empty((self.num_chains, self.num_samples, *value.shape[2:])).to(device)
                into[name][chains, :until] = value.to(device)

    def finish(self) -> None:
        """Nothing to move: the draws are where they were written."""


@dataclass(frozen=True)
class DrawStreaming:
    """Where a run's draws go as they are made (:meth:`Sampler.stream_draws`)."""

    to: str
    chunk_draws: int
    directory: Path | None = None


class StreamedDraws:
    """Draws written into a device buffer of ``chunk_draws`` draws per chain of the running group
    and moved off the device each time it fills: into host tensors (pinned on CUDA, copied without
    waiting) or into a chunk file of :class:`~ppdgm.fit.DrawFiles`. The device holds at
    most ``chunk_draws x group width x (values + stats per chain)`` elements
    (``peak_device_bytes`` records the most it held); the draws equal :class:`Draws`'."""

    def __init__(self, num_chains: int, num_samples: int, streaming: DrawStreaming):
        self.num_chains, self.num_samples, self.streaming = num_chains, num_samples, streaming
        self.buffer: dict[str, dict] = {g: {} for g in DRAW_GROUPS}
        self.host: dict[str, dict] = {g: {} for g in DRAW_GROUPS}
        self.files = None
        if streaming.to == "disk":
            if streaming.directory is None:
                raise ValueError("stream_draws to='disk' needs a directory for the chunk files")
            directory = check_writable(streaming.directory, "stream_draws directory")
            self.files = DrawFiles(directory, num_chains, num_samples)
        self.first, self.pending, self.peak_device_bytes = 0, 0, 0

    @property
    def samples(self) -> Mapping:
        return LazyDraws(self.files, "samples") if self.files is not None else self.host["samples"]

    @property
    def stats(self) -> Mapping:
        return LazyDraws(self.files, "stats") if self.files is not None else self.host["stats"]

    def device_bytes(self) -> int:
        return sum(v.nbytes for g in DRAW_GROUPS for v in self.buffer[g].values())

    def write(self, chains: slice, index: int, samples: dict, stats: dict) -> None:
        if self.pending == 0:
            self.first = index
        for group, values in (("samples", samples), ("stats", stats)):
            buffer = self.buffer[group]
            for name, value in values.items():
                if name not in buffer or buffer[name].shape[0] != value.shape[0]:
                    buffer[name] = value.new_empty((value.shape[0], self.streaming.chunk_draws, *value.shape[1:]))
                buffer[name][:, self.pending] = value
        self.pending += 1
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes())
        if self.pending == self.streaming.chunk_draws or index + 1 == self.num_samples:
            self._flush(chains)

    def _flush(self, chains: slice) -> None:
        n, first = self.pending, self.first
        if self.files is not None:
            self.files.write(
                chains.start,
                first,
                {g: {k: v[:, :n].cpu().clone() for k, v in self.buffer[g].items()} for g in DRAW_GROUPS},
            )
        else:
            for group in DRAW_GROUPS:
                for name, value in self.buffer[group].items():
                    into = self.host[group].get(name)
                    if into is None:
                        shape = (self.num_chains, self.num_samples, *value.shape[2:])
                        into = torch.empty(shape, dtype=value.dtype, pin_memory=value.is_cuda)
                        self.host[group][name] = into
                    into[chains, first : first + n].copy_(value[:, :n], non_blocking=value.is_cuda)
        self.pending = 0

    def rows(self, chains: slice, until: int) -> dict:
        """What a checkpoint keeps of ``chains``' first ``until`` draws: their chunk files' index
        and the draws still in the buffer, or (to host) the draws themselves."""
        self._synchronize()
        n = self.pending
        pending = {g: {k: v[:, :n].cpu().clone() for k, v in self.buffer[g].items()} if n else {} for g in DRAW_GROUPS}
        if self.files is not None:
            return {"chunks": self.files.entries(chains), "first_draw": until - n, **pending}
        kept = {g: {k: v[chains, : until - n] for k, v in self.host[g].items()} for g in DRAW_GROUPS}
        return {
            g: {k: torch.cat([kept[g][k], v], 1) if k in kept[g] else v for k, v in pending[g].items()}
            if n
            else kept[g]
            for g in DRAW_GROUPS
        }

    def restore(self, chains: slice, saved: dict, device) -> None:
        if "chunks" in saved:
            if self.files is None:
                raise ValueError(
                    "the checkpoint's draws were streamed to chunk files; resume with stream_draws('disk', ...)"
                )
            self.files.add(saved["chunks"])
        first = saved.get("first_draw", 0)
        count = next(iter(saved["samples"].values())).shape[1] if saved["samples"] else 0
        for i in range(count):  # the buffered draws are written again, as the run wrote them
            row = {g: {k: v[:, i].to(device) for k, v in saved[g].items()} for g in DRAW_GROUPS}
            self.write(chains, first + i, row["samples"], row["stats"])

    def finish(self) -> None:
        """Wait for the last copies off the device, and free the buffer."""
        self._synchronize()
        self.buffer = {g: {} for g in DRAW_GROUPS}

    def _synchronize(self) -> None:
        if any(v.is_cuda for g in DRAW_GROUPS for v in self.buffer[g].values()):
            torch.cuda.synchronize()


@dataclass
class SamplingRun:
    """What the driver hands back: the draws, and per group its history and final state
    (``state_dict()``, None for a group without one), and the timing."""

    draws: Draws | StreamedDraws
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
        streaming: DrawStreaming | None = None,
        threads: int | None = 1,
    ):
        self.name, self.num_warmup, self.num_samples = name, num_warmup, num_samples
        self.settings, self.progress, self.checkpoint = settings, progress, checkpoint
        self.callbacks, self.config = list(callbacks), config if config is not None else settings
        self.streaming, self.threads = streaming, check_threads(threads)

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

    @with_threads_of_first_argument
    def run(self, groups: list, device, resume: bool = False) -> SamplingRun:
        """Every group through warm-up and sampling, with ``threads`` torch CPU threads."""
        saved = self.load() if resume else {"finished": {}, "current": None}
        total = self.num_warmup + self.num_samples
        width = sum(g.width for g in groups)
        draws: Draws | StreamedDraws = (
            Draws(width, self.num_samples)
            if self.streaming is None or self.streaming.to == "device"
            else StreamedDraws(width, self.num_samples, self.streaming)
        )
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
        draws.finish()
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

    _streaming: DrawStreaming | None = None

    def stream_draws(self, to: str = "disk", chunk_draws: int = 100, directory: PathLike | None = None):
        """Bound the device memory the draws take (many chains, long runs); returns the sampler.

        Draws are written into a buffer of ``chunk_draws`` draws per chain and moved off the
        device each time it fills: ``to="host"`` into host tensors (pinned on CUDA) that the Fit
        holds; ``to="disk"`` into one file per chunk in ``directory``, which the Fit's
        ``samples`` and ``sample_stats`` read on access (``fit.save`` copies the files,
        ``ppdgm.load`` reads them back lazily, ``to_arviz`` reads them). ``to="device"`` keeps
        them all on the device (the default). The draws equal an unstreamed run's, and a
        checkpointed run resumes with its chunk files; the device then holds at most
        ``chunk_draws x chains x (values + stats per chain)`` elements of draws::

            fit = ChEES(num_chains=8192).stream_draws("disk", 100, "draws/").run(model, x)
        """
        if to not in DRAWS_TO:
            raise ValueError(f"to must be one of {DRAWS_TO}, got {to!r}")
        if isinstance(chunk_draws, bool) or not isinstance(chunk_draws, int) or chunk_draws < 1:
            raise ValueError(f"chunk_draws must be a positive int, got {chunk_draws!r}")
        if to == "disk" and directory is None:
            raise ValueError("directory is required with to='disk': the folder the chunk files go to")
        if directory is not None and to != "disk":
            raise ValueError(f"directory is only used with to='disk', got to={to!r}")
        directory = check_writable(directory, "stream_draws directory") if directory is not None else None
        self._streaming = DrawStreaming(to, chunk_draws, directory)
        return self

    def _settings(self) -> dict:
        """What decides the draws: a checkpoint from other settings cannot be resumed."""
        return {k: v for k, v in self.config.items() if k not in ("device", "progress", "checkpoint_every", "threads")}

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
            self._streaming,
            self.threads,
        )

    def _fit(self, run: SamplingRun, history: dict, extra: dict, model, args, kwargs, callbacks=()) -> Fit:
        """The Fit every sampler returns: draws ``(chain, draw, ...)``, ``sample_stats`` for ArviZ;
        handed to the ``callbacks``' ``on_end``."""
        if isinstance(run.draws, StreamedDraws):
            streaming = run.draws.streaming
            extra = {
                **extra,
                "draws": {
                    "to": streaming.to,
                    "chunk_draws": streaming.chunk_draws,
                    "directory": str(streaming.directory) if streaming.directory is not None else None,
                    "peak_device_bytes": run.draws.peak_device_bytes,
                },
            }
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
    no gradient flows into them, and the JIT may bake them into its trace. Pyro's warning that a
    ``pyro.module``'s frozen weights are "not registered in the param store" is silenced here:
    freezing them is the point."""
    params = [p for _, p in pyro.get_param_store().named_parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad=False")
            yield
    finally:
        for p in params:
            p.requires_grad_(True)
