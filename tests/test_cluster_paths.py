"""Jobs on a cluster (issue 13): local paths refused at once under `ray job submit` or on a
multi-node Ray, drivers that do the work kept off a head without CPUs, and S3 keys never taken from
the command line, so they never reach Ray's job metadata or manifest.json.

The cluster is real: ``ray.cluster_utils.Cluster`` with a head that advertises 0 CPUs, as
``cluster.yaml``'s does, and one 1-CPU worker node. `ray job submit` is the environment variable
Ray's job supervisor sets for every entrypoint (:data:`unet.runtime.SUBMITTED_JOB_ENV`).
"""

from __future__ import annotations

import importlib
import json
import logging

import pytest

from unet import storage
from unet.cli import run_main
from unet.runtime import SUBMITTED_JOB_ENV

JOBS = ("calibrate", "demo", "ensemble", "evaluate", "infer", "prepare", "render", "train")
PHANTOMS = ["--source", "phantoms", "--num", "6", "--size", "32", "--ratios", "2,1,1"]


def _main(job: str):
    return importlib.import_module(f"jobs.{job}").main


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- point 3: shared URIs -----------------------------------------------------------------------

@pytest.mark.parametrize("job, argv, flag", [
    ("prepare", [*PHANTOMS, "--out", "runs/prepared"], "--out"),
    ("train", ["--config", "configs/busi.yaml"], "--data"),  # the laptop config, submitted unchanged
    ("train", ["--config", "configs/busi.yaml", "--data", "s3://b/busi-prepared"], "--storage"),
    ("infer", ["--model", "busi-unet", "--input", "s3://b/images/", "--output", "masks"], "--output"),
    ("evaluate", ["--model", "busi-unet", "--data", "runs/busi_prepared", "--out", "s3://b/eval"], "--data"),
], ids=["prepare", "train-config", "train-storage", "infer", "evaluate"])
def test_submitted_job_refuses_local_paths_at_once(job, argv, flag, monkeypatch, capsys):
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert run_main(_main(job), argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"error: {flag} " in line and "ray job submit" in line and "s3://bucket/prefix" in line


@pytest.mark.slow
def test_submitted_job_with_shared_paths_on_a_node_with_cpus_runs(tmp_path, monkeypatch, capsys):
    """The other side of both checks: submitted, shared URIs, the driver on a node with CPUs (a
    private local Ray, as `--entrypoint-num-cpus` gives on a worker): the job runs."""
    import ray

    ray.shutdown()
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        assert run_main(_main("prepare"), [*PHANTOMS, "--out", f"file://{tmp_path}/out"]) == 0, capsys.readouterr().err
        assert ray.is_initialized()  # it looked at its node
    finally:
        ray.shutdown()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["total"]["total"] == 6


@pytest.fixture(scope="module")
def cpu_less_head_cluster():
    """Head with 0 CPUs (as in cluster.yaml) plus one 1-CPU worker node; this process not yet connected."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_multi_node_cluster_refuses_local_paths_and_takes_shared_ones(cpu_less_head_cluster, tmp_path,
                                                                      monkeypatch, capsys):
    import ray

    monkeypatch.delenv(SUBMITTED_JOB_ENV, raising=False)
    # Joining by address (as `--address`/$RAY_ADDRESS would): the job looks at the cluster first.
    monkeypatch.setenv("RAY_ADDRESS", cpu_less_head_cluster.address)
    assert run_main(_main("train"), ["--data", str(tmp_path / "data"), "--storage", "s3://b/runs"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--data " in line and "Ray cluster of 2 nodes" in line and "s3://" in line
    assert not ray.is_initialized()  # it only looked
    ray.init(address=cpu_less_head_cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    assert run_main(_main("prepare"), [*PHANTOMS, "--out", str(tmp_path / "local")]) == 2
    assert "--out " in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "local").exists()
    # file:// says "every node mounts this path": accepted.
    assert run_main(_main("prepare"), [*PHANTOMS, "--out", f"file://{tmp_path}/shared"]) == 0
    assert (tmp_path / "shared" / "manifest.json").is_file()


# --- point 4: a driver that does the work is not run on a head without CPUs -----------------------

@pytest.mark.slow
@pytest.mark.parametrize("job, argv", [
    ("prepare", [*PHANTOMS, "--out", "s3://bucket/prepared"]),
    ("evaluate", ["--model", "busi-unet", "--data", "s3://bucket/prepared", "--out", "s3://bucket/eval"]),
])
def test_submitted_driver_on_cpu_less_head_is_refused(cpu_less_head_cluster, job, argv, monkeypatch, capsys):
    import ray

    if not ray.is_initialized():
        ray.init(address=cpu_less_head_cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    assert run_main(_main(job), argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"jobs.{job} does its work in the driver" in line and "--entrypoint-num-cpus" in line


# --- point 7: no keys on the command line, no abbreviations --------------------------------------

@pytest.mark.parametrize("job", JOBS)
def test_no_job_accepts_abbreviated_flags(job):
    assert importlib.import_module(f"jobs.{job}").build_parser().allow_abbrev is False


_VALID = {"prepare": [*PHANTOMS, "--out", "o"], "infer": ["--model", "m", "--input", "i", "--output", "o"],
          "render": ["--masks", "m", "--to", "t"]}


@pytest.mark.parametrize("job", sorted(_VALID))
@pytest.mark.parametrize("argv", [["--secret-key", "hunter2"], ["--access-key=AKIAHUNTER2"], ["--sec=hunter2"]])
def test_keys_on_the_command_line_are_refused_without_echoing_them(job, argv, capsys):
    parser = importlib.import_module(f"jobs.{job}").build_parser()
    parser.parse_args(_VALID[job])  # the rest of the command line is fine
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*_VALID[job], *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    if argv[0].startswith("--sec="):  # an abbreviation is no flag at all
        assert "unrecognized arguments" in err
    else:
        assert "not accepted" in err and "AWS_SECRET_ACCESS_KEY" in err and "--credentials-file" in err
        assert "hunter2" not in err.lower()


def test_credentials_file_works_and_manifest_holds_no_secret(s3_env, s3_server, tmp_path, monkeypatch, capsys):
    """Keys from --credentials-file reach the store (SeaweedFS refuses wrong ones) and appear in
    nothing the job records or prints."""
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {s3_server.access_key}\n"
                           f"aws_secret_access_key = {s3_server.secret_key}\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)  # restored after the test, whatever the job sets
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    out = s3_env + "/prepared"
    assert run_main(_main("prepare"), [*PHANTOMS, "--out", out, "--credentials-file", str(credentials)]) == 0
    printed = capsys.readouterr()
    manifest = storage.read_bytes(out + "/manifest.json").decode()
    assert json.loads(manifest)["counts"]["total"]["total"] == 6
    for secret in (s3_server.secret_key, s3_server.access_key):
        assert secret not in manifest and secret not in printed.out and secret not in printed.err
    for uri in storage.iter_files(out, suffixes=".parquet"):
        assert s3_server.secret_key.encode() not in storage.read_bytes(uri)


def test_credentials_file_without_keys_is_one_clear_line(tmp_path, monkeypatch, capsys):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert run_main(_main("prepare"), [*PHANTOMS, "--out", str(tmp_path / "o"),
                                       "--credentials-file", str(tmp_path / "missing")]) == 2
    assert "--credentials-file" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").write_text("[default]\n")
    assert run_main(_main("prepare"), [*PHANTOMS, "--out", str(tmp_path / "o"),
                                       "--credentials-file", str(tmp_path / "empty")]) == 2
    assert "has no aws_access_key_id" in _one_error_line(capsys.readouterr().err)
