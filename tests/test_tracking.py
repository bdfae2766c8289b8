"""Experiment tracking: fits logged to a SQLite MLflow store and read back through MLflow's client."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppdgm.cli import main
from ppdgm.inference import SVI
from ppdgm.inference.chees import ChEES
from ppdgm.tracking import RUN_FILE, MLflowTracker, flatten_params

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402  (after the skip when mlflow is missing)

USER_MODEL = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist, torch

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(x.shape[1]), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)
    """
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: MLflow migrates a new database for seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def normal_mean(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifacts(client, run_id):
    return {a.path for a in client.list_artifacts(run_id, "fit")}


def test_params_are_flattened_within_mlflows_limits():
    flat = flatten_params(
        {"engine": {"lr": 0.01, "optim": "adam"}, "model": {"hidden": [64] * 5000, "act": torch.tanh}}
    )
    assert flat["engine.lr"] == "0.01" and flat["engine.optim"] == "adam" and flat["model.act"] == "tanh"
    assert len(flat["model.hidden"]) == 6000 and flat["model.hidden"].startswith("[64, 64")


def test_a_training_run_is_read_back_with_params_series_and_artifacts(store, tmp_path):
    x = torch.randn(60) + 2.0
    tracker = MLflowTracker(store, out=tmp_path / "fit", params={"name": "normal_mean"}, flush_every=7)
    fit = SVI(num_steps=40, lr=0.05, eval_every=10, progress=False).run(
        normal_mean, None, (x,), val_data=(x[:20],), callbacks=[tracker]
    )
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert json.loads((tmp_path / "fit" / RUN_FILE).read_text())["run_id"] == tracker.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["engine.num_steps"] == "40" and run.data.params["engine.lr"] == "0.05"
    assert run.data.params["model.name"] == "normal_mean"
    loss = sorted(client.get_metric_history(tracker.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, 41))
    np.testing.assert_allclose([m.value for m in loss], fit.history["loss"], rtol=1e-6)
    assert steps_of(client, tracker.run_id, "val_loss") == fit.history["val_step"] == [10, 20, 30, 40]
    assert steps_of(client, tracker.run_id, "lr") == list(range(1, 41))
    assert len(steps_of(client, tracker.run_id, "grad_norm")) == 40
    assert run.data.metrics["timing.steps"] == 40
    assert {"fit/fit.json", "fit/tensors.pt", "fit/loss.png"} <= artifacts(client, tracker.run_id)


def test_a_sampler_logs_step_size_and_acceptance_per_iteration(store, tmp_path):
    tracker = MLflowTracker(store, out=tmp_path / "chees")
    fit = ChEES(num_samples=15, num_warmup=25, num_chains=4, progress=False).run(
        normal_mean, torch.randn(30), callbacks=[tracker]
    )
    client = MlflowClient(store)
    step_size = sorted(client.get_metric_history(tracker.run_id, "step_size"), key=lambda m: m.step)
    assert [m.step for m in step_size] == list(range(1, 41))
    np.testing.assert_allclose([m.value for m in step_size], fit.history["step_size"], rtol=1e-6)
    assert steps_of(client, tracker.run_id, "accept_mean") == list(range(1, 41))
    assert client.get_run(tracker.run_id).data.params["engine.num_chains"] == "4"
    assert "fit/fit.json" in artifacts(client, tracker.run_id)


def test_cli_fit_then_evaluate_log_into_one_run(store, tmp_path, capsys):
    out = tmp_path / "flow"
    assert (
        main(
            [
                "fit",
                "flow",
                "--data",
                "moons",
                "--out",
                str(out),
                "--steps",
                "20",
                "--no-progress",
                "--track",
                "mlflow",
                "--tracking-uri",
                store,
            ]
        )
        == 0
    ), capsys.readouterr().err
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert main(["evaluate", str(out), "--split", "valid", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "logged to the fit's MLflow run" in captured.err
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.params["model.model"] == "flow" and run.data.params["model.data"] == "moons"
    assert run.data.params["model.spec.name"] == "flow"
    assert steps_of(client, run_id, "loss") == list(range(1, 21))
    nll = float(captured.out.split("NLL ")[1].split(",")[0])
    assert run.data.metrics["valid.nll"] == pytest.approx(nll, abs=1e-3)
    assert {"fit/fit.json", "fit/tensors.pt", "fit/loss.png", "fit/samples.png"} <= artifacts(client, run_id)
    assert "fit/checkpoint.pt" not in artifacts(client, run_id)


def test_a_killed_and_resumed_cli_fit_is_one_run_logging_each_step_once(store, tmp_path):
    (tmp_path / "mine.py").write_text(USER_MODEL)
    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(size=(100, 2)).astype("float32"))
    out = tmp_path / "run"
    argv = [
        "fit",
        f"{tmp_path / 'mine.py'}:model",
        "--data",
        str(tmp_path / "d.npy"),
        "--out",
        str(out),
        "--steps",
        "1500",
        "--checkpoint-every",
        "100",
        "--no-progress",
        "--track",
        "mlflow",
        "--tracking-uri",
        store,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppdgm.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / "fit.json").exists()
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: never ended
    before = steps_of(client, run_id, "loss")
    assert before == list(range(1, len(before) + 1)) and len(before) < 1500

    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == run_id
    experiment = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"params.`model.data` = '{tmp_path / 'd.npy'}'")
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert steps_of(client, run_id, "loss") == list(range(1, 1501))
    print(f"killed run logged {len(before)} steps")
    assert "fit/fit.json" in artifacts(client, run_id)


def test_track_without_mlflow_exits_2_with_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    code = main(["fit", "flow", "--data", "moons", "--out", str(tmp_path / "f"), "--steps", "5", "--track", "mlflow"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "pip install ppdgm[track]" in err
    assert not (tmp_path / "f" / "fit.json").exists()


def test_tracking_uri_without_track_is_refused(tmp_path, capsys):
    code = main(["fit", "flow", "--data", "moons", "--out", str(tmp_path / "f"), "--tracking-uri", "sqlite:///x.db"])
    assert code == 2 and "--track mlflow" in capsys.readouterr().err


def test_an_unwritable_store_warns_once_and_the_fit_still_saves(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "f"
    code = main(
        [
            "fit",
            "flow",
            "--data",
            "moons",
            "--out",
            str(out),
            "--steps",
            "10",
            "--no-progress",
            "--track",
            "mlflow",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'a_file' / 'mlruns.db'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and (out / "fit.json").exists() and (out / "loss.png").exists()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tracking stopped" in warnings[0] and "a_file" in warnings[0]
    assert not (out / RUN_FILE).exists()


def test_the_api_tracker_warns_once_through_warnings(tmp_path):
    (tmp_path / "a_file").write_text("")
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'a_file' / 'm.db'}")
    with pytest.warns(UserWarning, match="tracking stopped") as caught:
        fit = SVI(num_steps=5, progress=False).run(normal_mean, None, (torch.randn(10),), callbacks=[tracker])
    assert len(caught) == 1 and fit.num_steps == 5 and tracker.run_id is None


def test_bad_tracker_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="tracking_uri"):
        MLflowTracker(3)
    with pytest.raises(ValueError, match="flush_every"):
        MLflowTracker("sqlite:///x.db", flush_every=0)
