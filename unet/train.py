"""Distributed training on Ray Train (V2 ``TorchTrainer``): config, data, loop, checkpoints, export.

The pieces, in the order a reader meets them in a run:

1. :class:`TrainConfig` — every knob of a run, from a YAML/TOML file plus command-line overrides
   (``jobs/train.py`` is the CLI). :meth:`TrainConfig.resolved` fills the defaults that depend on
   other fields (run name, smoke-test sizes).
2. :func:`plan_resources` — how many CPUs/GPUs each Train worker asks for and how much CPU stays
   free for Ray Data. On a 2-CPU machine, two workers asking 1 CPU each leave Ray Data nothing to
   schedule its read/decode tasks on and the first epoch waits forever; the plan gives workers a
   fraction instead and refuses up front (one clear line) when the cluster cannot hold the request.
3. :func:`build_datasets` — the prepared shards (``unet.data.read_split``) as Ray Datasets;
   :class:`SplitValDataConfig` splits ``train`` equally across ranks (DDP needs the same number of
   steps on every rank) and ``val`` *unequally* so that every validation image is scored exactly
   once (an equal split drops rows to even the shards out).
4. :func:`train_loop_per_worker` — runs on every worker: build model/loss/optimiser/scheduler,
   resume from ``ray.train.get_checkpoint()``, then per epoch :func:`train_one_epoch`,
   :func:`validate` (TP/FP/FN counts on every rank, one ``all_reduce``, scores computed once),
   a rank-0 log line (:func:`log_epoch`) and ``ray.train.report`` with a checkpoint.
5. :func:`fit` — the driver: connect to or start Ray, plan resources, resume or skip a finished
   run, ``TorchTrainer.fit()``, and export the best checkpoint (by ``monitor``, default the
   validation Dice) as a model artifact (``unet.artifact.save_artifact``) with the run's
   provenance and training history.

Checkpoints live in ``<storage>/<name>/`` (local or ``s3://``; Ray writes through the pyarrow file
system from :func:`unet.storage.get_filesystem`). Ray keeps the best ``keep`` checkpoints by
``monitor`` (``val_dice``) and always the latest one too (its checkpoint manager never deletes the
latest), so a crash resumes from the last epoch, not the best. Running the same command again (same storage and
name) finds Ray's ``checkpoint_manager_snapshot.json`` there: an unfinished run continues from its
latest checkpoint; a finished one is not trained again — the best checkpoint is re-exported.

Learning-rate schedules are per epoch (linear warm-up, then poly or cosine decay) so that they stay
right when an elastic run changes its worker count, which changes the steps per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.train import DataConfig
from torch import nn

from unet import storage
from unet.cli import UsageError, init_ray, local_ray_options, require_cuda
from unet.data.dataset import check_oversample
from unet.losses import DeepSupervisionLoss, build_loss
from unet.metrics import MetricAccumulator
from unet.models import build_model
from unet.transforms import DEFAULT_MEAN, DEFAULT_STD

__all__ = [
    "CHECKPOINT_FILE",
    "CLASSES",
    "FitOutcome",
    "ResourcePlan",
    "SplitValDataConfig",
    "TrainConfig",
    "build_datasets",
    "build_loss_fn",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "evaluate",
    "fit",
    "export_best",
    "init_ray",
    "load_checkpoint_state",
    "load_config_file",
    "local_ray_options",
    "log_epoch",
    "lr_factor",
    "parse_workers",
    "plan_resources",
    "reduce_metrics",
    "train_loop_per_worker",
    "train_one_epoch",
    "validate",
]

logger = logging.getLogger("unet.train")

CLASSES = ("benign", "malignant", "normal")
CHECKPOINT_FILE = "train_state.pt"  # inside each Ray checkpoint directory (ours, so torch.save is fine)
CHECKPOINT_CONFIG = "config.json"   # the same config, readable without torch
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's index of a run's checkpoints
# Fields that define *what* is trained: resuming a run with different values would silently mix
# two experiments (or fail deep inside load_state_dict), so fit() refuses with a clear message.
IDENTITY_FIELDS = ("data", "model", "model_kwargs", "image_size", "loss", "loss_kwargs")

MODEL_NAMES = ("unet", "attention_unet", "unet_plus_plus")
LOSS_NAMES = ("dice", "bce", "dice_bce")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("poly", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
MONITORS = ("val_dice", "val_dice_per_image", "val_iou", "val_iou_per_image")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# --smoke-test: tiny everything, so the whole distributed path runs in well under a minute.
SMOKE_IMAGE_SIZE = (32, 32)
SMOKE_CHANNELS = [4, 8, 16]
SMOKE_EPOCHS = 2
SMOKE_BATCH_SIZE = 4
SMOKE_PHANTOMS = 24


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def parse_workers(value: int | str) -> tuple[int, int]:
    """``4`` or ``"4"`` -> (4, 4); ``"2-8"`` -> (2, 8) (elastic: Ray Train V2 resizes in between)."""
    text = str(value).strip()
    try:
        if "-" in text:
            low, high = (int(part) for part in text.split("-", 1))
        else:
            low = high = int(text)
    except ValueError as e:
        raise ValueError(f"workers={value!r}: expected a count N or a range N-M, e.g. 2 or 2-8") from e
    if low < 1 or high < low:
        raise ValueError(f"workers={value!r}: need 1 <= N <= M in N-M")
    return low, high


def _parse_size(value: Any) -> tuple[int, int]:
    """``128`` / ``"128"`` / ``"128x160"`` / ``[128, 160]`` -> (height, width)."""
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
    elif isinstance(value, (int, np.integer)):
        parts = [value, value]
    else:
        parts = list(value)
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image_size={value!r}: expected N, HxW or [H, W]") from e
    if h < 8 or w < 8:
        raise ValueError(f"image_size={value!r}: height and width must be >= 8")
    return h, w


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field names are the config-file keys.

    Data and model:
        data: URI of prepared shards (``jobs.prepare`` output: local path or ``s3://``).
        model: ``unet`` | ``attention_unet`` | ``unet_plus_plus``; ``model_kwargs`` go to
            ``unet.models.build_model`` (e.g. ``{"channels": [16, 32, 64, 128, 256]}``).
        image_size: training (height, width); default 128x128 (256 is the GPU choice).
        augment: augment the train split (``unet.data.augment`` defaults).
        oversample: ``{class: n}``: each epoch shows train rows of that class n times, each copy
            augmented differently, e.g. ``{normal: 3}`` against false lesions on normal images.
    Optimisation:
        loss (+ loss_kwargs): ``dice`` | ``bce`` | ``dice_bce``; UNet++ deep supervision is
            handled by wrapping it in ``DeepSupervisionLoss``.
        optimizer: ``adamw`` | ``sgd`` (momentum, Nesterov); lr, weight_decay, momentum.
        schedule: ``poly`` (power ``poly_power``) | ``cosine`` | ``constant``, after
            ``warmup_epochs`` of linear warm-up; stepped once per epoch.
        epochs, batch_size (per worker), val_batch_size (default batch_size), seed.
        amp: ``none`` | ``bf16`` | ``fp16`` (fp16 needs a GPU; bf16 also works on CPU).
    Cluster:
        workers: N, or ``"N-M"`` for an elastic worker group.
        use_gpu, cpus_per_worker (None = planned, see :func:`plan_resources`), gpus_per_worker,
        data_cpus: CPUs left for Ray Data, placement_strategy (``PACK``/``SPREAD``/...),
        max_block_mib: bound Ray Data's read units and blocks of the train split (MiB; see
            :func:`unet.data.read_split`); None = one read task per shard,
        address: Ray cluster to join (default: $RAY_ADDRESS, else start a local Ray),
        num_cpus: CPUs of a local Ray started by this job (default: all of this machine),
        check_resources: refuse early if the cluster cannot hold the request (switch off on an
            autoscaling cluster that grows on demand).
    Output:
        storage: where runs live (local dir or ``s3://bucket/prefix``); ``name``: the run
            (default ``<model>``, or ``smoke-<model>``); the run directory is storage/name.
        export: artifact destination (default storage/name/model).
        keep: best checkpoints kept (by ``monitor``; the latest is kept as well).
        monitor: the validation score that picks the best checkpoint: ``val_dice`` (Dice of the
            counts summed over the split, default), ``val_dice_per_image`` (mean of per-image Dice;
            an empty prediction on a normal image scores 1), ``val_iou``, ``val_iou_per_image``.
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        smoke_test: tiny images/model/epochs, phantom data when ``data`` is not given.
    Fault drills (used by the tests): with ``crash_at_epoch`` set, rank ``crash_rank`` kills its
        process (``os._exit``) at the end of that epoch, before the checkpoint — only while the
        file ``crash_marker`` does not exist yet (it is created first), i.e. on the first attempt.
    """

    data: str | None = None
    model: str = "unet"
    model_kwargs: dict = field(default_factory=dict)
    image_size: tuple[int, int] = (128, 128)
    augment: bool = True
    oversample: dict = field(default_factory=dict)
    loss: str = "dice_bce"
    loss_kwargs: dict = field(default_factory=dict)
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "poly"
    poly_power: float = 0.9
    warmup_epochs: int = 0
    epochs: int = 40
    batch_size: int = 8
    val_batch_size: int | None = None
    seed: int = 0
    amp: str = "none"
    workers: int | str = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 1.0
    data_cpus: float = 1.0
    max_block_mib: float | None = None
    placement_strategy: str = "PACK"
    address: str | None = None
    num_cpus: int | None = None
    check_resources: bool = True
    storage: str = "runs"
    name: str | None = None
    export: str | None = None
    keep: int = 2
    monitor: str = "val_dice"
    max_failures: int = 2
    smoke_test: bool = False
    crash_at_epoch: int | None = None
    crash_rank: int = 1
    crash_marker: str | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping (hyphens in keys allowed); unknown keys raise ``ValueError``."""
        return cls().updated(values, source=source)

    def updated(self, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """A copy with ``values`` applied. Keys may use ``-`` or ``_``; ``a.b`` sets a key inside a
        dict field (``model_kwargs.channels``). Unknown keys raise ``ValueError`` naming ``source``."""
        names = set(self.field_names())
        current = dataclasses.asdict(self)
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            top, _, sub = key.partition(".")
            if top not in names:
                raise ValueError(f"{source}: unknown setting {raw_key!r}; valid settings: "
                                 f"{', '.join(sorted(names))}")
            if sub:
                if not isinstance(current[top], dict):
                    raise ValueError(f"{source}: {raw_key!r}: {top} is not a mapping, so it has no keys")
                current[top] = {**current[top], sub: value}
            else:
                current[top] = value
        return TrainConfig(**current).validated(source)

    def validated(self, source: str = "config") -> TrainConfig:
        """Check every field; returns a normalised copy or raises ``ValueError`` naming the field."""
        where = f"{source}: "
        c = dataclasses.replace(self)

        def choice(name: str, options: Sequence[str], lower: bool = True) -> None:
            value = getattr(c, name)
            value = value.lower() if lower and isinstance(value, str) else value
            if value not in options:
                raise ValueError(f"{where}{name}={getattr(c, name)!r}; choose one of {', '.join(options)}")
            setattr(c, name, value)

        def number(name: str, kind: type, minimum: float, *, allow_none: bool = False,
                   strict: bool = False) -> None:
            value = getattr(c, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number, str)):
                raise ValueError(f"{where}{name}={value!r} must be a number")
            try:
                converted = kind(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}{name}={value!r} must be a {kind.__name__}") from e
            if kind is int and float(value) != converted:
                raise ValueError(f"{where}{name}={value!r} must be a whole number")
            if converted < minimum or (strict and converted == minimum):
                relation = ">" if strict else ">="
                raise ValueError(f"{where}{name}={value!r} must be {relation} {minimum}")
            setattr(c, name, converted)

        def flag(name: str) -> None:
            value = getattr(c, name)
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                value = value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError(f"{where}{name}={value!r} must be true or false")
            setattr(c, name, value)

        choice("model", MODEL_NAMES, lower=False)
        choice("loss", LOSS_NAMES, lower=False)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("amp", AMP_MODES)
        choice("monitor", MONITORS, lower=False)
        c.placement_strategy = str(c.placement_strategy).upper()
        choice("placement_strategy", PLACEMENT_STRATEGIES, lower=False)
        for name in ("model_kwargs", "loss_kwargs"):
            value = getattr(c, name) or {}
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}{name}={value!r} must be a mapping, e.g. {{channels: [16, 32, 64]}}")
            setattr(c, name, json.loads(json.dumps(dict(value))))  # tuples -> lists, JSON-safe
        try:
            c.oversample = check_oversample(c.oversample)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from e
        try:
            c.image_size = _parse_size(c.image_size)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from e
        for name in ("augment", "use_gpu", "check_resources", "smoke_test"):
            flag(name)
        number("lr", float, 0.0, strict=True)
        number("weight_decay", float, 0.0)
        number("momentum", float, 0.0)
        number("poly_power", float, 0.0, strict=True)
        number("warmup_epochs", int, 0)
        number("epochs", int, 1)
        number("batch_size", int, 1)
        number("val_batch_size", int, 1, allow_none=True)
        number("seed", int, 0)
        number("cpus_per_worker", float, 0.0, allow_none=True, strict=True)
        number("gpus_per_worker", float, 0.0, strict=True)
        number("data_cpus", float, 0.0)
        number("max_block_mib", float, 0.0, allow_none=True, strict=True)
        number("num_cpus", int, 1, allow_none=True)
        number("keep", int, 1)
        number("max_failures", int, -1)
        number("crash_at_epoch", int, 1, allow_none=True)
        number("crash_rank", int, 0)
        try:
            low, high = parse_workers(c.workers)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from e
        c.workers = str(low) if low == high else f"{low}-{high}"
        if c.warmup_epochs >= c.epochs and c.warmup_epochs > 0:
            raise ValueError(f"{where}warmup_epochs={c.warmup_epochs} must be < epochs={c.epochs}")
        if c.amp == "fp16" and not c.use_gpu:
            raise ValueError(f"{where}amp=fp16 needs use_gpu (fp16 autocast is a GPU feature); "
                             "use amp=bf16 or none on CPU")
        if c.name is not None and (not str(c.name) or "/" in str(c.name)):
            raise ValueError(f"{where}name={c.name!r} must be a non-empty run name without '/'")
        if c.data is not None:
            c.data = str(c.data)
        return c

    def resolved(self) -> TrainConfig:
        """Apply the smoke-test sizes and the default run name (a copy; idempotent)."""
        c = dataclasses.replace(self)
        if c.smoke_test:
            c.image_size = SMOKE_IMAGE_SIZE
            c.epochs = min(c.epochs, SMOKE_EPOCHS)
            c.batch_size = min(c.batch_size, SMOKE_BATCH_SIZE)
            c.warmup_epochs = min(c.warmup_epochs, c.epochs - 1)
            c.model_kwargs = {"channels": SMOKE_CHANNELS, **c.model_kwargs}
        if c.name is None:
            c.name = f"smoke-{c.model}" if c.smoke_test else c.model
        return c.validated()

    # -- derived ------------------------------------------------------------------------------

    @property
    def worker_range(self) -> tuple[int, int]:
        return parse_workers(self.workers)

    @property
    def run_uri(self) -> str:
        if self.name is None:
            raise ValueError("the run has no name yet; call resolved() first")
        return storage.join(self.storage, self.name)

    @property
    def export_uri(self) -> str:
        return self.export or storage.join(self.run_uri, "model")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what checkpoints, config.json and the artifact provenance store)."""
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict of settings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"config file {path}: cannot read it ({e.strerror or e})") from e
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml/toml parse errors have no common base; re-raised
        raise ValueError(f"config file {path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings at the top level, "
                         f"got {type(values).__name__}")
    return values


