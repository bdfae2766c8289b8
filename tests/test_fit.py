import os
import signal
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppdgm
from ppdgm.fit import Fit, safe_load

SCRIPT = Path(__file__).parent / "scripts" / "train_ppca.py"


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True)


def test_killed_run_resumes_to_the_same_parameters_as_an_uninterrupted_one(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_script(whole, 60).returncode == 0
    killed = run_script(broken, 60, "--kill-at", 35)
    assert killed.returncode == -signal.SIGKILL  # really killed mid-way, after the step-30 checkpoint
    assert not (broken / "fit.json").exists() and (broken / "checkpoint.pt").exists()
    assert safe_load(broken / "checkpoint.pt")["step"] == 30
    resumed = run_script(broken, 60, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = ppdgm.load(whole), ppdgm.load(broken)
    assert a.history["loss"] == b.history["loss"]
    for name, value in a.params["params"].items():
        assert torch.equal(value, b.params["params"][name]), name


def test_save_load_round_trip_rebuilds_zoo_model(tmp_path):
    from ppdgm.data import load_digits
    from ppdgm.inference import SVI
    from ppdgm.models.ppca import PPCA

    x = load_digits("train").x[:300]
    model = PPCA(features=64, latent_features=3)
    fit = SVI(num_steps=30, lr=0.02, progress=False).run(model.model, model.guide, x)
    fit.module, fit.spec = model, model.spec
    before = model.log_likelihood(x[:20])
    fit.save(tmp_path)
    pyro.clear_param_store()
    loaded = ppdgm.load(tmp_path)
    assert isinstance(loaded.module, PPCA) and loaded.module is not model
    assert torch.allclose(loaded.module.log_likelihood(x[:20]), before)
    assert loaded.history == fit.history and loaded.config["lr"] == 0.02
    assert torch.allclose(loaded.param("mu"), model.mu.detach())


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/ppdgm-pickle-payload-ran")


def test_crafted_pickle_is_refused_not_run(tmp_path):
    MARKER.unlink(missing_ok=True)
    fit = Fit(engine="svi", history={"loss": [1.0]})
    fit.save(tmp_path)
    torch.save({"params": Payload(), "samples": None}, tmp_path / "tensors.pt")
    with pytest.raises(ValueError, match="refused to load"):
        ppdgm.load(tmp_path)
    assert not MARKER.exists()


def test_save_is_atomic_and_keeps_the_previous_file_on_failure(tmp_path):
    fit = Fit(engine="svi", history={"loss": [1.0, 0.5]})
    fit.save(tmp_path)
    good = (tmp_path / "tensors.pt").read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    broken = Fit(engine="svi", extra={"tensors": Unsaveable()})
    with pytest.raises(RuntimeError):
        broken.save(tmp_path)
    assert (tmp_path / "tensors.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.json", "tensors.pt"]


def test_plain_function_fit_converts_to_arviz_with_plate_dims_and_loo():
    import arviz as az

    from ppdgm.inference import SVI

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("schools", x.shape[0]):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(theta, 1.0), obs=x)

    x = torch.linspace(-2, 2, 8)
    fit = SVI(num_steps=300, lr=0.05, progress=False).run(model, None, x)
    idata = fit.to_arviz(num_samples=200)
    assert idata.posterior["theta"].dims == ("chain", "draw", "schools")
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "schools")
    assert idata.observed_data["obs"].dims == ("schools",)
    assert abs(float(idata.posterior["mu"].mean())) < 1.0
    assert az.loo(idata).n_data_points == 8


def test_a_loaded_fit_without_its_data_says_so_and_converts_once_given_it(tmp_path):
    from ppdgm.inference import NUTS

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    x = torch.linspace(-2, 2, 8)
    NUTS(num_warmup=20, num_samples=20, num_chains=1, progress=False).run(model, x).save(tmp_path)
    fit = ppdgm.load(tmp_path, model=model)
    with pytest.raises(ValueError, match=r"takes \['x'\] but this Fit holds no data"):
        fit.to_arviz()
    fit.args = (x,)
    assert fit.to_arviz().log_likelihood["obs"].shape == (1, 20, 8)


def test_load_refuses_a_folder_without_a_fit(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fit\.json"):
        ppdgm.load(tmp_path)
