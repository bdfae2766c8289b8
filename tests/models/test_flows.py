import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppdgm
from ppdgm.data import Dataset, load_dataset, load_digits
from ppdgm.inference import SVI
from ppdgm.models import model_class
from ppdgm.models.flows import KINDS, FlowModel, SoftClampedScale

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def float64():
    # Pyro's autoregressive inverse allocates its buffer in the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _randomize_batch_norm(flow):
    for layer in flow.layers:
        if hasattr(layer, "moving_mean"):
            layer.moving_mean.normal_()
            layer.moving_variance.uniform_(0.5, 2.0)
            layer.gamma.data.uniform_(0.5, 2.0)


def _change_of_variables(flow, x, y):
    """log N(f^{-1}(x); 0, I) + log |det d f^{-1} / dx| with the Jacobian taken by autograd."""
    out = []
    for i in range(x.shape[0]):
        yi = None if y is None else y[i : i + 1]

        def latent(xi, yi=yi):
            return flow.to_latent(xi[None], yi)[0]

        J = torch.autograd.functional.jacobian(latent, x[i])
        z = latent(x[i])
        out.append(torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() + torch.linalg.slogdet(J)[1])
    return torch.stack(out)


@pytest.mark.parametrize("context", [0, 2], ids=["plain", "conditional"])
@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_change_of_variables(kind, context, float64):
    flow = FlowModel(features=3, kind=kind, num_layers=3, hidden_features=[8], context=context)
    _randomize_batch_norm(flow)
    flow.eval()
    x = torch.randn(5, 3)
    y = torch.randn(5, context) if context else None
    with torch.no_grad():
        lp = flow.log_prob(x, y)
    ref = _change_of_variables(flow, x, y).detach()
    assert lp.shape == (5,)
    assert torch.allclose(lp, ref, atol=1e-4, rtol=0)
    # a wrong Jacobian term would move log p by far more than the tolerance
    assert (lp - flow.distribution(y).base_dist.log_prob(flow.to_latent(x, y)).detach()).abs().max() > 1e-2
    s = flow.sample(7, None if y is None else torch.randn(7, context))
    assert s.shape == (7, 3)
    assert torch.isfinite(flow.log_prob(s, None if y is None else torch.randn(7, context))).all()


def test_dequantized_flow_includes_the_logit_jacobian(float64):
    flow = FlowModel(features=3, kind="maf", num_layers=2, hidden_features=[8], levels=17).eval()
    v = torch.rand(4, 3) * 0.9 + 0.05
    ref = _change_of_variables(flow, v, None).detach()
    assert torch.allclose(flow.log_prob(v).detach(), ref, atol=1e-4, rtol=0)
    s = flow.sample(50)
    assert ((s * 16 - (s * 16).round()).abs() < 1e-6).all() and s.min() >= 0 and s.max() <= 1


def test_soft_clamped_scale_keeps_gradients_honest():
    raw = torch.tensor([-50.0, -5.0, -1e-3, 0.0, 1e-3, 3.0, 50.0], requires_grad=True)
    _, log_scale = SoftClampedScale(lambda: (raw * 0, raw))()
    assert log_scale.min() >= -3 and log_scale.max() <= 3  # inside Pyro's hard clamp [-5, 3]
    assert torch.allclose(log_scale[2:5], raw[2:5], atol=1e-6)  # identity near zero
    log_scale.sum().backward()
    assert (raw.grad[1:-1] > 0).all() and raw.grad[0] < 1e-3 and raw.grad[-1] < 1e-3  # no straight-through push


def test_maf_learns_moons_and_beats_a_gaussian():
    train, test = load_dataset("moons", "train", n=1000), load_dataset("moons", "test", n=500)
    gauss = torch.distributions.MultivariateNormal(train.x.mean(0), torch.cov(train.x.T))
    gauss_nll = -gauss.log_prob(test.x).mean().item()  # 1.88 nats; the MAF reaches about 1.06
    flow = FlowModel(features=2, kind="maf", num_layers=4, hidden_features=[32, 32])
    fit = SVI(num_steps=400, lr=5e-3, batch_size=250, seed=0).run(flow.model, None, train.x)
    nll = -ppdgm.evaluate.log_likelihood(flow, test.x).mean
    assert fit.extra["autoguide"] == "empty"
    assert nll < gauss_nll - 0.5, (nll, gauss_nll)


def test_conditional_flow_uses_its_context():
    g = torch.Generator().manual_seed(0)
    y = torch.nn.functional.one_hot(torch.randint(0, 2, (400,), generator=g), 2).float()
    x = 4 * (y[:, :1] - 0.5) + 0.3 * torch.randn(400, 2, generator=g)  # centre +-2 picked by y
    flow = FlowModel(features=2, kind="realnvp", num_layers=2, hidden_features=[16], context=2)
    SVI(num_steps=300, lr=1e-2, seed=0).run(flow.model, None, (x, y))
    right = flow.log_prob(x, y).mean().item()
    wrong = flow.log_prob(x, y.flip(-1)).mean().item()
    assert right > wrong + 10, (right, wrong)


