"""Experiment tracking: an MLflow callback that any engine's ``run(..., callbacks=[...])`` accepts.

:class:`MLflowTracker` records a run in an MLflow store (by default a local SQLite file, no server:
``mlflow ui --backend-store-uri sqlite:///path/mlruns.db`` shows it): the engine's settings and
the model's as params, every step's metrics (loss, validation loss, learning rate, gradient norm;
a sampler's step size and acceptance) as step-indexed metrics, the timing, and the saved fit
folder with its report figures as artifacts. The run's id is written into the fit's folder
(:data:`RUN_FILE`), so a resumed fit continues the same MLflow run and ``ppdgm evaluate`` logs its
held-out numbers into it (:func:`log_evaluation`).

Tracking never costs a fit: the first store error stops tracking with one warning saying why,
and the fit runs on and saves. MLflow is an optional dependency (``pip install ppdgm[track]``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ppdgm.inference.callbacks import Callback

RUN_FILE = "mlflow_run.json"
"""The file in a fit's folder naming its MLflow run (tracking URI and run id)."""

INSTALL_HINT = "pip install ppdgm[track]"
MAX_PARAM_KEY = 250  # MLflow's limits on a param's key and value, and on entities per log_batch
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
NOT_ARTIFACTS = ("checkpoint.pt", RUN_FILE)
"""Files of a fit's folder that are not logged: the resume state, and the run's own pointer."""


class TrackingWarning(UserWarning):
    """Tracking stopped (the fit itself goes on)."""


def require_mlflow():
    """The ``mlflow`` module, or an ImportError that says which extra to install."""
    try:
        import mlflow
    except ImportError:
        raise ImportError(f"experiment tracking needs MLflow, which is not installed: {INSTALL_HINT}") from None
    return mlflow


def default_tracking_uri(out) -> str:
    """``sqlite:///<out>/../mlruns.db``: one store beside the fit folders, shared by their runs."""
    return f"sqlite:///{Path(out).resolve().parent / 'mlruns.db'}"


def flatten_params(settings: dict, prefix: str = "") -> dict[str, str]:
    """Nested ``settings`` as MLflow params: keys joined by dots, values as text, both cut to
    MLflow's limits (a long list is kept whole up to 6000 characters)."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else getattr(value, "__name__", None) or repr(value)
            out[name[:MAX_PARAM_KEY]] = text[:MAX_PARAM_VALUE]
    return out


def _numeric(value) -> float | None:
    """A metric value MLflow stores (numbers, bools, one-element tensors), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if getattr(value, "numel", lambda: 0)() == 1:
        return float(value)
    return None