# ---------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------

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
        return (f"{workers} worker(s) x {self.resources_per_worker()} + {self.data_cpus:g} CPU for Ray Data "
                f"on a cluster of {self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU")


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
                   nodes: Sequence[Mapping[str, float]] | None = None) -> ResourcePlan:
    """Size the workers for ``cluster`` (``ray.cluster_resources()``) and check that they fit.

    CPUs per worker, unless given: on GPU runs 1 (the GPU does the work; Ray Data gets the rest for
    decoding and augmentation); on CPU runs an equal share of what is left after ``data_cpus``
    (whole CPUs when the share is >= 1, else a fraction — 0.5 each for 2 workers on 2 CPUs).
    Elastic runs are planned for their maximum size so a grown group still leaves Ray Data room.

    ``nodes`` (per-node resources, e.g. from ``ray.nodes()``) adds placement checks: each worker must
    fit on one node, and after placing them (as ``placement_strategy`` would) one node must keep a
    whole CPU free, because Ray Data's file-listing task asks for 1 CPU.

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
            "(check_resources=false skips this check on autoscaling clusters)")
    if cfg.cpus_per_worker is not None:
        cpus = float(cfg.cpus_per_worker)
    elif cfg.use_gpu:
        cpus = 1.0 if total_cpu - data_cpus >= high else _round_down((total_cpu - data_cpus) / high)
    else:
        share = (total_cpu - data_cpus) / high
        cpus = float(math.floor(share)) if share >= 1 else _round_down(share)
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


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

class SplitValDataConfig(DataConfig):
    """Ray's ``DataConfig``, except that ``val`` is split with ``streaming_split(equal=False)``.

    The default (``equal=True``) evens the shards out by dropping rows, which is right for training
    (DDP needs the same number of steps on every rank) but would leave validation images unscored.
    An unequal split hands out whole blocks dynamically: every row goes to exactly one rank.
    """

    def __init__(self, unequal: Sequence[str] = ("val",)):
        super().__init__()
        self.unequal = tuple(unequal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train V2 calls this once per dataset; handle any number anyway.
        output = [{} for _ in range(world_size)]
        regular = {k: v for k, v in datasets.items() if k not in self.unequal}
        if regular:
            shards = super().configure(regular, world_size, worker_handles, worker_node_ids, **kwargs)
            for rank, assigned in enumerate(shards):
                output[rank].update(assigned)
        for name, ds in datasets.items():
            if name not in self.unequal:
                continue
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output


def build_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """``{"train": ..., "val": ...}`` Ray Datasets of model batches from ``cfg.data``.

    ``train`` stays lazy and streams (new shard order and augmentations every epoch). ``val`` is
    decoded once and materialised in the object store: it is small (BUSI: ~100 images, 13 MB at
    128 px) and identical every epoch, so re-reading it would only add a pipeline start per epoch.
    """
    from unet.data import AugmentConfig, read_split

    if not cfg.data:
        raise ValueError("no training data: pass --data URI of prepared shards (jobs.prepare), "
                         "or --smoke-test to generate phantoms")
    if cfg.oversample:
        _check_classes(cfg.data, cfg.oversample)
    size = tuple(cfg.image_size)
    return {
        "train": read_split(cfg.data, "train", size=size,
                            augment=AugmentConfig() if cfg.augment else None,
                            shuffle=True, seed=cfg.seed, max_block_mib=cfg.max_block_mib,
                            oversample=cfg.oversample),
        "val": read_split(cfg.data, "val", size=size).materialize(),
    }


def _check_classes(data: str, oversample: Mapping[str, int]) -> None:
    """A class to oversample that the train split does not have is a typo, not a no-op."""
    from unet.prepare import MANIFEST, read_manifest

    if not storage.exists(storage.join(data, MANIFEST)):
        return
    classes = sorted(k for k in read_manifest(data)["counts"]["train"] if k != "total")
    unknown = sorted(set(oversample) - set(classes))
    if unknown:
        raise ValueError(f"oversample: class(es) {unknown} not in the train split of {data}, which has {classes}")


def make_smoke_data(cfg: TrainConfig) -> str:
    """Write tiny phantom shards for ``--smoke-test`` under the run directory; returns their URI.

    Idempotent: an existing manifest there is reused.
    """
    from unet.prepare import PrepareConfig, prepare

    out = storage.join(cfg.run_uri, "smoke-data")
    if not storage.exists(storage.join(out, "manifest.json")):
        # Small shards: several blocks per split, so both ranks get some of the val split.
        prepare(PrepareConfig(source="phantoms", out=out, num=SMOKE_PHANTOMS, seed=cfg.seed,
                              size=(64, 64), shard_size=4), command="unet.train --smoke-test")
    return out


# ---------------------------------------------------------------------------------------------
# Model, loss, optimiser, schedule
# ---------------------------------------------------------------------------------------------

def build_loss_fn(cfg: TrainConfig) -> nn.Module:
    """The configured loss, wrapped for deep supervision (a no-op for single-output models)."""
    return DeepSupervisionLoss(build_loss(cfg.loss, **cfg.loss_kwargs))


def build_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


def lr_factor(epoch_index: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` during epoch ``epoch_index`` (0-based).

    Linear warm-up over ``warmup_epochs`` (from 1/(warmup+1) up to just below 1), then ``poly``:
    ``(1 - t)^power`` or ``cosine``: ``(1 + cos(pi t)) / 2``, with t the fraction of the decay phase
    already done — so the last epoch still learns (t < 1).
    """
    warm = cfg.warmup_epochs
    if epoch_index < warm:
        return (epoch_index + 1) / (warm + 1)
    if cfg.schedule == "constant":
        return 1.0
    t = (epoch_index - warm) / max(1, cfg.epochs - warm)
    if cfg.schedule == "poly":
        return (1.0 - t) ** cfg.poly_power
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch ``LambdaLR`` for :func:`lr_factor`.

    The factor is a closure, so the scheduler's state dict keeps only its position: a resumed run
    with more ``epochs`` follows the new schedule from where it is.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# One epoch: train, evaluate, reduce
