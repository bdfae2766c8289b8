import itertools

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppdgm.data import load_digits
from ppdgm.evaluate import bernoulli_baseline, log_likelihood
from ppdgm.inference.pcd import PersistentCD
from ppdgm.models import build_from_spec, model_class
from ppdgm.models.rbm import RBM


def random_rbm(units="bernoulli", features=6, hidden_units=4, **kw):
    torch.manual_seed(1)
    m = RBM(features=features, hidden_units=hidden_units, units=units, init_scale=0.7, **kw)
    with torch.no_grad():
        m.b.normal_(0, 0.5)
        m.c.normal_(0, 0.5)
    return m


def all_hidden(h):
    return torch.tensor(list(itertools.product([0, 1], repeat=h)), dtype=torch.float32)


@pytest.mark.parametrize("units", ["bernoulli", "gaussian", "softmax"])
def test_free_energy_sums_the_energy_over_hidden_states(units):
    m = random_rbm(units, sigma=0.8)
    v = {
        "bernoulli": torch.bernoulli(torch.full((5, 6), 0.5)),
        "gaussian": torch.randn(5, 6),
        "softmax": torch.tensor([[0, 2, 1, 0, 0, 3]] * 5, dtype=torch.float32),
    }[units]
    h = all_hidden(4)
    brute = torch.stack([torch.logsumexp(-m.energy(vi.expand(16, 6), h), 0) for vi in v])
    assert torch.allclose(-m.free_energy(v), brute, atol=1e-5)


def test_gaussian_rbm_exact_log_partition_integrates_the_visible_units():
    m = random_rbm("gaussian", sigma=0.8)
    h = all_hidden(4)
    sigma, b = 0.8, m.b.detach()
    mean = b + sigma * (h @ m.W.detach().T)  # p(v | h) = N(b + sigma W h, sigma^2)
    log_z = torch.logsumexp(h @ m.c.detach() + ((mean**2 - b**2) / (2 * sigma**2)).sum(-1), 0) + 6 * (
        0.5 * torch.log(torch.tensor(2 * torch.pi)) + torch.log(torch.tensor(sigma))
    )
    assert m.log_partition("exact").value == pytest.approx(log_z.item(), abs=1e-4)


def test_pyro_program_elbo_under_exact_guide_is_minus_free_energy():
    m = random_rbm()
    v = torch.bernoulli(torch.full((7, 6), 0.5))
    elbo = -pyro.infer.Trace_ELBO().loss(m.model, m.guide, v)
    # uniform priors on v (6 units) and h (4 units) contribute -10 log 2 per point
    expected = (-m.free_energy(v) - 10 * torch.log(torch.tensor(2.0))).sum()
    assert elbo == pytest.approx(expected.item(), rel=1e-5)


def test_conditionals_and_gibbs_keep_supports():
    torch.manual_seed(0)
    s = random_rbm("softmax")
    docs = torch.tensor([[0, 2, 1, 0, 0, 3], [5, 0, 0, 0, 0, 0]], dtype=torch.float32)
    out = s.gibbs(docs, 5)
    assert torch.equal(out.sum(-1), docs.sum(-1))  # document lengths kept
    g = random_rbm("gaussian", sigma=0.5)
    h = torch.ones(20000, 4)
    draws = g.sample_visible(h)
    assert torch.allclose(draws.mean(0), g.visible_mean(h[:1])[0], atol=0.02)
    assert torch.allclose(draws.std(0), torch.full((6,), 0.5), atol=0.02)
    b = random_rbm()
    assert set(b.sample(10, steps=3).unique().tolist()) <= {0.0, 1.0}
    assert b.transform(torch.ones(3, 6)).shape == (3, 4) and b.reconstruct(torch.ones(3, 6)).shape == (3, 6)


@pytest.fixture(scope="module")
def trained_rbm():
    train = load_digits("train", binarize=True).x
    torch.manual_seed(0)
    rbm = RBM(features=64, hidden_units=128)
    fit = PersistentCD(
        num_epochs=60,
        batch_size=50,
        lr=0.02,
        optim="adam",
        lr_schedule="linear",
        weight_decay=1e-4,
        num_chains=100,
        seed=0,
    ).run(rbm, train)
    return rbm, fit


