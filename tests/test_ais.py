import itertools

import pytest
import torch

from ppdgm.ais import annealed_importance_sampling, default_betas, exact_log_partition
from ppdgm.models.dbm import DBM, MultimodalDBM
from ppdgm.models.rbm import RBM


def randomize(model, weight_scale=1.0, bias_scale=0.5, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, weight_scale if p.dim() == 2 else bias_scale)
    return model


def brute_force_log_z(energy):
    """log sum exp(-E) over every joint state (bernoulli layers, one-hot softmax layers), vectorized."""
    choices = []
    for size, units in zip(energy.sizes, energy.units):
        if units == "softmax":
            choices.append(torch.eye(size, dtype=torch.float64))
        else:
            choices.append(torch.tensor(list(itertools.product([0, 1], repeat=size)), dtype=torch.float64))
    idx = torch.cartesian_prod(*[torch.arange(len(c)) for c in choices])
    state = {i: c[idx[:, i]] for i, c in enumerate(choices)}
    return torch.logsumexp(energy.log_density(state), 0).item()


def double(energy):
    from ppdgm.ais import _double

    return _double(energy)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RBM(features=10, hidden_units=6),
        lambda: RBM(features=10, hidden_units=6, units="gaussian", sigma=0.7),
        lambda: DBM(sizes=[6, 4, 3]),
        lambda: MultimodalDBM(features=5, hidden_units=3, top_units=3, classes=3),
    ],
    ids=["rbm-10x6", "gaussian-rbm", "dbm-3-layer", "multimodal-dbm"],
)
def test_ais_matches_exact_log_partition(make):
    model = randomize(make())
    energy = model.energy_graph()
    exact = exact_log_partition(energy)
    if model.units != "gaussian":  # gaussian units have no finite state set; their sum is checked in test_rbm
        assert exact.value == pytest.approx(brute_force_log_z(double(energy)), abs=1e-6)
    est = annealed_importance_sampling(energy, num_runs=200, num_betas=2000, seed=0)
    err = abs(est.value - exact.value)
    assert err < 3 * est.stderr, (est, exact)
    assert err < 0.1, (est, exact)
    assert 0 < est.stderr < 0.05


def test_ais_base_rate_model_and_seed():
    model = randomize(RBM(features=10, hidden_units=6))
    data = torch.bernoulli(torch.full((50, 10), 0.3))
    a = model.log_partition("ais", base_data=data, num_runs=50, num_betas=500, seed=3)
    b = model.log_partition("ais", base_data=data, num_runs=50, num_betas=500, seed=3)
    assert a.value == b.value and a.log_weights.shape == (50,)
    assert abs(a.value - model.log_partition("exact").value) < 0.2


def test_default_betas_follow_salakhutdinov_murray_spacing():
    b = default_betas(14500)
    assert b[0] == 0 and b[-1] == 1 and (b.diff() >= 0).all()
    assert abs(len(b) - 14500) <= 2
    assert ((b > 0.9).sum() / len(b)) > 0.65  # most of the steps near beta = 1


def test_bad_arguments_fail_fast():
    energy = RBM(features=4, hidden_units=3).energy_graph()
    with pytest.raises(TypeError, match="LayeredEnergy"):
        annealed_importance_sampling(RBM(features=4, hidden_units=3))
    with pytest.raises(ValueError, match="num_runs must be an int >= 2"):
        annealed_importance_sampling(energy, num_runs=1)
    with pytest.raises(ValueError, match="betas must be a non-decreasing"):
        annealed_importance_sampling(energy, betas=torch.tensor([0.2, 1.0]))
    with pytest.raises(ValueError, match="num_betas must be an int >= 10"):
        default_betas(3)
    with pytest.raises(ValueError, match="max_units"):
        exact_log_partition(RBM(features=30, hidden_units=30).energy_graph())
    with pytest.raises(ValueError, match="replicated softmax"):
        RBM(features=5, hidden_units=3, units="softmax").energy_graph()
