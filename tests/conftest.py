"""Shared fixtures: a real S3-protocol server on loopback (see ``unet/testing/s3server.py``).

``s3_server`` (session) starts SeaweedFS, or moto's server when ``weed`` is missing
(``UNET_TEST_S3=moto`` forces the fallback); ``s3_env`` points the AWS_* variables at it and
hands out a fresh empty bucket per test.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

# Every Ray this test process starts or joins runs without token authentication, set once before
# any test imports Ray: Ray's client reads the mode once per process, so a test that switched it
# for itself (the private autoscaling cluster) left later in-process clusters, whose servers found
# ~/.ray/auth_token, waiting forever for a token the client never sent. Clusters started with
# `ray start` in subprocesses (tests/test_cluster.py) set their own mode and token explicitly.
os.environ["RAY_AUTH_MODE"] = "disabled"

from unet.testing.s3server import running_s3_server


@pytest.fixture(scope="session")
def s3_server():
    """A running S3-protocol server on 127.0.0.1 (SeaweedFS, else moto); stopped after the session."""
    # UNET_TEST_S3=moto forces the fallback (to check it, or where weed misbehaves).
    with running_s3_server("moto" if os.environ.get("UNET_TEST_S3") == "moto" else "auto") as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point AWS_* at the test server and return a fresh empty bucket URI ``s3://test-<uuid8>``."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def seeded_one_thread():
    """Seed 0 and one intra-op thread: tiny tensors gain nothing from threads, and on a shared 2-CPU
    machine the thread pools of parallel test runs oversubscribe it (measured: 4x slower)."""
    import torch  # here: the other tests' processes need not import it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU local Ray cluster for one test module; workers import this checkout."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    repo = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    # address="local": a new cluster even if another Ray runs on this machine (never join it).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