# ---------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_one_epoch(model: nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, cfg: TrainConfig,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[float, int, float]:
    """One pass over this rank's batches; returns (sum of per-image loss, images, seconds spent
    waiting for the next batch) on this rank. A large wait means the input pipeline, not the
    model, sets the pace (give Ray Data more CPUs: ``--data-cpus``)."""
    model.train()
    loss_sum, images, wait_s = 0.0, 0, 0.0
    it = iter(batches)
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        wait_s += time.perf_counter() - t
        if batch is None:
            break
        x = batch["image"].to(device, non_blocking=True)
        y = batch["mask"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(cfg, device):
            out = model(x)
        # The loss in float32: soft Dice sums over whole images, which bf16/fp16 would round badly.
        loss = loss_fn([o.float() for o in out] if isinstance(out, (list, tuple)) else out.float(), y)
        value = float(loss.detach())  # the one host sync per step
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} (batch ids {list(batch['id'])[:4]}...); "
                                     "lower --lr or use --amp none")
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += value * x.shape[0]
        images += x.shape[0]
    return loss_sum, images, wait_s


def new_accumulators() -> dict[str, MetricAccumulator]:
    """One accumulator for all images and one per class."""
    return {"overall": MetricAccumulator(), **{c: MetricAccumulator() for c in CLASSES}}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
             cfg: TrainConfig | None = None) -> dict[str, MetricAccumulator]:
    """Accumulate TP/FP/FN/TN of thresholded predictions (sigmoid > 0.5) on *this rank's* batches.

    Returns accumulators (overall and per class) that still have to be summed across ranks
    (:func:`reduce_metrics`); nothing is averaged per batch.
    """
    model.eval()
    accs = new_accumulators()
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device) > 0.5
        with _autocast(cfg, device) if cfg is not None else contextlib.nullcontext():
            logits = model(x)
        if isinstance(logits, (list, tuple)):  # deep supervision heads: the last is the output
            logits = logits[-1]
        pred = logits.float() > 0  # sigmoid(z) > 0.5  <=>  z > 0
        accs["overall"].update(pred, target)
        classes = np.asarray(batch["class"], dtype=object)
        for cls in np.unique(classes):
            if cls not in CLASSES:
                raise ValueError(f"validation image {batch['id'][int(np.flatnonzero(classes == cls)[0])]!r} "
                                 f"has class {cls!r}; expected one of {CLASSES}")
            idx = torch.as_tensor(np.flatnonzero(classes == cls), device=pred.device)
            accs[cls].update(pred.index_select(0, idx), target.index_select(0, idx))
    return accs