def test_pcd_rbm_beats_base_rate_model_by_5_nats(trained_rbm):
    rbm, fit = trained_rbm
    train = load_digits("train", binarize=True).x
    test = load_digits("test", binarize=True).x
    baseline = bernoulli_baseline(train, test)  # -25.21 nats
    est = log_likelihood(rbm, test, num_runs=100, num_betas=3000, base_data=train, seed=0)
    assert rbm.last_log_z.stderr < 0.2
    assert est.mean > baseline.mean + 5, (est, baseline)  # measured: -18.20 vs -25.21
    # the negative phase mixes: R-hat of the recorded chains' free energies
    import arviz as az

    assert float(az.rhat(fit.to_arviz())["chain_energy"]) < 1.1


def test_registry_spec_and_features(trained_rbm):
    rbm, _ = trained_rbm
    assert model_class("rbm") is RBM
    _, _, clone = build_from_spec(rbm.spec)
    clone.load_state_dict(rbm.state_dict())
    x = load_digits("test", binarize=True).x[:20]
    assert torch.allclose(clone.free_energy(x), rbm.free_energy(x))
    # hidden features separate the digits better than chance for a linear read-out
    feats = rbm.transform(load_digits("train", binarize=True).x)
    assert feats.shape == (1200, 128) and 0 < feats.mean() < 1
    err = (rbm.reconstruct(x) - x).abs().mean()
    assert err < 0.2


def test_rbm_from_graph():
    from ppdgm.graphs import dbm_graph, rbm_graph

    m = RBM.from_graph(rbm_graph(64, 32, units="gaussian"))
    assert (m.features, m.hidden_units, m.units, m.support) == (64, 32, "gaussian", "real")
    with pytest.raises(ValueError, match="one visible and one hidden layer"):
        RBM.from_graph(dbm_graph([4, 3, 2]))


@settings(max_examples=25, deadline=None)
@given(features=st.one_of(st.integers(-3, 0), st.floats(0.5, 3), st.just(True)), units=st.sampled_from(["relu", 3]))
def test_bad_constructor_arguments(features, units):
    with pytest.raises(ValueError, match="features must be a positive int"):
        RBM(features=features)
    with pytest.raises(ValueError, match="units must be one of"):
        RBM(units=units)


