import itertools

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

import ppdgm
from ppdgm.data import load_digits
from ppdgm.evaluate import bernoulli_baseline, log_likelihood
from ppdgm.graphs import dbm_graph, multimodal_graph
from ppdgm.inference.pcd import PersistentCD
from ppdgm.models import build_from_spec
from ppdgm.models.dbm import DBM, MultimodalDBM
from ppdgm.models.rbm import RBM


def randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0 if p.dim() == 2 else 0.5)
    return model


def test_two_layer_dbm_bound_is_the_rbm_free_energy():
    dbm = randomize(DBM(sizes=[6, 4]))
    rbm = RBM(features=6, hidden_units=4)
    with torch.no_grad():
        rbm.W.copy_(dbm.weights[0])
        rbm.b.copy_(dbm.biases[0])
        rbm.c.copy_(dbm.biases[1])
    v = torch.bernoulli(torch.full((9, 6), 0.5))
    assert torch.allclose(dbm.variational_bound(v), -rbm.free_energy(v), atol=1e-5)


def test_block_gibbs_samples_the_exact_joint_of_a_multimodal_dbm():
    mm = randomize(MultimodalDBM(features=4, hidden_units=3, top_units=3, classes=3))
    e = mm.energy_graph()
    bits = torch.tensor(list(itertools.product([0, 1], repeat=10)), dtype=torch.float32)
    states = {k: [] for k in range(4)}
    for label in range(3):
        states[0].append(bits[:, :4])
        states[1].append(F.one_hot(torch.full((len(bits),), label), 3).float())
        states[2].append(bits[:, 4:7])
        states[3].append(bits[:, 7:])
    states = {k: torch.cat(v) for k, v in states.items()}
    p = torch.softmax(e.log_density(states).detach(), 0)
    exact_label = (p[:, None] * states[1]).sum(0)
    exact_top = (p[:, None] * states[2]).sum(0)
    torch.manual_seed(0)
    start = (
        torch.bernoulli(torch.full((8000, 4), 0.5)),
        F.one_hot(torch.randint(0, 3, (8000,)), 3).float(),
        torch.bernoulli(torch.full((8000, 3), 0.5)),
        torch.bernoulli(torch.full((8000, 3), 0.5)),
    )
    chains = mm.sample_chains(start, 100)
    assert torch.allclose(chains[1].mean(0), exact_label, atol=0.02)
    assert torch.allclose(chains[2].mean(0), exact_top, atol=0.02)


def test_importance_bound_reaches_the_exact_likelihood_and_beats_mean_field():
    dbm = randomize(DBM(sizes=[6, 4, 3]))
    e = dbm.energy_graph()
    v = torch.bernoulli(torch.full((5, 6), 0.5))
    h = torch.tensor(list(itertools.product([0, 1], repeat=7)), dtype=torch.float32)
    exact = torch.stack(
        [torch.logsumexp(e.log_density({0: x.expand(128, 6), 1: h[:, :4], 2: h[:, 4:]}), 0) for x in v]
    ).detach()
    torch.manual_seed(0)
    bound = dbm.importance_bound(v, 5000)
    mean_field = dbm.variational_bound(v, 30).detach()
    assert (mean_field <= exact + 1e-5).all()
    assert torch.allclose(bound, exact, atol=0.02)  # measured: within 0.004 nats
    assert (bound > mean_field).all()
    log_z = dbm.log_partition("exact").value
    assert torch.allclose(dbm.log_likelihood(v, method="exact", num_samples=5000), exact - log_z, atol=0.02)


@pytest.mark.parametrize("observed", ["pixels", "both"])
def test_importance_bound_of_a_multimodal_dbm_reaches_the_exact_marginal(observed):
    # observed layers in both Gibbs colours: the edges between clamped and drawn layers count too
    mm = randomize(MultimodalDBM(features=4, hidden_units=3, top_units=3, classes=3))
    e = mm.energy_graph()
    x = torch.bernoulli(torch.full((4, 4), 0.5))
    y = F.one_hot(torch.tensor([0, 2, 1, 2]), 3).float()
    bits = torch.tensor(list(itertools.product([0, 1], repeat=6)), dtype=torch.float32)
    labels = F.one_hot(torch.arange(3), 3).float().repeat_interleave(64, 0) if observed == "pixels" else None
    exact = []
    for r in range(4):
        hidden = {2: bits[:, :3], 3: bits[:, 3:]}
        if observed == "both":
            state = {0: x[r].expand(64, 4), 1: y[r].expand(64, 3), **hidden}
        else:
            state = {0: x[r].expand(192, 4), 1: labels, **{k: h.repeat(3, 1) for k, h in hidden.items()}}
        exact.append(torch.logsumexp(e.log_density(state), 0))
    torch.manual_seed(0)
    data = (x, y) if observed == "both" else x
    bound = mm.importance_bound(data, 5000)
    assert torch.allclose(bound, torch.stack(exact).detach(), atol=0.02)
    assert (bound > mm.variational_bound(data, 30).detach()).all()


