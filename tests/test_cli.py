import subprocess
import sys
import textwrap
import warnings

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
    code = main(
        [
            "fit",
            f"{tmp_path / 'mine.py'}:model",
            "--data",
            str(tmp_path / "d.csv"),
            "--out",
            str(out),
            "--steps",
            "400",
            "--lr",
            "0.05",
            "--batch-size",
            "50",
        ]
    )
    assert code == 0
    assert {"fit.json", "tensors.pt", "loss.png", "summary.txt"} <= {p.name for p in out.iterdir()}
    fit = ppdgm.load(out, trust_code=True)
    assert fit.spec["autoguide"] == "AutoNormal"
    loc = fit.param("AutoNormal.locs.loc")
    assert np.allclose(loc.numpy(), data.mean(0), atol=0.15)
    assert "loc" in (out / "summary.txt").read_text()


def test_zoo_fit_sample_evaluate(tmp_path, capsys):
    out = tmp_path / "ppca"
    assert (
        main(
            [
                "fit",
                "ppca",
                "--data",
                "digits",
                "--out",
                str(out),
                "--steps",
                "60",
                "--lr",
                "0.02",
                "--batch-size",
                "200",
                "--set",
                "latent_features=4",
            ]
        )
        == 0
    )
    assert main(["sample", str(out), "-n", "9", "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    assert "nats" in capsys.readouterr().out


def test_a_fitted_rbm_samples_by_continuing_the_chains_of_its_fit(tmp_path):
    import torch

    out = tmp_path / "rbm"
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(out), "--steps", "3"]) == 0
    assert main(["sample", str(out), "-n", "9", "-o", str(tmp_path / "s.png")]) == 0
    fit = ppdgm.load(out)
    chains = fit.extra["tensors"]["chains"]
    assert torch.equal(fit.module.chains, chains)  # what `ppdgm sample` starts from
    draws = fit.module.sample(2 * len(chains), steps=0)
    assert torch.equal(draws.sum(0), 2 * chains.sum(0))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "nomodel", "--data", "digits", "--out", "x"], "unknown model"),
        (["fit", "ppca", "--data", "imagenet", "--out", "x"], "data must be one of"),
        (["fit", "ppca", "--data", "digits", "--out", "x", "--set", "latent_features=0"], "latent_features"),
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
    r = subprocess.run(
        [sys.executable, "-m", "ppdgm.cli", "fit", "ppca", "--data", "nope", "--out", "/tmp/x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ppdgm.cli", "fit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--data" in r.stdout


def test_a_familys_suggested_engine_settings_apply_and_flags_override_them(tmp_path):
    from ppdgm.models.rbm import RBM

    suggested = RBM.engine_config
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(tmp_path / "a"), "--steps", "3"]) == 0
    config = ppdgm.load(tmp_path / "a").config
    assert {k: config[k] for k in suggested} == suggested
    assert (
        main(
            [
                "fit",
                "rbm",
                "--data",
                "digits-binary",
                "--out",
                str(tmp_path / "b"),
                "--steps",
                "3",
                "--lr",
                "0.5",
                "--engine-opt",
                "optim=sgd",
            ]
        )
        == 0
    )
    config = ppdgm.load(tmp_path / "b").config
    assert config["lr"] == 0.5 and config["optim"] == "sgd" and config["lr_schedule"] == suggested["lr_schedule"]


# ---------------------------------------------------------------------------------------------
# one-line errors, exit codes, safe loading, refusals, warnings (issue 12)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _user_fit(tmp_path, code=USER_MODEL, steps="30", lr="0.05", extra=()):
    (tmp_path / "mine.py").write_text(code)
    data = np.random.default_rng(0).normal(loc=[3.0, -1.0], size=(100, 2))
    np.savetxt(tmp_path / "d.csv", data, delimiter=",")
    out = tmp_path / "run"
    argv = [
        "fit",
        f"{tmp_path / 'mine.py'}:model",
        "--data",
        str(tmp_path / "d.csv"),
        "--out",
        str(out),
        "--steps",
        steps,
        "--lr",
        lr,
        "--no-progress",
        *extra,
    ]
    return main(argv), out


def test_an_out_that_is_an_existing_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(tmp_path / "taken"), "--steps", "2"]) == 2
    assert "is an existing file" in _one_line_error(capsys)