def test_bad_data_fails_before_training():
    rbm = RBM(features=4, hidden_units=3)
    before = rbm.W.detach().clone()
    engine = PersistentCD(num_steps=5)
    with pytest.raises(ValueError, match=r"expected binary values in \{0, 1\}"):
        engine.run(rbm, torch.full((10, 4), 0.5))
    with pytest.raises(ValueError, match="expected 4 columns"):
        engine.run(rbm, torch.ones(10, 5))
    with pytest.raises(ValueError, match="non-negative integer counts"):
        engine.run(RBM(features=4, hidden_units=3, units="softmax"), -torch.ones(10, 4))
    assert torch.equal(rbm.W, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_smoke():
    x = torch.bernoulli(torch.full((64, 10), 0.3)).cuda()
    rbm = RBM(features=10, hidden_units=6)
    fit = PersistentCD(num_steps=20, batch_size=16, num_chains=8).run(rbm, x)
    assert rbm.W.device.type == "cuda" and fit.extra["tensors"]["chains"].device.type == "cuda"
    assert rbm.chains.device.type == "cuda" and rbm.sample(5).device.type == "cuda"
    assert rbm.cpu().chains.device.type == "cpu" and rbm.cuda().chains.device.type == "cuda"
    ll = rbm.log_likelihood(x, num_runs=20, num_betas=200)
    assert ll.device.type == "cuda" and torch.isfinite(ll).all()


@pytest.mark.parametrize("units", ["bernoulli", "gaussian", "softmax"])
def test_closed_form_gradients_match_autograd(units):
    m = random_rbm(units, sigma=0.8)
    torch.manual_seed(2)
    data = {
        "bernoulli": lambda n: torch.bernoulli(torch.full((n, 6), 0.5)),
        "gaussian": lambda n: torch.randn(n, 6),
        "softmax": lambda n: (
            torch.multinomial(torch.ones(6), 8, replacement=True).bincount(minlength=6).float().expand(n, 6).clone()
        ),
    }[units]
    v, chains = data(7), data(5)
    loss = -(m.positive_log_density(v).mean() - m.negative_log_density(chains).mean())
    expected = torch.autograd.grad(loss, [m.W, m.b, m.c])
    pos, neg = m.contrastive_grads(v, chains)
    for p, g in zip([m.W, m.b, m.c], expected):
        assert torch.allclose(p.grad, g, atol=1e-5)
    assert torch.allclose(-(pos.mean() - neg.mean()), loss)
    assert (
        RBM(features=3, hidden_units=2, units="gaussian", learn_sigma=True).contrastive_grads(v[:, :3], v[:, :3])
        is None
    )


def test_sparsity_penalty_adds_its_gradient_to_the_closed_form_one():
    """The fast path (closed-form PCD gradient, then the penalty's backward, as PersistentCD does)
    gives the autograd gradient of the PCD loss plus the penalty; with zero weights the penalty's
    gradient on a hidden bias is cost * (sigmoid(c) - target)."""
    m = random_rbm(sparsity_cost=0.4, sparsity_target=0.15)
    torch.manual_seed(3)
    v, chains = torch.bernoulli(torch.full((7, 6), 0.5)), torch.bernoulli(torch.full((5, 6), 0.5))
    loss = -(m.positive_log_density(v).mean() - m.negative_log_density(chains).mean()) + m.regularizer()
    expected = torch.autograd.grad(loss, [m.W, m.b, m.c])
    m.contrastive_grads(v, chains)
    m.regularizer().backward()
    for p, g in zip([m.W, m.b, m.c], expected):
        assert torch.allclose(p.grad, g, atol=1e-5)
    assert float(m.regularizer()) == 0.0  # each penalty uses one positive batch once
    flat = RBM(features=6, hidden_units=4, sparsity_cost=0.4, sparsity_target=0.15)
    with torch.no_grad():
        flat.W.zero_()
        flat.c.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    flat.positive_log_density(v)
    flat.regularizer().backward()
    assert torch.allclose(flat.c.grad, 0.4 * (torch.sigmoid(flat.c.detach()) - 0.15), atol=1e-6)
    with pytest.raises(ValueError, match=r"sparsity_target: expected a number in \(0, 1\)"):
        RBM(sparsity_target=0.0)
    with pytest.raises(ValueError, match="sparsity_cost must be a non-negative number"):
        RBM(sparsity_cost="high")


def test_persistent_cd_with_the_sparsity_penalty_pulls_hidden_activations_to_their_target():
    """Same data, seeds and updates with and without the penalty: the hidden units' mean
    activation on the data lands nearer the target with it, on every seed."""
    x = load_digits("train", binarize=True).x[:300]
    for seed in range(3):
        means = {}
        for cost in (0.0, 1.0):
            torch.manual_seed(seed)
            rbm = RBM(features=64, hidden_units=32, sparsity_cost=cost, sparsity_target=0.05)
            PersistentCD(num_steps=150, batch_size=50, num_chains=50, lr=0.01, optim="adam", seed=seed).run(rbm, x)
            with torch.no_grad():
                means[cost] = float(rbm.hidden_mean(x).mean())
        assert abs(means[1.0] - 0.05) < abs(means[0.0] - 0.05), (seed, means)


def test_replicated_softmax_partition_function_per_document_length():
    m = random_rbm("softmax", features=5, hidden_units=3)
    length = 3
    sequences = torch.tensor(list(itertools.product(range(5), repeat=length)))
    docs = torch.nn.functional.one_hot(sequences, 5).sum(1).float()  # every word sequence as a count vector
    with torch.no_grad():
        brute = torch.logsumexp(-m.free_energy(docs), 0).item()
    exact = m.log_partition("exact", length=length)
    assert exact.value == pytest.approx(brute, abs=1e-5)
    est = m.log_partition("ais", length=length, num_runs=200, num_betas=2000, seed=0)
    assert abs(est.value - exact.value) < min(0.1, 3 * est.stderr + 1e-3), (est, exact)
    # the exact per-sequence probabilities of each length sum to one, the empty document included
    mixed = torch.cat([docs, docs[:1] * 0])
    p = m.log_likelihood(mixed, method="exact").exp()
    assert p[:-1].sum().item() == pytest.approx(1.0, abs=1e-4) and p[-1].item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="positive int document length"):
        m.energy_graph()


