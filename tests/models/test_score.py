"""Score model: mode coverage by both samplers, exact likelihood of a Gaussian, schedules, resume."""

import math

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppdgm
from ppdgm.data import Dataset, make_gaussian_mixture
from ppdgm.evaluate import mmd, modes_covered
from ppdgm.inference.score_matching import ScoreMatching, fixed_noise_loss
from ppdgm.models.diffusion_schedule import LogSNRSchedule
from ppdgm.models.score import VESDE, VPSDE, ScoreModel, check_decreasing, quantization_gamma


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
    estimate = model.log_likelihood(x, num_steps=20, divergence="hutchinson", num_probes=8)
    assert (estimate - exact).mean().abs() < 0.1
    assert model.log_likelihood(x, num_steps=20, divergence="hutchinson", num_probes=8).equal(estimate)  # seeded


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
    assert torch.allclose(ll, model.log_likelihood(test, num_steps=50, divergence="hutchinson"), atol=1e-5)


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
    ll = model.log_likelihood(test, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ll, fitted.log_prob(test), atol=0.05), (ll - fitted.log_prob(test)).abs().max()
    # the base is saved with the model: rebuilt from its spec and state it scores the same
    rebuilt = ScoreModel(**model.spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt.log_likelihood(test, num_steps=20), model.log_likelihood(test, num_steps=20))


def untrained_gaussian_base_vdm(x, **options):
    """A VDM model whose network's correction is zero: exactly its fitted Gaussian, diffused."""
    model = ScoreModel.from_data(x, sde="vdm", hidden_features=[16], **options).double()
    torch.nn.init.zeros_(model.net[-1].weight)
    torch.nn.init.zeros_(model.net[-1].bias)
    return model


