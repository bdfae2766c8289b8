"""The warm-up pieces one by one, against known numbers."""

import itertools
import math

import numpy as np
import pytest
import torch

from ppdgm.inference.adaptation import (
    CovarianceWelford,
    DualAveraging,
    TrajectoryAdam,
    Welford,
    half_turn,
    halton,
    warmup_windows,
)


def van_der_corput(n: int, base: int) -> float:
    """The digits of n in ``base``, mirrored behind the radix point (written from the definition)."""
    digits = np.base_repr(n, base)
    return sum(int(d, base) * base ** -(i + 1) for i, d in enumerate(reversed(digits)))


@pytest.mark.parametrize("base", [2, 3, 5])
def test_halton_is_the_van_der_corput_sequence(base):
    assert [halton(n, base) for n in range(1, 200)] == pytest.approx([van_der_corput(n, base) for n in range(1, 200)])
    assert halton(1) == 0.5 and halton(3) == 0.75 and halton(6) == 0.375


@pytest.mark.parametrize("target", [0.6, 0.8, 0.9])
def test_dual_averaging_reaches_the_target_acceptance(target):
    """Acceptance exp(-step_size) (a known decreasing function): the averaged step size solves
    exp(-eps) = target, i.e. eps = -log(target)."""
    averager = DualAveraging.start(step_size=1.0, target=target)
    eps = 1.0
    for _ in range(3000):
        eps = averager.update(math.exp(-eps))
    assert math.exp(-averager.final) == pytest.approx(target, abs=0.005)
    assert averager.final == pytest.approx(-math.log(target), rel=0.05)


def test_dual_averaging_reset_restarts_the_schedule():
    a = DualAveraging.start(0.5, 0.8)
    for _ in range(10):
        a.update(0.1)
    a.reset(0.25)
    fresh = DualAveraging.start(0.25, 0.8)
    assert (a.t, a.x, a.h_bar, a.x_bar, a.mu) == (fresh.t, fresh.x, fresh.h_bar, fresh.x_bar, fresh.mu)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_welford_equals_numpy_mean_and_variance(batch):
    rows = (
        torch.randn(700, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
        * torch.tensor([1.0, 3.0, 0.1], dtype=torch.float64)
        + 5
    )
    w = Welford.empty(rows[0])
    for chunk in rows.split(batch):
        w.update(chunk)
    assert w.count == 700
    np.testing.assert_allclose(w.mean.numpy(), rows.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(w.variance.numpy(), rows.numpy().var(0, ddof=1), rtol=1e-10)
    shrink = 700 / 705
    np.testing.assert_allclose(
        w.regularized_variance().numpy(), shrink * rows.numpy().var(0, ddof=1) + 1e-3 * 5 / 705, rtol=1e-10
    )


def test_adam_step_equals_torch_adam():
    """ChEES's Adam on log T is torch.optim.Adam with betas=(0, 0.95), ascending the gradient."""
    grads = [0.3, -1.2, 4.0, 0.01, -0.5, 2.5]
    ours = TrajectoryAdam(value=0.7, lr=0.025)
    x = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.025, betas=(0.0, 0.95), eps=1e-8, maximize=True)
    for g in grads:
        ours.step(g)
        x.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        assert ours.value == pytest.approx(x.item(), rel=1e-12, abs=1e-14)


def test_adam_step_is_clipped():
    adam = TrajectoryAdam(value=0.0, lr=1.0)
    assert adam.step(10.0, low=-0.5, high=0.5) == 0.5
    assert adam.step(-1e6, low=-0.25, high=0.5) == -0.25


def test_warmup_windows_double_and_end_at_ninety_percent():
    ends = warmup_windows(1000)
    sizes = np.diff([150, *ends])
    assert ends[-1] == 900 and ends[0] == 150 + 107
    assert all(b >= a for a, b in itertools.pairwise(sizes[:-1]))  # doubling, but for the last one
    assert warmup_windows(19) == []


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_covariance_welford_equals_numpy_covariance(batch):
    x = (
        torch.randn(300, 4, dtype=torch.float64)
        @ torch.tensor([[1.0, 0.5, 0, 0], [0, 2, 0, 0], [0, 0, 1, -1], [0, 0, 0, 3]]).double()
    )
    acc = CovarianceWelford.empty(x[0])
    for rows in x.split(batch):
        acc.update(rows)
    assert acc.count == 300
    assert torch.allclose(acc.mean, x.mean(0))
    assert torch.allclose(acc.covariance, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))


def test_half_turn_is_half_a_period_of_the_slowest_whitened_direction():
    """For the Gaussian N(0, C) HMC with inverse mass M^-1 oscillates along each eigenvector of
    M^-1/2 C M^-1/2 with period 2 pi sqrt(lambda): half of it is pi sqrt(lambda_max)."""
    cov = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    assert half_turn(cov, torch.ones(2)) == pytest.approx(2 * math.pi)
    assert half_turn(cov, torch.tensor([4.0, 1.0])) == pytest.approx(math.pi)
    corr = torch.tensor([[1.0, 0.8], [0.8, 1.0]])  # whitened by its diagonal: lambda_max = 1.8
    assert half_turn(corr * 9.0, torch.full((2,), 9.0)) == pytest.approx(math.pi * math.sqrt(1.8))
