"""The engine protocol and what every engine shares: seeds, devices, progress bars, checkpoints.

An engine is configured by its constructor and run by ``run(model, ...) -> Fit``. Engines know
Pyro traces, not model classes; training engines run on :mod:`ppdgm.inference.trainer`. Engines
checkpoint through :class:`Checkpointer`, which
saves everything a resumed run needs to end bit-for-bit where an uninterrupted one would: the
param store, optimizer state, RNG states, the step and the history.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from ppdgm.fit import Device, Fit, PathLike, atomic_save, safe_load

CHECKPOINT_FILE = "checkpoint.pt"


class Engine(ABC):
    """Base of all engines: ``Engine(**config).run(model, ...) -> Fit``."""

    name: str = "engine"
    input: str = "program"
    """What ``run`` takes, as :mod:`ppdgm.families` hands it over: ``"program"`` (a Pyro model,
    a guide or None, the data), ``"posterior"`` (a Pyro model and its arguments), or a module
    implementing the protocol of that name in :mod:`ppdgm.models.family`: ``"energy"``,
    ``"denoising"``, ``"adversarial"``, ``"layers"``."""
    threads: int | None = 1
    """Torch CPU threads while the training or sampling driver runs (the caller's count is
    restored after), None to keep the caller's: engine steps are many small tensor operations,
    which a second thread slows down on a small CPU (:mod:`ppdgm.threads`). An engine taking
    ``threads=`` in its constructor sets it; otherwise set the attribute."""

    @abstractmethod
    def run(self, model: Any, *args: Any, **kwargs: Any) -> Fit:  # pragma: no cover - protocol
        ...

    @property
    def config(self) -> dict:
        """The constructor's arguments as plain data (saved with the Fit)."""
        return {k: _plain(v) for k, v in vars(self).items() if not k.startswith("_")}


def _plain(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)


# ---------------------------------------------------------------------------------------------
# seeds, devices, progress


def set_seed(seed: int | None) -> None:
    if seed is not None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        pyro.set_rng_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and primitives (``weights_only``-safe)."""
    # pyro.set_rng_seed seeds NumPy's global generator, so that is the state a resume restores
    np_state = np.random.get_state(legacy=True)  # noqa: NPY002
    if not isinstance(np_state, tuple):  # legacy=True gives the Mersenne Twister's 5-tuple
        raise RuntimeError(f"NumPy's global generator is not a Mersenne Twister: {type(np_state).__name__}")
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    r = state["random"]
    random.setstate((r[0], tuple(r[1]), r[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(device: Device, *tensors: Any) -> torch.device:
    """``device=`` if given, else the device of the first tensor, else CPU. Device follows data."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device} requested but CUDA is not available")
        return device
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# checkpoints


class Checkpointer:
    """Saves and restores an engine's state in ``directory/checkpoint.pt``, atomically."""

    def __init__(self, directory: PathLike | None, every: int | None) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"checkpoint_every must be a positive int, got {every!r}")
        self.directory = Path(directory) if directory is not None else None
        self.every = every if self.directory is not None else None

    @property
    def path(self) -> Path | None:
        return self.directory / CHECKPOINT_FILE if self.directory is not None else None

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def save(self, state: dict) -> None:
        if self.path is not None:
            atomic_save({**state, "rng": rng_state()}, self.path)

    def load(self) -> dict | None:
        """The saved state (RNG restored as a side effect), or None when there is none."""
        if self.path is None or not self.path.exists():
            return None
        state = safe_load(self.path)
        set_rng_state(state.pop("rng"))
        return state


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; ``fit`` holds the last finite state."""

    def __init__(self, message: str, fit: Fit | None = None) -> None:
        super().__init__(message)
        self.fit = fit


def step_timing(seconds: float, steps: int) -> dict:
    """The timing a training Fit reports."""
    return {"seconds": seconds, "steps": steps, "ms_per_step": 1e3 * seconds / max(steps, 1)}


def to_device(x: Any, device: Device) -> Any:
    """Every tensor in ``x`` (nested in tuples, lists and dicts: chain states, saved engine states)
    moved to ``device``; other leaves as they are."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def move_module(model: Callable, device: Device) -> None:
    """A zoo model's bound ``model``/``guide`` method takes its module (and parameters) to ``device``."""
    module = getattr(model, "__self__", None)
    if isinstance(module, torch.nn.Module):
        module.to(device)
