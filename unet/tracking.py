"""Experiment tracking with MLflow for training runs: ``python -m jobs.train --mlflow [URI]``.

:func:`start` opens one MLflow run per training run (its name is the run name, its tag
``unet.run_uri`` the run directory) and logs the resolved config as params; every epoch's metrics
(rank 0's record: train loss, validation Dice/IoU, lesion Dice, gate metrics, ...) at
``step=epoch``; at the end the exported model directory as the run's artifacts ``model/``.

Where: ``--mlflow URI`` is any MLflow tracking URI (``http(s)://`` server, ``file:`` store, a plain
path = a file store). ``--mlflow`` alone uses ``$MLFLOW_TRACKING_URI`` if set, else the file store
``./mlruns`` (MLflow's classic default, made absolute when the config is resolved). The experiment
is ``$MLFLOW_EXPERIMENT_NAME``, else ``unet``. Running the same command again (resume, re-export)
continues the MLflow run of that run directory.

Tracking never decides the fate of training. MLflow stays out of the Ray workers: the Ray Train
controller hands each reported epoch to a queue (:class:`EpochReporter`, no MLflow there), and a
thread of the driver makes every MLflow call. The first MLflow error (server down, bad URI, ...)
logs one warning line and switches tracking off for the rest of the run; training goes on. The
driver waits for MLflow only at the end (for the artifact upload), for at most the client's own
retries: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` bound it.

MLflow is an optional dependency (``pip install 'unet-ray[tracking]'``, i.e. ``mlflow-skinny``).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ray.train import UserCallback

from unet import storage
from unet.runtime import UsageError

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_STORE", "EpochReporter", "INSTALL_HINT", "MlflowRun", "NoRun", "RUN_TAG",
           "epoch_metrics", "flatten_params", "resolve_uri", "start"]

logger = logging.getLogger("unet.tracking")

DEFAULT_STORE = "mlruns"     # --mlflow without a value and without $MLFLOW_TRACKING_URI: ./mlruns
DEFAULT_EXPERIMENT = "unet"  # unless $MLFLOW_EXPERIMENT_NAME names another
RUN_TAG = "unet.run_uri"     # the run directory: the same run directory continues the same MLflow run
INSTALL_HINT = "pip install 'unet-ray[tracking]' (or: pip install mlflow-skinny)"
_NOT_METRICS = ("epoch", "start_epoch")  # the step, and bookkeeping


def resolve_uri(value: str | bool | None) -> str | None:
    """The tracking URI for the ``mlflow`` setting: None/False = off; True/"" = ``$MLFLOW_TRACKING_URI``
    or ``file:<cwd>/mlruns``; a plain path = a file store there (absolute); any other URI as given."""
    if value is None or value is False:
        return None
    if value is True or not str(value).strip():
        value = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    value = str(value).strip()
    if value.startswith("file:"):
        path = value[len("file:"):]
        return value if path.startswith("//") else "file:" + os.path.abspath(os.path.expanduser(path))
    if ":" in value or value == "databricks":
        return value  # http(s)://, databricks, sqlite:///... : MLflow's to interpret
    return "file:" + os.path.abspath(os.path.expanduser(value))


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model_kwargs": {"channels": [4, 8]}}`` -> ``{"model_kwargs.channels": "[4, 8]"}`` (MLflow params
    are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten_params(value, prefix=f"{name}.")
        else:
            out[name] = str(value)
    return out


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one epoch's record that MLflow can plot (finite ints/floats, not the epoch)."""
    return {k: float(v) for k, v in record.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class EpochReporter(UserCallback):
    """Runs in the Ray Train controller: puts rank 0's metrics of each report into the driver's
    queue. All ranks report the same (already reduced) record; rank 0's is the one logged."""

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        try:
            self.queue.put_nowait(("epoch", dict(metrics[0])))
        except Exception:  # noqa: BLE001 - tracking must never fail the run; the controller's log keeps it
            logger.exception("could not hand epoch metrics to the MLflow thread")


class NoRun:
    """Tracking off: the same methods as :class:`MlflowRun`, doing nothing."""

    callbacks: tuple = ()

    def finish(self, artifact: str | None = None, history: Iterable[Mapping[str, Any]] = ()) -> None:
        pass

    def close(self) -> None:
        pass


class MlflowRun:
    """One MLflow run for one training run, written by a driver thread (see the module docstring).

    ``callbacks``: for ``RunConfig(callbacks=...)``; :meth:`finish` logs the artifact (and the epochs
    this process did not see, for a run that gets its first MLflow run now) and ends the run
    FINISHED; :meth:`close` ends it FAILED unless finished, and waits for the thread.
    """

    def __init__(self, uri: str, *, experiment: str, run_name: str, run_uri: str, params: Mapping[str, str],
                 tags: Mapping[str, str]):
        from ray.util.queue import Queue

        self.uri, self.experiment, self.run_name, self.run_uri = uri, experiment, run_name, run_uri
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callbacks = [EpochReporter(self.queue)]
        self.run_id: str | None = None
        self._client = None
        self._on = True            # False after the first MLflow failure
        self._new = False          # this process created the MLflow run (vs. continued one)
        self._logged: set[int] = set()
        self._finished = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, args=(dict(params), dict(tags)),
                                        name="unet-mlflow", daemon=True)
        self._thread.start()

    # -- driver side --------------------------------------------------------------------------

    def finish(self, artifact: str | None = None, history: Iterable[Mapping[str, Any]] = ()) -> None:
        """Log the model artifact directory, backfill ``history`` into a new MLflow run, end it FINISHED."""
        self._finished = True
        self.queue.put(("history", [dict(r) for r in history]))
        if artifact:
            self.queue.put(("model", artifact))
        self.close()

    def close(self) -> None:
        """End the run (FAILED unless :meth:`finish` came first) and wait for the thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self.queue.put(("end", "FINISHED" if self._finished else "FAILED"))
        except Exception as e:  # noqa: BLE001 - Ray went first (the run's own error is on its way): don't mask it
            logger.warning("MLflow run %s left open: its queue is gone (%s)", self.run_id, type(e).__name__)
            return
        self._thread.join()
        self.queue.shutdown()

    # -- the thread ---------------------------------------------------------------------------

    def _work(self, params: dict[str, str], tags: dict[str, str]) -> None:
        self._call("start", self._start, params, tags)
        while True:
            kind, value = self.queue.get()
            if kind == "end":
                self._call("end run", lambda: self._client.set_terminated(self.run_id, status=value))
                return
            if kind == "epoch":
                self._call(f"epoch {value.get('epoch')}", self._log_epoch, value)
            elif kind == "history" and self._new:
                for record in value:
                    if int(record["epoch"]) not in self._logged:
                        self._call(f"epoch {record['epoch']}", self._log_epoch, record)
            elif kind == "model":
                self._call("model artifact", self._log_model, value)

    def _call(self, what: str, fn, *args) -> None:
        """Run one MLflow step unless tracking is off; the first failure warns once and turns it off."""
        if not self._on:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - MLflow/requests/OS errors alike: tracking must not fail training
            message = " ".join(str(e).split())
            logger.warning("MLflow tracking at %s failed (%s: %s: %s); training goes on without it",
                           self.uri, what, type(e).__name__, message[:300] + ("..." if len(message) > 300 else ""))
            self._on = False

    def _start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        if self.uri.startswith("file:"):
            # MLflow 3.x keeps its file store in maintenance mode and refuses it unless asked;
            # it is what a local `--mlflow` means (no database to set up).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=self.uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
        previous = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{self.run_uri}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if previous:  # the same run directory: continue its MLflow run (params stay those of its start)
            run = previous[0]
            client.update_run(run.info.run_id, status="RUNNING")
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            run = client.create_run(experiment_id, run_name=self.run_name, tags={**tags, RUN_TAG: self.run_uri})
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run.info.run_id, params=items[i:i + 100])
            self._new = True
        self._client, self.run_id = client, run.info.run_id
        where = (f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
                 if self.uri.startswith(("http://", "https://")) else self.uri)
        logger.info("MLflow run %s (%s, experiment %r): %s", self.run_id,
                    "new" if self._new else "continued", self.experiment, where)

    def _log_epoch(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        epoch, now = int(record["epoch"]), int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in epoch_metrics(record).items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self._logged.add(epoch)

    def _log_model(self, artifact: str) -> None:
        if not storage.is_s3(artifact):
            self._client.log_artifacts(self.run_id, artifact, artifact_path="model")
            return
        with tempfile.TemporaryDirectory() as tmp:  # MLflow uploads from local files
            root = artifact.rstrip("/")
            for uri in storage.iter_files(root):
                local = os.path.join(tmp, *uri[len(root) + 1:].split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(uri))
            self._client.log_artifacts(self.run_id, tmp, artifact_path="model")


def start(cfg, *, command: str | None = None) -> MlflowRun | NoRun:
    """The MLflow run for the resolved ``TrainConfig`` ``cfg`` (:class:`NoRun` when ``cfg.mlflow`` is
    off). Needs Ray initialised (the epoch queue is a Ray actor). Without MLflow installed: one
    :class:`UsageError` line saying what to install."""
    if not cfg.mlflow:
        return NoRun()
    try:
        import mlflow  # noqa: F401 - only to check it is there before training starts
    except ImportError as e:
        raise UsageError(f"--mlflow needs MLflow's client, which is not installed: {INSTALL_HINT}") from e
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    tags = {"unet.command": (command or "")[:5000], "mlflow.source.name": "jobs.train"}
    return MlflowRun(resolve_uri(cfg.mlflow), experiment=experiment, run_name=cfg.name, run_uri=cfg.run_uri,
                     params=flatten_params(cfg.to_dict()), tags=tags)
