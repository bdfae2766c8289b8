"""VAE, conditional VAE and the semi-supervised M2 model on the bundled digits."""

import numpy as np
import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from sklearn.linear_model import LogisticRegression

import ppdgm
from ppdgm.data import load_digits
from ppdgm.evaluate import bernoulli_baseline, iwae_log_likelihood, log_likelihood, summarize
from ppdgm.inference import SVI
from ppdgm.models import build_from_spec, model_class
from ppdgm.models.ssvae import SemiSupervisedVAE
from ppdgm.models.vae import VAE, ConditionalVAE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def digits():
    return {s: load_digits(s, binarize=True) for s in ("train", "test")}


@pytest.fixture(scope="module")
def trained(digits):
    """The default VAE (64-256-16, as in Pyro's tutorial) after 1,000 steps of SVI."""
    pyro.clear_param_store()
    vae = VAE.from_data(digits["train"])
    fit = SVI(num_steps=1000, batch_size=100, lr=3e-3, seed=0, progress=False).run(
        vae.model, vae.guide, vae.data_args(digits["train"])
    )
    return vae, fit


# -- the headline numbers ----------------------------------------------------------------------
def test_short_training_beats_the_bernoulli_baseline_by_5_nats(trained, digits):
    vae, _ = trained
    base = bernoulli_baseline(digits["train"].x, digits["test"].x)
    est = log_likelihood(vae, digits["test"].x)  # IWAE, k = 1000
    assert est.method == "iwae" and est.n == 297
    assert est.nll <= base.nll - 5.0, (est, base)


def test_iwae_k1_is_the_elbo_and_tightens_with_k(trained, digits):
    vae, _ = trained
    x = digits["test"].x
    pyro.set_rng_seed(1)
    k1 = summarize(iwae_log_likelihood(vae.model, vae.guide, x.repeat(4, 1), k=1), "k=1")
    elbo = (
        -Trace_ELBO(num_particles=40, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
        / x.shape[0]
    )
    assert abs(k1.mean - elbo) < 4 * k1.stderr + 0.05, (k1, elbo)
    means = [vae.log_likelihood(x, k=k).mean().item() for k in (1, 10, 100)]
    assert means == sorted(means) and means[-1] - means[0] > 0.3, means


def test_fit_history_and_uses(trained, digits):
    vae, fit = trained
    loss = np.asarray(fit.history["loss"]) / 1200
    assert loss[-50:].mean() < loss[:5].mean() - 10  # per-point negative ELBO falls by > 10 nats
    x = digits["test"].x[:5]
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (5, 16) and (scale > 0).all()
    rec = vae.reconstruct(x)
    assert rec.shape == (5, 64) and ((rec > 0) & (rec < 1)).all()
    # reconstructions are closer to their own digit than to the other digits
    d = torch.cdist(rec, x)
    assert (d.argmin(1) == torch.arange(5)).all()
    path = vae.interpolate(x[0], x[1], steps=7)
    assert path.shape == (7, 64)
    torch.testing.assert_close(path[[0, -1]], rec[:2], atol=1e-5, rtol=0)
    s = vae.sample(12)
    assert s.shape == (12, 64) and set(s.unique().tolist()) <= {0.0, 1.0}
    idata = fit.to_arviz(num_samples=4)
    assert idata.posterior["z"].dims == ("chain", "draw", "data", "z_dim_1")
    assert idata.log_likelihood["x"].shape == (1, 4, 1200)


def test_save_and_load_rebuild_the_same_model(trained, digits, tmp_path):
    vae, fit = trained
    fit.module, fit.spec = vae, vae.spec
    fit.save(tmp_path)
    pyro.clear_param_store()
    loaded = ppdgm.load(tmp_path)
    assert isinstance(loaded.module, VAE) and loaded.module.spec == vae.spec
    x = digits["test"].x[:20]
    torch.testing.assert_close(loaded.module.reconstruct(x), vae.reconstruct(x))


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, loss",
    [
        ({"posterior": "iaf", "hidden_features": [64]}, "elbo"),
        ({"prior": "flow", "hidden_features": [64]}, "elbo"),
        ({"network": "conv", "hidden_features": [32], "latent_features": 4}, "elbo"),
        ({"hidden_features": [64], "beta": 0.5}, "meanfield"),
        ({"hidden_features": [64]}, "iwae"),
    ],
)
def test_variants_train_and_evaluate(kwargs, loss, digits):
    x = digits["train"].x[:300]
    vae = VAE(**kwargs)
    fit = SVI(
        loss=loss, num_particles=5 if loss == "iwae" else 1, num_steps=60, batch_size=100, lr=1e-2, progress=False
    ).run(vae.model, vae.guide, x)
    h = np.asarray(fit.history["loss"])
    assert h[-10:].mean() < h[:10].mean()
    ll = vae.log_likelihood(digits["test"].x[:20], k=5)
    assert ll.shape == (20,) and torch.isfinite(ll).all() and (ll < 0).all()


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "gaussian"])
def test_continuous_likelihoods(likelihood):
    data = load_digits("train", binarize=False)
    vae = VAE.from_data(data, likelihood=likelihood, hidden_features=[32], latent_features=4)
    assert vae.support == {"continuous_bernoulli": "unit_interval", "gaussian": "real"}[likelihood]
    fit = SVI(num_steps=40, batch_size=100, lr=1e-2, progress=False).run(vae.model, vae.guide, vae.data_args(data))
    assert fit.history["loss"][-1] < fit.history["loss"][0]
    assert vae.sample(3, mean=True).shape == (3, 64)


