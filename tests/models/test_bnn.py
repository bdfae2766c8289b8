"""Bayesian neural networks: the linear special case has an exact posterior; a small MLP regresses."""

import math

import arviz as az
import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppdgm.data import Dataset
from ppdgm.inference.chees import ChEES
from ppdgm.inference.mcmc import NUTS
from ppdgm.models import model_class
from ppdgm.models.bnn import BNN

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

G = torch.Generator().manual_seed(0)
XL = torch.randn(30, 2, generator=G)
YL = XL @ torch.tensor([1.0, -0.5]) + 0.3 + 0.5 * torch.randn(30, generator=G)


def linear_posterior(x, y, noise, prior_scale):
    """Exact Gaussian posterior of [w, b] for y = x w + b + N(0, noise^2) under the BNN's priors."""
    phi = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    prior_var = torch.tensor([prior_scale**2 / x.shape[1]] * x.shape[1] + [prior_scale**2]).double()
    prec = torch.diag(1 / prior_var) + phi.T @ phi / noise**2
    cov = torch.linalg.inv(prec)
    return cov @ phi.T @ y.double() / noise**2, cov.diag().sqrt()


@pytest.mark.parametrize("engine", ["chees", "nuts"])
def test_linear_bnn_matches_exact_posterior(engine):
    bnn = BNN(features=2, hidden_features=(), noise_scale=0.5, prior_scale=1.0)
    if engine == "chees":
        fit = ChEES(num_chains=32, num_warmup=150, num_samples=150, jit_compile=True, seed=0).run(bnn.model, XL, YL)
    else:
        fit = NUTS(num_chains=1, num_warmup=100, num_samples=200, jit_compile=True, seed=0).run(bnn.model, XL, YL)
    mean, sd = linear_posterior(XL, YL, 0.5, 1.0)
    w = fit.samples["layers.0.weight"].reshape(*fit.samples["layers.0.weight"].shape[:2], -1)
    draws = torch.cat([w, fit.samples["layers.0.bias"]], -1).double().numpy()
    for j in range(3):
        a = draws[..., j]
        assert abs(a.mean() - mean[j].item()) < 4 * float(az.mcse(a, method="mean"))
        assert abs(a.std() - sd[j].item()) < 4 * float(az.mcse(a, method="sd"))


def test_mlp_bnn_regression_beats_the_mean_and_predicts():
    x = torch.linspace(-3, 3, 30).unsqueeze(-1)
    y = torch.sin(x.squeeze(-1)) + 0.1 * torch.randn(30, generator=torch.Generator().manual_seed(1))
    xt = torch.linspace(-2.8, 2.8, 25).unsqueeze(-1)
    yt = torch.sin(xt.squeeze(-1))
    bnn = BNN(features=1, hidden_features=(6,), noise_scale=0.1)
    fit = ChEES(num_chains=16, num_warmup=120, num_samples=40, max_leapfrog_steps=40, jit_compile=True, seed=0).run(
        bnn.model, x, y
    )
    pred = bnn.predict(xt, fit.samples)
    rmse = ((pred - yt) ** 2).mean().sqrt()
    assert rmse < 0.35 * yt.std(), rmse  # the mean predictor scores 1.0 * std
    ll = bnn.log_likelihood(xt, yt, fit.samples)
    assert ll.shape == (25,) and ll.mean() > -1.0  # a N(0, std) guess scores about -1.4
    assert bnn.sample(7, xt, fit.samples).shape == (7, 25)
    idata = fit.to_arviz()
    assert idata.posterior["layers.0.weight"].dims[:2] == ("chain", "draw")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")


def test_zoo_run_attaches_draws_that_survive_save_and_load(tmp_path):
    import ppdgm

    bnn = BNN(features=2, hidden_features=(), noise_scale=0.5)
    ds = Dataset(x=XL, y=YL, name="toy")
    from ppdgm.families import fit_family

    fit = fit_family(bnn, ChEES(num_chains=4, num_warmup=30, num_samples=10), ds, checkpoint_dir=tmp_path)
    pred = bnn.predict(XL)  # uses the attached draws
    fit.save(tmp_path)
    back = ppdgm.load(tmp_path)
    assert torch.allclose(back.module.predict(XL), pred)
    assert back.module.log_likelihood(XL, YL).shape == (30,)


def test_classification_and_registry():
    cls = model_class("bnn")
    ds = Dataset(x=torch.randn(12, 3), y=torch.tensor([0, 1, 2] * 4), name="toy")
    bnn = cls.from_data(ds, hidden_features=(4,))
    assert bnn.likelihood == "categorical" and bnn.out_features == 3
    assert cls(**bnn.spec["kwargs"]).spec == bnn.spec
    tr = pyro.poutine.trace(bnn.model).get_trace(*bnn.data_args(ds))
    assert tr.nodes["y"]["fn"].logits.shape == (12, 3)
    bin_ds = Dataset(x=torch.randn(6, 2), y=torch.tensor([0, 1] * 3), name="toy")
    assert cls.from_data(bin_ds).likelihood == "bernoulli"