def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # what a read-only folder does (tests may run as root)
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(tmp_path / "ro"), "--steps", "2"]) == 2
    err = _one_line_error(capsys)
    assert "not writable" in err and "Permission denied" in err
    assert not (tmp_path / "ro" / "fit.json").exists()


def test_sample_into_an_unwritable_folder_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import tempfile

    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(tmp_path / "r"), "--steps", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(
        tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
    )
    assert main(["sample", str(tmp_path / "r"), "-o", str(tmp_path / "ro" / "s.png")]) == 2
    assert "not writable" in _one_line_error(capsys)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    import ppdgm.fit

    real = ppdgm.fit.atomic_save

    def full(obj, path):
        if str(path).endswith("tensors.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ppdgm.fit, "atomic_save", full)
    out = tmp_path / "r"
    assert (
        main(["fit", "rbm", "--data", "digits-binary", "--out", str(out), "--steps", "2", "--checkpoint-every", "1"])
        == 2
    )
    err = _one_line_error(capsys)
    assert "No space left on device" in err and "kept" in err
    assert (out / "checkpoint.pt").stat().st_size > 0


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_empty_or_truncated_files_are_named_as_such(tmp_path, capsys, content):
    out = tmp_path / "r"
    assert (
        main(["fit", "rbm", "--data", "digits-binary", "--out", str(out), "--steps", "2", "--checkpoint-every", "1"])
        == 0
    )
    capsys.readouterr()
    (out / "checkpoint.pt").write_bytes(content)
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(out), "--steps", "4", "--resume"]) == 2
    err = _one_line_error(capsys)
    assert "checkpoint.pt" in err and ("truncated" in err or "empty" in err) and "other than tensors" not in err
    (out / "tensors.pt").write_bytes(content)
    assert main(["sample", str(out), "-o", str(tmp_path / "s.png")]) == 2
    err = _one_line_error(capsys)
    assert "tensors.pt" in err and ("truncated" in err or "empty" in err)


def test_a_model_file_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
    code, _ = _user_fit(tmp_path, code=USER_MODEL + "\ndef broken(:\n    pass\n")
    assert code == 2
    err = _one_line_error(capsys)
    assert "mine.py:" in err and "syntax error" in err


def test_a_model_error_at_run_time_is_exit_1_with_its_cause_on_one_line(tmp_path, capsys):
    wrong_shape = USER_MODEL.replace("torch.zeros(x.shape[1])", "torch.zeros(x.shape[1] + 1)")
    code, _ = _user_fit(tmp_path, code=wrong_shape)
    assert code == 1
    err = _one_line_error(capsys)
    # Pyro's message ends with a colon; the reason (the shapes that do not broadcast) is on the same line
    assert "model error" in err and "site" in err and "shape" in err.split("site", 1)[1]


def test_a_saved_fit_naming_code_is_not_run_without_the_opt_in(tmp_path, capsys):
    import json

    code, out = _user_fit(tmp_path)
    assert code == 0
    capsys.readouterr()
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.py"
    payload.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef model(x):\n    pass\n")
    meta = json.loads((out / "fit.json").read_text())
    meta["spec"]["function"] = f"{payload}:model"
    (out / "fit.json").write_text(json.dumps(meta))
    for argv in (["diagnose", str(out)], ["sample", str(out)], ["evaluate", str(out)]):
        assert main(argv) == 2
        err = _one_line_error(capsys)
        assert str(payload) in err and "--trust-code" in err
    with pytest.raises(ppdgm.fit.UntrustedCodeError, match="trust_code=True"):
        ppdgm.load(out)
    assert not marker.exists()
    ppdgm.load(out, trust_code=True)
    assert marker.exists()


@pytest.mark.parametrize("flag", [["--lr", "0.1"], ["--steps", "5"], ["--epochs", "1"], ["--batch-size", "10"]])
def test_a_sampler_refuses_training_options(flag, tmp_path, capsys):
    assert main(["fit", "vae", "--engine", "nuts", "--data", "digits-binary", "--out", str(tmp_path / "x"), *flag]) == 2
    err = _one_line_error(capsys)
    assert "takes no option" in err and "svi" in err and "num_samples" in err


