"""Annealed importance sampling for the partition function of layered Boltzmann machines.

Salakhutdinov & Murray (2008): anneal from a base-rate model whose visible biases are fitted to
the data (every other unit uniform) to the machine, through ``num_betas`` inverse temperatures,
in ``num_runs`` parallel runs. One colour of the layer graph (the one with fewer visible layers:
the hidden layer of an RBM, the odd layers of a DBM) is summed out in closed form, so the runs
move only the other colour and each transition is one sweep of block Gibbs at the current
temperature. The intermediate distributions are

    p*_beta(x) = exp(sum_kept own_beta(x_i)) * prod_summed sum_{x_j} exp(beta * (b_j + input_j) . x_j)

with ``own_beta = ((1 - beta) b_base + beta b) . x`` for bernoulli/softmax layers and the
(unannealed) gaussian quadratic for gaussian layers, so at ``beta = 0`` every layer is independent
and ``log Z_0`` is known. ``log Z = log Z_0 + log mean(w)``; the standard error is the delta
method's ``sd(w) / (sqrt(M) mean(w))``.

:func:`exact_log_partition` enumerates one colour (up to ``max_units`` bernoulli units) and sums
out the other, for tests and tiny models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppdgm.boltzmann import LayeredEnergy, two_colouring
from ppdgm.progress import progress_bar
from ppdgm.threads import check_threads, torch_threads


@dataclass(frozen=True)
class LogZ:
    """An estimate of ``log Z`` with its standard error (0 when exact)."""

    value: float
    stderr: float
    method: str
    num_runs: int = 0
    num_betas: int = 0
    log_weights: torch.Tensor | None = None

    def __str__(self) -> str:
        return f"{self.method}: log Z = {self.value:.4f} +/- {self.stderr:.4f}"


def default_betas(num_betas: int, dtype=torch.float64) -> torch.Tensor:
    """Salakhutdinov & Murray's spacing: 3.5% of the steps in [0, 0.5], 27.5% in [0.5, 0.9], the rest in [0.9, 1]."""
    if not isinstance(num_betas, int) or num_betas < 10:
        raise ValueError(f"num_betas must be an int >= 10, got {num_betas!r}")
    n1 = max(2, round(0.035 * num_betas))
    n2 = max(2, round(0.275 * num_betas))
    n3 = max(2, num_betas - n1 - n2)
    return torch.cat(
        [
            torch.linspace(0, 0.5, n1 + 1, dtype=dtype)[:-1],
            torch.linspace(0.5, 0.9, n2 + 1, dtype=dtype)[:-1],
            torch.linspace(0.9, 1.0, n3, dtype=dtype),
        ]
    )


def split_colours(energy: LayeredEnergy) -> tuple[list[int], list[int]]:
    """``(kept, summed)`` layer indices: the summed colour is the one with fewer visible layers
    (none for RBMs and chain DBMs; a multimodal DBM may sum out a one-hot label layer, which the
    base-rate model then leaves uniform)."""
    colour = two_colouring(len(energy.names), energy.edges)
    classes = [[i for i, c in enumerate(colour) if c == k] for k in (0, 1)]
    summed = min(classes, key=lambda c: (sum(energy.visible[i] for i in c), -len(c)))
    kept = classes[0] if summed is classes[1] else classes[1]
    return kept, summed


def _double(energy: LayeredEnergy) -> LayeredEnergy:
    return LayeredEnergy(
        list(energy.names),
        list(energy.units),
        list(energy.visible),
        [b.detach().double() for b in energy.biases],
        [(a, b, W.detach().double()) for a, b, W in energy.edges],
        [s.detach().double() if s is not None else None for s in energy.log_sigmas],
        dict(energy.counts),
    )


def base_biases(energy: LayeredEnergy, kept, base_data: dict | None, smoothing: float = 5.0) -> dict:
    """Biases of the base-rate model: logits of the smoothed data means on visible bernoulli and
    softmax layers that have data, zero (uniform) elsewhere; gaussian layers use their own bias."""
    out = {}
    for i in kept:
        b = energy.biases[i]
        data = (base_data or {}).get(i)
        if data is None or energy.units[i] == "gaussian":
            out[i] = torch.zeros_like(b)
            continue
        data = data.to(b.device, b.dtype)
        n = data.shape[0]
        if energy.units[i] == "bernoulli":
            p = (data.sum(0) + smoothing) / (n + 2 * smoothing)
            out[i] = (p / (1 - p)).log()
        else:
            p = (data.sum(0) + smoothing) / (data.sum() + smoothing * data.shape[1])
            out[i] = p.log()
    return out


def _log_z0(energy, kept, summed, base) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=energy.biases[0].device)
    for i in kept:
        u = energy.units[i]
        if u == "bernoulli":
            total = total + torch.nn.functional.softplus(base[i]).sum()
        elif u == "softmax":
            total = total + energy.counts.get(i, 1) * torch.logsumexp(base[i], -1)
        else:
            total = total + (0.5 * math.log(2 * math.pi) + energy.log_sigmas[i]).sum()
    for j in summed:
        zero = torch.zeros_like(energy.biases[j])
        total = total + energy.log_marginal(j, energy.natural(j, zero, beta=0.0))
    return total


def _log_unnormalized(energy, kept, summed, base, state, beta) -> torch.Tensor:
    """``log p*_beta`` of the kept layers' states, the summed layers summed out."""
    out = torch.zeros((), dtype=torch.float64, device=energy.biases[0].device)
    for i in kept:
        x = state[i]
        if energy.units[i] == "gaussian":
            out = out + energy.own_log_density(i, x)
        else:
            out = out + (x * ((1 - beta) * base[i] + beta * energy.biases[i])).sum(-1)
    for j in summed:
        out = out + energy.log_marginal(j, energy.natural(j, energy.input(j, state), beta))
    return out