@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 5),
    hidden=st.lists(st.integers(1, 4), max_size=2),
)
@settings(max_examples=25, deadline=None)
def test_weight_draws_broadcast_against_data(batch, n, hidden):
    """A batch of weight draws on the left gives a batch of outputs; draw b equals a single run."""
    bnn = BNN(features=2, hidden_features=tuple(hidden), out_features=3, likelihood="categorical")
    x = torch.randn(n, 2)
    B = math.prod(batch)
    with pyro.plate("draws", B, dim=-2):
        tr = pyro.poutine.trace(bnn.model).get_trace(x)
    weights = {k: v["value"] for k, v in tr.nodes.items() if k.startswith("layers")}
    logits = tr.nodes["y"]["fn"].logits
    assert logits.shape == (B, n, 3)
    one = {
        k: v[B - 1].squeeze(0)
        if v.dim() > 2 and k.endswith("weight")
        else v[B - 1].reshape(v.shape[-1:])
        if k.endswith("bias")
        else v[B - 1]
        for k, v in weights.items()
    }
    single = pyro.poutine.trace(pyro.poutine.condition(bnn.model, data=one)).get_trace(x)
    assert torch.allclose(single.nodes["y"]["fn"].logits, logits[B - 1], atol=1e-5)


def test_layer_is_one_matrix_product_per_draw():
    """Draws padded to the data plate ``(B, 1, out, in)`` and weights that vary along the data
    ``(n, out, in)`` both give ``y[b, i] = W_b x_i + b_b``."""
    from ppdgm.models.bnn import BayesianLinear

    g = torch.Generator().manual_seed(0)
    layer, x = BayesianLinear(3, 2), torch.randn(5, 3, generator=g)
    for w, b in (
        (torch.randn(4, 1, 2, 3, generator=g), torch.randn(4, 1, 2, generator=g)),
        (torch.randn(5, 2, 3, generator=g), torch.randn(2, generator=g)),
        (torch.randn(2, 3), torch.zeros(2)),
    ):
        layer.weight, layer.bias = w, b
        want = torch.einsum("...oi,...i->...o", w, x) + b
        assert torch.allclose(layer(x), want, atol=1e-6)


def test_suggested_engine_settings_sample_a_classifier():
    """The CLI's ChEES settings for the BNN family: a three-class problem is learned and the
    chains agree on the predicted probabilities (function-space R-hat)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    y = torch.arange(150) % 3
    x = centres[y] + 0.7 * torch.randn(150, 2, generator=g)
    bnn = BNN(features=2, hidden_features=(4,), out_features=3, likelihood="categorical")
    fit = ChEES(**BNN.engine_config, progress=False).run(bnn.model, x, y)
    assert fit.samples["layers.0.weight"].shape[:2] == (32, 200) and fit.extra["divergences"] == 0
    xt = centres[y] + 0.7 * torch.randn(150, 2, generator=g)
    assert (bnn.predict(xt, fit.samples).argmax(-1) == y).float().mean() > 0.9
    assert bnn.log_likelihood(xt, y, fit.samples).mean() > math.log(1 / 3) + 0.7
    probs = bnn.function_draws(xt[:20], fit.samples).double().numpy()
    assert float(az.rhat(az.convert_to_dataset({"p": probs}))["p"].max()) < 1.02


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"hidden_features": (0,)}, "hidden_features"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"likelihood": "bernoulli", "out_features": 2}, "out_features"),
        ({"noise_scale": -1.0}, "noise_scale"),
        ({"activation": "gelu2"}, "activation"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        BNN(**kw)


def test_bad_data():
    bnn = BNN(features=2)
    with pytest.raises(ValueError, match="features"):
        bnn.model(torch.randn(5, 3), torch.randn(5))
    with pytest.raises(ValueError, match="y: expected shape"):
        bnn.model(torch.randn(5, 2), torch.randn(4))
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        BNN(features=2, likelihood="bernoulli").model(torch.randn(3, 2), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="posterior draws"):
        bnn.predict(torch.randn(3, 2))


@cuda
def test_bnn_chees_cuda_smoke():
    bnn = BNN(features=2, hidden_features=(4,), noise_scale=0.5)
    fit = ChEES(num_chains=8, num_warmup=20, num_samples=10).run(bnn.model, XL.cuda(), YL.cuda())
    assert fit.samples["layers.0.weight"].device.type == "cuda"
    assert bnn.predict(XL.cuda(), fit.samples).device.type == "cuda"


@pytest.mark.parametrize("likelihood, classes", [("categorical", 3), ("bernoulli", 2)])
def test_classifier_bnn_predicts_from_guide_draws(likelihood, classes):
    from ppdgm.diagnostics import guide_draws
    from ppdgm.inference import SVI

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])[:classes]
    y = torch.arange(300) % classes
    x = centres[y] + 0.5 * torch.randn(300, 2, generator=g)
    bnn = BNN(
        features=2,
        hidden_features=(8,),
        out_features=classes if likelihood == "categorical" else 1,
        likelihood=likelihood,
    )
    fit = SVI(num_steps=400, lr=0.03, progress=False).run(bnn.model, None, (x, y))
    bnn.attach_posterior(guide_draws(bnn.model, fit.guide, (x, y), num_samples=100))
    probs = bnn.predict(x)
    guess = probs.argmax(-1) if likelihood == "categorical" else (probs.squeeze(-1) > 0.5).long()
    assert (guess == y).float().mean() > 0.9
    assert bnn.log_likelihood(x, y).mean() > math.log(1 / classes) + 0.5  # far better than chance
