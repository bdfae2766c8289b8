"""What every registered posterior sampler (``ENGINES`` whose class has ``input == "posterior"``)
must do, through the same calls: find a known posterior, resume a killed run to the uninterrupted
draws, reproduce its draws from a seed, and save/load/convert to ArviZ with ``sample_stats``."""

import arviz as az
import numpy as np
import pytest
import torch

import ppdgm
from ppdgm.inference import ENGINES, engine_class
from ppdgm.inference.base import Checkpointer

from known_posteriors import NN_MEAN, NN_SD, X, normal_normal

SAMPLERS = sorted(name for name in ENGINES if engine_class(name).input == "posterior")

# small runs; a sampler not listed runs with the common arguments every sampler takes
SETTINGS = {"chees": {"num_chains": 16, "num_warmup": 100, "num_samples": 150, "checkpoint_every": 40}}
COMMON = {"num_chains": 2, "num_warmup": 150, "num_samples": 300}
# resuming is exact or not at any length: shorter runs for the samplers that checkpoint per chain
RESUME = {name: {"num_warmup": 40, "num_samples": 40} for name in SAMPLERS if name not in SETTINGS}


def make(name, **overrides):
    return engine_class(name)(**{**SETTINGS.get(name, COMMON), "seed": 0, "progress": False, **overrides})


def test_every_posterior_engine_is_covered():
    assert {"nuts", "hmc", "chees"} <= set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_conjugate_normal_posterior_within_mcse(name, seed):
    fit = make(name, seed=seed).run(normal_normal, X)
    idata = az.from_dict(posterior={"mu": fit.samples["mu"].double().numpy()})
    mean, sd = float(idata.posterior["mu"].mean()), float(idata.posterior["mu"].std())
    mcse_mean = float(az.mcse(idata, method="mean")["mu"])
    mcse_sd = float(az.mcse(idata, method="sd")["mu"])
    assert abs(mean - NN_MEAN) < 4 * mcse_mean, (mean, NN_MEAN, mcse_mean)
    assert abs(sd - NN_SD) < 4 * mcse_sd + 0.02 * NN_SD, (sd, NN_SD, mcse_sd)  # + the 1/ESS bias of sd


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("killed_at", ["second", "last"])  # early (ChEES: in warm-up), at the end (in sampling)
def test_killed_run_resumes_to_the_uninterrupted_draws(name, killed_at, tmp_path, monkeypatch):
    engine = make(name, **RESUME.get(name, {}))
    save, saves = Checkpointer.save, []

    def counted(self, state):
        saves.append(1)
        save(self, state)

    monkeypatch.setattr(Checkpointer, "save", counted)
    whole = engine.run(normal_normal, X, checkpoint_dir=tmp_path / "whole")
    kill, saves[:] = 2 if killed_at == "second" else len(saves), []

    def killed(self, state):
        saves.append(1)
        if len(saves) == kill:
            raise KeyboardInterrupt  # the work since the checkpoint before is lost
        save(self, state)

    monkeypatch.setattr(Checkpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        engine.run(normal_normal, X, checkpoint_dir=tmp_path)
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = engine.run(normal_normal, X, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(resumed.samples["mu"], whole.samples["mu"])
    assert resumed.history == whole.history
    for k, v in whole.extra["tensors"]["sample_stats"].items():
        assert torch.equal(resumed.extra["tensors"]["sample_stats"][k].nan_to_num(), v.nan_to_num()), k
    finished = engine.run(normal_normal, X, checkpoint_dir=tmp_path, resume=True)  # nothing left to run
    assert torch.equal(finished.samples["mu"], whole.samples["mu"])
    assert {k: v for k, v in finished.extra.items() if k != "tensors"} == {
        k: v for k, v in whole.extra.items() if k != "tensors"
    }
    with pytest.raises(ValueError, match=r"other sampler settings \(\['seed'\]\)"):
        make(name, seed=5, **RESUME.get(name, {})).run(normal_normal, X, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_draws(name):
    a = make(name, num_warmup=30, num_samples=20).run(normal_normal, X)
    b = make(name, num_warmup=30, num_samples=20).run(normal_normal, X)
    c = make(name, num_warmup=30, num_samples=20, seed=1).run(normal_normal, X)
    assert torch.equal(a.samples["mu"], b.samples["mu"])
    assert not torch.equal(a.samples["mu"], c.samples["mu"])


@pytest.mark.parametrize("name", SAMPLERS)
def test_fit_saves_loads_and_converts_to_arviz(name, tmp_path):
    fit = make(name, num_warmup=30, num_samples=20).run(normal_normal, X)
    chains = fit.samples["mu"].shape[0]
    assert fit.samples["mu"].shape == (chains, 20)
    fit.save(tmp_path)
    back = ppdgm.load(tmp_path, model=normal_normal)
    assert torch.equal(back.samples["mu"], fit.samples["mu"]) and back.engine == name
    back.args = (X,)
    idata = back.to_arviz()
    for stat in ("diverging", "lp", "acceptance_rate", "step_size", "n_steps"):
        assert idata.sample_stats[stat].shape == (chains, 20), stat
    assert np.isfinite(idata.sample_stats["lp"].values).all()
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data")
    assert fit.timing["grad_evals"] > 0 and fit.timing["seconds"] > 0
