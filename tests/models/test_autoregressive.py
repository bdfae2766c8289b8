import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppdgm
from ppdgm.data import load_digits
from ppdgm.evaluate import bernoulli_baseline
from ppdgm.inference import SVI
from ppdgm.models import model_class
from ppdgm.models.autoregressive import MADE, NADE, made_degrees, made_masks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ALL_STATES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: MADE(features=6, hidden_features=[10, 10]),
        lambda: MADE(features=6, hidden_features=[10], order="random", seed=3),
        lambda: MADE(features=6, hidden_features=[10, 7], num_masks=4, seed=1),
        lambda: NADE(features=6, hidden_features=5),
    ],
    ids=["made", "made-random-order", "made-order-agnostic", "nade"],
)
def test_exact_log_prob_sums_to_one_over_all_states(make):
    model = make()
    # random (non-zero) biases and weights so every conditional is far from 1/2
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.5)
    model.eval()
    lp = model.log_prob(ALL_STATES)
    assert lp.shape == (64,)
    assert abs(torch.logsumexp(lp, 0).item()) < 1e-5
    assert lp.max() - lp.min() > 3  # far from uniform, so the sum is a real check


def test_made_masks_are_autoregressive():
    order = torch.tensor([2, 0, 3, 1])
    masks = made_masks(made_degrees(4, [6, 5], order, None))
    connected = masks[0].t()
    for m in masks[1:]:
        connected = (connected @ m.t()).clamp(max=1)  # (input, output) reachability
    # output d may see input j only if j comes before d in the ordering
    rank = torch.empty(4, dtype=torch.long)
    rank[order] = torch.arange(4)
    allowed = (rank[:, None] < rank[None, :]).float()
    assert torch.equal(connected * (1 - allowed), torch.zeros(4, 4))
    assert connected[order[0], order[-1]] == 1  # and the allowed paths exist


def test_made_beats_the_factorized_bernoulli_baseline_by_5_nats():
    train, valid, test = (load_digits(s, binarize=True) for s in ("train", "valid", "test"))
    baseline = bernoulli_baseline(train.x, test.x).nll  # 25.21 nats
    made = model_class("made").from_data(train, hidden_features=[256])
    SVI(num_steps=400, lr=3e-3, eval_every=25, patience=4, seed=0).run(made.model, None, train.x, val_data=valid.x)
    nll = -ppdgm.evaluate.log_likelihood(made, test.x).mean  # about 18.0 nats
    assert baseline == pytest.approx(25.21, abs=0.01)
    assert nll < baseline - 5, (nll, baseline)


def test_nade_learns_binarized_digits():
    train, test = load_digits("train", binarize=True), load_digits("test", binarize=True)
    nade = NADE.from_data(train, hidden_features=32)
    SVI(num_steps=150, lr=2e-2, batch_size=200, seed=0).run(nade.model, None, train.x)
    nll = -nade.log_likelihood(test.x).mean().item()  # about 18.5 nats
    assert nll < bernoulli_baseline(train.x, test.x).nll - 4, nll


@pytest.mark.parametrize("cls", [MADE, NADE])
def test_samples_match_the_model_marginals(cls):
    """Ancestral sampling draws from the same distribution log_prob scores: compare the
    empirical frequency of each of the 2^4 states with exp(log_prob)."""
    model = cls(features=4, **({"hidden_features": [8]} if cls is MADE else {"hidden_features": 4}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.5)
    states = ALL_STATES[:16, 2:]
    probs = model.log_prob(states).exp()
    draws = model.sample(20000)
    freq = (draws[:, None, :] == states[None]).all(-1).float().mean(0)
    assert (freq - probs).abs().max() < 0.02


def test_fit_save_load_round_trip(tmp_path):
    train = load_digits("train", binarize=True)
    made = MADE.from_data(train, hidden_features=[32], num_masks=2)
    fit = SVI(num_steps=20, lr=1e-2, seed=0).run(made.model, None, train.x)
    fit.spec, fit.module = made.spec, made
    loaded = ppdgm.load(fit.save(tmp_path / "made"))
    made.eval(), loaded.module.eval()
    assert torch.allclose(loaded.module.log_prob(train.x[:50]), made.log_prob(train.x[:50]), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 9).filter(lambda d: d != 6), value=st.sampled_from([0.5, 2.0, -1.0]))
def test_bad_input_is_refused(dim, value):
    made, nade = MADE(features=6, hidden_features=[4]), NADE(features=6, hidden_features=3)
    for model in (made, nade):
        with pytest.raises(ValueError, match="6 features"):
            model.log_prob(torch.zeros(2, dim))
        x = torch.zeros(3, 6)
        x[0, 1] = value
        with pytest.raises(ValueError, match="binary"):
            model.model(x)
        x[0, 1] = float("nan")
        with pytest.raises(ValueError, match="finite"):
            model.log_prob(x)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_masks"):
        MADE(num_masks=0)
    with pytest.raises(ValueError, match="order"):
        MADE(order="reverse")
    with pytest.raises(ValueError, match="hidden_features"):
        NADE(hidden_features=0)
    with pytest.raises(ValueError, match="n must be"):
        MADE(features=4, hidden_features=[4]).sample(0)


@cuda
def test_made_and_nade_on_cuda_follow_the_data():
    x = load_digits("train", binarize=True).x[:256].cuda()
    for model in (MADE(features=64, hidden_features=[32]), NADE(features=64, hidden_features=16)):
        fit = SVI(num_steps=5, seed=0).run(model.model, None, x)
        assert fit.num_steps == 5
        assert model.sample(3).is_cuda and torch.isfinite(model.log_prob(x[:8])).all()
