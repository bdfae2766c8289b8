"""Torch CPU threads for a block of work, restored afterwards.

The engines' steps are many small tensor operations (a few hundred to a few thousand elements
each): on a small CPU, a second intra-op thread costs more in synchronization than it saves
(AIS on a 64-128 RBM: 1.2 ms per temperature at one thread, 34 ms at two on a loaded 2-core
machine; ``benchmarks/bench_threads.py``). Engines therefore run with one thread unless told
otherwise, and give the caller back the thread count it had.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch

F = TypeVar("F", bound=Callable[..., Any])


def check_threads(threads: int | None) -> int | None:
    """``threads`` if it is a positive int or None (leave torch's setting), else a ValueError."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None (keep torch's setting), got {threads!r}")
    return threads


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: as they are), then restore the count."""
    check_threads(threads)
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_threads_of_first_argument(fn: F) -> F:
    """``fn(owner, ...)`` runs with ``owner.threads`` torch CPU threads (an engine or a driver)."""

    @functools.wraps(fn)
    def run(owner: Any, *args: Any, **kwargs: Any) -> Any:
        with torch_threads(owner.threads):  # which checks it
            return fn(owner, *args, **kwargs)

    return cast(F, run)
