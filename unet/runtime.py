"""Where a job runs: joining or starting Ray, and refusing requests no node can serve.

Used by training (:mod:`unet.training`) and inference (:mod:`unet.inference`) alike, so the same
kind of refusal reads the same and raises the same :class:`UsageError` in both.
"""

from __future__ import annotations

import os

__all__ = ["UsageError", "init_ray", "local_ray_options", "require_cuda"]


class UsageError(Exception):
    """Bad use that is not about one argument's value: e.g. the cluster cannot fit the request."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect the job to its Ray; returns True if this call started (or joined) Ray.

    Order: an already initialised Ray (tests, the demo, notebooks) -> ``address`` (``auto`` = the
    cluster ``ray start`` made on this machine) -> ``$RAY_ADDRESS`` (set by ``ray job submit``) -> a
    new private local Ray with ``num_cpus`` (default: this machine's CPUs). The last one is explicit
    (``address="local"``): plain ``ray.init()`` would silently join any ``ray start`` cluster it
    finds and then ignore ``num_cpus``.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(**local_ray_options(num_cpus))
    return True


def local_ray_options(num_cpus: int | None = None) -> dict:
    """``ray.init`` arguments for a private local Ray. Its workers get this checkout on their
    ``PYTHONPATH`` so ``unet`` and ``jobs`` import there even when the package is not installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"address": "local", "num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}


def require_cuda(gpus: float, flag: str) -> None:
    """Fail fast, in one line, when Ray can schedule GPU work but torch there cannot use a GPU.

    Runs one tiny task that asks Ray for ``gpus`` GPU (as a worker will) and reports what torch
    sees on the node where Ray put it. Ray's GPUs can be logical (``ray start --num-gpus``) or
    the node's torch a CPU build; the run would otherwise fail later, once per retry, inside Ray.
    """
    import ray

    @ray.remote(num_cpus=0, num_gpus=gpus)
    def probe() -> dict:
        import platform

        import torch

        return {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "host": platform.node(),
                "node": ray.get_runtime_context().get_node_id()[:8],
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    seen = ray.get(probe.remote())
    if not seen["cuda"]:
        raise UsageError(f"{flag}: Ray gave the task GPU {', '.join(seen['gpu_ids'])} on node {seen['node']} "
                         f"({seen['host']}), but "
                         f"torch {seen['torch']} there sees no CUDA device; install a CUDA build of torch on "
                         f"the GPU nodes or run without {flag}")
