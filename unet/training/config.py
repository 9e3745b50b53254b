"""Every knob of a training run: :class:`TrainConfig`, read from a YAML/TOML file plus overrides.

``jobs/train.py`` is the CLI over this; :meth:`TrainConfig.resolved` fills the defaults that depend
on other fields (run name, smoke-test sizes). The choice lists come from their registries (models,
losses, optimisers, schedules, AMP modes), so a new entry there is a valid setting here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unet import storage
from unet.data.dataset import check_oversample
from unet.losses import LOSSES
from unet.models import MODELS

from .optim import AMP_DTYPES, OPTIMIZERS, SCHEDULES

__all__ = ["AUGMENT_ON", "MONITORS", "PLACEMENT_STRATEGIES", "TrainConfig", "load_config_file", "parse_workers"]

MONITORS = ("val_dice", "val_dice_per_image", "val_iou", "val_iou_per_image", "val_lesion_dice",
            "val_lesion_dice_gated")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
AUGMENT_ON = ("auto", "cpu", "gpu")

# --smoke-test: tiny everything, so the whole distributed path runs in well under a minute.
SMOKE_IMAGE_SIZE = (32, 32)
SMOKE_CHANNELS = [4, 8, 16]
SMOKE_EPOCHS = 2
SMOKE_BATCH_SIZE = 4
SMOKE_PHANTOMS = 24


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
        augment_on: where: ``cpu`` = albumentations in Ray Data's tasks, per sample; ``gpu`` = Ray
            Data only decodes (the decoded train split is materialised once and reshuffled every
            epoch) and each worker augments and normalises its batches on its training device with
            kornia (:mod:`unet.data.gpu_augment`; on a CPU worker that works, slowly); ``auto``
            (default) = ``gpu`` with ``use_gpu``, else ``cpu``.
        oversample: ``{class: n}``: each epoch shows train rows of that class n times, each copy
            augmented differently, e.g. ``{normal: 3}`` against false lesions on normal images.
        folds, fold: K-fold cross-validation over train+val (:func:`unet.shards.split_shards`; the
            test split never takes part). With ``fold`` k the run trains on the other folds, is
            validated on fold k and is named ``<name>-fold<k>``; with ``folds`` alone
            :func:`unet.training.fit_folds` trains every fold, one after the other, and writes their
            ensemble to ``export`` (default storage/name/model). None (default) = train/val splits.
    Optimisation:
        loss (+ loss_kwargs): ``dice`` | ``bce`` | ``dice_bce``; UNet++ deep supervision is
            handled by wrapping it in ``DeepSupervisionLoss``.
        class_loss_weight: weight of the image head's cross-entropy (normal/benign/malignant)
            added to the segmentation loss, for models built with ``image_classes``. Default 0.5.
        optimizer: ``adamw`` | ``sgd`` (momentum, Nesterov); lr, weight_decay, momentum.
        schedule: ``poly`` (power ``poly_power``) | ``cosine`` | ``constant``, after
            ``warmup_epochs`` of linear warm-up; stepped once per epoch.
        epochs, batch_size (per worker), val_batch_size (default batch_size), seed.
        amp: ``none`` | ``bf16`` | ``fp16`` (fp16 needs a GPU; bf16 also works on CPU).
        ema_decay: keep an exponential moving average of the weights (and BatchNorm statistics),
            updated after every optimiser step with this decay (torch's ``AveragedModel``;
            e.g. 0.99 averages over ~100 steps); validation, the best checkpoint and the exported
            model are the average's. None (default) = the trained weights themselves.
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
        node_types: cluster-launcher YAML naming the node types an autoscaling cluster can add
            (:mod:`unet.autoscaling`; default: found from the cluster, else a fixed cluster).
    Output:
        storage: where runs live (local dir or ``s3://bucket/prefix``); ``name``: the run
            (default ``<model>``, or ``smoke-<model>``); the run directory is storage/name.
        export: artifact destination (default storage/name/model).
        keep: best checkpoints kept (by ``monitor``; the latest is kept as well).
        monitor: the validation score that picks the best checkpoint: ``val_dice`` (Dice of the
            counts summed over the split, default), ``val_dice_per_image`` (mean of per-image Dice;
            an empty prediction on a normal image scores 1), ``val_iou``, ``val_iou_per_image``,
            ``val_lesion_dice`` (mean Dice over benign/malignant images only: the segmentation
            failure mode, with false lesions on normal images left to the image gate) and
            ``val_lesion_dice_gated`` (the same after the image head's gate at 0.5).
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        smoke_test: tiny images/model/epochs, phantom data when ``data`` is not given.
        mlflow: MLflow tracking URI (:mod:`unet.tracking`); ``true`` = ``$MLFLOW_TRACKING_URI``, else
            the file store ``./mlruns``; None/false = no tracking.
    """

    data: str | None = None
    model: str = "unet"
    model_kwargs: dict = field(default_factory=dict)
    image_size: tuple[int, int] = (128, 128)
    augment: bool = True
    augment_on: str = "auto"
    oversample: dict = field(default_factory=dict)
    folds: int | None = None
    fold: int | None = None
    loss: str = "dice_bce"
    loss_kwargs: dict = field(default_factory=dict)
    class_loss_weight: float = 0.5
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
    ema_decay: float | None = None
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
    node_types: str | None = None
    storage: str = "runs"
    name: str | None = None
    export: str | None = None
    keep: int = 2
    monitor: str = "val_dice"
    max_failures: int = 2
    smoke_test: bool = False
    mlflow: str | bool | None = None

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

        choice("model", tuple(MODELS), lower=False)
        choice("loss", tuple(LOSSES), lower=False)
        choice("optimizer", tuple(OPTIMIZERS))
        choice("schedule", tuple(SCHEDULES))
        choice("amp", tuple(AMP_DTYPES))
        choice("monitor", MONITORS, lower=False)
        choice("augment_on", AUGMENT_ON)
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
        number("class_loss_weight", float, 0.0)
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
        number("folds", int, 2, allow_none=True)
        number("fold", int, 0, allow_none=True)
        if c.fold is not None and (c.folds is None or c.fold >= c.folds):
            raise ValueError(f"{where}fold={c.fold} needs folds=K with fold < K (folds={c.folds})")
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
        if isinstance(c.mlflow, str) and c.mlflow.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
            c.mlflow = c.mlflow.strip().lower() in ("true", "yes", "on")
        if c.mlflow is False:
            c.mlflow = None
        if c.mlflow is not None and not isinstance(c.mlflow, (bool, str)):
            raise ValueError(f"{where}mlflow={c.mlflow!r} must be a tracking URI, true (the default store) or false")
        number("ema_decay", float, 0.0, allow_none=True, strict=True)
        if c.ema_decay is not None and c.ema_decay >= 1.0:
            raise ValueError(f"{where}ema_decay={c.ema_decay!r} must be < 1 (e.g. 0.99), or none for no average")
        if c.data is not None:
            c.data = str(c.data)
        return c

    def resolved(self) -> TrainConfig:
        """Apply the smoke-test sizes, the default run name and MLflow URI (a copy; idempotent)."""
        c = dataclasses.replace(self)
        if c.smoke_test:
            c.image_size = SMOKE_IMAGE_SIZE
            c.epochs = min(c.epochs, SMOKE_EPOCHS)
            c.batch_size = min(c.batch_size, SMOKE_BATCH_SIZE)
            c.warmup_epochs = min(c.warmup_epochs, c.epochs - 1)
            c.model_kwargs = {"channels": SMOKE_CHANNELS, **c.model_kwargs}
        if c.name is None:
            c.name = f"smoke-{c.model}" if c.smoke_test else c.model
        if c.fold is not None and not c.name.endswith(f"-fold{c.fold}"):
            c.name = f"{c.name}-fold{c.fold}"
        if c.mlflow is not None:
            from unet.tracking import resolve_uri

            c.mlflow = resolve_uri(c.mlflow)
        return c.validated()

    # -- derived ------------------------------------------------------------------------------

    @property
    def augment_on_device(self) -> bool:
        """True when the train split is decoded only and batches are augmented on the worker's device."""
        return self.augment_on == "gpu" or (self.augment_on == "auto" and self.use_gpu)

    def split(self, part: str) -> str:
        """The split name this run reads for ``part`` ("train" or "val"): the fold's side with ``fold`` set."""
        from unet.shards import fold_split

        return part if self.fold is None else fold_split(part, self.fold, self.folds)

    def for_fold(self, fold: int) -> TrainConfig:
        """This (cross-validation) config for one fold: named ``<name>-fold<k>``, exported into its own run."""
        if self.folds is None:
            raise ValueError("for_fold needs folds=K")
        return dataclasses.replace(self, fold=fold, export=None).resolved()

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