@pytest.fixture(scope="module")
def digits():
    return load_digits("train", binarize=True), load_digits("test", binarize=True)


def test_pretrained_pcd_dbm_beats_the_rbm_of_the_same_first_layer_size(digits):
    train, test = digits
    torch.manual_seed(0)
    dbm = DBM(sizes=[64, 128, 64], mean_field_steps=10)
    errors = dbm.pretrain(train.x, epochs=30, lr=0.05, batch_size=50)
    assert errors[0] < 3.0  # squared reconstruction error per digit of the bottom RBM
    PersistentCD(
        num_epochs=80,
        batch_size=50,
        lr=0.01,
        optim="adam",
        lr_schedule="linear",
        weight_decay=1e-4,
        num_chains=200,
        k=5,
        seed=0,
    ).run(dbm, train.x)
    torch.manual_seed(0)
    rbm = RBM(features=64, hidden_units=128)  # as in tests/models/test_rbm.py
    PersistentCD(
        num_epochs=60,
        batch_size=50,
        lr=0.02,
        optim="adam",
        lr_schedule="linear",
        weight_decay=1e-4,
        num_chains=100,
        seed=0,
    ).run(rbm, train.x)
    ais = {"num_runs": 100, "num_betas": 3000, "base_data": train.x, "seed": 1}
    dbm_ll = log_likelihood(dbm, test.x, **ais)  # a lower bound (importance-sampled, h1 summed out)
    rbm_ll = log_likelihood(rbm, test.x, **ais)
    baseline = bernoulli_baseline(train.x, test.x)
    assert dbm.last_log_z.stderr < 0.4 and rbm.last_log_z.stderr < 0.2
    assert dbm_ll.mean > baseline.mean + 5, (dbm_ll, baseline)
    # measured: DBM bound -17.61 nats, RBM -18.32 (AIS seed 1), base rate -25.21: the DBM wins by 0.71 nats
    assert dbm_ll.mean > rbm_ll.mean, (dbm_ll, rbm_ll)


def test_multimodal_dbm_labels_test_digits_and_draws_digits_from_labels(digits):
    train, test = digits
    means = torch.stack([train.x[train.y == k].mean(0) for k in range(10)])
    accuracies = []
    for seed in range(3):
        torch.manual_seed(seed)
        mm = MultimodalDBM(features=64, hidden_units=128, top_units=64, classes=10)  # pretrains in PCD
        engine = PersistentCD(batch_size=50, num_epochs=40, num_chains=100, seed=seed, **MultimodalDBM.engine_config)
        engine.run(mm, (train.x, train.y))
        accuracies.append((mm.predict(test.x) == test.y).float().mean().item())
        # complete(label): E[pixels | label] by clamped Gibbs is nearest to that digit's class mean,
        # ahead of the next class by a margin (measured: 0.67 to 0.98 on seeds 0-2)
        torch.manual_seed(seed)
        images = mm.complete({"label": torch.eye(10)}, steps=100, method="gibbs", num_samples=50)["pixels"]
        dist = torch.cdist(images, means)
        margin = (dist + 1e9 * torch.eye(10)).min(-1).values - dist.diagonal()
        assert (margin > 0.2).all(), (seed, dist.argmin(-1), margin)
    # measured 0.896, 0.902, 0.906 on 297 test digits (standard error of each about 0.018)
    assert min(accuracies) > 0.86 and sum(accuracies) / 3 >= 0.88, accuracies
    # pixels alone: a bound on log p(pixels) with the label summed out, below the joint's over both modalities
    ais = {"num_runs": 50, "num_betas": 500, "seed": 0}
    pixels_only = mm.log_likelihood(test.x[:50], **ais).mean()
    joint = mm.log_likelihood((test.x[:50], test.y[:50]), **ais).mean()
    assert joint < pixels_only < joint + 2.31  # log p(x, y) <= log p(x) and p(y | x) is not much below 1/10
    assert mm.sample(3, steps=5).shape == (3, 64) and [t.shape for t in mm.sample_all(3, steps=5)] == [(3, 64), (3, 10)]
    # mean-field completion is one mode of the conditional: its label read-out is the classifier's
    assert torch.equal(mm.complete({"pixels": test.x})["label"].argmax(-1), mm.predict(test.x))
    with pytest.raises(ValueError, match="method must be 'gibbs' or 'mean-field'"):
        mm.complete({"label": torch.eye(10)}, method="exact")