def test_parallel_tempering_samples_a_bimodal_rbm_and_trains_by_pcd():
    torch.manual_seed(0)
    m = RBM(features=6, hidden_units=1, init_scale=0.0, temperatures=8, min_beta=0.1)
    with torch.no_grad():  # all-off and all-on are equally likely modes behind a deep barrier
        m.W.fill_(6.0)
        m.c.fill_(-18.0)
        m.b.fill_(-3.0)
    states = torch.tensor(list(itertools.product([0, 1], repeat=6)), dtype=torch.float32)
    p = torch.softmax(-m.free_energy(states).detach(), 0)
    exact = (p[:, None] * states).sum(0)  # 0.5 each
    gibbs = m.gibbs(torch.zeros(4000, 6), 300)
    tempered = m.tempered_gibbs(torch.zeros(8, 4000, 6), 300)  # every chain starts in the all-off mode
    assert (gibbs.mean(0) - exact).abs().max() > 0.15  # measured 0.27 instead of 0.5: stuck in one mode
    assert torch.allclose(tempered[0].mean(0), exact, atol=0.03), tempered[0].mean(0)  # measured within 0.011
    assert 0.05 < m.swap_rate < 1  # measured 0.84
    # sample() tempers on its own: its draws weigh both modes as the model does
    assert torch.allclose(m.sample(4000, steps=300).mean(0), exact, atol=0.03)
    with pytest.raises(ValueError, match="temperatures must be a positive int"):
        m.sample(3, temperatures=0)
    # continued from states spread over both modes (the tempered chains, all replicas given), plain
    # Gibbs keeps both; the rows are drawn from the start, cycled past its 4000
    resumed = m.sample(6000, steps=20, temperatures=1, start=tempered)
    assert resumed.shape == (6000, 6) and torch.allclose(resumed.mean(0), exact, atol=0.03), resumed.mean(0)
    assert torch.equal(m.sample(4000, steps=0, start=tempered[0]).sum(0), tempered[0].sum(0))
    with pytest.raises(ValueError, match="start: expected 6 columns"):
        m.sample(3, start=torch.zeros(5, 4))
    x = torch.bernoulli(torch.full((40, 6), 0.5))
    fit = PersistentCD(num_steps=10, batch_size=20, num_chains=7).run(m, x)
    assert fit.extra["tensors"]["chains"].shape == (8, 7, 6) and fit.samples["chain_energy"].shape[0] == 4
    with pytest.raises(ValueError, match="parallel tempering"):
        RBM(units="gaussian", temperatures=3)