def test_beta_scales_the_kl_term_and_annealing_ramps_it():
    vae = VAE(hidden_features=[8], latent_features=2, beta=0.25)
    x = torch.ones(3, 64)
    tr = poutine.trace(vae.model).get_trace(x)
    assert tr.nodes["z"]["scale"] == 0.25 and tr.nodes["x"]["scale"] == 1.0
    anneal = vae.kl_annealing(100)
    assert vae.kl_weight == 0.0
    anneal(50, {})
    assert vae.kl_weight == pytest.approx(0.125)
    anneal(400, {})
    assert vae.kl_weight == pytest.approx(0.25)


# -- bad input ---------------------------------------------------------------------------------
def test_guide_that_does_not_match_the_model_is_refused(digits):
    vae = VAE(hidden_features=[8], latent_features=2)

    def wrong_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"guide does not match.*\['z'\].*\['w'\]"):
        SVI(num_steps=5, progress=False).run(vae.model, wrong_guide, digits["train"].x[:10])


def test_binary_likelihood_on_grey_pixels_is_refused_before_training():
    grey = load_digits("train", binarize=False).x
    vae = VAE(hidden_features=[8], latent_features=2)
    steps = []
    with pytest.raises(ValueError, match=r"x: expected binary values in \{0, 1\} for a Bernoulli likelihood"):
        SVI(num_steps=5, progress=False).run(vae.model, vae.guide, grey, callbacks=[lambda s, i: steps.append(s)])
    assert steps == []
    with pytest.raises(ValueError, match="binary"):
        vae.log_likelihood(grey[:3])


@settings(max_examples=30, deadline=None)
@given(latent=st.one_of(st.integers(max_value=0), st.floats(), st.none()))
def test_latent_size_below_one_is_refused(latent):
    with pytest.raises(ValueError, match="latent_features must be an int >= 1"):
        VAE(latent_features=latent)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"likelihood": "poisson"}, "likelihood must be one of"),
        ({"hidden_features": []}, "hidden_features must be a non-empty list"),
        ({"network": "conv", "features": 10}, "image_shape"),
        ({"posterior": "flow"}, "posterior must be one of"),
        ({"beta": -1.0}, "beta must be a non-negative"),
        ({"activation": "sigmoidal"}, "activation must be one of"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**kwargs)


def test_wrong_width_data_is_refused():
    vae = VAE(hidden_features=[8], latent_features=2)
    with pytest.raises(ValueError, match=r"x: expected 64 columns, got shape \(3, 10\)"):
        vae.model(torch.zeros(3, 10))


