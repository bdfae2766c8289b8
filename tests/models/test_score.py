"""Score model: mode coverage by both samplers, exact likelihood of a Gaussian, schedules, resume."""

import math

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppdgm
from ppdgm.data import make_gaussian_mixture
from ppdgm.evaluate import mmd, modes_covered
from ppdgm.inference.score_matching import ScoreMatching, fixed_noise_loss
from ppdgm.models.score import VESDE, VPSDE, ScoreModel, check_decreasing


@pytest.fixture(scope="module")
def mixture_model():
    x, centres = make_gaussian_mixture(2000, seed=0)
    torch.manual_seed(0)
    model = ScoreModel(features=2, sde="vp", hidden_features=[64, 64])
    fit = ScoreMatching(num_steps=800, batch_size=1024, lr=5e-3, ema=0.99, seed=0).run(model, x)
    held_out, _ = make_gaussian_mixture(1000, seed=2)
    torch.manual_seed(3)
    gaussian = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T)).sample((1000,))
    return model, fit, centres, held_out, mmd(held_out, gaussian).mmd2


@pytest.mark.parametrize(
    "method, kwargs, sharp", [("pc", {"num_scales": 200}, 0.45), ("annealed_langevin", {"num_scales": 50}, 0.2)]
)
def test_covers_eight_modes_and_beats_a_gaussian(mixture_model, method, kwargs, sharp):
    model, fit, centres, held_out, gaussian_mmd = mixture_model
    torch.manual_seed(0)
    samples = model.sample(1000, method, **kwargs)
    covered, near = modes_covered(samples, centres, max_dist=0.3, min_count=10)
    assert covered >= 6 and near > sharp  # share within 3 sd of a mode (a fitted Gaussian: ~0.07)
    assert mmd(held_out, samples).mmd2 < 0.5 * gaussian_mmd
    assert fit.history["loss"][-1] < 0.6 * fit.history["loss"][0]


def test_hutchinson_divergence_is_unbiased_for_the_exact_one(mixture_model):
    model = mixture_model[0]
    x, _ = make_gaussian_mixture(64, seed=5)
    exact = model.log_likelihood(x, num_steps=20, divergence="exact")
    estimate = model.log_likelihood(x, num_steps=20, num_probes=8)
    assert (estimate - exact).mean().abs() < 0.1
    assert model.log_likelihood(x, num_steps=20, num_probes=8).equal(estimate)  # seeded probes


def test_probability_flow_likelihood_of_a_gaussian_matches_the_true_density():
    mu, sd = 0.5, 0.8
    g = torch.Generator().manual_seed(0)
    x = mu + sd * torch.randn(4000, 1, generator=g)
    test = mu + sd * torch.randn(500, 1, generator=g)
    torch.manual_seed(0)
    model = ScoreModel(features=1, sde="ve", hidden_features=[64, 64], sigma_max=4.0)
    ScoreMatching(num_steps=1000, batch_size=512, lr=2e-3, ema=0.99, seed=0).run(model, x)
    ll = model.log_likelihood(test, num_steps=50)
    true = torch.distributions.Normal(mu, sd).log_prob(test).squeeze(-1)
    assert (ll - true).mean().abs() < 0.05  # nats per point
    assert (ll - true).abs().mean() < 0.25  # and the shape, point by point
    # in one dimension a Rademacher probe gives the exact divergence
    assert torch.allclose(ll, model.log_likelihood(test, num_steps=50, divergence="exact"), atol=1e-5)


@pytest.mark.parametrize("sde, options", [("vp", {}), ("ve", {"sigma_min": 1e-3, "sigma_max": 50.0})])
def test_an_untrained_gaussian_base_model_is_the_fitted_gaussian(sde, options):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g)
    cov = a @ a.T / 5 + 0.05 * torch.eye(5)  # correlated, eigenvalues spread over two decades
    # (a VE model's prior N(0, sigma_max^2) ignores the data's mean: keep the per-dimension means
    # equal so that the prior is right, as it is for VP)
    mean = torch.arange(5.0) if sde == "vp" else torch.full((5,), 2.0)
    x = torch.distributions.MultivariateNormal(mean, cov).sample((2000,))
    test = x[:100] + 0.1
    model = ScoreModel.from_data(x, sde=sde, hidden_features=[16], eps=1e-4, **options)
    assert model.gaussian_base
    torch.nn.init.zeros_(model.net[-1].weight)  # the network's correction is zero
    torch.nn.init.zeros_(model.net[-1].bias)
    fitted = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T))
    ll = model.log_likelihood(test, num_steps=200, divergence="exact")
    assert torch.allclose(ll, fitted.log_prob(test), atol=0.05), (ll - fitted.log_prob(test)).abs().max()
    # the base is saved with the model: rebuilt from its spec and state it scores the same
    rebuilt = ScoreModel(**model.spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt.log_likelihood(test, num_steps=20), model.log_likelihood(test, num_steps=20))


