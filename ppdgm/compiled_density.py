"""The potential of a batch of chains and its gradient as one compiled program (TorchInductor).

A gradient of a small model in eager PyTorch is dominated by dispatch: tens of tiny operators
forward and as many backward, each a few microseconds of Python and C++ overhead, whatever the
chains' work. Here the Pyro model runs once under ``make_fx``, which records forward and backward
(``torch.func.grad``) as one graph of ATen operators with no Python left in it; Inductor then
fuses that graph into a few C++ loops. On the three targets of ``benchmarks/hmc_targets.py`` (64
chains, one thread) a gradient costs 5-11x less than the TorchScript trace of the forward pass
followed by ``autograd.grad``.

Like any trace, the graph replays the branches the model took at the recording point; the
compiled function is checked against the eager one at a second point, first as a graph (cheap:
drops a branching model before Inductor runs) and then compiled.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import pyro
import torch

Pair = tuple[torch.Tensor, torch.Tensor]


def graph_of_potential_and_grad(log_density: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor):
    """An FX graph of ``u -> (-log_density(u), -grad)`` for batches shaped like ``u``, recorded
    by running ``log_density`` once at ``u``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def summed(u):
        logp = log_density(u)
        return logp.sum(), logp

    def potential_and_grad(u):
        grad, logp = torch.func.grad(summed, has_aux=True)(u)
        return -logp, -grad

    with warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.simplefilter("ignore")
        return make_fx(potential_and_grad)(u.detach())


def agree(got: Pair, want: Pair, rtol: float = 1e-4) -> bool:
    """Whether two (potential, gradient) pairs are equal up to float reordering: each entry within
    ``rtol`` of the largest magnitude of its tensor (infinite and NaN entries must match)."""
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            return False
        scale = 1.0 + float(w[finite].abs().max()) if finite.any() else 1.0
        if not torch.allclose(g[finite], w[finite], rtol=rtol, atol=rtol * scale):
            return False
    return True


class CompiledPotential:
    """``u -> (potential, gradient)`` for batches shaped like the recording point, compiled by
    Inductor; ``seconds`` is the time recording and compiling took (ChEES's init time)."""

    def __init__(self, program: Callable[[torch.Tensor], Pair], shape: torch.Size, seconds: float):
        self.program, self.shape, self.seconds = program, shape, seconds

    def __call__(self, u: torch.Tensor) -> Pair:
        return self.program(u.detach())

    @classmethod
    def build(
        cls, log_density: Callable[[torch.Tensor], torch.Tensor], eager: Callable[[torch.Tensor], Pair], u: torch.Tensor
    ) -> CompiledPotential:
        """Record and compile at ``u``, then check against ``eager`` at ``0.5 u + 0.1``; raises
        RuntimeError saying why when the graph or the compiled program differs from eager."""
        start, u = time.perf_counter(), u.detach()
        other = 0.5 * u + 0.1
        want = eager(other)
        graph = graph_of_potential_and_grad(log_density, u)
        if not agree(graph(other), want):
            raise RuntimeError("the recorded graph differs from the model at a second point (a branch on the values)")
        program = torch.compile(graph, backend="inductor", dynamic=False, fullgraph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = program(other)
        if not agree(got, want):
            raise RuntimeError("the Inductor-compiled program differs from the eager model at a second point")
        return cls(program, u.shape, time.perf_counter() - start)