def correlated_gaussian(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(torch.arange(d, dtype=torch.float64), cov).sample((n,))


def test_adaptive_ode_likelihood_converges_to_the_exact_density_as_the_tolerance_tightens():
    torch.manual_seed(0)
    x = correlated_gaussian(2000)
    test = x[:10] + 0.1
    # gamma_max = 20 leaves alpha_1^2 = 2e-9 of signal, so the N(0, I) prior is the diffused base
    model = untrained_gaussian_base_vdm(x, gamma_min=-10.0, gamma_max=20.0)
    # its density at t = 0, mapped back by 1 / alpha_0: the fitted Gaussian plus the noise (sigma_0 / alpha_0)^2
    u = (test - model.loc) / model.scale
    cov = torch.cov(((x - model.loc) / model.scale).T) + math.exp(-10.0) * torch.eye(5, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(model.base_mean, cov).log_prob(u) - 5 * math.log(model.scale)
    errors, nfes = [], []
    for tol in (1e-2, 1e-4, 1e-7):
        errors.append(float((model.log_likelihood(test, rtol=tol, atol=tol) - exact).abs().max()))
        nfes.append(model.last_nfe)
    assert errors[-1] < 1e-3, errors
    assert errors[0] > 100 * errors[-1] and errors[1] > 2 * errors[-1], errors
    assert nfes == sorted(nfes) and nfes[-1] > 2 * nfes[0]  # tighter tolerances take more, smaller steps


def test_the_vdm_bound_lies_below_the_likelihood_of_its_own_model():
    # the VDM generative model decodes z_0 with N(z_0 / alpha_0, (sigma_0 / alpha_0)^2): its density
    # is the Gaussian widened by twice that noise, and the variational bound sits just below it
    x = correlated_gaussian(2400)
    train, test = x[:2000], x[2000:]
    model = untrained_gaussian_base_vdm(train, gamma_min=-10.0, gamma_max=20.0)
    u = (test - model.loc) / model.scale
    cov = torch.cov(((train - model.loc) / model.scale).T) + 2 * math.exp(-10.0) * torch.eye(5, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(model.base_mean, cov).log_prob(u) - 5 * math.log(model.scale)
    gap = exact - model.vdm_bound(test, num_times=64)
    se = float(gap.std()) / math.sqrt(len(gap))
    assert -3 * se < float(gap.mean()) < 0.3, (float(gap.mean()), se)
    assert model.vdm_bound(test[:5], num_times=4).equal(model.vdm_bound(test[:5], num_times=4))  # seeded


@pytest.mark.parametrize("sde", ["vdm", "vp", "ve"])
def test_ddpm_draws_of_an_untrained_gaussian_base_model_have_the_gaussians_moments(sde):
    x = correlated_gaussian(2000).float()
    options = {"sigma_min": 1e-3, "sigma_max": 50.0} if sde == "ve" else {}
    model = ScoreModel.from_data(x, sde=sde, hidden_features=[16], **options)
    torch.nn.init.zeros_(model.net[-1].weight)
    torch.nn.init.zeros_(model.net[-1].bias)
    torch.manual_seed(0)
    draws = model.sample(4000, "ddpm", num_scales=100)
    mean, cov = x.mean(0), torch.cov(x.T)
    se = (cov.diagonal() / 4000).sqrt()
    assert ((draws.mean(0) - mean).abs() < 4 * se).all(), (draws.mean(0) - mean) / se
    assert torch.linalg.matrix_norm(torch.cov(draws.T) - cov) < 0.1 * torch.linalg.matrix_norm(cov)


def test_dequantization_keeps_each_pixels_cell_and_redraws_its_noise():
    model = ScoreModel(features=3, hidden_features=[8], sde="vdm", dequantization_levels=17)
    k = torch.tensor([[0.0, 7.0, 16.0]] * 200)
    first, second = model._dequantize((k + 0.5) / 17), model._dequantize((k + 0.5) / 17)
    assert torch.equal((first * 17).floor(), k) and torch.equal((second * 17).floor(), k)
    assert not torch.equal(first, second)
    assert float(((first * 17 - k).mean(0) - 0.5).abs().max()) < 0.1  # uniform within the cell
    # from_data on dequantized digits: the VDM bound, gamma_min at the quantization noise
    data = Dataset(first, None, "digits-dequantized-train", None)
    built = ScoreModel.from_data(data)
    assert built.sde_kind == "vdm" and built.dequantization_levels == 17
    assert built.logit_squeeze == 0.05
    assert float(built.sde.gamma_min.detach()) == pytest.approx(quantization_gamma(17, built.scale, 0.05))


def test_the_bound_pushes_the_schedules_endpoints_outward_from_a_short_schedule():
    x = correlated_gaussian(1000).float()
    torch.manual_seed(0)
    model = ScoreModel.from_data(x, sde="vdm", hidden_features=[16], gamma_min=-3.0, gamma_max=3.0)
    torch.nn.init.zeros_(model.net[-1].weight)  # the exact score of the fitted Gaussian
    torch.nn.init.zeros_(model.net[-1].bias)
    # gamma_max = 3 leaves signal at t = 1 for the prior to pay, gamma_min = -3 a decoder wider than the
    # data's smallest directions: descending the mean loss moves gamma_max up and gamma_min down
    torch.stack([model.denoising_loss(x) for _ in range(8)]).mean().backward()
    assert float(model.sde.gamma_max.grad) < 0 < float(model.sde.gamma_min.grad)
    assert model.net[0].weight.grad is not None and model.embed.w.grad is None  # the embedding is fixed


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
        (lambda: LogSNRSchedule(1.0, -1.0), "gamma_min < gamma_max"),
        (lambda: ScoreModel(dequantization_levels=1), "dequantization_levels"),
        (lambda: ScoreModel(features=1).vdm_bound(torch.zeros(3, 1)), "sde='vdm'"),
        (lambda: ScoreModel(features=1).log_likelihood(torch.zeros(3, 1), num_steps=0), "num_steps"),
        (lambda: ScoreModel(features=1).log_likelihood(torch.zeros(3, 1), rtol=0.0), "rtol"),
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