def test_patience_stops_on_the_validation_loss_and_keeps_the_best_weights():
    x, _ = make_gaussian_mixture(500, seed=0)
    shifted = x[:200] + 3.0  # a validation set the model gets worse at as it fits x
    torch.manual_seed(0)
    model = ScoreModel(features=2, hidden_features=[32])
    fit = ScoreMatching(num_steps=2000, batch_size=128, lr=1e-2, eval_every=20, patience=3, seed=0).run(
        model, x, val_data=shifted
    )
    best = fit.extra["best_val"]
    losses = dict(zip(fit.history["val_step"], fit.history["val_loss"]))
    assert len(fit.history["loss"]) == best["step"] + 3 * 20 < 2000  # stopped three evaluations later
    assert losses[best["step"]] == min(losses.values()) == best["loss"]
    assert fixed_noise_loss(model, shifted) == pytest.approx(best["loss"])  # the best weights


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    x, _ = make_gaussian_mixture(300, seed=0)

    def train(steps, resume, directory):
        torch.manual_seed(0)
        model = ScoreModel(features=2, hidden_features=[16])
        fit = ScoreMatching(num_steps=steps, batch_size=64, ema=0.9, checkpoint_every=5, seed=0).run(
            model, x, val_data=x[:50], checkpoint_dir=directory, resume=resume
        )
        return model, fit

    whole, fit_whole = train(20, False, tmp_path / "a")
    train(10, False, tmp_path / "b")
    resumed, fit_resumed = train(20, True, tmp_path / "b")
    assert fit_resumed.history["loss"] == pytest.approx(fit_whole.history["loss"])
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b)
    fit_whole.save(tmp_path / "saved")
    loaded = ppdgm.load(tmp_path / "saved").module
    z = torch.randn(4, 2)
    assert torch.allclose(loaded.score(z, 0.5), whole.score(z, 0.5))
    torch.manual_seed(1)
    a = loaded.sample(5, "ode", num_scales=10)
    torch.manual_seed(1)
    b = pyro.poutine.trace(loaded.model).get_trace(5, 10).nodes["x"]["value"]  # the same map as a Pyro program
    assert torch.allclose(a, b, atol=1e-5)


def test_standardization_enters_the_likelihood_as_a_jacobian():
    torch.manual_seed(0)
    plain = ScoreModel(features=3, hidden_features=[8])
    shifted = ScoreModel(features=3, hidden_features=[8], loc=1.0, scale=2.0)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(5, 3)
    expected = plain.log_likelihood((x - 1.0) / 2.0, num_steps=5) - 3 * math.log(2.0)
    assert torch.allclose(shifted.log_likelihood(x, num_steps=5), expected, atol=1e-5)
    data = 10 + 3 * torch.randn(200, 3)
    fitted = ScoreModel.from_data(data)
    assert fitted.loc == pytest.approx(float(data.mean())) and fitted.scale == pytest.approx(float(data.std()))


@settings(max_examples=30, deadline=None)
@given(st.floats(0.02, 0.99), st.sampled_from(["ve", "vp"]))
def test_time_of_std_inverts_the_schedule(t, sde):
    model = ScoreModel(features=1, sde=sde, eps=0.01)
    std = model.sde.marginal(torch.tensor([t], dtype=torch.float64))[1]
    assert model._time_of_std(std).item() == pytest.approx(t, abs=1e-6)


def test_schedules_have_the_stated_marginals():
    ve = VESDE(0.01, 10.0)
    assert ve.marginal(torch.tensor([0.0, 1.0]))[1].tolist() == pytest.approx([0.01, 10.0])
    vp = VPSDE(0.1, 20.0)
    mean, std = vp.marginal(torch.tensor([1.0]))
    assert float(mean) == pytest.approx(math.exp(-0.25 * 19.9 - 0.05)) and float(mean**2 + std**2) == pytest.approx(1)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ScoreModel(sde="ve", sigma_min=1.0, sigma_max=0.5), "noise schedule must decrease"),
        (lambda: ScoreModel(sde="vp", beta_min=5.0, beta_max=1.0), "noise schedule"),
        (lambda: check_decreasing([1.0, 0.5, 0.5]), "strictly decreasing"),
        (lambda: ScoreModel(features=1).sample(4, "annealed_langevin", sigmas=[0.1, 0.5, 1.0]), "strictly decreasing"),
        (lambda: ScoreModel(features=1).sample(4, "annealed_langevin", step_size=0.0), "step_size"),
        (lambda: ScoreModel(sde="sub-vp"), "sde must be one of"),
        (lambda: ScoreModel(features=1).log_likelihood(torch.zeros(3, 2)), "expected 1 columns"),
        (lambda: ScoreModel(features=1).sample(3, method="euler"), "method"),
        (lambda: ScoreMatching(num_steps=1).run(ScoreModel(features=2), torch.zeros(5, 3)), "expected 2 columns"),
        (lambda: ScoreMatching(ema=1.5), "ema"),
    ],
)
def test_bad_input_is_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_smoke():
    x, _ = make_gaussian_mixture(256, seed=0)
    model = ScoreModel(features=2, hidden_features=[16])
    ScoreMatching(num_steps=3, batch_size=64).run(model, x.cuda())
    assert model.sample(8, num_scales=5).device.type == "cuda"
    assert torch.isfinite(model.log_likelihood(x[:4].cuda(), num_steps=3)).all()
