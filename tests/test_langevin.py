"""The shared Langevin sampler recovers a known Gaussian; bad settings fail before sampling."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppdgm.langevin import Langevin, ReplayBuffer, check_step_size, score_of

MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]])


def gaussian_log_density(x):
    return torch.distributions.MultivariateNormal(MEAN.to(x), COV.to(x)).log_prob(x)


def test_recovers_mean_and_covariance_of_a_gaussian_energy():
    # 4000 independent chains, 800 steps of h = 0.01 (time 8: the slowest mode has relaxed to e^-5 of its
    # start); ULA's stationary covariance is inflated by 1 / (1 - h * lambda_max / 2) < 2%, and the Monte
    # Carlo standard errors are ~0.016 (mean) and ~0.02 (covariance).
    torch.manual_seed(0)
    x0 = 3 * torch.randn(4000, 2)
    x = Langevin(step_size=0.01, num_steps=800).run(x0, log_density=gaussian_log_density)
    assert torch.allclose(x.mean(0), MEAN, atol=0.06)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.08)


def test_score_interface_matches_log_density_interface():
    torch.manual_seed(1)
    x0 = torch.randn(64, 2)
    precision = torch.linalg.inv(COV)
    torch.manual_seed(2)
    a = Langevin(0.05, 20).run(x0, log_density=gaussian_log_density)
    torch.manual_seed(2)
    b = Langevin(0.05, 20).run(x0, score=lambda x: -(x - MEAN) @ precision)
    assert torch.allclose(a, b, atol=1e-5)


def test_zero_noise_is_gradient_ascent_to_the_mode():
    x = Langevin(0.1, 300, noise_scale=0.0).run(torch.zeros(5, 2), log_density=gaussian_log_density)
    assert torch.allclose(x, MEAN.expand(5, 2), atol=1e-4)


def test_grad_clip_and_clamp_bound_each_move():
    sampler = Langevin(1.0, 1, noise_scale=0.0, grad_clip=0.5, clamp=(-10.0, 2.0))
    x0 = torch.tensor([[50.0, 0.0], [0.0, 0.0]])
    x = sampler.run(x0, score=lambda x: -x)
    assert (x - x0.clamp(-10, 2)).norm(dim=1).max() <= 0.5 + 1e-6
    assert x.max() <= 2.0


def test_path_has_every_state():
    x, path = Langevin(0.01, 7).run(torch.zeros(3, 2), log_density=gaussian_log_density, return_path=True)
    assert path.shape == (8, 3, 2) and torch.equal(path[-1], x)


def test_score_of_is_the_gradient():
    x = torch.randn(10, 2)
    expected = -(x - MEAN) @ torch.linalg.inv(COV)
    assert torch.allclose(score_of(gaussian_log_density)(x), expected, atol=1e-5)


def test_replay_buffer_reinitializes_the_stated_share_and_keeps_capacity():
    torch.manual_seed(0)
    buf = ReplayBuffer(lambda n: torch.full((n, 2), -1.0), capacity=500, reinit_prob=0.05)
    assert torch.equal(buf.sample(4), torch.full((4, 2), -1.0))  # empty: all fresh
    buf.push(torch.ones(400, 2))
    buf.push(2 * torch.ones(300, 2))
    assert len(buf) == 500 and (buf.states[:300] == 2).all()  # newest first, oldest dropped
    fresh = (buf.sample(20000) == -1).all(1).float().mean()
    assert abs(float(fresh) - 0.05) < 0.01


@settings(max_examples=25, deadline=None)
@given(st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf"))))
def test_nonpositive_step_size_is_refused(step):
    with pytest.raises(ValueError, match="step_size must be a positive finite number"):
        Langevin(step_size=step)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": -1}, "num_steps"),
        ({"noise_scale": -0.1}, "noise_scale"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"clamp": (1.0, 0.0)}, "clamp"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Langevin(**kwargs)


def test_run_needs_exactly_one_target():
    with pytest.raises(ValueError, match="exactly one"):
        Langevin().run(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="x0"):
        Langevin().run([0.0, 1.0], score=lambda x: x)
    assert check_step_size(2) == 2.0 and math.isclose(Langevin(0.02).noise_scale, 0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_smoke():
    x = Langevin(0.01, 10).run(torch.zeros(8, 2, device="cuda"), log_density=gaussian_log_density)
    assert x.device.type == "cuda" and torch.isfinite(x).all()