def reduce_metrics(accs: Mapping[str, MetricAccumulator], extra: Sequence[float] = (),
                   device: torch.device | None = None) -> tuple[dict[str, MetricAccumulator], list[float]]:
    """Sum accumulators (and a few extra numbers, e.g. the train loss) over all ranks in ONE
    ``all_reduce``. Without a process group (single process) it returns the inputs."""
    names = list(accs)
    states = [accs[n].state() for n in names]
    vec = np.concatenate(states + [np.asarray(extra, dtype=np.float64)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if device is None or torch.distributed.get_backend() != "nccl":
            device = torch.device("cpu")
        t = torch.from_numpy(vec).to(device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        vec = t.cpu().numpy()
    out, offset = {}, 0
    for n, s in zip(names, states, strict=True):
        out[n] = MetricAccumulator().merge(vec[offset:offset + len(s)])
        offset += len(s)
    return out, vec[offset:].tolist()


def _sync_buffers(model: nn.Module) -> None:
    """Make every rank's BatchNorm running statistics rank 0's.

    DDP broadcasts buffers *before* each training forward, so after the last step every rank holds
    stats updated by its own batch; validating those would score slightly different models per rank.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for buf in _unwrap(model).buffers():
        if buf.is_floating_point() or buf.dtype in (torch.int64, torch.int32):
            torch.distributed.broadcast(buf.data, src=0)


def validate(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
             cfg: TrainConfig | None = None, extra: Sequence[float] = ()
             ) -> tuple[dict[str, MetricAccumulator], list[float]]:
    """Distributed validation: rank 0's weights/buffers on every rank, each rank scores its own
    images, counts summed over ranks. Every rank must call it (it holds collectives)."""
    _sync_buffers(model)
    # The plain module, not DDP: ranks see different numbers of validation batches, and DDP's
    # forward may start collectives (buffer sync) that would then not line up.
    accs = evaluate(_unwrap(model), batches, device, cfg)
    return reduce_metrics(accs, extra, device)


def scores(accs: Mapping[str, MetricAccumulator]) -> dict[str, Any]:
    """Flat metrics for logging/reporting: ``val_dice``/``val_iou`` (from summed counts), their
    per-image means, image count, raw counts, and per-class Dice/IoU."""
    overall = accs["overall"].compute()
    out: dict[str, Any] = {
        "val_dice": overall["dice_micro"],
        "val_iou": overall["iou_micro"],
        "val_dice_per_image": overall["dice_macro"],
        "val_iou_per_image": overall["iou_macro"],
        "val_images": overall["images"],
        "val_counts": [overall["tp"], overall["fp"], overall["fn"], overall["tn"]],
    }
    for cls in CLASSES:
        if accs[cls].state()[4] > 0:
            c = accs[cls].compute()
            out[f"val_dice_{cls}"] = c["dice_micro"]
            out[f"val_dice_per_image_{cls}"] = c["dice_macro"]
            out[f"val_iou_{cls}"] = c["iou_micro"]
            out[f"val_images_{cls}"] = c["images"]
    return out


# ---------------------------------------------------------------------------------------------
# Logging and checkpoints
# ---------------------------------------------------------------------------------------------

def log_epoch(record: Mapping[str, Any], epochs: int) -> None:
    """The one per-epoch log line (call on rank 0 only)."""
    logger.info(
        "epoch %d/%d  loss %.4f  val_dice %.4f (per image %.4f)  val_iou %.4f  lr %.2e  %.1f img/s  "
        "data wait %.0f%%  epoch %.1fs  elapsed %.1fs",
        record["epoch"], epochs, record["train_loss"], record["val_dice"], record["val_dice_per_image"],
        record["val_iou"], record["lr"], record["images_per_s"], 100 * record.get("data_wait", 0.0),
        record["epoch_s"], record["elapsed_s"])


def _setup_worker_logging() -> None:
    # Ray forwards worker stdout to the driver; without a handler logging would drop INFO lines.
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[unet.train] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def load_checkpoint_state(checkpoint, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict saved in a Ray checkpoint by :func:`train_loop_per_worker` (any storage).

    Read straight from the checkpoint's filesystem into memory, not through
    ``Checkpoint.as_directory()``: that shares one download folder per node, and a rank arriving
    after another has finished downloading downloads again over the file the first is reading
    (a resumed group then fails with a "corrupted" checkpoint).
    """
    import io

    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        with checkpoint.filesystem.open_input_file(path) as f:
            data = f.readall()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {checkpoint.path} has no {CHECKPOINT_FILE}; "
                                "it was not written by unet.train") from None
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path}: cannot load {CHECKPOINT_FILE} ({len(data)} bytes): {e}") from e


def _read_checkpoint_config(checkpoint) -> dict[str, Any]:
    """``config.json`` of a checkpoint (the metadata without loading the weights)."""
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_CONFIG}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {checkpoint.path}: cannot read {CHECKPOINT_CONFIG}: {e}") from e