def test_dequantized_digits_bound_and_training_loss_agree(tmp_path):
    train, test = load_digits("train"), load_digits("test")
    flow = FlowModel.from_data(train, kind="realnvp", num_layers=2, hidden_features=[64])
    assert flow.levels == 17 and flow.support == "unit_interval"
    # pixels already dequantized off their grid are continuous data: no second dequantization
    noisy = Dataset(train.x + torch.rand_like(train.x) / 17, train.y, "digits-dequantized-train", (8, 8))
    assert FlowModel.from_data(noisy).levels is None
    untrained = -flow.log_likelihood(test.x).mean().item()
    fit = SVI(num_steps=60, lr=2e-3, batch_size=300, seed=0).run(flow.model, None, train.x)
    trained = -flow.log_likelihood(test.x, num_samples=4).mean().item()
    # 64 log 17 = 181.3 nats: what a uniform density over the 17 levels scores
    assert trained < 64 * math.log(17) - 20 and trained < untrained - 40, (untrained, trained)
    # the SVI loss per image is the same dequantization bound (the -D log 17 term is in the model)
    train_nll = -flow.log_likelihood(train.x[:300]).mean().item()
    assert abs(fit.history["loss"][-1] / 1200 - train_nll) < 5.0
    # round trip through Fit.save / ppdgm.load rebuilds the flow from its spec
    fit.spec, fit.module = flow.spec, flow
    loaded = ppdgm.load(fit.save(tmp_path / "fit"))
    v = flow.dequantize(test.x[:20])
    assert torch.allclose(loaded.module.log_prob(v), flow.log_prob(v), atol=1e-4)


def test_registered_and_rebuilt_from_spec():
    flow = model_class("flow")(features=4, kind="nsf_ar", num_layers=2, hidden_features=[8], context=3)
    again = FlowModel(**flow.spec["kwargs"])
    assert again.spec == flow.spec and sum(p.numel() for p in again.parameters()) == sum(
        p.numel() for p in flow.parameters()
    )


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 6).filter(lambda d: d != 3), rows=st.integers(1, 4))
def test_wrong_dimension_is_refused(dim, rows):
    flow = FlowModel(features=3, kind="maf", num_layers=1, hidden_features=[4])
    with pytest.raises(ValueError, match=r"3 features, got shape"):
        flow.log_prob(torch.zeros(rows, dim))
    with pytest.raises(ValueError, match="3 features"):
        flow.model(torch.zeros(rows, dim))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_is_refused(bad):
    flow = FlowModel(features=2, kind="realnvp", num_layers=1, hidden_features=[4])
    x = torch.zeros(3, 2)
    x[1, 0] = bad
    with pytest.raises(ValueError, match="finite"):
        flow.model(x)
    with pytest.raises(ValueError, match="finite"):
        flow.log_likelihood(x)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        FlowModel(kind="glow")
    with pytest.raises(ValueError, match="features must be"):
        FlowModel(features=1)
    with pytest.raises(ValueError, match="levels"):
        FlowModel(levels=1)
    cond = FlowModel(features=2, num_layers=1, hidden_features=[4], context=3)
    with pytest.raises(ValueError, match=r"y: expected shape \(2, 3\)"):
        cond.log_prob(torch.zeros(2, 2), torch.zeros(2, 2))
    assert cond.sample(4).shape == (4, 2)  # no y: one-hot contexts in turn
    with pytest.raises(ValueError, match="unconditional"):
        FlowModel(features=2, num_layers=1, hidden_features=[4]).log_prob(torch.zeros(2, 2), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"unit_interval|\[0, 1\]"):
        FlowModel(features=2, num_layers=1, hidden_features=[4], levels=17).model(torch.full((2, 2), 3.0))


@cuda
def test_flow_on_cuda_follows_the_data():
    x = load_dataset("moons", "train", n=256).x.cuda()
    flow = FlowModel(features=2, kind="nsf_coupling", num_layers=2, hidden_features=[16])
    fit = SVI(num_steps=5, seed=0).run(flow.model, None, x)
    assert fit.num_steps == 5 and flow.base_loc.is_cuda
    assert flow.sample(4).is_cuda and torch.isfinite(flow.log_prob(x[:8])).all()


@pytest.mark.parametrize("kind", ["nsf_coupling", "realnvp", "maf"])
def test_full_batch_training_does_not_replay_a_cached_transform(kind):
    # the same data tensor every step used to hit Pyro's identity-keyed transform cache and
    # backpropagate through the previous step's freed graph
    x = load_dataset("moons", "train", n=128).x
    flow = FlowModel(features=2, kind=kind, num_layers=2, hidden_features=[16])
    fit = SVI(num_steps=3, seed=0, progress=False).run(flow.model, None, x)
    assert len(fit.history["loss"]) == 3 and all(math.isfinite(v) for v in fit.history["loss"])
