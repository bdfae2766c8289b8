"""Sample-quality metrics: known answers, calibrated permutation p-values, a cached feature net."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppdgm.evaluate as ev
from ppdgm.data import load_digits
from ppdgm.evaluate import frechet_distance, mmd, modes_covered, precision_recall, sample_quality


def test_mmd_matches_the_unbiased_estimator_by_hand():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    k = lambda a, b: math.exp(-((a - b) ** 2) / 2)  # noqa: E731 - bandwidth 1
    by_hand = k(0, 1) + k(0, 2) - 2 * (k(0, 0) + k(0, 2) + k(1, 0) + k(1, 2)) / 4
    assert mmd(x, y, bandwidth=1.0).mmd2 == pytest.approx(by_hand, abs=1e-12)


def test_permutation_p_value_separates_same_and_different_laws():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g)
    shifted = torch.randn(200, 2, generator=g) + torch.tensor([1.0, 0.0])
    same, diff = mmd(a, b, num_permutations=200), mmd(a, shifted, num_permutations=200)
    assert same.p_value > 0.05 and abs(same.mmd2) < 0.01
    assert diff.p_value <= 1 / 201 + 1e-12 and diff.mmd2 > 10 * abs(same.mmd2)


def test_permutation_p_values_are_roughly_uniform_under_the_null():
    g = torch.Generator().manual_seed(1)
    ps = [
        mmd(torch.randn(40, 1, generator=g), torch.randn(40, 1, generator=g), num_permutations=50, seed=i).p_value
        for i in range(40)
    ]
    assert 0.3 < sum(ps) / len(ps) < 0.7  # uniform mean 0.5, s.e. ~0.05
    assert sum(p < 0.05 for p in ps) <= 6  # nominal 5% of 40 = 2


def test_precision_recall_known_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 2, generator=g)
    same = precision_recall(real, real.clone())
    assert same.precision == 1.0 and same.recall == 1.0
    far = precision_recall(real, real + 100.0)
    assert far.precision == 0.0 and far.recall == 0.0
    half = torch.cat([real[:150], real[150:] + 100.0])  # half of the fakes are off the data
    assert precision_recall(real, half).precision == pytest.approx(0.5)
    two = torch.cat([real[:150], real[150:] + 100.0])  # real data in two clusters; fakes cover one
    dropped = precision_recall(two, real[:150] + 0.01)
    assert dropped.precision == 1.0 and dropped.recall == pytest.approx(0.5, abs=0.02)


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # N(0, I) vs N(1, 4 I) in 2-D: |mu|^2 + tr(I + 4I - 2 * 2I) = 2 + 2 = 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g)
    y = 1 + 2 * torch.randn(20000, 2, generator=g)
    assert frechet_distance(x, y) == pytest.approx(4.0, abs=0.15)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_modes_covered_counts():
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    pts = torch.cat([torch.zeros(10, 2), torch.tensor([[5.0, 0.1]] * 3), torch.tensor([[2.5, 2.5]] * 7)])
    assert modes_covered(pts, centres, max_dist=0.5, min_count=1) == (2, 13 / 20)
    assert modes_covered(pts, centres, max_dist=0.5, min_count=5)[0] == 1


def test_digits_classifier_features_rank_real_digits_above_noise():
    net = ev.digits_classifier()
    test, valid = load_digits("test"), load_digits("valid")
    assert (net(test.x).argmax(1) == test.y).float().mean() > 0.9
    real = frechet_distance(test.x, valid.x, features="digits")
    noise = frechet_distance(test.x, torch.rand(300, 64, generator=torch.Generator().manual_seed(0)), "digits")
    assert real < noise / 10
    q = sample_quality(test.x, valid.x, features="digits")
    assert q["precision"] > 0.7 and q["recall"] > 0.7 and q["frechet"] == pytest.approx(real)


def test_digits_classifier_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setitem(ev.DIGITS_CLASSIFIER, "steps", 5)
    monkeypatch.setattr(ev, "_CLASSIFIERS", {})
    a = ev.digits_classifier(cache_dir=tmp_path)
    files = list(tmp_path.glob("digits_classifier-*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(ev, "_CLASSIFIERS", {})
    b = ev.digits_classifier(cache_dir=tmp_path)  # read back from disk
    retrained = ev._train_digits_classifier(ev.DIGITS_CLASSIFIER)  # same recipe, same weights
    for (_, pa), (_, pb), (_, pc) in zip(
        a.state_dict().items(), b.state_dict().items(), retrained.state_dict().items()
    ):
        assert torch.equal(pa, pb) and torch.equal(pa, pc)
    files[0].write_bytes(b"not a checkpoint")  # a damaged cache is rebuilt, not trusted
    monkeypatch.setattr(ev, "_CLASSIFIERS", {})
    c = ev.digits_classifier(cache_dir=tmp_path)
    assert torch.equal(next(iter(c.state_dict().values())), next(iter(a.state_dict().values())))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5))
def test_mismatched_columns_are_refused(d1, d2):
    x, y = torch.zeros(5, d1), torch.zeros(5, d2)
    if d1 == d2:
        mmd(x + torch.arange(5.0).unsqueeze(1), y)
        return
    for fn in (mmd, precision_recall, frechet_distance):
        with pytest.raises(ValueError, match="columns"):
            fn(x, y)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mmd(torch.zeros(1, 2), torch.zeros(5, 2)), "at least 2 points"),
        (lambda: mmd(torch.zeros(5, 2), torch.zeros(5, 2), bandwidth=-1.0), "bandwidth"),
        (lambda: mmd(torch.zeros(5, 2), torch.zeros(5, 2), num_permutations=-3), "num_permutations"),
        (lambda: precision_recall(torch.zeros(5, 2), torch.zeros(5, 2), k=5), "k must be"),
        (lambda: frechet_distance(torch.zeros(5, 2), torch.zeros(5, 2), features=3), "features"),
        (lambda: mmd(torch.zeros(5), torch.zeros(5, 1)), "rank-2"),
        (lambda: mmd(torch.full((5, 2), float("nan")), torch.zeros(5, 2)), "finite"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_smoke():
    x, y = torch.randn(100, 64, device="cuda"), torch.rand(100, 64, device="cuda")
    q = sample_quality(x, y, features="digits", num_permutations=10)
    assert all(math.isfinite(v) for v in q.values())