def _gather(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _worker_info(device: torch.device) -> dict[str, Any]:
    import ray

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"node_id": ray.get_runtime_context().get_node_id(), "host": platform.node(),
            "device": device.type, "device_name": name, "torch_threads": torch.get_num_threads()}


def _maybe_crash(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Fault drill (tests): kill this worker process once, at the end of ``crash_at_epoch``."""
    if cfg.crash_at_epoch != epoch or cfg.crash_rank != rank or not cfg.crash_marker:
        return
    marker = Path(cfg.crash_marker)
    if marker.exists():
        return
    marker.write_text(f"rank {rank} crashed at epoch {epoch}\n")
    # Ray's controller collects reports by polling: dying right after a report can lose it (the
    # previous epoch's checkpoint never registered, the restart begins at epoch 1). Wait until every
    # checkpoint reported so far is committed, so the drill tests resume and not that race.
    import ray.train

    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    logger.warning("fault drill: rank %d exits at epoch %d", rank, epoch)
    sys.stdout.flush()
    os._exit(1)


# ---------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------

def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function. ``loop_config = {"train": TrainConfig.to_dict(), "torch_threads": n,
    "command": str}``. Returns (rank 0's value reaches ``Result.return_value``) a small summary."""
    import ray.train
    import ray.train.torch

    _setup_worker_logging()
    cfg = TrainConfig.from_dict(loop_config["train"], source="train_loop_config")
    torch.set_num_threads(int(loop_config.get("torch_threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP broadcasts rank 0's anyway)
    np.random.seed(cfg.seed + rank)

    model = build_model(cfg.model, **cfg.model_kwargs)
    start_epoch, history, hardware, commands = 1, [], None, []
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        model.load_state_dict(state["model"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state.get("history", []))
        commands = list(state.get("commands", []))
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
    loss_fn = build_loss_fn(cfg)
    if loop_config.get("command") and (not commands or commands[-1] != loop_config["command"]):
        commands.append(loop_config["command"])

    workers = _gather(_worker_info(device))
    hardware = {"workers": world, "worker_info": workers,
                "torch_threads": int(loop_config.get("torch_threads", 1)),
                "resources_per_worker": loop_config.get("resources_per_worker")}
    if rank == 0:
        where = f"resuming at epoch {start_epoch}" if state is not None else "starting"
        logger.info("%s: %d worker(s) on %d node(s), device %s, %s", cfg.name, world,
                    len({w["node_id"] for w in workers}), device, where)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    from unet.data import collate_torch

    val_batch_size = cfg.val_batch_size or cfg.batch_size
    elapsed_before = float(history[-1]["elapsed_s"]) if history else 0.0
    attempt_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, collate_fn=collate_torch,
            local_shuffle_buffer_size=max(4 * cfg.batch_size, 64),
            local_shuffle_seed=(cfg.seed * 1_000_003 + epoch * 101 + rank) % (2**31))
        loss_sum, n_images, wait_s = train_one_epoch(model, train_batches, loss_fn, optimizer, device, cfg,
                                                     scaler)
        train_s = time.perf_counter() - t0
        scheduler.step()
        val_batches = val_shard.iter_torch_batches(batch_size=val_batch_size, collate_fn=collate_torch)
        accs, (loss_sum, n_images, train_s_sum, wait_s_sum) = validate(
            model, val_batches, device, cfg, extra=[loss_sum, n_images, train_s, wait_s])
        _maybe_crash(cfg, epoch, rank)
        epoch_s = time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(n_images, 1),
            "train_images": int(n_images),
            "lr": lr,
            # all ranks' images over the mean rank's time spent training
            "images_per_s": n_images / max(train_s_sum / world, 1e-9),
            # share of the training time the ranks spent waiting for input batches
            "data_wait": wait_s_sum / max(train_s_sum, 1e-9),
            "epoch_s": epoch_s,
            "elapsed_s": elapsed_before + (time.perf_counter() - attempt_start),
            **scores(accs),
        }
        history.append(record)
        metrics = {**record, "start_epoch": start_epoch, "world_size": world,
                   "worker_nodes": [w["node_id"] for w in workers]}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "epoch": epoch,
                    "config": cfg.to_dict(),
                    "history": history,
                    "hardware": hardware,
                    "commands": commands,
                }, Path(tmp) / CHECKPOINT_FILE)
                (Path(tmp) / CHECKPOINT_CONFIG).write_text(json.dumps(
                    {"epoch": epoch, "config": cfg.to_dict(), "metrics": record}, indent=2) + "\n")
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                log_epoch(record, cfg.epochs)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:04d}")
    return {"start_epoch": start_epoch, "epochs": cfg.epochs, "world_size": world}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def build_trainer(cfg: TrainConfig, plan: ResourcePlan, datasets: Mapping[str, Any], *,
                  train_loop=train_loop_per_worker, loop_config: Mapping[str, Any] | None = None):
    """The ``TorchTrainer`` for ``cfg`` (gloo on CPU, nccl on GPU), checkpointing to storage/name.

    ``train_loop``/``loop_config`` default to :func:`train_loop_per_worker` with the config; tests
    pass their own loop to exercise pieces (e.g. :func:`validate`) under the same trainer setup.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = storage.get_filesystem(cfg.storage)
    num_workers: int | tuple[int, int] = plan.max_workers if not plan.elastic else (plan.min_workers, plan.max_workers)
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=cfg.use_gpu,
                            resources_per_worker=plan.resources_per_worker(),
                            placement_strategy=cfg.placement_strategy)
    run_config = RunConfig(
        name=cfg.name,
        storage_path=path,
        storage_filesystem=fs if storage.is_s3(cfg.storage) else None,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep, checkpoint_score_attribute=cfg.monitor,
                                           checkpoint_score_order="max"),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
    )
    if loop_config is None:
        loop_config = {"train": cfg.to_dict(), "torch_threads": plan.torch_threads,
                       "resources_per_worker": plan.resources_per_worker()}
    return TorchTrainer(
        train_loop,
        train_loop_config=dict(loop_config),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
        datasets=dict(datasets),
        dataset_config=SplitValDataConfig(),
    )


@dataclass
class FitOutcome:
    """What :func:`fit` did and where things are."""

    artifact: str                 # URI of the exported model artifact
    run_uri: str                  # storage/name: checkpoints + Ray's snapshot
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    trained: bool                 # False when the run was already finished (only re-exported)
    start_epoch: int | None       # first epoch trained by the (last) attempt of this call
    plan: ResourcePlan | None
    seconds: float


def _previous_result(cfg: TrainConfig):
    """Ray's ``Result`` of an earlier run at storage/name, or None when there is none."""
    from ray.train import Result

    if not storage.exists(storage.join(cfg.run_uri, SNAPSHOT_FILE)):
        return None
    fs, path = storage.get_filesystem(cfg.run_uri)
    return Result.from_path(path, storage_filesystem=fs)


