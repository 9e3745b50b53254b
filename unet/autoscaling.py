"""The node types an autoscaling Ray cluster can add, so that jobs plan before their nodes exist.

A cluster whose workers scale from zero (``cluster.yaml``: ``min_workers: 0``) has no worker CPU
when a job is submitted; a plan sized from ``ray.cluster_resources()`` then plans for nothing. The
jobs plan from the node types instead, found in this order:

1. ``--node-types FILE``: a Ray cluster-launcher YAML (its ``available_node_types``; ``cluster.yaml``
   itself works, and so does a small file holding only that mapping, e.g. for KubeRay groups);
2. the cluster config the autoscaler publishes in Ray's GCS, where the platform reports one (Ray
   Data reads the same record for its own autoscaling);
3. ``~/ray_bootstrap_config.yaml`` when the job's driver runs on the head node: ``ray up`` writes
   the cluster's config there, and ``ray job submit`` runs drivers on the head.

None of them: a fixed cluster, planned from what is up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unet.runtime import UsageError

__all__ = ["NodeType", "NodeTypes", "discover_node_types", "load_node_types"]

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# A node type without a limit (GCS max_count -1) is counted as this many nodes.
UNLIMITED = 1000


@dataclass(frozen=True)
class NodeType:
    """One kind of worker node the autoscaler can add: its resources and how many at most."""

    name: str
    resources: Mapping[str, float]
    max_workers: int

    def holds(self, bundle: Mapping[str, float]) -> int:
        """How many ``bundle``-sized workers fit on one node of this type."""
        return _holds(self.resources, bundle)

    def describe(self) -> str:
        shown = {k: (int(v) if float(v).is_integer() else v) for k, v in self.resources.items()
                 if k in ("CPU", "GPU") or not k.startswith(("memory", "object_store", "node:"))}
        return f"{self.name} {shown} x{self.max_workers}"


def _holds(resources: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    counts = [math.floor(float(resources.get(k, 0.0)) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


@dataclass(frozen=True)
class NodeTypes:
    """The worker node types of an autoscaling cluster; ``source`` says where they were read."""

    types: tuple[NodeType, ...]
    source: str
    max_nodes: int | None = None  # the cluster-wide ``max_workers``, if any

    def fitting(self, bundle: Mapping[str, float]) -> list[NodeType]:
        return [t for t in self.types if t.holds(bundle) > 0]

    def capacity(self, bundle: Mapping[str, float], live_nodes: Sequence[Mapping[str, float]] = ()) -> int:
        """The most ``bundle`` workers the cluster can ever hold: the nodes up now plus every node
        the autoscaler may add (best node types first, within the cluster-wide limit)."""
        per_node = sorted(((t.holds(bundle), t.max_workers) for t in self.types), reverse=True)
        left = self.max_nodes if self.max_nodes is not None else UNLIMITED * len(self.types)
        total = sum(_holds(n, bundle) for n in live_nodes)
        for holds, count in per_node:
            take = min(count, left)
            total, left = total + holds * take, left - take
        return total

    def largest_cpu(self, prefer_no_gpu: bool) -> NodeType | None:
        """The type with the most CPUs (among those without GPUs when ``prefer_no_gpu`` and any
        exist): CPU-only jobs should not hold GPU nodes."""
        pool = [t for t in self.types if not t.resources.get("GPU")] if prefer_no_gpu else []
        pool = pool or list(self.types)
        return max(pool, key=lambda t: float(t.resources.get("CPU", 0.0)), default=None)

    def has_cpu(self, cpus: float = 1.0) -> bool:
        return any(float(t.resources.get("CPU", 0.0)) >= cpus - 1e-9 for t in self.types)

    def describe(self) -> str:
        return ", ".join(t.describe() for t in self.types) + f" (from {self.source})"


def load_node_types(path: str) -> NodeTypes:
    """Node types from a cluster-launcher YAML (the head type and types with ``max_workers: 0``
    are left out: they are never added). Each type must name its ``CPU`` (and ``GPU``) in
    ``resources``: Ray fills them in from the instance type only inside ``ray up``."""
    import yaml

    expanded = os.path.expanduser(path)
    try:
        with open(expanded, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise UsageError(f"--node-types {path}: no such file") from e
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--node-types {path}: cannot read it as YAML ({e})") from e
    if not isinstance(config, dict):
        raise UsageError(f"--node-types {path}: expected a mapping with available_node_types")
    types_config = config.get("available_node_types", config)
    head = config.get("head_node_type")
    types = []
    for name, spec in (types_config or {}).items():
        if not isinstance(spec, dict) or name == head:
            continue
        max_workers = int(spec.get("max_workers", 0))
        if max_workers == 0:
            continue
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if "CPU" not in resources:
            raise UsageError(f"--node-types {path}: node type '{name}' names no CPU in its resources; write "
                             f"them out, e.g. resources: {{CPU: 16, GPU: 1}} (Ray fills them in from the "
                             f"instance type only inside `ray up`)")
        types.append(NodeType(name, resources, max_workers))
    if not types:
        raise UsageError(f"--node-types {path}: no worker node type with max_workers > 0 in "
                         f"available_node_types")
    max_nodes = config.get("max_workers") if "available_node_types" in config else None
    return NodeTypes(tuple(types), path, int(max_nodes) if max_nodes is not None else None)


def _from_gcs() -> NodeTypes | None:
    """The cluster config in the GCS (``ray._private.state`` is where Ray Data reads it too)."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the record is a cluster without it
        return None
    if config is None:
        return None
    types = tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                           UNLIMITED if g.max_count == -1 else int(g.max_count))
                  for g in config.node_group_configs if g.max_count != 0 and g.resources)
    return NodeTypes(types, "the cluster config in Ray's GCS") if types else None


def _driver_on_head() -> bool:
    import ray

    here = ray.get_runtime_context().get_node_id()
    return any(n.get("NodeID") == here and "node:__internal_head__" in n.get("Resources", {})
               for n in ray.nodes() if n.get("Alive"))


def discover_node_types(explicit: str | None = None) -> NodeTypes | None:
    """The node types of the cluster this process is connected to (see the module docstring), or
    None on a fixed cluster. Ray must be initialised unless ``explicit`` is given."""
    if explicit:
        return load_node_types(explicit)
    found = _from_gcs()
    if found is not None:
        return found
    bootstrap = os.path.expanduser(BOOTSTRAP_CONFIG)
    if os.path.exists(bootstrap) and _driver_on_head():
        return load_node_types(BOOTSTRAP_CONFIG)
    return None