def _sqlite_problem(uri: str) -> str | None:
    """Why the SQLite file of ``uri`` cannot be written, checked before MLflow retries for seconds."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(unquote(urlparse(uri).path))
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    return None if os.access(folder, os.W_OK) else f"cannot create {path}: {folder} is not writable"


def read_run_file(folder) -> dict | None:
    """``{"tracking_uri", "run_id"}`` of the fit in ``folder`` when it was tracked, else None."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class MLflowTracker(Callback):
    """Log a fit to MLflow: params, step-indexed metrics, timing and the fit folder as artifacts.

    Args:
        tracking_uri: an MLflow tracking URI (default: :func:`default_tracking_uri` of ``out``, or
            MLflow's own default when there is no ``out``).
        out: the fit's folder; the run id is written there so that ``resume=True`` (a resumed fit)
            continues the same run and ``ppdgm evaluate`` logs into it.
        experiment: the MLflow experiment (created beside a SQLite store, artifacts in
            ``mlartifacts/`` next to the database file).
        run_name: the run's name (default: MLflow's).
        params: further settings to record as params (the model's spec, the data), nested dicts
            flattened with dots.
        resume: continue the run named in ``out`` instead of starting one. Metrics already in the
            store are not logged again, and steps the killed run did not flush are filled in from
            the Fit's history at the end, so each step is in the series once.
        log_fit: at ``on_end``, save the Fit and its report into a temporary folder and log them as
            artifacts. A caller that saves the fit itself turns it off and calls :meth:`log_folder`.
        flush_every: metric values gathered before one write to the store.
        warn: called with the one message saying tracking stopped (default: ``warnings.warn``).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        out=None,
        experiment: str = "ppdgm",
        run_name: str | None = None,
        params: dict | None = None,
        resume: bool = False,
        log_fit: bool = True,
        flush_every: int = 200,
        warn=None,
    ):
        if tracking_uri is not None and not isinstance(tracking_uri, str):
            raise TypeError(f"tracking_uri must be a str such as 'sqlite:///runs/mlruns.db', got {tracking_uri!r}")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"params must be a dict, got {type(params).__name__}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        require_mlflow()
        self.out = Path(out) if out is not None else None
        self.tracking_uri = tracking_uri or (default_tracking_uri(out) if out is not None else None)
        self.experiment, self.run_name, self.params = experiment, run_name, dict(params or {})
        self.resume, self.log_fit, self.flush_every = resume, log_fit, flush_every
        self.warn = warn or (lambda message: warnings.warn(message, TrackingWarning, stacklevel=3))
        self.active = os.environ.get("RANK", "0") == "0"  # one process of a torchrun run logs
        self.stopped: str | None = None
        self.client: Any = None
        self.run_id: Any = None
        self._pending: list = []
        self._logged: dict[str, set] = {}

    # -- the store, guarded: the first error stops tracking with one warning ----------------------

    def _guarded(self, what: str, action, *args):
        if not self.active or self.stopped is not None:
            return None
        try:
            return action(*args)
        except Exception as err:
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            self.stopped = f"tracking stopped: could not {what} ({self.tracking_uri}): {reason}"
            self.warn(self.stopped)
            return None

    def _connect(self, config: dict) -> None:
        from mlflow.tracking import MlflowClient

        problem = _sqlite_problem(self.tracking_uri or "")
        if problem:
            raise OSError(problem)
        self.client = client = MlflowClient(self.tracking_uri)
        saved = read_run_file(self.out) if self.resume and self.out is not None else None
        if saved is not None and saved.get("tracking_uri") == self.tracking_uri:
            self.run_id = saved["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            for key in client.get_run(self.run_id).data.metrics:
                self._logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
        else:
            run = client.create_run(self._experiment_id(), run_name=self.run_name)
            self.run_id = run.info.run_id
            if self.out is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / RUN_FILE).write_text(json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id}))
        self._log_params({"engine": config, "model": self.params})

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if (self.tracking_uri or "").startswith("sqlite:///"):  # not MLflow's ./mlruns under the working folder
            location = str(Path(unquote(urlparse(self.tracking_uri).path)).parent / "mlartifacts")
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def _log_params(self, settings: dict) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, v) for k, v in flatten_params(settings).items() if k not in have]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])

    def _queue(self, step: int, values: dict, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            number = _numeric(value)
            name = prefix + key
            seen = self._logged.setdefault(name, set())
            if number is None or step in seen:
                continue
            seen.add(step)
            self._pending.append(Metric(name, number, now, step))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i : i + MAX_METRICS_PER_BATCH])

    # -- the callback ------------------------------------------------------------------------------

    def on_start(self, config: dict) -> None:
        self._guarded("open the MLflow run", self._connect, config)

    def on_step(self, step: int, info: dict) -> None:
        if self.run_id is None or self.stopped is not None:
            return
        self._queue(step, info)
        if len(self._pending) >= self.flush_every:
            self._guarded("log metrics", self._flush)

    def on_validation(self, step: int, metrics: dict) -> None:
        if self.run_id is not None and self.stopped is None:
            self._queue(step, metrics)

    def on_end(self, fit) -> None:
        if self.run_id is None or self.stopped is not None:
            return
        self._queue_history(fit)
        self._queue(
            fit.num_steps,
            {k: v for k, v in fit.timing.items() if _numeric(v) is not None and math.isfinite(v)},
            prefix="timing.",
        )
        self._guarded("log metrics", self._flush)
        if self.log_fit:
            self._guarded("log the fit as artifacts", self._log_fit, fit)
        self._guarded("end the run", self.client.set_terminated, self.run_id)

    def _queue_history(self, fit) -> None:
        """Steps of the Fit's history that were not logged live (those a killed run never flushed)."""
        history, steps = fit.history, fit.num_steps
        val_steps = history.get("val_step") or []
        for key, values in history.items():
            if key == "val_step" or not isinstance(values, list):
                continue
            if val_steps and len(values) == len(val_steps) and key.startswith("val"):
                at = val_steps
            elif len(values) == steps:
                at = range(1, steps + 1)
            else:  # a sampler's per-chain lists, or a metric measured now and then: logged live only
                continue
            for step, value in zip(at, values):
                self._queue(step, {key: value})

    def _log_fit(self, fit) -> None:
        from ppdgm.reports import write_fit_report

        with tempfile.TemporaryDirectory() as folder:
            fit.save(folder)
            write_fit_report(fit, folder)
            self.log_folder(folder)

    def log_folder(self, folder) -> None:
        """Log the files of a saved fit's ``folder`` (fit, tensors, report figures, summary) as
        the run's ``fit/`` artifacts; checkpoints are left out."""
        if self.run_id is None or self.stopped is not None:
            return

        def log():
            root = Path(folder)
            for path in sorted(root.rglob("*")):
                if path.is_file() and path.name not in NOT_ARTIFACTS and not path.name.endswith(".tmp"):
                    where = path.parent.relative_to(root)
                    self.client.log_artifact(self.run_id, str(path), "fit" if where == Path(".") else f"fit/{where}")

        self._guarded("log the fit folder as artifacts", log)


def log_evaluation(folder, result, split: str, warn=None) -> bool:
    """Log an evaluation ``result`` of the fit in ``folder`` into the MLflow run that tracked it.

    ``result`` is a :class:`~ppdgm.evaluate.NatsEstimate` (logged as ``<split>.log_px``,
    ``<split>.log_px_stderr``, ``<split>.nll``) or a dict of sample-quality numbers (``<split>.<name>``).
    Returns whether it was logged: False when the fit was not tracked, or (after one warning) when
    the store cannot be written or MLflow is missing."""
    saved = read_run_file(folder)
    if saved is None:
        return False
    warn = warn or (lambda message: warnings.warn(message, TrackingWarning, stacklevel=2))
    if isinstance(result, dict):
        values = {f"{split}.{k}": v for k, v in result.items()}
    else:
        values = {f"{split}.log_px": result.mean, f"{split}.log_px_stderr": result.stderr, f"{split}.nll": result.nll}
    metrics = {k: float(v) for k, v in values.items() if _numeric(v) is not None}
    try:
        require_mlflow()
        from mlflow.tracking import MlflowClient

        problem = _sqlite_problem(saved["tracking_uri"])
        if problem:
            raise OSError(problem)
        client = MlflowClient(saved["tracking_uri"])
        for key, value in metrics.items():
            client.log_metric(saved["run_id"], key, value)
    except Exception as err:
        warn(
            f"the evaluation was not logged to the fit's MLflow run ({saved['tracking_uri']}): "
            f"{' '.join(str(err).split())[:300]}"
        )
        return False
    return True
