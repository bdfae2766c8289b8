"""Every registered family through the whole command-line path, on its first bundled dataset:
fit -> sample -> evaluate -> diagnose -> an interrupted run resumed with --resume.

Parametrized over ``ppdgm.models.MODELS``, so a new family is covered the day it is registered.
Budgets are tiny; ``TINY`` shrinks a few families and their estimators (it is optional: a family
without an entry runs on its defaults).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ppdgm.cli import main
from ppdgm.models import MODELS, model_class

# per family: "set" -> --set (constructor names, one place to rename), "engine" -> --engine-opt,
# "evaluate" -> evaluate --opt (a cheap estimator), "budget" -> fit flags
TINY = {
    "bnn": {
        "set": {"hidden_features": [8]},
        "budget": [],
        "engine": {"num_chains": 4, "num_warmup": 4, "num_samples": 4, "checkpoint_every": 2},
        "sample": 2,
    },  # a BNN draws targets given inputs: `sample -n` is refused in one line
    "rbm": {"evaluate": {"num_runs": 4, "num_betas": 50}},
    "dbm": {"set": {"hidden_units": [16, 8]}, "evaluate": {"num_runs": 4, "num_betas": 50, "num_samples": 4}},
    "mdbm": {"evaluate": {"num_runs": 4, "num_betas": 50}},
    "dbn": {"set": {"hidden_units": [16, 8]}, "evaluate": {"num_runs": 4, "num_betas": 50, "num_samples": 4}},
    "vae": {"evaluate": {"k": 4}},
    "cvae": {"evaluate": {"k": 4}},
    "ssvae": {"evaluate": {"k": 4}},
    "score": {"set": {"num_scales": 20}, "evaluate": {"num_steps": 4}},
    "ebm": {"engine": {"num_chains": 16}},
}
STEPS = ["--steps", "4", "--batch-size", "50", "--checkpoint-every", "2"]


def fit_argv(name, out, budget=None):
    tiny = TINY.get(name, {})
    argv = [
        "fit",
        name,
        "--data",
        model_class(name).datasets[0],
        "--out",
        str(out),
        "--no-progress",
        *(tiny.get("budget", STEPS) if budget is None else budget),
    ]
    for flag, key in (("--set", "set"), ("--engine-opt", "engine")):
        for k, v in tiny.get(key, {}).items():
            argv += [flag, f"{k}={v}".replace(" ", "")]
    return argv


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_family_through_the_user_path(name, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(fit_argv(name, out)) == 0, capsys.readouterr().err
    assert {"fit.json", "tensors.pt"} <= {p.name for p in out.iterdir()}
    code = TINY.get(name, {}).get("sample", 0)
    assert main(["sample", str(out), "-n", "4", "-o", str(tmp_path / "s.png")]) == code, capsys.readouterr().err
    assert code or (tmp_path / "s.png").stat().st_size > 0
    opts = [f"--opt={k}={v}" for k, v in TINY.get(name, {}).get("evaluate", {}).items()]
    assert main(["evaluate", str(out), "--no-progress", *opts]) == 0, capsys.readouterr().err
    assert main(["diagnose", str(out), "--num-samples", "20"]) == 0, capsys.readouterr().err
    capsys.readouterr()

    # an interrupted run: the checkpoint of a shorter run, then --resume to a longer budget
    resumed = tmp_path / "resumed"
    assert main(fit_argv(name, resumed)) == 0
    (resumed / "fit.json").unlink()
    argv = fit_argv(name, resumed)
    if "--steps" in argv:
        argv[argv.index("--steps") + 1] = "6"
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "resuming from" in err and "Traceback" not in err
    assert (resumed / "fit.json").exists()


def test_a_family_runs_from_the_shell_without_a_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ppdgm.cli", *fit_argv("made", tmp_path / "m")], capture_output=True, text=True
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
