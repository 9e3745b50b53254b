"""cluster.yaml against Ray's own autoscaler schema, and `ray job submit` against a real local cluster.

The job-submission test starts a real head node (`ray start --head --block`, dashboard on
127.0.0.1, random free ports, its own short temp dir, token authentication ON with a token of its
own), submits `python -m jobs.infer` over a few phantom images exactly as docs/operations.md says
(`--runtime-env deploy/runtime_env.yaml`, i.e. the checkout uploaded as working_dir minus the
excludes), waits for it and checks the Parquet output. It stops only the processes it started:
SIGTERM to its own `ray start --block` (which tears down the node it owns), then any survivor by
pid. It never runs `ray stop`, which would kill every Ray on the machine.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pyarrow.dataset as pads
import pytest
import ray
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


# --- cluster.yaml ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_launcher_checks(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_config, schema)  # the file as written
    # What `ray up` does before talking to AWS: merge the provider defaults, then validate.
    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_cluster_yaml_shape_cpu_head_autoscaling_gpus_no_keys_private_dashboard(cluster_config):
    c = cluster_config
    assert c["provider"]["type"] == "aws"
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # CPU head
    gpu_types = {n: t for n, t in types.items() if t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name  # scale from zero
    # Storage/credentials through instance profiles only: no keys anywhere in the file.
    text = (REPO / "cluster.yaml").read_text()
    for forbidden in ("aws_access_key_id", "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AKIA"):
        assert forbidden not in text
    for name, t in types.items():
        assert "IamInstanceProfile" in t["node_config"], name
    # Dashboard not public: bound to localhost on the head, no inbound rule beyond Ray's SSH default.
    start = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert not c["provider"].get("security_group", {}).get("IpPermissions")
    # Token auth on every node, token shipped by file_mounts.
    assert "--env RAY_AUTH_MODE=token" in c["docker"]["run_options"]
    assert "~/.ray/auth_token" in c["file_mounts"]
    # The image is the one deploy/Dockerfile builds, tagged with the project version.
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    assert c["docker"]["image"].endswith(f"/unet-ray:{version}")
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile


# --- a real local cluster and `ray job submit` -------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> list[int]:
    """Pids of all processes below ``pid`` (Linux /proc), so teardown can stop exactly those."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process exited while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _get(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0


class LocalRayHead:
    """A head node owned by this test: started with `ray start --head --block`, stopped by pid."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.token = secrets.token_hex(32)
        gcs, dash, client, agent = _free_ports(4)
        self.address = f"http://127.0.0.1:{dash}"
        # Short path: Ray puts unix sockets under the temp dir and sockets paths max out at 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",  # on, whatever ~/.ray/auth_token or the caller's env say
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in entrypoints = this venv
        }
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--num-cpus={num_cpus}", "--num-gpus=0",
             f"--object-store-memory={300 * 1024**2}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.logs()}")
            if _get(f"{self.address}/api/version", self.token) == 200:
                return
            time.sleep(1.0)
        raise TimeoutError(f"dashboard at {self.address} not up after {timeout_s}s: {self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return (Path(self.temp_dir) / "ray-start.log").read_text()[-3000:]

    def stop(self) -> None:
        children = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` cleans up the node it started
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in children:  # only processes this head spawned, by pid
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def submit(self, *entrypoint: str, timeout_s: float = 420.0) -> subprocess.CompletedProcess:
        """`ray job submit` as documented in docs/operations.md; waits for the job and streams its logs."""
        cmd = [RAY, "job", "submit", "--address", self.address, "--runtime-env", "deploy/runtime_env.yaml",
               "--", *entrypoint]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def ray_head():
    head = LocalRayHead(num_cpus=2)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def infer_inputs(tmp_path_factory) -> dict:
    from unet.artifact import save_artifact
    from unet.models import build_model
    from unet.phantoms import make_phantom

    root = tmp_path_factory.mktemp("submit")
    images = root / "images"
    images.mkdir()
    sizes = {}
    for i, (kind, size) in enumerate([("benign", (40, 56)), ("malignant", (48, 48)), ("normal", (36, 60)),
                                      ("benign", (52, 44))]):
        image, _ = make_phantom(i, kind, size=size)
        cv2.imwrite(str(images / f"img_{i}.png"), image)
        sizes[f"img_{i}"] = size
    torch.manual_seed(0)
    model = build_model("unet", channels=(4, 8)).eval()
    artifact = save_artifact(model, root / "model", architecture="unet", model_kwargs={"channels": [4, 8]},
                             input_size=(32, 32), normalization={"mean": 0.5, "std": 0.25})
    return {"root": root, "images": images, "sizes": sizes, "model": str(artifact)}


@pytest.mark.slow
def test_token_auth_is_enforced(ray_head):
    assert _get(f"{ray_head.address}/api/version", None) == 401
    assert _get(f"{ray_head.address}/api/version", "not-the-token") == 403
    assert _get(f"{ray_head.address}/api/version", ray_head.token) == 200


@pytest.mark.slow
def test_ray_job_submit_infer_writes_parquet(ray_head, infer_inputs):
    out = infer_inputs["root"] / "masks"
    # Submitted, a plain local path is refused at once, in one line: on a real cluster it would name
    # a different folder, or none, on each node.
    refused = ray_head.submit("python", "-m", "jobs.infer", "--model", infer_inputs["model"], "--input",
                              str(infer_inputs["images"]), "--output", str(out))
    assert refused.returncode != 0 and "--input" in refused.stdout
    assert "a local path, but this job was submitted with `ray job submit`" in refused.stdout
    assert not out.exists()
    # file:// says "every node mounts this path", true of this one-machine cluster.
    entrypoint = ["python", "-m", "jobs.infer", "--model", infer_inputs["model"], "--input",
                  f"file://{infer_inputs['images']}", "--output", f"file://{out}", "--workers", "1", "--batch-size", "2"]
    proc = ray_head.submit(*entrypoint)
    assert proc.returncode == 0, f"{shlex.join(entrypoint)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "succeeded" in proc.stdout

    from unet.artifact import load_artifact

    table = pads.dataset(str(out), format="parquet").to_table().to_pandas()
    assert len(table) == len(infer_inputs["sizes"])
    assert set(table["status"]) == {"ok"}
    assert set(table["model_id"]) == {load_artifact(infer_inputs["model"]).model_id}
    for row in table.itertuples():
        stem = Path(str(row.image_id)).stem
        assert (row.height, row.width) == infer_inputs["sizes"][stem]
        mask = cv2.imdecode(np.frombuffer(row.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == infer_inputs["sizes"][stem]
        assert set(np.unique(mask)) <= {0, 255}
        assert row.tumour_pixels == int((mask > 0).sum())


@pytest.mark.slow
def test_ray_job_submit_bad_use_fails_with_one_clear_line(ray_head, infer_inputs):
    """A submitted job that is used wrongly fails with the job's one-line error, not a traceback wall."""
    missing = infer_inputs["root"] / "no-such-prepared"
    proc = ray_head.submit("python", "-m", "jobs.evaluate", "--model", infer_inputs["model"], "--data", str(missing),
                           "--out", str(infer_inputs["root"] / "never"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = {line for line in proc.stdout.splitlines() if line.startswith("jobs.evaluate: error: ")}
    assert len(errors) == 1, proc.stdout[-3000:]
    assert str(missing) in errors.pop()
    assert "exit code 2" in proc.stdout
    assert not (infer_inputs["root"] / "never").exists()
