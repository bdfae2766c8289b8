"""GAN: mode coverage on 8 Gaussians, WGAN-GP's penalty, failure warnings, resume, bad shapes."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppdgm
from ppdgm.data import Dataset, make_gaussian_mixture
from ppdgm.evaluate import mmd, modes_covered
from ppdgm.inference.adversarial import Adversarial, DivergenceWarning, ModeCollapseWarning
from ppdgm.models.gan import GAN


@pytest.fixture(scope="module")
def mixture():
    x, centres = make_gaussian_mixture(2000, seed=0)
    held_out, _ = make_gaussian_mixture(1000, seed=2)
    torch.manual_seed(3)
    gaussian = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T)).sample((1000,))
    return x, centres, held_out, mmd(held_out, gaussian).mmd2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_covers_eight_modes_and_beats_a_gaussian(mixture, seed):
    x, centres, held_out, gaussian_mmd = mixture
    torch.manual_seed(seed)
    gan = GAN(features=2, latent_features=2, hidden_features=[64, 64], critic_hidden_features=[64, 64])
    engine = Adversarial(loss="nonsaturating", num_steps=400, batch_size=256, lr=2e-3, ema=0.99, seed=seed)
    fit = engine.run(gan.model, gan.critic, x)
    samples = gan.sample(2000)
    covered, _ = modes_covered(samples, centres, max_dist=0.3, min_count=20)  # 1% of draws within 3 sd
    assert covered == 8
    assert mmd(held_out, samples).mmd2 < 0.5 * gaussian_mmd
    assert len(fit.history["loss"]) == len(fit.history["critic_loss"]) == 400
    assert fit.extra["warnings"] == [] and min(fit.history["diversity"]) > 0.5


def test_wgan_gp_keeps_the_critic_gradient_near_one(mixture):
    x = mixture[0]
    torch.manual_seed(0)
    gan = GAN(features=2, latent_features=2, hidden_features=[32, 32], critic_hidden_features=[32, 32])
    fit = Adversarial(loss="wgan-gp", num_steps=60, batch_size=128, lr=1e-3, seed=0).run(gan.model, gan.critic, x)
    assert fit.config["n_critic"] == 5 and len(fit.history["critic_loss"]) == 60
    fake = gan.sample(500)
    eps = torch.rand(500, 1)
    mix = (eps * x[:500] + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(gan.critic(mix).sum(), mix)
    assert 0.5 < grad.norm(dim=1).mean() < 1.5
    assert fit.history["critic_loss"][-1] < 0  # a positive Wasserstein estimate: critic ranks real above fake


def collapsed_generator(n, y=None):
    """Ignores its noise: every draw is the same learnable point, far from the data."""
    loc = pyro.param("loc", torch.tensor([8.0, 8.0]))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        return pyro.deterministic("x", loc + 0.0 * z, event_dim=1)


def test_collapse_and_divergence_are_warned(mixture):
    x = mixture[0]
    critic = GAN(features=2).critic
    engine = Adversarial(
        loss="nonsaturating", num_steps=150, batch_size=128, lr=1e-6, critic_lr=1e-2, monitor_every=50, seed=0
    )
    with pytest.warns(ModeCollapseWarning, match="mode collapse"), pytest.warns(DivergenceWarning, match="diverged"):
        fit = engine.run(collapsed_generator, critic, x)
    assert {a["kind"] for a in fit.extra["warnings"]} == {"mode_collapse", "divergence"}
    assert max(fit.history["diversity"]) < 1e-6


def test_conditional_gan_follows_its_label():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (600,), generator=g)
    x = torch.stack([4.0 * y - 2.0, torch.zeros(600)], 1) + 0.2 * torch.randn(600, 2, generator=g)
    torch.manual_seed(0)
    gan = GAN.from_data(
        Dataset(x, y, "two-blobs"), conditional=True, hidden_features=[32, 32], critic_hidden_features=[32, 32]
    )
    assert gan.classes == 2 and len(gan.data_args(Dataset(x, y, "two-blobs"))) == 2
    Adversarial(loss="nonsaturating", num_steps=300, batch_size=128, lr=2e-3, seed=0).run(gan.model, gan.critic, (x, y))
    left = gan.sample(300, y=torch.zeros(300, dtype=torch.long))
    right = gan.sample(300, y=torch.ones(300, dtype=torch.long))
    assert left[:, 0].mean() < -1.5 and right[:, 0].mean() > 1.5


@pytest.mark.filterwarnings("ignore::ppdgm.inference.adversarial.ModeCollapseWarning")
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, mixture):
    x = mixture[0][:512]

    def train(steps, resume, directory):
        torch.manual_seed(0)
        gan = GAN(features=2, hidden_features=[16], critic_hidden_features=[16])
        engine = Adversarial(loss="nonsaturating", num_steps=steps, batch_size=64, lr=1e-3, checkpoint_every=10, seed=0)
        fit = engine.run(gan.model, gan.critic, x, checkpoint_dir=directory, resume=resume)
        return gan, fit

    whole, fit_whole = train(30, False, tmp_path / "a")
    train(20, False, tmp_path / "b")
    resumed, fit_resumed = train(30, True, tmp_path / "b")
    assert fit_resumed.timing["steps"] == 10
    assert fit_resumed.history["loss"] == pytest.approx(fit_whole.history["loss"])
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.filterwarnings("ignore::ppdgm.inference.adversarial.ModeCollapseWarning")
def test_saved_fit_reloads_the_generator(tmp_path, mixture):
    torch.manual_seed(0)
    gan = GAN(features=2, hidden_features=[16], critic_hidden_features=[16])
    fit = Adversarial(num_steps=5, batch_size=64, seed=0).run(gan.model, gan.critic, mixture[0])
    fit.save(tmp_path)
    loaded = ppdgm.load(tmp_path)
    z = torch.randn(4, 2)
    assert torch.allclose(loaded.module.generate(z), gan.generate(z))


def test_mismatched_shapes_fail_before_training(mixture):
    x = mixture[0]
    wide = GAN(features=3)
    with pytest.raises(ValueError, match="generator/data shape mismatch"):
        Adversarial(num_steps=1).run(wide.model, wide.critic, x)
    gan, critic_for_3d = GAN(features=2), GAN(features=3).critic
    with pytest.raises(ValueError, match="generator/critic shape mismatch"):
        Adversarial(num_steps=1).run(gan.model, critic_for_3d, x)
    with pytest.raises(ValueError, match="no site 'x'"):
        Adversarial(num_steps=1, site="x").run(lambda n: pyro.sample("w", dist.Normal(0.0, 1.0)), gan.critic, x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss": "least-squares"}, "loss must be one of"),
        ({"r1_weight": -1.0}, "r1_weight"),
        ({"loss": "wgan-gp", "r1_weight": 1.0}, "r1_weight"),
        ({"ema": 1.0}, "ema"),
        ({"ema": 0.0}, "ema"),
        ({"n_critic": 0}, "n_critic"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.5, 1.5)}, "betas"),
        ({"collapse_threshold": 2.0}, "collapse_threshold"),
    ],
)
def test_bad_engine_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adversarial(**kwargs)


def test_bad_model_settings_are_refused():
    with pytest.raises(ValueError, match="output"):
        GAN(output="tanh")
    with pytest.raises(ValueError, match="latent_features"):
        GAN(latent_features=0)
    with pytest.raises(TypeError, match="spectral_norm"):
        GAN(spectral_norm="yes")
    with pytest.raises(TypeError, match="critic"):
        Adversarial().run(GAN().model, "critic", torch.zeros(4, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore::ppdgm.inference.adversarial.ModeCollapseWarning")
def test_cuda_smoke(mixture):
    gan = GAN(features=2, hidden_features=[16], critic_hidden_features=[16])
    fit = Adversarial(loss="wgan-gp", num_steps=5, batch_size=64).run(gan.model, gan.critic, mixture[0].cuda())
    assert gan.sample(8).device.type == "cuda" and len(fit.history["loss"]) == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parzen_log_likelihood_recovers_a_known_density(seed):
    """On draws of N(0, I_2) the Parzen estimate (Silverman bandwidth) is within 0.05 nats per point
    of the exact mean log density; a conditional GAN asks for the labels it scores x given."""
    from ppdgm.models.gan import _parzen

    g = torch.Generator().manual_seed(seed)
    x, draws = torch.randn(2000, 2, generator=g), torch.randn(20000, 2, generator=g)
    exact = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1).mean()
    assert abs(float(_parzen(x, draws, None, 500).mean() - exact)) < 0.05
    gan = GAN(features=2, classes=2, hidden_features=[4], critic_hidden_features=[4])
    assert gan.log_likelihood(x[:5], torch.tensor([0, 1, 0, 1, 1]), num_samples=20).shape == (5,)
    with pytest.raises(ValueError, match="given its 5 labels"):
        gan.log_likelihood(x[:5], num_samples=20)


def _generator_weights(gan):
    return [p.detach().clone() for p in gan.generator.parameters()]


def test_ema_weights_are_what_sample_uses(mixture):
    """After training with ``ema`` the generator holds the moving average of its iterates (decay
    ``min(ema, (1 + t) / (10 + t))`` at step t), recomputed here from runs without it."""
    x = mixture[0][:256]

    def run(steps, ema=None):
        torch.manual_seed(0)
        gan = GAN(features=2, hidden_features=[16], critic_hidden_features=[16])
        start = _generator_weights(gan)
        Adversarial(loss="hinge", num_steps=steps, batch_size=64, lr=1e-2, ema=ema, seed=0).run(
            gan.model, gan.critic, x
        )
        return gan, start

    average = None
    for t in range(3):
        gan, start = run(t + 1)
        average = start if average is None else average
        decay = min(0.15, (1 + t) / (10 + t))  # the ramp at t = 0, ema = 0.15 after
        average = [a + (1 - decay) * (p - a) for a, p in zip(average, _generator_weights(gan))]
    averaged, _ = run(3, ema=0.15)
    for a, p in zip(average, _generator_weights(averaged)):
        assert torch.allclose(a, p, atol=1e-6)
    last = _generator_weights(gan)
    assert max(float((a - p).abs().max()) for a, p in zip(average, last)) > 1e-3  # the average is not the last iterate


def test_spectral_norm_bounds_the_critics_lipschitz_constant(mixture):
    """Trained with a large critic step (lr 1e-2), the spectrally normalized
    critic's every layer keeps operator norm <= 1 (so |D(a) - D(b)| <= |a - b|); the same critic
    without it grows far steeper."""
    x = mixture[0]

    def steepest(spectral_norm):
        torch.manual_seed(0)
        gan = GAN(features=2, hidden_features=[32], critic_hidden_features=[32, 32], spectral_norm=spectral_norm)
        Adversarial(loss="hinge", num_steps=60, batch_size=128, lr=1e-3, critic_lr=1e-2, seed=0).run(
            gan.model, gan.critic, x
        )
        gan.critic.eval()
        a, b = torch.randn(2, 4000, 2) * 3
        with torch.no_grad():
            slopes = (gan.critic(a) - gan.critic(b)).abs() / (a - b).norm(dim=1)
            linear = [m for m in gan.critic.modules() if isinstance(m, torch.nn.Linear)]
            norms = [float(torch.linalg.matrix_norm(m.weight, 2)) for m in linear]
        return float(slopes.max()), max(norms)

    slope, norm = steepest(True)
    assert norm < 1.05 and slope < 1.05
    slope_free, _ = steepest(False)
    assert slope_free > 3 * slope
