import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ppdgm
from ppdgm.cli import main

USER_MODEL = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist, torch

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(x.shape[1]), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)
    """
)


def test_list_names_models_engines_datasets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ppca" in out and "svi" in out and "digits" in out


def test_fit_a_users_own_pyro_file_on_csv_data_then_diagnose(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(USER_MODEL)
    data = np.random.default_rng(0).normal(loc=[3.0, -1.0], size=(200, 2))
    np.savetxt(tmp_path / "d.csv", data, delimiter=",")
    out = tmp_path / "run"
    code = main(["fit", f"{tmp_path / 'mine.py'}:model", "--data", str(tmp_path / "d.csv"), "--out", str(out),
                 "--steps", "400", "--lr", "0.05", "--batch-size", "50"])
    assert code == 0
    assert {"fit.json", "tensors.pt", "loss.png", "summary.txt"} <= {p.name for p in out.iterdir()}
    fit = ppdgm.load(out, trust_code=True)
    assert fit.spec["autoguide"] == "AutoNormal"
    loc = fit.param("AutoNormal.locs.loc")
    assert np.allclose(loc.numpy(), data.mean(0), atol=0.15)
    assert "loc" in (out / "summary.txt").read_text()


def test_zoo_fit_sample_evaluate(tmp_path, capsys):
    out = tmp_path / "ppca"
    assert main(["fit", "ppca", "--data", "digits", "--out", str(out), "--steps", "60", "--lr", "0.02",
                 "--batch-size", "200", "--set", "latent_dim=4"]) == 0
    assert main(["sample", str(out), "-n", "9", "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    assert "nats" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "nomodel", "--data", "digits", "--out", "x"], "unknown model"),
        (["fit", "ppca", "--data", "imagenet", "--out", "x"], "data must be one of"),
        (["fit", "ppca", "--data", "digits", "--out", "x", "--set", "latent_dim=0"], "latent_dim"),
        (["fit", "ppca", "--data", "digits", "--out", "x", "--engine", "warp"], "unknown engine"),
        (["fit", "ppca", "--data", "digits", "--out", "x", "--engine-opt", "bogus=1"], "takes no option"),
        (["fit", "ppca", "--data", "digits", "--out", "x", "--steps", "0"], "num_steps"),
        (["sample", "/nonexistent/dir"], "fit.json"),
        (["fit", "ppca", "--data", "digits", "--out", "x", "--nproc", "0"], "--nproc must be"),
        (["fit", "ppca", "--data", "digits", "--out", "x", "--nproc", "3", "--batch-size", "600"], "larger than"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_arguments_print_no_traceback_from_the_shell():
    r = subprocess.run([sys.executable, "-m", "ppdgm.cli", "fit", "ppca", "--data", "nope", "--out", "/tmp/x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ppdgm.cli", "fit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--data" in r.stdout


def test_a_familys_suggested_engine_settings_apply_and_flags_override_them(tmp_path):
    from ppdgm.models.rbm import RBM

    suggested = RBM.engine_config
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(tmp_path / "a"), "--steps", "3"]) == 0
    config = ppdgm.load(tmp_path / "a").config
    assert {k: config[k] for k in suggested} == suggested
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(tmp_path / "b"), "--steps", "3",
                 "--lr", "0.5", "--engine-opt", "optim=sgd"]) == 0
    config = ppdgm.load(tmp_path / "b").config
    assert config["lr"] == 0.5 and config["optim"] == "sgd" and config["lr_schedule"] == suggested["lr_schedule"]
