"""MLflow tracking of training runs (unet.tracking, ``jobs.train --mlflow``) with MLflow's own client.

Fast tests check how ``--mlflow`` resolves and the missing-client message. Slow tests train tiny
runs on a real local Ray and read back with ``MlflowClient``: a local ``file:`` store (params,
one metric point per epoch, the model artifact; a rerun or a resumed run continues the same MLflow
run, a first MLflow run of a finished training run gets its history backfilled), a real ``mlflow server`` on
loopback (mlflow-skinny's own server: REST API and artifact proxy), a server that never answers
(the driver waits at most the client's timeout), and the CLI with a closed port (one warning line,
training succeeds).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.train import build_parser, config_from_args
from unet import tracking
from unet.runtime import UsageError, local_ray_options
from unet.training import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"channels": [4, 8, 16]}
SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}  # for the CLI test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Fast
# ---------------------------------------------------------------------------------------------

def test_mlflow_flag_resolves_to_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def resolved(*argv: str) -> str | None:
        return config_from_args(build_parser().parse_args(list(argv))).resolved().mlflow

    assert resolved() is None                                            # off by default
    assert resolved("--mlflow") == f"file:{tmp_path}/mlruns"             # alone: ./mlruns, absolute
    assert resolved("--mlflow", "--smoke-test") == f"file:{tmp_path}/mlruns"  # takes no flag as its value
    assert resolved("--mlflow", "runs/ml") == f"file:{tmp_path}/runs/ml"  # a path is a file store
    assert resolved("--mlflow", "file:./x") == f"file:{tmp_path}/x"
    assert resolved("--mlflow", "http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolved("--set", "mlflow=true") == f"file:{tmp_path}/mlruns"
    assert resolved("--mlflow", "--set", "mlflow=false") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolved("--mlflow") == "http://tracking.example:5000"         # MLflow's own variable wins
    with pytest.raises(ValueError, match="mlflow=3 must be a tracking URI"):
        resolved("--set", "mlflow=3")


def test_params_are_the_flattened_config_and_metrics_the_finite_numbers():
    cfg = TrainConfig(model_kwargs={"channels": [4, 8]}, name="x")
    params = tracking.flatten_params(cfg.to_dict())
    assert params["model_kwargs.channels"] == "[4, 8]" and params["lr"] == "0.001"
    assert params["image_size"] == "[128, 128]" and params["mlflow"] == "None"
    assert set(params) >= {"epochs", "batch_size", "loss", "monitor", "seed"}
    record = {"epoch": 3, "train_loss": 0.25, "val_dice": 1, "val_lesion_dice_gated": 0.5, "val_gate_auroc": 0.75,
              "val_false_lesion_rate": float("nan"), "val_counts": [1, 2, 3, 4], "worker_nodes": ["a"],
              "start_epoch": 1, "flag": True}
    assert tracking.epoch_metrics(record) == {"train_loss": 0.25, "val_dice": 1.0, "val_lesion_dice_gated": 0.5,
                                              "val_gate_auroc": 0.75}


def test_mlflow_without_the_client_fails_in_one_line_saying_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a module as not installed
    cfg = TrainConfig(storage=str(tmp_path), mlflow=True).resolved()
    with pytest.raises(UsageError, match=r"^--mlflow needs MLflow's client, which is not installed: "
                                         r"pip install 'unet-ray\[tracking\]'"):
        tracking.start(cfg)


# ---------------------------------------------------------------------------------------------
# Slow: real Ray, real MLflow stores
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()
    ray.init(**local_ray_options(2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    """12 phantoms at 32x32 (all three classes), half train, half val."""
    from unet.prepare import PrepareConfig, prepare

    out = str(tmp_path_factory.mktemp("prepared"))
    prepare(PrepareConfig(source="phantoms", out=out, num=12, seed=3, size=(32, 32), ratios=(0.5, 0.5, 0.0),
                          shard_size=4), command="tests/test_tracking.py")
    return out


def _config(data: str, storage_uri: str, name: str, **overrides) -> TrainConfig:
    values = dict(data=data, storage=storage_uri, name=name, model="unet", model_kwargs=TINY_MODEL,
                  image_size=32, epochs=2, batch_size=4, workers=1, keep=1, max_failures=0)
    return TrainConfig.from_dict(values | overrides, source="test")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _check_run(client, run, cfg: TrainConfig, outcome, epochs: int) -> None:
    """Params = the resolved config, one point per epoch per metric (= the history), the model files."""
    assert run.info.run_name == cfg.name and run.info.status == "FINISHED"
    assert run.data.tags[tracking.RUN_TAG] == outcome.run_uri
    params = run.data.params
    assert params["model_kwargs.channels"] == "[4, 8, 16]" and params["epochs"] == "2"
    assert params["data"] == cfg.data and params["workers"] == "1" and params["image_size"] == "[32, 32]"
    for key in ("train_loss", "val_dice", "val_iou", "val_lesion_dice", "val_false_lesion_rate", "lr"):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(1, epochs + 1)), key
        assert [m.value for m in points] == pytest.approx([r[key] for r in outcome.history]), key
    files = {Path(f.path).name: f for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "model.safetensors"} <= set(files)
    local = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(Path(outcome.run_uri) / "dl"))
    assert Path(local).read_bytes() == (Path(outcome.artifact) / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_file_store_gets_params_epochs_and_model_and_a_rerun_continues_it(
        local_ray, phantom_data, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the job allows the file store itself
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "busi-tests")
    store = f"file:{tmp_path}/mlruns"
    cfg = _config(phantom_data, str(tmp_path / "runs"), "tracked", mlflow=store)
    caplog.set_level("INFO", logger="unet")
    outcome = fit(cfg, command="pytest tracked")
    assert outcome.trained and [r["epoch"] for r in outcome.history] == [1, 2]
    client = _client(store)
    run = _only_run(client, "busi-tests")
    _check_run(client, run, cfg, outcome, epochs=2)
    assert run.data.tags["unet.command"] == "pytest tracked"
    announced = [r.getMessage() for r in caplog.records if r.name == "unet.tracking"]
    assert announced == [f"MLflow run {run.info.run_id} (new, experiment 'busi-tests'): {store}"]

    # The same command again (only re-exports): the same MLflow run, no second copy of the epochs.
    again = fit(cfg, command="pytest tracked again")
    assert not again.trained
    rerun = _only_run(client, "busi-tests")
    assert rerun.info.run_id == run.info.run_id and rerun.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_dice")) == 2
    assert rerun.data.tags["unet.command"] == "pytest tracked again"

    # The finished run tracked for the first time (a new store): its history is backfilled.
    other = f"file:{tmp_path}/other"
    late = fit(TrainConfig.from_dict({**cfg.to_dict(), "mlflow": other}), command="pytest late")
    _check_run(_client(other), _only_run(_client(other), "busi-tests"), cfg, late, epochs=2)


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(local_ray, phantom_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-tests")
    store = f"file:{tmp_path}/mlruns"
    fit(_config(phantom_data, str(tmp_path / "runs"), "resumed", epochs=1, mlflow=store), command="pytest 1")
    more = fit(_config(phantom_data, str(tmp_path / "runs"), "resumed", epochs=2, mlflow=store), command="pytest 2")
    assert more.trained and more.start_epoch == 2
    client = _client(store)
    run = _only_run(client, "resume-tests")  # one MLflow run for the one run directory
    points = sorted(client.get_metric_history(run.info.run_id, "val_dice"), key=lambda m: m.step)
    assert [m.step for m in points] == [1, 2]
    assert [m.value for m in points] == pytest.approx([r["val_dice"] for r in more.history])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "1"  # params: those of its start
    assert run.data.tags["unet.command"] == "pytest 2"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` (mlflow-skinny's) on loopback: file backend, artifacts proxied over HTTP."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"file:{root}/store", "--artifacts-destination", str(root / "artifacts")],
        env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_tracking_server_gets_params_epochs_and_model(local_ray, phantom_data, mlflow_server, tmp_path,
                                                      monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "server-tests")
    cfg = _config(phantom_data, str(tmp_path / "runs"), "served", mlflow=mlflow_server)
    caplog.set_level("INFO", logger="unet")
    outcome = fit(cfg, command="pytest served")
    client = _client(mlflow_server)
    run = _only_run(client, "server-tests")
    _check_run(client, run, cfg, outcome, epochs=2)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    announced = [r.getMessage() for r in caplog.records if r.name == "unet.tracking"]
    assert announced == [f"MLflow run {run.info.run_id} (new, experiment 'server-tests'): "
                         f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"]


@pytest.mark.slow
def test_a_server_that_never_answers_costs_at_most_the_client_timeout(local_ray, tmp_path, monkeypatch, caplog):
    timeout = 8  # long enough that handing the epochs over (a Ray queue actor) is clearly not waiting for it
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    artifact = tmp_path / "model"
    artifact.mkdir()
    (artifact / "config.json").write_text("{}")
    caplog.set_level("INFO", logger="unet")
    with socket.socket() as hole:  # accepts connections (kernel backlog), never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        cfg = TrainConfig(storage=str(tmp_path), name="hole", mlflow=uri).resolved()
        run = tracking.start(cfg, command="pytest hole")
        for epoch in (1, 2, 3):  # what the Ray Train controller does after each report
            run.callbacks[0].after_report(None, [{"epoch": epoch, "train_loss": 1.0 / epoch}], None)
        handed_over = time.time()
        run.finish(str(artifact), [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)])
        finish_s = time.time() - handed_over
    warnings = [r for r in caplog.records if r.name == "unet.tracking" and r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].getMessage().startswith(f"MLflow tracking at {uri} failed (start: ")
    assert warnings[0].getMessage().endswith("training goes on without it")
    assert handed_over < warnings[0].created, "handing epochs over waited for MLflow"
    assert finish_s < timeout + 2.0, f"the end of the run waited {finish_s:.1f}s for a server that never answers"


@pytest.mark.slow
def test_cli_with_an_unreachable_server_trains_with_one_warning_line(tmp_path):
    port = _free_port()  # closed: nothing listens there
    env = {**os.environ, **SHORT_HTTP, "MLFLOW_EXPERIMENT_NAME": "unreachable"}
    env.pop("UNET_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--smoke-test", "--workers", "1", "--num-cpus", "2",
         "--storage", str(tmp_path / "runs"), "--mlflow", f"http://127.0.0.1:{port}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    warnings = [line for line in lines if "MLflow" in line]
    assert len(warnings) == 1, proc.stdout
    assert f"warning: MLflow tracking at http://127.0.0.1:{port} failed (start: " in warnings[0]
    assert sum(" epoch " in f" {line}" and "/2 " in line for line in lines) == 2, proc.stdout
    assert lines[-1].startswith("model artifact: ") and "Traceback" not in proc.stderr
