"""How many CPUs/GPUs each Train worker asks for, and how much CPU stays free for Ray Data.

On a 2-CPU machine, two workers asking 1 CPU each leave Ray Data nothing to schedule its
read/decode tasks on and the first epoch waits forever; the plan gives workers a fraction instead
and refuses up front (one clear line) when the cluster cannot hold the request.

On an autoscaling cluster (node types known, :mod:`unet.autoscaling`) the plan is sized from the
job's request and the node types the autoscaler can add, not from the nodes that happen to be up
(often none: workers scale from zero); only what no node type can ever hold is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unet.autoscaling import NodeTypes
from unet.runtime import UsageError

from .config import TrainConfig

__all__ = ["ResourcePlan", "plan_resources"]


@dataclass(frozen=True)
class ResourcePlan:
    """What each Train worker reserves and what is left for Ray Data.

    ``torch_threads`` is the intra-op thread count per worker: as many as the CPUs it reserved
    (at least one), so two workers on a 2-CPU box do not each spin up two threads and thrash.
    """

    min_workers: int
    max_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float
    torch_threads: int
    cluster_cpus: float
    cluster_gpus: float
    # Autoscaling clusters: the node types that hold one worker (empty on a fixed cluster).
    node_types: tuple[str, ...] = ()

    @property
    def elastic(self) -> bool:
        return self.max_workers > self.min_workers

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def describe(self) -> str:
        workers = f"{self.min_workers}-{self.max_workers}" if self.elastic else str(self.max_workers)
        where = f"on a cluster of {self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU"
        if self.node_types:
            where = (f"on node type(s) {', '.join(self.node_types)} (autoscaling; "
                     f"{self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU up now)")
        return f"{workers} worker(s) x {self.resources_per_worker()} + {self.data_cpus:g} CPU for Ray Data {where}"


def _round_down(value: float, step: float = 0.01) -> float:
    return math.floor(value / step + 1e-9) * step


def _node_cpus(nodes: Sequence[Mapping[str, float]]) -> list[float]:
    return [float(n.get("CPU", 0.0)) for n in nodes]


def _place_workers(plan: ResourcePlan, nodes: list[dict], strategy: str) -> list[float] | None:
    """Free CPUs per node after placing ``plan.min_workers`` workers the way ``strategy`` would
    (greedy approximation of Ray's placement); None if they do not fit."""
    cpu = [float(n.get("CPU", 0.0)) for n in nodes]
    gpu = [float(n.get("GPU", 0.0)) for n in nodes]
    order = sorted(range(len(nodes)), key=lambda i: -cpu[i])
    used_nodes: list[int] = []

    def fits(i: int) -> bool:
        return cpu[i] >= plan.cpus_per_worker - 1e-9 and gpu[i] >= plan.gpus_per_worker - 1e-9

    for _ in range(plan.min_workers):
        if "SPREAD" in strategy:
            # Next node round-robin that still fits; STRICT_SPREAD never reuses a node.
            candidates = [i for i in order if fits(i) and (i not in used_nodes or strategy == "SPREAD")]
            candidates.sort(key=lambda i: used_nodes.count(i))
        else:
            candidates = [i for i in order if fits(i)]
        if not candidates:
            return None
        i = candidates[0]
        cpu[i] -= plan.cpus_per_worker
        gpu[i] -= plan.gpus_per_worker
        used_nodes.append(i)
    return cpu


def plan_resources(cfg: TrainConfig, cluster: Mapping[str, float],
                   nodes: Sequence[Mapping[str, float]] | None = None,
                   node_types: NodeTypes | None = None) -> ResourcePlan:
    """Size the workers for ``cluster`` (``ray.cluster_resources()``) and check that they fit.

    CPUs per worker, unless given: on GPU runs 1 (the GPU does the work; Ray Data gets the rest for
    decoding and augmentation); on CPU runs an equal share of what is left after ``data_cpus``
    (whole CPUs when the share is >= 1, else a fraction — 0.5 each for 2 workers on 2 CPUs).
    Elastic runs are planned for their maximum size so a grown group still leaves Ray Data room.

    ``nodes`` (per-node resources, e.g. from ``ray.nodes()``) adds placement checks: each worker must
    fit on one node, and after placing them (as ``placement_strategy`` would) one node must keep a
    whole CPU free, because Ray Data's file-listing task asks for 1 CPU.

    ``node_types`` (an autoscaling cluster): see :func:`_plan_on_node_types`. With neither node
    types nor CPUs to share (``check_resources=false`` on an empty cluster) a worker asks for 1 CPU.

    Raises:
        UsageError: the cluster cannot hold ``min_workers`` workers plus ``data_cpus`` — with the
            numbers and what to change. (Ray would otherwise wait for resources forever.)
    """
    low, high = cfg.worker_range
    total_cpu = float(cluster.get("CPU", 0.0))
    total_gpu = float(cluster.get("GPU", 0.0))
    data_cpus = float(cfg.data_cpus)
    gpus = float(cfg.gpus_per_worker) if cfg.use_gpu else 0.0
    hint = ("lower --workers or --cpus-per-worker/--data-cpus, or use a bigger cluster "
            "(on an autoscaling cluster: --node-types FILE, or check_resources=false)")
    if node_types is not None:
        return _plan_on_node_types(cfg, total_cpu, total_gpu, nodes or [], node_types)
    if cfg.cpus_per_worker is not None:
        cpus = float(cfg.cpus_per_worker)
    elif cfg.use_gpu:
        cpus = 1.0 if total_cpu - data_cpus >= high else _round_down((total_cpu - data_cpus) / high)
    else:
        share = (total_cpu - data_cpus) / high
        cpus = float(math.floor(share)) if share >= 1 else _round_down(share)
    if cpus <= 0 and not cfg.check_resources:
        cpus = 1.0  # nothing up to share and no node types known: what a Ray worker asks by default
    plan = ResourcePlan(low, high, cpus, gpus, data_cpus, max(1, int(cpus)), total_cpu, total_gpu)
    if not cfg.check_resources:
        return plan
    if cpus <= 0:
        raise UsageError(f"cluster too small: {total_cpu:g} CPU cannot hold {low} training worker(s) "
                         f"plus {data_cpus:g} CPU for Ray Data; {hint}")
    need_cpu = low * cpus + data_cpus
    if need_cpu > total_cpu + 1e-9:
        raise UsageError(f"cluster too small: {low} worker(s) x {cpus:g} CPU + {data_cpus:g} CPU for "
                         f"Ray Data = {need_cpu:g} CPU, but the cluster has {total_cpu:g} CPU; {hint}")
    if cfg.use_gpu and low * gpus > total_gpu + 1e-9:
        raise UsageError(f"cluster too small: {low} worker(s) x {gpus:g} GPU = {low * gpus:g} GPU, but the "
                         f"cluster has {total_gpu:g} GPU; lower --workers/--gpus-per-worker or drop --use-gpu")
    if nodes:
        free = _place_workers(plan, [dict(n) for n in nodes], cfg.placement_strategy)
        if free is None:
            raise UsageError(f"cluster too fragmented: {low} worker(s) of {plan.resources_per_worker()} do "
                             f"not fit on its {len(nodes)} node(s) {_node_cpus(nodes)}; {hint}")
        # Ray Data's file-listing task asks for a whole CPU on one node; if the workers leave only
        # fractions scattered over nodes, the first epoch never starts.
        if data_cpus > 0 and max(free) < min(1.0, data_cpus) - 1e-9:
            raise UsageError(f"cluster too fragmented: with {low} worker(s) of {plan.resources_per_worker()} "
                             f"placed {cfg.placement_strategy} on nodes {_node_cpus(nodes)}, no node keeps a "
                             f"whole CPU free for Ray Data (free per node: {[round(f, 2) for f in free]}); "
                             f"use fewer --cpus-per-worker, PACK placement or bigger nodes")
    return plan



def _plan_on_node_types(cfg: TrainConfig, total_cpu: float, total_gpu: float,
                        nodes: Sequence[Mapping[str, float]], types: NodeTypes) -> ResourcePlan:
    """The plan on an autoscaling cluster: sized per worker, independent of what is up now.

    CPUs per worker, unless given: 1 on GPU runs; on CPU runs one worker per node of the largest
    CPU-only node type, leaving ``data_cpus`` of that node to Ray Data (half the node when it has
    fewer than ``data_cpus + 1``). An elastic group (``--workers 2-8``) is sized the same way: it
    starts with the minimum and grows as the autoscaler adds nodes. Refused (when checking):
    a worker no node type holds, a minimum the node types cannot reach, no CPU for Ray Data.
    """
    low, high = cfg.worker_range
    data_cpus = float(cfg.data_cpus)
    gpus = float(cfg.gpus_per_worker) if cfg.use_gpu else 0.0
    if cfg.cpus_per_worker is not None:
        cpus = float(cfg.cpus_per_worker)
    elif cfg.use_gpu:
        cpus = 1.0
    else:
        node_cpu = float(types.largest_cpu(prefer_no_gpu=True).resources.get("CPU", 0.0))
        free = node_cpu - data_cpus
        cpus = float(math.floor(free)) if free >= 1 else _round_down(node_cpu / 2)
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    fitting = types.fitting(bundle) if cpus > 0 else []
    plan = ResourcePlan(low, high, cpus, gpus, data_cpus, max(1, int(cpus)), total_cpu, total_gpu,
                        tuple(t.name for t in fitting) or ("none",))
    if not cfg.check_resources:
        return plan
    if not fitting and not any(_holds_one(n, bundle) for n in nodes):
        raise UsageError(f"no node type can hold one training worker of {bundle}: the autoscaler can add "
                         f"{types.describe()}; lower --cpus-per-worker/--gpus-per-worker or add a bigger "
                         f"node type")
    capacity = types.capacity(bundle, nodes)
    if capacity < low:
        raise UsageError(f"the cluster can never hold {low} training worker(s) of {bundle}: at most "
                         f"{capacity} with the nodes up now plus {types.describe()}; lower --workers or "
                         f"raise max_workers of a node type")
    if data_cpus > 0 and not (types.has_cpu(min(1.0, data_cpus))
                              or any(float(n.get("CPU", 0.0)) >= min(1.0, data_cpus) for n in nodes)):
        raise UsageError(f"no node can give Ray Data a whole CPU: {types.describe()}; add a CPU node type")
    return plan


def _holds_one(node: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(float(node.get(k, 0.0)) >= v - 1e-9 for k, v in bundle.items())