# -- conditional VAE -------------------------------------------------------------------------
def test_conditional_vae_learns_and_generates_chosen_classes(digits):
    train = digits["train"]
    cvae = model_class("cvae").from_data(train, hidden_features=[64], latent_features=4)
    fit = SVI(num_steps=150, batch_size=100, lr=1e-2, progress=False).run(cvae.model, cvae.guide, cvae.data_args(train))
    assert np.mean(fit.history["loss"][-10:]) < np.mean(fit.history["loss"][:10])
    x, y = digits["test"].x[:30], digits["test"].y[:30]
    right = cvae.log_likelihood(x, y, k=20)
    wrong = cvae.log_likelihood(x, (y + 5) % 10, k=20)
    assert right.mean() > wrong.mean() + 1.0  # the label carries information about x
    assert cvae.sample(6, y=3).shape == (6, 64)
    assert cvae.interpolate(x[0], x[1], steps=4, y1=int(y[0]), y2=int(y[1])).shape == (4, 64)
    _, _, rebuilt = build_from_spec(cvae.spec)
    assert isinstance(rebuilt, ConditionalVAE) and rebuilt.classes == 10
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 10\)"):
        cvae.log_likelihood(x, y + 10)
    with pytest.raises(ValueError, match="needs labels"):
        cvae.model(x)


# -- semi-supervised M2 -------------------------------------------------------------------------
def test_m2_hides_labels_reproducibly(digits):
    m = SemiSupervisedVAE()
    _x, y = m.data_args(digits["train"])
    assert (y >= 0).sum().item() == 120 and len(y) == 1200
    assert torch.equal(y, m.data_args(digits["train"])[1])
    known = y >= 0
    assert torch.equal(y[known], digits["train"].y[known])


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")  # the labelled-only part
def test_m2_mixed_batch_loss_is_the_sum_of_its_labelled_and_unlabelled_parts():
    """Masked enumeration: one batch mixing both kinds equals the two kinds run apart."""
    pyro.set_rng_seed(3)
    m = SemiSupervisedVAE(hidden_features=[16], latent_features=2, alpha=2.0)
    x = torch.bernoulli(torch.full((12, 64), 0.3))
    y = torch.tensor([3, -1, -1, 7, -1, 0, -1, -1, 1, -1, -1, 2])
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=3000, vectorize_particles=True)
    mixed = elbo.loss(m.model, m.guide, x, y)
    lab, unl = y >= 0, y < 0
    parts = elbo.loss(m.model, m.guide, x[lab], y[lab]) + elbo.loss(m.model, m.guide, x[unl], y[unl])
    assert mixed == pytest.approx(parts, rel=2e-3)


def test_m2_with_10_percent_labels_classifies_test_digits():
    """Continuous digits, continuous-Bernoulli likelihood, 120 labelled of 1,200."""
    train, test = load_digits("train"), load_digits("test")
    m = SemiSupervisedVAE.from_data(train, likelihood="continuous_bernoulli")
    x, y = m.data_args(train)
    SVI(loss="enum", max_plate_nesting=1, num_steps=500, batch_size=100, lr=3e-3, progress=False).run(
        m.model, m.guide, (x, y)
    )
    acc = m.accuracy(test.x, test.y)
    known = y >= 0
    logreg = LogisticRegression(max_iter=5000).fit(x[known].numpy(), y[known].numpy())
    baseline = (logreg.predict(test.x.numpy()) == test.y.numpy()).mean()
    assert acc >= 0.90, (acc, baseline)
    probs = m.classify(test.x[:4])
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    ll = m.log_likelihood(test.x[:10], k=10)
    assert ll.shape == (10,) and torch.isfinite(ll).all()
    assert m.sample(5, y=2).shape == (5, 64)


def test_m2_bad_labels_are_refused():
    m = SemiSupervisedVAE(hidden_features=[8], latent_features=2)
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 10\) or -1"):
        m.model(torch.zeros(2, 64), torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="y: expected 2 integer labels"):
        m.model(torch.zeros(2, 64), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labelled_fraction"):
        SemiSupervisedVAE(labelled_fraction=0.0)


@cuda
def test_vae_and_m2_run_on_cuda():
    x = load_digits("train", binarize=True).x[:200].cuda()
    vae = VAE(hidden_features=[32], latent_features=4)
    fit = SVI(num_steps=5, batch_size=100, progress=False).run(vae.model, vae.guide, x)
    assert vae.encoder_head.weight.is_cuda and np.isfinite(fit.history["loss"]).all()
    assert vae.log_likelihood(x[:10], k=5).is_cuda and vae.sample(3).is_cuda
    m = SemiSupervisedVAE(hidden_features=[32], latent_features=4)
    y = torch.full((200,), -1, device="cuda")
    y[:20] = 1
    SVI(loss="enum", max_plate_nesting=1, num_steps=5, batch_size=100, progress=False).run(m.model, m.guide, (x, y))
    assert m.classify(x[:3]).is_cuda