def _transition(energy, kept, summed, base, state, beta) -> dict:
    """One block-Gibbs sweep at inverse temperature ``beta``: summed colour, then kept colour."""
    hidden = {j: energy.sample(j, energy.natural(j, energy.input(j, state), beta)) for j in summed}
    return {i: energy.sample(i, energy.natural(i, energy.input(i, hidden), beta, base_bias=base[i])) for i in kept}


@torch.no_grad()
def annealed_importance_sampling(
    energy: LayeredEnergy,
    num_runs: int = 100,
    num_betas: int = 10000,
    betas: torch.Tensor | None = None,
    base_data: dict | None = None,
    seed: int | None = None,
    threads: int | None = 1,
) -> LogZ:
    """``log Z`` of a layered Boltzmann machine by AIS.

    Args:
        energy: the machine (``model.energy_graph()``).
        num_runs: parallel annealing runs (the importance samples).
        num_betas: inverse temperatures (Salakhutdinov & Murray's spacing) unless ``betas`` is given.
        base_data: ``{layer index: data}`` to fit the base-rate model's biases (visible layers).
        seed: seeds torch's generator first, when given.
        threads: torch CPU threads while it anneals (None: the caller's; restored after). One is
            fastest for these small steps on a small CPU: :mod:`ppdgm.threads`.
    """
    check_threads(threads)
    if not isinstance(energy, LayeredEnergy):
        raise TypeError(f"energy must be a LayeredEnergy (model.energy_graph()), got {type(energy).__name__}")
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 2:
        raise ValueError(f"num_runs must be an int >= 2, got {num_runs!r}")
    if betas is None:
        betas = default_betas(num_betas)
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.dim() != 1 or betas.numel() < 2 or betas[0] != 0 or betas[-1] != 1 or (betas.diff() < 0).any():
        raise ValueError("betas must be a non-decreasing 1-D sequence from 0 to 1")
    if seed is not None:
        torch.manual_seed(seed)
    with torch_threads(threads):
        e = _double(energy)
        kept, summed = split_colours(e)
        if base_data is not None and not isinstance(base_data, dict):
            raise TypeError(f"base_data must be a dict {{layer index: tensor}}, got {type(base_data).__name__}")
        base = base_biases(e, kept, base_data)
        device = e.biases[0].device
        state = {}
        for i in kept:
            shape = (num_runs, e.sizes[i])
            if e.units[i] == "gaussian":
                state[i] = e.biases[i] + e.sigma(i) * torch.randn(shape, dtype=torch.float64, device=device)
            else:
                state[i] = e.sample(i, base[i].expand(shape))
        log_w = torch.zeros(num_runs, dtype=torch.float64, device=device)
        previous = _log_unnormalized(e, kept, summed, base, state, 0.0)
        bar = progress_bar(betas.numel() - 1, "AIS")
        for beta in betas[1:].tolist():
            current = _log_unnormalized(e, kept, summed, base, state, beta)
            log_w += current - previous
            state = _transition(e, kept, summed, base, state, beta)
            previous = _log_unnormalized(e, kept, summed, base, state, beta)
            bar.update(1)
        bar.close()
        log_z0 = _log_z0(e, kept, summed, base)
        log_mean_w = torch.logsumexp(log_w, 0) - math.log(num_runs)
        w = (log_w - log_w.max()).exp()
        stderr = float(w.std() / (math.sqrt(num_runs) * w.mean()))
        return LogZ(float(log_z0 + log_mean_w), stderr, "ais", num_runs, betas.numel(), log_w.float().cpu())


@torch.no_grad()
def exact_log_partition(energy: LayeredEnergy, max_units: int = 24, chunk: int = 1 << 15) -> LogZ:
    """``log Z`` by enumerating the smaller all-bernoulli colour and summing out the other."""
    if not isinstance(energy, LayeredEnergy):
        raise TypeError(f"energy must be a LayeredEnergy (model.energy_graph()), got {type(energy).__name__}")
    e = _double(energy)
    colour = two_colouring(len(e.names), e.edges)
    classes = [[i for i, c in enumerate(colour) if c == k] for k in (0, 1)]
    eligible = [c for c in classes if c and all(e.units[i] == "bernoulli" for i in c)]
    if not eligible:
        raise ValueError("exact enumeration needs one colour of bernoulli units only")
    enum = min(eligible, key=lambda c: sum(e.sizes[i] for i in c))
    other = [i for i in range(len(e.names)) if i not in enum]
    n = sum(e.sizes[i] for i in enum)
    if n > max_units:
        raise ValueError(f"exact enumeration of 2^{n} states refused (max_units={max_units}); use AIS")
    device = e.biases[0].device
    powers = 2 ** torch.arange(n, device=device)
    parts = []
    for lo in range(0, 2**n, chunk):
        codes = torch.arange(lo, min(lo + chunk, 2**n), device=device)
        bits = ((codes.unsqueeze(-1) // powers) % 2).double()
        state = dict(zip(enum, bits.split([e.sizes[i] for i in enum], -1)))
        logp = sum((e.own_log_density(i, state[i]) for i in enum), torch.zeros((), dtype=torch.float64))
        for j in other:
            logp = logp + e.log_marginal(j, e.natural(j, e.input(j, state)))
        parts.append(torch.logsumexp(logp, 0))
    return LogZ(float(torch.logsumexp(torch.stack(parts), 0)), 0.0, "exact")


__all__ = ["LogZ", "annealed_importance_sampling", "default_betas", "exact_log_partition", "split_colours"]