def test_gaussian_bernoulli_rbm_learns_a_four_mode_mixture():
    from ppdgm.data import make_gaussian_mixture

    x, _ = make_gaussian_mixture(2000, modes=4, radius=2.0, sd=0.3, seed=0)
    test, _ = make_gaussian_mixture(1000, modes=4, radius=2.0, sd=0.3, seed=1)
    gaussian = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T)).log_prob(test).mean().item()
    results = {}
    for learn_sigma in (False, True):  # closed-form gradients, then autograd through log sigma
        torch.manual_seed(0)
        m = RBM(features=2, hidden_units=10, units="gaussian", sigma=0.5, learn_sigma=learn_sigma, init_scale=0.1)
        PersistentCD(num_epochs=40, batch_size=100, lr=0.01, optim="adam", num_chains=200, k=5, seed=0).run(m, x)
        results[learn_sigma] = m.log_likelihood(test, method="exact").mean().item()
    # measured: -2.92 (fixed sigma 0.5) and -3.36 (learned) against the best single Gaussian's -3.57 nats
    assert results[False] > gaussian + 0.4, (results, gaussian)
    assert results[True] > gaussian + 0.1, (results, gaussian)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 12),
    value=st.sampled_from([0.5, -1.0, 2.0, float("nan")]),
    units=st.sampled_from(["bernoulli", "softmax"]),
)
def test_any_mismatched_or_off_support_data_is_refused_before_training(rows, cols, value, units):
    rbm = RBM(features=6, hidden_units=3, units=units)
    before = rbm.W.detach().clone()
    if units == "softmax" and value == 2.0:  # a count of 2 is valid for word counts
        value = 0.5
    x = torch.ones(rows, cols)
    if cols == 6:
        x[rows // 2, cols // 2] = value
    with pytest.raises(ValueError, match=r"x: expected|data: expected"):
        PersistentCD(num_steps=3).run(rbm, x)
    assert torch.equal(rbm.W, before)


def test_a_trained_rbm_keeps_its_chains_and_samples_from_them(tmp_path):
    import ppdgm

    x = torch.bernoulli(torch.full((40, 6), 0.5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = RBM(features=6, hidden_units=4)
    assert m.chains is None  # untrained: sample() starts from noise
    fit = PersistentCD(num_steps=10, batch_size=20, num_chains=8, chain_blocks=2, seed=0).run(m, x)
    chains = fit.extra["tensors"]["chains"]
    assert torch.equal(m.chains, chains)  # every chain block, not the last one advanced
    # steps=0: the draws are the chains, in random order and cycled (each of the 8 three times)
    assert torch.equal(m.sample(24, steps=0).sum(0), 3 * chains.sum(0))
    # a model whose visible units are all on given any hidden state: its draws from noise are all
    # ones, its kept chains (zeros here) are not
    b = m.b.detach().clone()
    with torch.no_grad():
        m.b.fill_(30.0)
    m.chains = torch.zeros(8, 6)
    assert m.sample(5, steps=0).sum() == 0 and m.sample(5, steps=0, from_chains=False).sum() == 5 * 6
    with torch.no_grad():
        m.b.copy_(b)
    m.chains = chains
    with pytest.raises(TypeError, match="from_chains must be a bool"):
        m.sample(3, from_chains="no")
    with pytest.raises(ValueError, match="steps must be a non-negative int or None"):
        m.sample(3, steps=-1)

    # ppdgm.save / ppdgm.load keep them, on the model's dtype; an RBM saved before chains were kept loads without
    fit.module, fit.spec = m, m.spec
    fit.save(tmp_path / "fit")
    loaded = ppdgm.load(tmp_path / "fit").module
    assert torch.equal(loaded.chains, chains) and torch.equal(loaded.sample(16, steps=0).sum(0), 2 * chains.sum(0))
    assert loaded.double().chains.dtype == torch.float64
    old = {k: v for k, v in m.state_dict().items() if k != "_extra_state"}
    fresh = RBM(features=6, hidden_units=4)
    fresh.load_state_dict(old, strict=False)
    assert fresh.chains is None and fresh.sample(3, steps=1).shape == (3, 6)
    with pytest.raises(ValueError, match=r"chains: expected saved chains of shape \(num_chains, 6\)"):
        fresh.load_state_dict({**old, "_extra_state": {"chains": torch.zeros(8, 5)}})


def test_a_resumed_run_keeps_the_chains_an_uninterrupted_run_keeps(tmp_path):
    x = torch.bernoulli(torch.full((60, 6), 0.4), generator=torch.Generator().manual_seed(1))
    engine = PersistentCD(num_steps=20, batch_size=20, num_chains=10, checkpoint_every=5, seed=3)
    runs = {}
    for name in ("full", "part", "resumed"):
        torch.manual_seed(0)
        runs[name] = RBM(features=6, hidden_units=4, temperatures=3)
    engine.run(runs["full"], x)
    engine.run(runs["part"], x, checkpoint_dir=tmp_path, callbacks=[lambda step, info: step == 10])
    fit = engine.run(runs["resumed"], x, checkpoint_dir=tmp_path, resume=True)
    # a tempering RBM keeps its beta = 1 replicas: (chains, visible)
    assert runs["resumed"].chains.shape == (10, 6)
    assert torch.equal(runs["resumed"].chains, fit.extra["tensors"]["chains"][0])
    assert torch.equal(runs["resumed"].chains, runs["full"].chains)


@pytest.mark.parametrize("seed, temperatures", [(0, 1), (1, 1), (2, 3)])
def test_draws_from_the_kept_chains_match_the_exact_distribution(seed, temperatures):
    """A tiny RBM trained by PCD on two noisy overlapping patterns: its default draws (the kept
    chains plus 10 sweeps) have the exact means and pairwise moments ``E[v_i v_j]`` (by enumeration
    of the 64 visible states) within 4.5 standard errors. Measured over seeds 0-7: at most 2.8;
    the draws from noise without sweeps 6.4-14, the tempering RBM's lowest-beta replicas 17-23."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.float32)
    x = patterns[torch.randint(0, 2, (400,), generator=g)]
    x = (x + (torch.rand(x.shape, generator=g) < 0.1)) % 2
    torch.manual_seed(seed)
    m = RBM(features=6, hidden_units=4, temperatures=temperatures)
    engine = PersistentCD(
        num_steps=300, batch_size=50, num_chains=2000, k=2, optim="adam", lr=0.02, lr_schedule="linear", seed=seed
    )
    engine.run(m, x)
    upper = torch.triu_indices(6, 6)

    def moments(v):  # E[v_i] on the diagonal, E[v_i v_j] above it
        return (v[:, :, None] * v[:, None, :])[:, upper[0], upper[1]]

    states = torch.tensor(list(itertools.product([0, 1], repeat=6)), dtype=torch.float32)
    with torch.no_grad():
        exact = (torch.softmax(-m.free_energy(states), 0)[:, None] * moments(states)).sum(0)
    draws = m.sample(2000)
    z = (moments(draws).mean(0) - exact) / (exact * (1 - exact) / 2000).sqrt()
    assert z.abs().max() < 4.5, (z, exact)
