"""Callbacks: hooks any engine calls during a run (the training and the sampling driver alike).

An experiment tracker (:class:`ppdgm.tracking.MLflowTracker`) or a user's early stop is a
:class:`Callback`; a plain ``callable(step, info) -> bool | None`` is wrapped as one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ppdgm.fit import Fit


class Callback:
    """A hook on a training run. Override what you need; a plain ``callable(step, info)`` works too.

    ``on_start(config)`` gets the engine's config; ``on_step(step, info)`` the step's metrics (with
    ``lr``); ``on_validation(step, metrics)`` each validation; ``on_end(fit)`` the Fit. ``on_step``
    and ``on_validation`` returning True stop the run (an experiment tracker returns None)."""

    def on_start(self, config: dict) -> None:
        pass

    def on_step(self, step: int, info: dict) -> bool | None:
        return None

    def on_validation(self, step: int, metrics: dict) -> bool | None:
        return None

    def on_end(self, fit: Fit) -> None:
        pass


class _PlainCallback(Callback):
    def __init__(self, fn: Callable[[int, dict], bool | None]) -> None:
        self.fn = fn

    def on_step(self, step: int, info: dict) -> bool | None:
        return self.fn(step, info)


CallbackLike = Callback | Callable[[int, dict], bool | None]
"""What ``callbacks=`` takes: :class:`Callback` objects or plain ``callable(step, info)``."""


def as_callbacks(callbacks: CallbackLike | Iterable[CallbackLike] | None) -> list[Callback]:
    """``callbacks`` as :class:`Callback` objects; TypeError before any compute for anything else."""
    if callbacks is None:
        return []
    if callable(callbacks) or isinstance(callbacks, Callback):
        callbacks = [callbacks]
    out: list[Callback] = []
    for i, cb in enumerate(callbacks):
        if isinstance(cb, Callback):
            out.append(cb)
        elif callable(cb):
            out.append(_PlainCallback(cb))
        else:
            raise TypeError(f"callbacks[{i}] must be a Callback or a callable(step, info), got {type(cb).__name__}")
    return out
