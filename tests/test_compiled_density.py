"""The Inductor-compiled potential: equals eager, ChEES's draws with it equal eager's, and every
way it can fail (a branch on the values, a compiler error) falls back with a warning."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppdgm.compiled_density
from ppdgm.compiled_density import agree
from ppdgm.inference.chees import ChEES
from ppdgm.logdensity import BatchedLogDensity

SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])
Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])


def schools(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def branching(data):
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    scale = 1.0 if z.sum() > 0 else 2.0  # one branch for the whole batch: a trace records it
    pyro.sample("x", dist.Normal(z, scale).to_event(1), obs=data)


def test_inductor_chees_draws_equal_eager_draws_and_report_compile_time():
    """Same seed, same math: the compiled run's draws equal the eager run's to float tolerance
    (one compile, of the potential at the chains' starting points, serves the whole run). No
    warm-up: the adaptation would amplify float differences into different step sizes."""
    kw = {
        "num_chains": 8,
        "num_warmup": 0,
        "num_samples": 20,
        "init_step_size": 0.2,
        "max_leapfrog_steps": 8,
        "seed": 4,
    }
    eager = ChEES(**kw).run(schools, SIGMA, Y)
    compiled = ChEES(**kw, jit_compile="inductor").run(schools, SIGMA, Y)
    assert eager.extra["compile_seconds"] is None
    assert compiled.extra["compile_seconds"] > 0
    for site in ("mu", "tau", "eta"):
        a, b = eager.samples[site], compiled.samples[site]
        assert a.shape == b.shape == (8, 20, *a.shape[2:])
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (site, (a - b).abs().max())
    assert not torch.equal(compiled.samples["mu"][:, 0], compiled.samples["mu"][:, -1])  # the chains moved


def test_compiled_potential_equals_eager_off_the_recording_point():
    density = BatchedLogDensity(schools, (SIGMA, Y))
    gen = torch.Generator().manual_seed(0)
    density.compile(torch.randn(8, density.dim, generator=gen), "inductor")  # the shape ChEES's test compiled
    assert density.compile_seconds is not None
    v = 3 * torch.randn(8, density.dim, generator=gen)
    want = BatchedLogDensity(schools, (SIGMA, Y)).potential_and_grad(v)
    got = density.potential_and_grad(v)
    assert agree(got, want, rtol=1e-5)
    odd = density.potential_and_grad(v[:5])  # another batch size: the eager path
    assert agree(odd, (want[0][:5], want[1][:5]), rtol=1e-6)


def test_graph_that_would_replay_the_wrong_branch_is_dropped_before_compiling():
    density = BatchedLogDensity(branching, (torch.zeros(2),))
    with pytest.warns(UserWarning, match="Inductor could not compile"):  # make_fx refuses the branch
        density.compile(torch.full((3, 2), -0.1), "inductor")  # recorded scale 2; 0.5 u + 0.1 > 0
    assert density.compile_seconds is None and getattr(density, "_jit_shape", None) is None
    v = torch.full((3, 2), 0.3)
    assert agree(density.potential_and_grad(v), BatchedLogDensity(branching, (torch.zeros(2),)).potential_and_grad(v))


def test_compiler_failure_falls_back_to_the_trace(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ppdgm.compiled_density.torch, "compile", broken)
    density = BatchedLogDensity(schools, (SIGMA, Y))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        density.compile(torch.zeros(4, density.dim), "inductor")
    assert density.compile_seconds is None and density._jit_shape == (4, density.dim)


def test_bad_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be"):
        BatchedLogDensity(schools, (SIGMA, Y)).compile(torch.zeros(2, 10), "xla")
    with pytest.raises(ValueError, match="jit_compile must be"):
        ChEES(jit_compile="fast")


def test_agree_compares_relative_to_the_largest_entry_and_matches_infinities():
    big = (torch.tensor([1e6, 1.0]), torch.tensor([[1e6, 0.0]]))
    assert agree((big[0] + torch.tensor([1.0, 0.0]), big[1]), big)
    assert not agree((big[0] + torch.tensor([1e3, 0.0]), big[1]), big)
    inf = (torch.tensor([float("inf"), 1.0]), torch.zeros(1, 2))
    assert agree(inf, inf) and not agree((torch.tensor([1.0, 1.0]), torch.zeros(1, 2)), inf)
