"""Learning-rate schedules shared by every training engine, and persistent CD's momentum switch.

A schedule is a multiplier of each optimizer's base learning rate at step ``t`` of ``T``:
``constant`` (1), ``linear`` (1 down to ``final``), ``exponential`` (``final ** (t / T)``) and
``cosine`` (half a cosine from 1 down to ``final``), where ``final`` is ``lr_final_factor``.
``None`` means ``constant``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ppdgm.inference.checks import choice, positive_number

SCHEDULES = ("constant", "linear", "exponential", "cosine")


def check_schedule(lr_schedule, lr_final_factor) -> tuple:
    """Validated ``(lr_schedule, lr_final_factor)``; None stays None (constant)."""
    if lr_schedule is not None:
        choice("lr_schedule", lr_schedule, SCHEDULES)
    return lr_schedule, positive_number("lr_final_factor", lr_final_factor)


def lr_factor(schedule: str | None, step: int, total: int, final: float) -> float:
    """The multiplier of the base learning rate at ``step`` of ``total``."""
    frac = min(step / max(total, 1), 1.0)
    if schedule is None or schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - (1.0 - final) * frac
    if schedule == "exponential":
        return final**frac
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")


def momentum_switch(step: int, total: int, momentum: Sequence[float], switch: float) -> float:
    """``momentum[0]`` for the first ``switch`` fraction of the steps, then ``momentum[1]``
    (Hinton's 0.5 -> 0.9 for RBMs)."""
    return momentum[0] if step < switch * total else momentum[1]