def _check_same_run(cfg: TrainConfig, saved: Mapping[str, Any], where: str) -> None:
    new = cfg.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in IDENTITY_FIELDS if saved.get(k) != new[k]]
    if diffs:
        raise UsageError(f"run {cfg.run_uri} exists (checkpoint {where}) with different settings "
                         f"({'; '.join(diffs)}); use another --name to start a new run, or the old "
                         "settings to resume it")


def _best_checkpoint(result, monitor: str) -> tuple[Any, dict[str, Any]]:
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m and monitor in m]
    if not candidates:
        raise RuntimeError(f"run {result.path} has no checkpoint with {monitor} to export")
    # Highest score; on a tie the later epoch (it trained longer for the same score).
    return max(candidates, key=lambda cm: (cm[1][monitor], cm[1]["epoch"]))


def export_best(cfg: TrainConfig, result, *, command: str | None = None,
                plan: ResourcePlan | None = None) -> tuple[str, int, dict[str, Any], list[dict[str, Any]]]:
    """Save the best checkpoint of ``result`` as a model artifact at ``cfg.export_uri``.

    Returns (artifact URI, best epoch, its metrics, full history from the latest checkpoint).
    """
    import ray

    from unet.artifact import save_artifact
    from unet.evaluation import manifest_sha256

    best_ckpt, best_metrics = _best_checkpoint(result, cfg.monitor)
    best = load_checkpoint_state(best_ckpt)
    latest = load_checkpoint_state(result.checkpoint) if result.checkpoint is not None else best
    model = build_model(cfg.model, **cfg.model_kwargs)
    model.load_state_dict(best["model"])
    history = latest.get("history", best.get("history", []))
    best_metrics = {k: v for k, v in best_metrics.items() if k not in ("worker_nodes",)}
    provenance = {
        "command": (latest.get("commands") or [None])[-1] or command,
        "commands": latest.get("commands", []),
        "export_command": command,
        "config": best.get("config", cfg.to_dict()),
        "data": cfg.data,
        "data_manifest_sha256": manifest_sha256(cfg.data) if cfg.data else None,
        "run": cfg.run_uri,
        "checkpoint": best_ckpt.path,
        "best_epoch": int(best["epoch"]),
        "epochs": int(latest["epoch"]),
        "val_metrics": best_metrics,
        "history": history,
        "hardware": {**(latest.get("hardware") or {}), "driver_platform": platform.platform(),
                     "plan": dataclasses.asdict(plan) if plan else None},
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    uri = save_artifact(model, cfg.export_uri, architecture=cfg.model, model_kwargs=model.model_kwargs(),
                        input_size=tuple(cfg.image_size),
                        normalization={"mean": DEFAULT_MEAN, "std": DEFAULT_STD}, threshold=0.5,
                        provenance=provenance, name=cfg.name)  # model_id = "<run name>-<sha12>"
    return uri, int(best["epoch"]), best_metrics, history


def fit(cfg: TrainConfig, *, command: str | None = None) -> FitOutcome:
    """Train (or resume, or just re-export) the run described by ``cfg``; export the best model.

    ``command`` is recorded in checkpoints and the artifact's provenance (default: this process's
    command line).
    """
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    command = command or shlex.join([os.path.basename(sys.executable), *sys.argv])
    started = init_ray(cfg.address, cfg.num_cpus)
    try:
        import ray

        if cfg.smoke_test and not cfg.data:
            cfg = dataclasses.replace(cfg, data=make_smoke_data(cfg))
        previous = _previous_result(cfg)
        plan = None
        if previous is not None and previous.checkpoint is not None:
            saved = _read_checkpoint_config(previous.checkpoint)
            _check_same_run(cfg, saved.get("config", {}), previous.checkpoint.path)
            done = int(saved.get("epoch", 0))
            if done >= cfg.epochs:
                logger.info("run %s already finished %d/%d epochs; exporting its best checkpoint",
                            cfg.run_uri, done, cfg.epochs)
                uri, best_epoch, best_metrics, history = export_best(cfg, previous, command=command)
                return FitOutcome(uri, cfg.run_uri, best_epoch, best_metrics, history, False, None, None,
                                  time.perf_counter() - t0)
            logger.info("run %s has %d/%d epochs; resuming from its latest checkpoint",
                        cfg.run_uri, done, cfg.epochs)
        plan = plan_resources(cfg, ray.cluster_resources(), _alive_nodes())
        if cfg.use_gpu and cfg.check_resources:
            require_cuda(plan.gpus_per_worker, "--use-gpu")
        logger.info("resources: %s", plan.describe())
        if not storage.exists(storage.join(cfg.data, "manifest.json")):
            logger.warning("%s has no manifest.json; provenance will not pin the data version", cfg.data)
        datasets = build_datasets(cfg)
        trainer = build_trainer(cfg, plan, datasets, loop_config={
            "train": cfg.to_dict(), "torch_threads": plan.torch_threads,
            "resources_per_worker": plan.resources_per_worker(), "command": command})
        result = trainer.fit()
        uri, best_epoch, best_metrics, history = export_best(cfg, result, command=command, plan=plan)
        start_epoch = (result.metrics or {}).get("start_epoch")
        return FitOutcome(uri, cfg.run_uri, best_epoch, best_metrics, history, True, start_epoch, plan,
                          time.perf_counter() - t0)
    finally:
        if started:
            import ray

            ray.shutdown()
