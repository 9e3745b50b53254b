"""Planning on autoscaling clusters (unet.autoscaling): from the node types, not from what is up.

The fast tests check the plans against ``cluster.yaml``'s node types. The slow one submits
``jobs.train`` and ``jobs.infer`` to a real scale-from-zero cluster: Ray's own fake-node autoscaler
(``ray.cluster_utils.AutoscalingCluster``: real raylets that the autoscaler starts on this machine)
with a head of 0 CPU and worker types shaped like ``cluster.yaml`` (min 0), in logical resources
small enough for a 2-CPU machine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from unet.autoscaling import NodeType, NodeTypes, load_node_types
from unet.runtime import UsageError
from unet.training import TrainConfig, plan_resources

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster_types() -> NodeTypes:
    return load_node_types(str(REPO / "cluster.yaml"))


# --- plans on cluster.yaml's node types, with no worker up -----------------------------------

EMPTY = ({"CPU": 0.0}, [{"CPU": 0.0}])  # cluster.yaml's head: CPU 0, no worker yet


def test_cluster_yaml_node_types_are_read_without_the_head(cluster_types):
    assert {t.name: (dict(t.resources), t.max_workers) for t in cluster_types.types} == {
        "cpu_worker": ({"CPU": 16.0}, 8), "gpu_1x_a10g": ({"CPU": 4.0, "GPU": 1.0}, 8),
        "gpu_4x_a10g": ({"CPU": 48.0, "GPU": 4.0}, 2)}
    assert cluster_types.max_nodes == 16


def test_elastic_cpu_workers_are_sized_per_node_type_not_shared_out_of_nothing(cluster_types):
    plan = plan_resources(TrainConfig(workers="2-8"), *EMPTY, cluster_types)
    # One worker per 16-CPU cpu_worker node, one CPU of it left to Ray Data; starts with 2, grows to 8.
    assert (plan.min_workers, plan.max_workers, plan.cpus_per_worker, plan.torch_threads) == (2, 8, 15.0, 15)
    assert plan.node_types[0] == "cpu_worker"
    assert "2-8 worker(s) x {'CPU': 15.0}" in plan.describe() and "cpu_worker" in plan.describe()


def test_gpu_workers_fit_the_gpu_node_types(cluster_types):
    plan = plan_resources(TrainConfig(workers=4, use_gpu=True), *EMPTY, cluster_types)
    assert plan.resources_per_worker() == {"CPU": 1.0, "GPU": 1.0}
    assert plan.node_types == ("gpu_1x_a10g", "gpu_4x_a10g")


def test_without_node_types_an_unchecked_empty_cluster_never_gets_a_negative_share():
    for cfg in (TrainConfig(workers="2-8", check_resources=False),
                TrainConfig(workers=2, use_gpu=True, check_resources=False)):
        plan = plan_resources(cfg, *EMPTY)
        assert plan.cpus_per_worker == 1.0, cfg.workers  # was (0 - 1) / 8 < 0


@pytest.mark.parametrize("cfg, fragment", [
    (TrainConfig(workers=1, cpus_per_worker=64), "no node type can hold one training worker of {'CPU': 64.0}"),
    (TrainConfig(workers=1, use_gpu=True, gpus_per_worker=8), "{'CPU': 1.0, 'GPU': 8.0}"),
    # 8 x 1 GPU + 2 x 4 GPU within the cluster-wide 16 nodes: 16 GPU workers at most.
    (TrainConfig(workers=17, use_gpu=True), "never hold 17 training worker(s) of {'CPU': 1.0, 'GPU': 1.0}: at most 16"),
])
def test_only_what_no_node_type_can_ever_hold_is_refused(cluster_types, cfg, fragment):
    with pytest.raises(UsageError) as info:
        plan_resources(cfg, *EMPTY, cluster_types)
    assert fragment in str(info.value) and "cpu_worker {'CPU': 16} x8" in str(info.value)
    plan_resources(TrainConfig(workers=16, use_gpu=True), *EMPTY, cluster_types)  # the limit itself fits


def test_ray_data_needs_a_whole_cpu_somewhere():
    gpu_only = NodeTypes((NodeType("gpu", {"CPU": 0.5, "GPU": 1.0}, 4),), "test")
    with pytest.raises(UsageError, match="no node can give Ray Data a whole CPU"):
        plan_resources(TrainConfig(workers=1, use_gpu=True, cpus_per_worker=0.25), *EMPTY, gpu_only)


def test_node_types_file_errors_are_one_line(tmp_path):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["cpu_worker"]["resources"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(UsageError, match=r"node type 'cpu_worker' names no CPU in its resources"):
        load_node_types(str(bad))
    with pytest.raises(UsageError, match=r"--node-types .*missing.yaml: no such file"):
        load_node_types(str(tmp_path / "missing.yaml"))


@pytest.mark.slow
def test_infer_refuses_actors_no_node_type_can_hold_and_a_pool_beyond_their_limits(tmp_path):
    import ray

    from unet import inference as inf
    from unet.artifact import save_artifact
    from unet.models import build_model
    from unet.runtime import local_ray_options

    model = tmp_path / "model"  # refused right after loading: any small artifact does
    save_artifact(build_model("unet", channels=(4, 8)), model, architecture="unet", model_kwargs={"channels": [4, 8]},
                  input_size=(32, 32), normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)
    (tmp_path / "in").mkdir()

    def run(**kw):
        inf.run_inference(inf.InferenceConfig(model=str(model), input=str(tmp_path / "in"),
                                              output=str(tmp_path / "out"),
                                              node_types=str(REPO / "cluster.yaml"), **kw))

    ray.shutdown()
    ray.init(**local_ray_options(1), log_to_driver=False)
    try:
        with pytest.raises(UsageError, match=r"no node type can hold one model actor of \{'CPU': 1.0, 'GPU': 8.0\}"):
            run(gpus_per_worker=8)
        # 8 x 1 + 2 x 4 GPUs within the cluster-wide 16 nodes, plus the 1-CPU node up now (no GPU).
        with pytest.raises(UsageError, match=r"--workers 17: the cluster can never hold more than 16 model actor"):
            run(workers=17, gpus_per_worker=1)
    finally:
        ray.shutdown()
    assert not (tmp_path / "out").exists()  # refused before anything was written


# --- scale from zero on Ray's fake-node autoscaler -------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_autoscaling_cluster():
    from ray.cluster_utils import AutoscalingCluster

    class PrivateAutoscalingCluster(AutoscalingCluster):
        """``AutoscalingCluster`` that leaves every other Ray of this machine alone.

        The base class runs ``ray stop --force`` (which kills every Ray process on the machine:
        other test sessions, a training run) and listens on the default ports. This one has its
        own GCS port, temp dir and client port, runs ``ray start --block`` in a process group of
        its own, and stops by ending that group: the head, its autoscaler and the raylets the
        autoscaler started.
        """

        def __init__(self, head_resources, worker_node_types, workdir: str):
            self.port, self.workdir = _free_port(), workdir
            super().__init__(head_resources, worker_node_types)

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            # Ray's fake_multi_node/example.yaml, which the base class reads, is not in the wheel;
            # these are its settings, plus this cluster's GCS address for the nodes it adds.
            types = copy.deepcopy(worker_node_types)
            types["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
            return {"cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
                    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                                 "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{self.port}"},
                    "available_node_types": types, "auth": {}, "upscaling_speed": 1.0,
                    "idle_timeout_minutes": 5, "docker": {}, "initialization_commands": [], "setup_commands": [],
                    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
                    "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
                    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}

        @property
        def address(self) -> str:
            return f"127.0.0.1:{self.port}"

        def start(self, _system_config=None, override_env=None):
            config_file = os.path.join(self.workdir, "autoscaling.yaml")
            Path(config_file).write_text(yaml.safe_dump(self._config))
            head = self._head_resources
            cmd = [RAY, "start", "--head", "--block", f"--port={self.port}", f"--autoscaling-config={config_file}",
                   f"--temp-dir={self.workdir}/ray", f"--num-cpus={head.get('CPU', 0)}",
                   f"--num-gpus={head.get('GPU', 0)}", "--include-dashboard=false",
                   f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                   f"--dashboard-port={_free_port()}", "--disable-usage-stats"]
            # RAY_AUTH_MODE=disabled: `ray start` would otherwise switch token authentication on with
            # the token in ~/.ray, which a private loopback test cluster does not need.
            env = os.environ | {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                                "RAY_AUTH_MODE": "disabled"}
            self.log = open(os.path.join(self.workdir, "head.log"), "wb")
            self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            ready = Path(self.workdir, "ray", "ray_current_cluster")  # written once the head is up
            deadline = time.monotonic() + 180
            while not ready.exists():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the test cluster did not start: {Path(self.workdir, 'head.log').read_text()}")
                time.sleep(1)

        def shutdown(self):
            # SIGTERM lets `ray start --block` stop its processes; SIGKILL ends what is left of
            # the group (raylets the autoscaler started share it).
            for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait_s)
                except subprocess.TimeoutExpired:
                    pass
                time.sleep(2)
            self.log.close()

    return PrivateAutoscalingCluster


# Worker types shaped like cluster.yaml (min 0, CPU-only and GPU types), in logical resources a
# 2-CPU machine can start: the CPU type holds one 1-CPU training worker plus one CPU for Ray Data.
FAKE_WORKER_TYPES = {
    "cpu_worker": {"resources": {"CPU": 2, "object_store_memory": 150 * 1024 ** 2}, "node_config": {},
                   "min_workers": 0, "max_workers": 2},
    "gpu_1x_a10g": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * 1024 ** 2},
                    "node_config": {}, "min_workers": 0, "max_workers": 1},
}


@pytest.mark.slow
def test_train_and_infer_submitted_to_a_cluster_with_no_workers_scale_it_up_and_finish(monkeypatch):
    import ray
    import torch
    from PIL import Image

    from unet.artifact import save_artifact
    from unet.models import build_model
    from unet.phantoms import generate

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for this process and the jobs: see start()
    workdir = tempfile.mkdtemp(prefix="unet-as-", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = _private_autoscaling_cluster()({"CPU": 0}, FAKE_WORKER_TYPES, workdir)
    ray.shutdown()
    cluster.start()
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 1 and alive[0]["Resources"].get("CPU", 0) == 0  # the head only: no worker

        work = Path(workdir)
        # jobs.train finds the node types itself, as on a `ray up` head: ~/ray_bootstrap_config.yaml.
        home = work / "home"
        home.mkdir()
        (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(cluster._config))
        # jobs.infer is told them: --node-types FILE (the same YAML).
        node_types = work / "autoscaling.yaml"
        model = save_artifact(build_model("unet", channels=(4, 8)), work / "model", architecture="unet",
                              model_kwargs={"channels": [4, 8]}, input_size=(32, 32),
                              normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)
        images = work / "images"
        images.mkdir()
        for p in generate(4, seed=1, size=(32, 32)):
            Image.fromarray(p.image).save(images / f"{p.id}.png")

        def shared(path) -> str:  # every fake node is this machine: its file system is shared
            return f"file://{path}"

        base_env = os.environ | {"RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
        train = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", "--smoke-test", "--epochs", "1", "--workers", "1-2",
             "--storage", shared(work / "runs"), "--name", "scale-from-zero"],
            cwd=REPO, env=base_env | {"HOME": str(home)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        infer = subprocess.Popen(
            [sys.executable, "-m", "jobs.infer", "--model", shared(model), "--input", shared(images),
             "--output", shared(work / "masks"), "--node-types", str(node_types), "--batch-size", "4"],
            cwd=REPO, env=base_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        train_out, _ = train.communicate(timeout=780)
        infer_out, _ = infer.communicate(timeout=120)
        assert train.returncode == 0, train_out
        assert infer.returncode == 0, infer_out

        # The plans name the node types and are sized from them: one 1-CPU worker per 2-CPU
        # cpu_worker node (its other CPU for Ray Data), not a share of the 0 CPUs up at submit.
        assert ("resources: 1-2 worker(s) x {'CPU': 1.0} + 1 CPU for Ray Data on node type(s) cpu_worker, "
                "gpu_1x_a10g (autoscaling; 0 CPU / 0 GPU up now)") in train_out, train_out
        assert ("resources: 1 model actor(s) x {'CPU': 1.0} + 0.5 CPU for reading and decoding on node type(s) "
                "cpu_worker, gpu_1x_a10g (autoscaling; 0 CPU / 0 GPU up now)") in infer_out, infer_out
        assert "model artifact:" in train_out
        assert json.loads(infer_out.strip().splitlines()[-1])["rows_ok"] == 4

        # The autoscaler added CPU workers of the declared shape, and no GPU node for CPU jobs.
        workers = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        assert workers and all(w["CPU"] == 2 and "GPU" not in w for w in workers), workers

        # A GPU run, even with --no-check-resources, first probes the GPU: the probe brings up a
        # gpu_1x_a10g node from zero, whose (logical) GPU torch cannot use here: one line, exit 2.
        if not torch.cuda.is_available():
            gpu = subprocess.run(
                [sys.executable, "-m", "jobs.infer", "--model", shared(model), "--input", shared(images),
                 "--output", shared(work / "gpu-masks"), "--node-types", str(node_types), "--gpus-per-worker", "1",
                 "--no-check-resources"], cwd=REPO, env=base_env, capture_output=True, text=True, timeout=600)
            assert gpu.returncode == 2, gpu.stdout + gpu.stderr
            assert "error: --gpus-per-worker: Ray gave the task GPU" in gpu.stderr, gpu.stderr
            assert "on node type(s) gpu_1x_a10g" in gpu.stdout, gpu.stdout
            assert any(n["Alive"] and n["Resources"].get("GPU") == 1 for n in ray.nodes())
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
