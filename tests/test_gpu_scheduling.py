"""GPU scheduling on a real Ray cluster with logical GPUs (no CUDA needed).

A simulated two-node cluster shaped like ``cluster.yaml``: a CPU-only head (2 CPUs) and one GPU
node (1 CPU, 2 logical GPUs, ``ray.cluster_utils.Cluster``). The jobs' planners read this cluster's
real resources and nodes; requests it cannot hold are refused in one line; requests it can hold
are scheduled onto the GPU node, where torch (a CPU build here) sees no CUDA device, which the
jobs report in one line before any training or inference starts. The same jobs on real GPUs are
exercised on a lent GPU machine (see README, "GPU").
"""

from __future__ import annotations

import pytest
import torch

from unet.runtime import UsageError, local_ray_options
from unet.training import TrainConfig, fit

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only-torch path")]


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0,
                                                             "include_dashboard": False})
    try:
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=local_ray_options()["runtime_env"])
        yield gpu_node.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(data=str(tmp_path / "data"), storage=str(tmp_path / "runs"), name="gpu", use_gpu=True,
                  workers=2, epochs=1, model_kwargs={"channels": [4, 8]})
    values.update(overrides)
    return TrainConfig.from_dict(values, source="test")


def test_cluster_reports_its_logical_gpus(gpu_cluster):
    import ray

    assert ray.cluster_resources()["GPU"] == 2
    gpus = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}
    assert gpus[gpu_cluster] == 2 and sum(gpus.values()) == 2


def test_train_more_gpu_workers_than_gpus_is_refused(gpu_cluster, tmp_path):
    with pytest.raises(UsageError, match=r"3 worker\(s\) x 1 GPU = 3 GPU, but the cluster has 2 GPU"):
        fit(_train_config(tmp_path, workers=3))


def test_train_gpu_workers_that_do_not_fit_the_gpu_node_are_refused(gpu_cluster, tmp_path):
    # 2 GPU workers x 1 CPU need 2 CPUs on the GPU node, which has 1: Ray would wait forever.
    with pytest.raises(UsageError, match=r"cluster too fragmented: 2 worker\(s\) of \{'CPU': 1.0, 'GPU': 1.0\}"):
        fit(_train_config(tmp_path))


def test_train_gpu_workers_are_scheduled_on_the_gpu_node_and_cpu_torch_fails_fast(gpu_cluster, tmp_path):
    with pytest.raises(UsageError) as info:
        fit(_train_config(tmp_path, cpus_per_worker=0.5))
    message = str(info.value)
    assert message.startswith("--use-gpu: Ray gave the task GPU ") and "sees no CUDA device" in message
    assert f"node {gpu_cluster[:8]}" in message, message     # placed on the GPU node, not the head
    assert "\n" not in message


def test_infer_gpu_actors_refused_or_scheduled_on_the_gpu_node(gpu_cluster, tmp_path):
    from unet import inference as inf
    from unet.artifact import save_artifact
    from unet.models import build_model

    model = save_artifact(build_model("unet", channels=(4, 8)), tmp_path / "model", architecture="unet",
                          model_kwargs={"channels": [4, 8]}, input_size=(32, 32),
                          normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)
    (tmp_path / "in").mkdir()

    def run(**kw):
        inf.run_inference(inf.InferenceConfig(model=str(model), input=str(tmp_path / "in"),
                                              output=str(tmp_path / "out"), **kw))

    with pytest.raises(UsageError, match=r"--workers 3 x --gpus-per-worker 1 needs 3 GPUs but the Ray cluster has 2"):
        run(workers=3, gpus_per_worker=1, cpus_per_worker=0.25)
    with pytest.raises(UsageError, match=rf"--gpus-per-worker: Ray gave the task GPU \d on node {gpu_cluster[:8]}"):
        run(workers=2, gpus_per_worker=1, cpus_per_worker=0.25)
