"""unet.cli.run_main sorts a job's errors: bad use (one line, exit 2), storage/network failures
(one line naming the URI with the retry advice, exit 3), bugs (traceback, exit 1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from unet import storage
from unet.cli import EXIT_STORAGE, EXIT_USAGE, run_main, usage_errors
from unet.runtime import UsageError

REPO = Path(__file__).resolve().parents[1]


def _raising(error: BaseException):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error", [
    UsageError("--workers 9: the cluster has 2 CPUs"),
    FileNotFoundError("config file x.yaml: cannot read it"),
    storage.StorageNotFoundError("cannot read s3://b/x: no such object"),
    storage.BucketNotFoundError("cannot list s3://nope/x: bucket 'nope' does not exist"),
    storage.StoragePermissionError("cannot read s3://b/x: access denied"),
])
def test_bad_use_is_one_line_exit_2(error, capsys):
    assert run_main(_raising(error), [], prog="jobs.x") == EXIT_USAGE
    assert capsys.readouterr().err == f"jobs.x: error: {error}\n"


@pytest.mark.parametrize("error", [
    storage.StorageError("cannot write s3://b/out/part-0.parquet at endpoint http://h:1: AWS Error SLOW_DOWN"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("s3://b/x: read timed out"),
    OSError("When reading information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION"),
])
def test_storage_failure_is_one_line_exit_3_with_retry_advice(error, capsys):
    assert run_main(_raising(error), [], prog="jobs.x") == EXIT_STORAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jobs.x: error: ")
    assert "run the same command again" in err and "storage or network failure" in err


@pytest.mark.parametrize("error", [KeyError("model"), ValueError("shapes (3,) and (4,) not aligned"),
                                   TypeError("unsupported operand"), IndexError("list index out of range")])
def test_anything_else_is_a_bug_with_its_traceback(error):
    with pytest.raises(type(error)):
        run_main(_raising(error), [], prog="jobs.x")


def test_storage_failure_inside_a_ray_task_is_unwrapped(capsys):
    from ray.exceptions import RayTaskError

    cause = storage.StorageError("cannot read s3://b/x: cannot reach endpoint http://127.0.0.1:1")
    wrapped = RayTaskError("read_task", "Traceback (most recent call last):\n  ...\n" * 30, cause).as_instanceof_cause()
    assert run_main(_raising(wrapped), [], prog="jobs.x") == EXIT_STORAGE
    err = capsys.readouterr().err
    assert err.startswith("jobs.x: error: cannot read s3://b/x") and "Traceback" not in err


def test_usage_errors_turns_validator_errors_into_bad_use(capsys):
    def main(argv):
        with usage_errors():
            raise KeyError("unknown model 'x'; valid: unet, attention_unet")

    assert run_main(main, [], prog="jobs.x") == EXIT_USAGE
    assert capsys.readouterr().err == "jobs.x: error: unknown model 'x'; valid: unet, attention_unet\n"
    with pytest.raises(UsageError, match="lr=-1"), usage_errors():
        raise ValueError("lr=-1 must be > 0")
    assert issubclass(UsageError, ValueError)  # validators' callers that catch ValueError still do


def test_unreachable_store_from_the_real_cli_exits_3_naming_the_uri(tmp_path):
    """A real job (jobs.render) against an S3 endpoint where nothing listens: one line, exit 3."""
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.render", "--masks", "s3://bucket/masks", "--to",
                           str(tmp_path / "view")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_STORAGE, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "s3://bucket/masks" in lines[0] and "run the same command again" in lines[0]
