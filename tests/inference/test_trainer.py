"""The training driver's pieces: schedules, argument checks, data order, the callback protocol."""

from __future__ import annotations

import math

import pytest
import torch

from ppdgm.distributed import World
from ppdgm.inference.callbacks import Callback, as_callbacks
from ppdgm.inference.checks import choice, positive_int, positive_number
from ppdgm.inference.pcd import PersistentCD
from ppdgm.inference.schedules import SCHEDULES, lr_factor, momentum_switch
from ppdgm.inference.trainer import Minibatches
from ppdgm.models.rbm import RBM


@pytest.mark.parametrize(
    "schedule, at_half", [("constant", 1.0), (None, 1.0), ("linear", 0.55), ("exponential", 0.1**0.5), ("cosine", 0.55)]
)
def test_schedules_start_at_one_end_at_the_final_factor_and_pass_their_midpoint(schedule, at_half):
    assert lr_factor(schedule, 0, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(schedule, 50, 100, 0.1) == pytest.approx(at_half)
    end = 1.0 if schedule in ("constant", None) else 0.1
    assert lr_factor(schedule, 100, 100, 0.1) == pytest.approx(end)
    assert lr_factor(schedule, 250, 100, 0.1) == pytest.approx(end)  # past the end: held


def test_cosine_is_flat_at_both_ends_and_linear_is_not():
    cos = [lr_factor("cosine", t, 1000, 0.0) for t in (0, 1, 999, 1000)]
    lin = [lr_factor("linear", t, 1000, 0.0) for t in (0, 1, 999, 1000)]
    assert cos[0] - cos[1] == pytest.approx(0.5 * (1 - math.cos(math.pi / 1000)))
    assert cos[0] - cos[1] < 1e-5 < lin[0] - lin[1] == pytest.approx(1e-3)
    assert cos[2] - cos[3] < 1e-5


def test_momentum_switches_after_its_fraction_of_the_steps():
    got = [momentum_switch(t, 100, (0.5, 0.9), 0.1) for t in (0, 9, 10, 99)]
    assert got == [0.5, 0.5, 0.9, 0.9]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_training_engine_takes_every_schedule(schedule):
    from ppdgm.inference import ENGINES, engine_class

    for name in ENGINES:
        cls = engine_class(name)
        if cls.input != "posterior":
            assert cls(lr_schedule=schedule).lr_schedule == schedule


def test_schedule_reaches_the_optimizer_each_step():
    lrs = []
    rbm = RBM(features=4, hidden_units=3)
    PersistentCD(
        num_steps=10,
        batch_size=5,
        num_chains=5,
        lr=0.2,
        lr_schedule="linear",
        lr_final_factor=0.5,
        record_every=1,
        progress=False,
    ).run(rbm, torch.bernoulli(torch.full((20, 4), 0.5)), callbacks=[lambda step, info: lrs.append(info["lr"])])
    assert lrs == pytest.approx([0.2 * (1 - 0.5 * t / 10) for t in range(10)])


def test_checks_refuse_bools_and_name_the_argument():
    with pytest.raises(ValueError, match="num_steps must be a positive int, got True"):
        positive_int("num_steps", True)
    with pytest.raises(ValueError, match="lr must be a positive number, got False"):
        positive_number("lr", False)
    with pytest.raises(ValueError, match=r"optim must be one of \('a', 'b'\), got 'c'"):
        choice("optim", "c", ("a", "b"))
    assert positive_int("batch_size", None, optional=True) is None and positive_number("lr", 2) == 2.0


def test_minibatches_cover_each_epoch_once_and_shards_split_it():
    x = torch.arange(10.0)[:, None]
    one = Minibatches((x,), 3, seed=0, world=World(0, 1))
    assert one.per_epoch == 4
    epoch = torch.cat([one[i][0] for i in range(4)]).flatten()
    assert sorted(epoch.tolist()) == list(range(10))
    assert not torch.equal(epoch, torch.cat([one[i][0] for i in range(4, 8)]).flatten())  # reshuffled
    ranks = [Minibatches((x,), 5, seed=0, world=World(r, 2)) for r in range(2)]
    both = torch.cat([r[0][0] for r in ranks]).flatten()
    assert sorted(both.tolist()) == sorted(epoch.tolist())
    assert Minibatches(x, None, 0, World()).batch is None and Minibatches(x, 100, 0, World(), False).batch == 10


def test_a_dataset_is_collated_like_tensors():
    x, y = torch.randn(9, 2), torch.arange(9)
    dataset = torch.utils.data.TensorDataset(x, y)
    a, b = Minibatches((x, y), 4, 0, World()), Minibatches(dataset, 4, 0, World())
    for i in range(6):
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i]))


def test_callback_protocol_sees_start_steps_validation_and_end():
    events = []

    class Tracker(Callback):
        def on_start(self, config):
            events.append(("start", config["num_steps"]))

        def on_step(self, step, info):
            events.append(("step", step, sorted(info)))

        def on_validation(self, step, metrics):
            events.append(("val", step, sorted(metrics)))
            return step == 4

        def on_end(self, fit):
            events.append(("end", fit.num_steps))

    x = torch.bernoulli(torch.full((20, 4), 0.5))
    PersistentCD(num_steps=10, batch_size=10, num_chains=5, record_every=2, progress=False).run(
        RBM(features=4, hidden_units=3), x, val_data=x, callbacks=Tracker()
    )
    assert events[0] == ("start", 10) and events[-1] == ("end", 4)
    assert ("val", 2, ["val_positive"]) in events and ("step", 3, ["loss", "lr", "negative", "positive"]) in events
    assert ("step", 4, ["chain_energy", "grad_norm", "loss", "lr", "negative", "positive", "record_step"]) in events
    with pytest.raises(TypeError, match=r"callbacks\[0\] must be a Callback or a callable"):
        as_callbacks([3])
