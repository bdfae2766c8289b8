import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppdgm
from ppdgm.inference import engine_class
from ppdgm.inference.base import NonFiniteLossError
from ppdgm.inference.pcd import PersistentCD
from ppdgm.models.rbm import RBM

STATES = torch.tensor(list(itertools.product([0, 1], repeat=8)), dtype=torch.float32)


def exact_log_prob(rbm, x):
    with torch.no_grad():
        return -rbm.free_energy(x) - rbm.log_partition("exact").value


@pytest.fixture(scope="module")
def teacher_data():
    """2,000 exact draws from a random 8x3 'teacher' RBM (enumerating its 256 visible states)."""
    torch.manual_seed(0)
    teacher = RBM(features=8, hidden_units=3, init_scale=2.0)
    with torch.no_grad():
        teacher.b.normal_(0, 1)
        teacher.c.normal_(0, 1)
    p = exact_log_prob(teacher, STATES).exp()
    idx = torch.multinomial(p, 2000, replacement=True, generator=torch.Generator().manual_seed(1))
    return teacher, STATES[idx]


def test_pcd_learns_a_teacher_rbm_to_its_entropy(teacher_data):
    teacher, x = teacher_data
    torch.manual_seed(0)
    student = RBM(features=8, hidden_units=6)
    before = exact_log_prob(student, x).mean()
    fit = PersistentCD(
        num_epochs=30, batch_size=100, lr=0.05, optim="adam", lr_schedule="linear", num_chains=200, seed=0
    ).run(student, x)
    after = exact_log_prob(student, x).mean()
    best = exact_log_prob(teacher, x).mean()  # the teacher's own log-likelihood of its draws
    assert after > before + 1.0  # measured: -5.53 -> -1.183 nats (teacher: -1.176)
    assert after > best - 0.03, (after, best)  # within 0.03 nats of the data-generating model
    assert fit.history["loss"] and fit.num_steps == 600
    assert len(fit.history["chain_energy"]) == len(fit.history["record_step"]) > 0
    assert fit.samples["chain_energy"].shape == (4, 600)


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, teacher_data):
    _, x = teacher_data

    def make():
        torch.manual_seed(0)
        return RBM(features=8, hidden_units=4)

    engine = PersistentCD(num_steps=40, batch_size=50, lr=0.05, num_chains=20, checkpoint_every=10, seed=3)
    full = make()
    engine.run(full, x)
    part = make()
    engine.run(part, x, checkpoint_dir=tmp_path, callbacks=[lambda step, info: step == 20])
    resumed = make()
    fit = engine.run(resumed, x, checkpoint_dir=tmp_path, resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert fit.num_steps == 40 and fit.samples["chain_energy"].shape[1] == 40


def test_a_checkpoint_without_the_rbms_kept_chains_resumes_and_a_foreign_one_is_refused(tmp_path, teacher_data):
    _, x = teacher_data
    engine = PersistentCD(num_steps=20, batch_size=50, lr=0.05, num_chains=20, checkpoint_every=10, seed=3)
    engine.run(RBM(features=8, hidden_units=4), x, checkpoint_dir=tmp_path, callbacks=[lambda step, info: step == 10])
    (path,) = tmp_path.glob("*.pt")
    saved = torch.load(path, weights_only=True)
    del saved["engine"]["module"]["_extra_state"]  # as written before the RBM kept its chains
    torch.save(saved, path)
    resumed = RBM(features=8, hidden_units=4)
    assert engine.run(resumed, x, checkpoint_dir=tmp_path, resume=True).num_steps == 20
    assert resumed.chains.shape == (20, 8)
    saved["engine"]["module"]["extra"] = torch.zeros(1)
    torch.save(saved, path)
    with pytest.raises(ValueError, match="does not match the model"):
        engine.run(RBM(features=8, hidden_units=4), x, checkpoint_dir=tmp_path, resume=True)


def test_fit_saves_loads_and_converts_to_arviz(tmp_path, teacher_data):
    import arviz as az

    _, x = teacher_data
    torch.manual_seed(0)
    rbm = RBM(features=8, hidden_units=4)
    fit = PersistentCD(num_steps=60, batch_size=50, num_chains=30, record_chains=3, lr=0.05).run(rbm, x)
    idata = fit.to_arviz()
    assert idata.posterior["chain_energy"].shape == (3, 60)
    assert 0.9 < float(az.rhat(idata)["chain_energy"]) < 1.5
    fit.save(tmp_path)
    back = ppdgm.load(tmp_path)
    assert isinstance(back.module, RBM) and torch.equal(back.module.W, rbm.W)
    assert back.extra["tensors"]["chains"].shape == (30, 8)
    assert back.to_arviz().posterior["chain_energy"].shape == (3, 60)
    assert engine_class("pcd") is PersistentCD


class Exploding(RBM):
    def positive_log_density(self, v):
        return super().positive_log_density(v) * (torch.inf if self.calls() > 2 else 1.0)

    def calls(self):
        self._n = getattr(self, "_n", 0) + 1
        return self._n


def test_non_finite_loss_names_the_step_and_keeps_the_last_state(tmp_path):
    x = torch.bernoulli(torch.full((40, 5), 0.5))
    model = Exploding(features=5, hidden_units=3)
    with pytest.raises(NonFiniteLossError, match="at step 2") as err:
        PersistentCD(num_steps=10, batch_size=20, num_chains=5).run(model, x, checkpoint_dir=tmp_path)
    assert err.value.fit.num_steps == 2 and (tmp_path / "fit.json").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_protocol_and_data_errors():
    class NotAModel(torch.nn.Module):
        def positive_log_density(self, x):
            return x.sum(-1)

    with pytest.raises(TypeError, match=r"missing \['init_chains', 'sample_chains', 'negative_log_density'\]"):
        PersistentCD().run(NotAModel(), torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        PersistentCD().run(lambda x: x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="data: expected a tensor"):
        PersistentCD().run(RBM(features=2, hidden_units=2), None)


@settings(max_examples=30, deadline=None)
@given(
    arg=st.sampled_from(
        [
            "num_steps",
            "k",
            "num_chains",
            "batch_size",
            "lr",
            "optim",
            "momentum",
            "weight_decay",
            "lr_schedule",
            "checkpoint_every",
        ]
    ),
    bad=st.sampled_from([0, -1, 1.5, "x", None, True, (0.5, 1.2)]),
)
def test_bad_configuration_is_refused(arg, bad):
    ok_none = {"batch_size", "checkpoint_every", "lr_schedule"}
    if (bad is None and arg in ok_none) or (arg == "momentum" and bad == 0):
        return
    if (
        (arg == "optim" and bad in ("sgd", "adam"))
        or (arg == "lr" and bad == 1.5)
        or (arg == "weight_decay" and bad in (0, 1.5))
    ):
        return
    with pytest.raises(ValueError, match=arg):
        PersistentCD(**{arg: bad})