def test_unknown_set_keys_list_the_valid_ones(tmp_path, capsys):
    assert main(["fit", "vae", "--data", "digits-binary", "--out", str(tmp_path / "x"), "--set", "z=-3"]) == 2
    err = _one_line_error(capsys)
    assert "'z'" in err and "latent" in err


def test_a_run_that_has_not_converged_warns(tmp_path, capsys):
    # the README's example at its default learning rate: the data mean is far from the prior's 0
    (tmp_path / "mine.py").write_text(USER_MODEL)
    data = np.random.default_rng(0).normal(loc=[3.0, -2.0], size=(200, 2))
    np.savetxt(tmp_path / "d.csv", data, delimiter=",")
    out = tmp_path / "slow"
    assert (
        main(
            [
                "fit",
                f"{tmp_path / 'mine.py'}:model",
                "--data",
                str(tmp_path / "d.csv"),
                "--out",
                str(out),
                "--steps",
                "2000",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "has not converged" in err
    assert "WARNING" in (out / "summary.txt").read_text()
    # the same model at a learning rate that converges does not warn
    assert (
        main(
            [
                "fit",
                f"{tmp_path / 'mine.py'}:model",
                "--data",
                str(tmp_path / "d.csv"),
                "--out",
                str(tmp_path / "fast"),
                "--steps",
                "2000",
                "--lr",
                "0.05",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "has not converged" not in capsys.readouterr().err


def test_resume_says_where_it_starts(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(out), "--steps", "2", "--resume"]) == 0
    assert "starting from scratch" in capsys.readouterr().err
    assert (
        main(
            [
                "fit",
                "rbm",
                "--data",
                "digits-binary",
                "--out",
                str(tmp_path / "c"),
                "--steps",
                "2",
                "--checkpoint-every",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(["fit", "rbm", "--data", "digits-binary", "--out", str(tmp_path / "c"), "--steps", "4", "--resume"]) == 0
    )
    assert "resuming from checkpoint.pt at step 2" in capsys.readouterr().err


def test_help_is_quick_because_it_does_not_import_torch():
    code = (
        "import sys; from ppdgm.cli import parser\n"
        "for argv in (['--help'], ['fit', '--help']):\n"
        "    try: parser().parse_args(argv)\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().endswith("False"), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "ppdgm.cli", "fit", "--help"], capture_output=True, text=True)
    for option in ("--steps", "--lr", "--seed", "--set", "--engine-opt", "--progress", "--resume"):
        assert option in r.stdout
    assert "(default: 0)" in r.stdout  # --seed shows its default


def test_long_estimators_show_progress_on_request_and_stay_quiet_otherwise(tmp_path, capsys):
    out = tmp_path / "rbm"
    assert main(["fit", "rbm", "--data", "digits-binary", "--out", str(out), "--steps", "3", "--no-progress"]) == 0
    capsys.readouterr()
    ais = ["--opt", "num_runs=4", "--opt", "num_betas=50"]
    assert main(["evaluate", str(out), "--progress", *ais]) == 0
    assert "AIS" in capsys.readouterr().err  # the temperatures' bar
    assert main(["evaluate", str(out), "--no-progress", *ais]) == 0
    assert "AIS" not in capsys.readouterr().err


def test_many_chains_of_few_draws_convert_without_arviz_guessing_a_transpose(tmp_path, capsys):
    # ArviZ warns "More chains (16) than draws (5)" on any such array; ppdgm's are (chain, draw) by
    # construction, so the user sees only ppdgm's own convergence warnings
    (tmp_path / "mine.py").write_text(USER_MODEL)
    np.savetxt(tmp_path / "d.csv", np.random.default_rng(0).normal(size=(50, 2)), delimiter=",")
    argv = ["fit", f"{tmp_path / 'mine.py'}:model", "--data", str(tmp_path / "d.csv"), "--engine", "chees"]
    argv += ["--engine-opt", "num_chains=16", "--engine-opt", "num_warmup=20", "--engine-opt", "num_samples=5"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
        assert main(["diagnose", str(tmp_path / "run"), "--trust-code"]) == 0
        ppdgm.load(tmp_path / "run", trust_code=True).to_arviz()
    assert not [w for w in caught if "than draws" in str(w.message)]
    assert "R-hat" in capsys.readouterr().err  # 5 draws: ppdgm's own warning still says so
