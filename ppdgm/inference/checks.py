"""Argument checks shared by every engine's constructor.

Each check raises ``ValueError`` naming the argument, what it expects and what came, before any
compute; ``bool`` is never accepted where a number is meant (``True`` is an int to Python, not to
a user who typed ``--num-steps true``).
"""

from __future__ import annotations


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value, optional: bool = False):
    """``value`` if it is an int >= 1 (or None when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    return value


def positive_number(name: str, value, optional: bool = False):
    """``float(value)`` if it is a number > 0 (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not (is_number(value) and value > 0):
        raise ValueError(f"{name} must be a positive number{' or None' if optional else ''}, got {value!r}")
    return float(value)


def number_in(name: str, value, low: float, high: float, closed_high: bool = True) -> float:
    """``float(value)`` if ``low <= value <= high`` (``< high`` unless ``closed_high``)."""
    ok = is_number(value) and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        raise ValueError(f"{name} must be a number in [{low}, {high}{']' if closed_high else ')'}, got {value!r}")
    return float(value)


def choice(name: str, value, options):
    """``value`` if it is one of ``options``."""
    if value not in tuple(options):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value