def test_spec_round_trip_and_graph_input():
    g = multimodal_graph([8, 5], [3], 4)
    mm = MultimodalDBM(graph=g.graph)
    _, _, clone = build_from_spec(mm.spec)
    assert clone.layers == mm.layers and clone.sizes == mm.sizes and type(clone) is MultimodalDBM
    dbm = DBM(graph=dbm_graph([6, 4, 3]).graph)
    _, _, clone = build_from_spec(dbm.spec)
    assert [tuple(w.shape) for w in clone.weights] == [(6, 4), (4, 3)]


def test_bad_input_fails_fast():
    with pytest.raises(ValueError, match="exactly one of graph"):
        DBM()
    d = nx.DiGraph()
    d.add_node("v", size=3, visible=True)
    d.add_node("h", size=2)
    d.add_edges_from([("v", "h"), ("h", "v")])
    with pytest.raises(ValueError, match="undirected"):
        DBM(graph=d)
    g = dbm_graph([4, 3]).graph
    g.nodes["h1"]["units"] = "gaussian"
    with pytest.raises(ValueError, match="hidden layer 'h1' must have bernoulli units"):
        DBM(graph=g)
    mm = MultimodalDBM(features=4, hidden_units=3, top_units=3, classes=3)
    x = torch.bernoulli(torch.full((5, 4), 0.5))
    with pytest.raises(ValueError, match=r"integer class labels in \[0, 3\)"):
        PersistentCD(num_steps=2).run(mm, (x, torch.tensor([0, 1, 2, 3, 0])))
    with pytest.raises(ValueError, match="2 tensor"):
        PersistentCD(num_steps=2).run(mm, (x, x, x))
    with pytest.raises(ValueError, match="one-hot rows"):
        mm.check_data((x, torch.ones(5, 3)))
    with pytest.raises(ValueError, match="not a visible layer"):
        mm.complete({"top": torch.ones(2, 3)})
    for bad, match in [
        ({"sparsity_cost": -0.1}, "sparsity_cost must be a non-negative number"),
        ({"sparsity_target": 1.0}, r"sparsity_target: expected a number in \(0, 1\) or one per hidden layer \(2\)"),
        ({"sparsity_target": (0.1,)}, r"one per hidden layer \(2\), got \(0.1,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            DBM(sizes=[4, 3, 2], **bad)
    ring = nx.cycle_graph(["v", "a", "b", "c"])
    nx.set_node_attributes(ring, 3, "size")
    ring.nodes["v"]["visible"] = True
    with pytest.raises(ValueError, match="tree of pathways"):
        DBM(graph=ring).pretrain(torch.ones(4, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_smoke():
    x = torch.bernoulli(torch.full((64, 8), 0.3)).cuda()
    y = torch.randint(0, 3, (64,)).cuda()
    mm = MultimodalDBM(features=8, hidden_units=6, top_units=4, classes=3)
    mm.pretrain((x, y), epochs=2, batch_size=16)
    PersistentCD(num_steps=10, batch_size=16, num_chains=8).run(mm, (x, y))
    assert mm.predict(x).device.type == "cuda"
    assert torch.isfinite(mm.log_likelihood((x, y), num_runs=10, num_betas=100)).all()


def test_persistent_cd_pretrains_a_dbm_greedily_before_its_chains_start():
    x = torch.bernoulli(torch.full((60, 6), 0.4))
    torch.manual_seed(0)
    by_hand = DBM(sizes=[6, 4, 3], pretrain_epochs=0)
    torch.manual_seed(0)
    by_engine = DBM(sizes=[6, 4, 3], pretrain_epochs=3)
    torch.manual_seed(0)  # as the engine seeds itself before it starts
    by_hand.pretrain(x, epochs=3, lr=0.05, batch_size=50)
    PersistentCD(num_steps=1, lr=1e-12, num_chains=4, seed=0).run(by_engine, x)
    assert by_engine.pretrained
    for a, b in zip(by_hand.parameters(), by_engine.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # a model pretrained already is not pretrained again, and a graph that is no tree of pathways trains as is
    before = [p.detach().clone() for p in by_engine.parameters()]
    by_engine.prepare(x)
    assert all(torch.equal(a, b) for a, b in zip(before, by_engine.parameters()))
    ring = nx.cycle_graph(["v", "a", "b", "c"])
    nx.set_node_attributes(ring, 3, "size")
    ring.nodes["v"]["visible"] = True
    PersistentCD(num_steps=2, num_chains=4).run(DBM(graph=ring), torch.ones(4, 3))
    with pytest.raises(ValueError, match="pretrain_epochs must be a non-negative int"):
        DBM(sizes=[6, 4], pretrain_epochs=-1)


def test_pcd_resume_restores_persistent_dbm_chains(tmp_path):
    x = torch.bernoulli(torch.full((40, 6), 0.4))
    y = torch.randint(0, 3, (40,))

    def make():
        torch.manual_seed(0)
        return MultimodalDBM(features=6, hidden_units=4, top_units=3, classes=3)

    engine = PersistentCD(num_steps=20, batch_size=10, num_chains=8, checkpoint_every=5, lr=0.05, seed=1)
    full = make()
    engine.run(full, (x, y))
    make_part = make()
    engine.run(make_part, (x, y), checkpoint_dir=tmp_path, callbacks=[lambda step, info: step == 10])
    resumed = make()
    fit = engine.run(resumed, (x, y), checkpoint_dir=tmp_path, resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert [tuple(c.shape) for c in fit.extra["tensors"]["chains"]] == [(8, 6), (8, 3), (8, 3), (8, 4)]


def test_pyro_elbo_of_model_and_mean_field_guide_is_the_variational_bound():
    import math

    import pyro

    dbm = randomize(DBM(sizes=[6, 4, 3]))
    v = torch.bernoulli(torch.full((3, 6), 0.5))
    pyro.set_rng_seed(0)
    elbo = pyro.infer.Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    mc = -elbo.loss(dbm.model, dbm.guide, v) / 3
    # uniform priors on the 13 units contribute -13 log 2 per point
    analytic = (dbm.variational_bound(v) - 13 * math.log(2)).mean().item()
    assert mc == pytest.approx(analytic, abs=0.05)  # measured -0.362 vs -0.374


def test_from_data_takes_a_graph_file_and_checks_it_against_the_data(tmp_path, digits):
    import json

    from ppdgm.graphs import dbn_graph
    from ppdgm.models.dbn import DBN

    train, _ = digits
    path = tmp_path / "g.json"
    path.write_text(json.dumps(dbm_graph([64, 32, 16]).to_json()))
    assert DBM.from_data(train, graph=str(path)).sizes == [64, 32, 16]
    assert RBM.from_data(train, graph=dbm_graph([64, 20]).graph).hidden_units == 20
    assert DBN.from_data(train, graph=dbn_graph([64, 16, 8]).graph).sizes == [64, 16, 8]
    path.write_text(json.dumps(dbm_graph([10, 4]).to_json()))
    with pytest.raises(ValueError, match="has 10 units but digits-binary-train has 64 columns"):
        DBM.from_data(train, graph=str(path))


def test_dbm_keeps_its_persistent_chains_samples_from_them_and_saves_them(tmp_path):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((40, 6), 0.3))
    dbm = DBM(sizes=[6, 4, 3], pretrain_epochs=0)
    assert dbm.chains is None and dbm.sample(3, steps=1).shape == (3, 6)  # untrained: from noise
    fit = PersistentCD(num_steps=20, batch_size=10, num_chains=8, k=2, seed=0).run(dbm, x)
    assert [tuple(c.shape) for c in dbm.chains] == [(8, 6), (8, 4), (8, 3)]
    visible = dbm.chains[0].clone()
    # steps=0: the draws are the chains, in random order and cycled (each of the 8 three times)
    assert torch.equal(dbm.sample(24, steps=0).sum(0), 3 * visible.sum(0))
    with torch.no_grad():  # visible units all on whatever the hidden: noise gives ones, the chains stay
        dbm.biases[0].fill_(30.0)
    assert (dbm.sample(5, steps=0)[:, None] == visible[None]).all(-1).any(-1).all()
    assert dbm.sample(5, steps=1, from_chains=False).sum() == 5 * 6
    with pytest.raises(TypeError, match="from_chains must be a bool"):
        dbm.sample(3, from_chains="no")
    fit.module, fit.spec = dbm, dbm.spec
    fit.save(tmp_path / "fit")
    loaded = ppdgm.load(tmp_path / "fit").module
    assert torch.equal(loaded.chains[0], visible) and torch.equal(loaded.sample(16, steps=0).sum(0), 2 * visible.sum(0))
    old = {k: v for k, v in dbm.state_dict().items() if k != "_extra_state"}
    fresh = DBM(sizes=[6, 4, 3])
    fresh.load_state_dict(old, strict=False)
    assert fresh.chains is None
    with pytest.raises(ValueError, match=r"chains: expected one \(num_chains, size\) tensor per layer"):
        fresh.load_state_dict({**old, "_extra_state": {"chains": [torch.zeros(8, 6), torch.zeros(8, 4)]}})


def test_draws_from_the_kept_chains_follow_the_exact_marginal():
    # a tiny DBM trained briefly; its kept chains plus the default 10 sweeps against enumeration,
    # within 4.5 standard errors of the mean of each visible unit, over three seeds
    bits = torch.tensor(list(itertools.product([0, 1], repeat=9)), dtype=torch.float32)
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.bernoulli(torch.tensor([0.8, 0.2, 0.7, 0.3]).expand(200, 4))
        dbm = DBM(sizes=[4, 3, 2], pretrain_epochs=0)
        PersistentCD(num_steps=200, batch_size=50, num_chains=2000, k=2, lr=0.05, optim="adam", seed=seed).run(dbm, x)
        e = dbm.energy_graph()
        p = torch.softmax(e.log_density({0: bits[:, :4], 1: bits[:, 4:7], 2: bits[:, 7:]}).detach(), 0)
        exact = (p[:, None] * bits[:, :4]).sum(0)
        draws = dbm.sample(2000)
        se = (exact * (1 - exact) / 2000).sqrt()
        assert ((draws.mean(0) - exact).abs() < 4.5 * se).all(), (seed, draws.mean(0), exact)


def test_sparsity_penalty_is_the_cross_entropy_to_the_target_with_gradient_cost_times_q_minus_t():
    """Zero weights: every hidden unit's mean activation is sigmoid(bias) whatever the data, so the
    penalty is cost * sum BCE(q, t) and its gradient on a bias is cost * (q - t)."""
    cost, targets = 0.3, (0.2, 0.05)
    dbm = DBM(sizes=[5, 4, 3], sparsity_cost=cost, sparsity_target=targets, pretrain_epochs=0)
    with torch.no_grad():
        for w in dbm.weights:
            w.zero_()
        dbm.biases[1].copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
        dbm.biases[2].copy_(torch.tensor([-3.0, 0.3, 1.0]))
    assert float(dbm.regularizer()) == 0.0  # no positive phase ran yet
    dbm.positive_log_density(torch.bernoulli(torch.full((7, 5), 0.5)))
    penalty = dbm.regularizer()
    expected = 0.0
    for layer, t in zip((1, 2), targets):
        q = torch.sigmoid(dbm.biases[layer].detach())
        expected += cost * F.binary_cross_entropy(q, torch.full_like(q, t), reduction="sum")
    assert torch.allclose(penalty, expected)
    penalty.backward()
    for layer, t in zip((1, 2), targets):
        q = torch.sigmoid(dbm.biases[layer].detach())
        assert torch.allclose(dbm.biases[layer].grad, cost * (q - t), atol=1e-6)
    assert float(dbm.regularizer()) == 0.0  # each penalty uses one positive batch once


def test_persistent_cd_with_the_sparsity_penalty_pulls_hidden_activations_to_their_target():
    """Same data, seeds and updates with and without the penalty: the mean posterior activation of
    each hidden layer lands nearer its target with it, on every seed."""
    x = load_digits("train", binarize=True).x[:300]
    targets = (0.05, 0.05)
    for seed in range(3):
        means = {}
        for cost in (0.0, 1.0):
            torch.manual_seed(seed)
            dbm = DBM(sizes=[64, 32, 16], sparsity_cost=cost, sparsity_target=targets, pretrain_epochs=0)
            PersistentCD(num_steps=150, batch_size=50, num_chains=50, lr=0.01, optim="adam", seed=seed).run(dbm, x)
            with torch.no_grad():
                mu = dbm.mean_field({0: x})
            means[cost] = [float(mu[i].mean()) for i in (1, 2)]
        for layer in range(2):
            assert abs(means[1.0][layer] - targets[layer]) < abs(means[0.0][layer] - targets[layer]), (seed, means)
