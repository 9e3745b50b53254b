"""Checkpoints of a run and the export of its best one as a model artifact.

Checkpoints live in ``<storage>/<name>/`` (local or ``s3://``; Ray writes through the pyarrow file
system from :func:`unet.storage.get_filesystem`). Each holds :data:`CHECKPOINT_FILE` (model,
optimiser, scheduler, epoch, config, history) and :data:`CHECKPOINT_CONFIG` (the same config and
metrics, readable without torch). Ray keeps the best ``keep`` checkpoints by ``monitor`` and always
the latest one too, so a crash resumes from the last epoch, not the best. Ray's
:data:`SNAPSHOT_FILE` indexes them: running the same command again finds it, continues an
unfinished run and only re-exports a finished one.

A checkpoint that does not load (a partial upload, a deleted ``train_state.pt``) is skipped with a
log line: :func:`resume_point` resumes from the newest one that loads, and the export takes the
best one that loads. A run none of whose checkpoints loads is refused in one line when the job
starts; if they all break while it runs, the restarted workers start again from epoch 1 (a restart
never fails the same way over and over).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import platform
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from unet import storage
from unet.models import build_model
from unet.runtime import UsageError
from unet.shards import manifest_sha256

from .config import TrainConfig
from .resources import ResourcePlan

__all__ = ["CHECKPOINT_CONFIG", "CHECKPOINT_FILE", "IDENTITY_FIELDS", "RESUMABLE_FIELDS", "SNAPSHOT_FILE",
           "ResumePoint", "apply_resumable_settings", "check_same_run", "export_best", "load_checkpoint_state",
           "previous_result", "read_checkpoint_config", "resume_point", "run_checkpoints", "write_checkpoint"]

logger = logging.getLogger("unet.train")

CHECKPOINT_FILE = "train_state.pt"  # inside each Ray checkpoint directory (ours, so torch.save is fine)
CHECKPOINT_CONFIG = "config.json"   # the same config, readable without torch
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's index of a run's checkpoints
# Fields that define *what* is trained: resuming a run with different values would silently mix
# two experiments (or fail deep inside load_state_dict), so fit() refuses with a clear message.
# The optimiser too: another optimiser cannot take over the saved one's state (moments, momentum).
IDENTITY_FIELDS = ("data", "model", "model_kwargs", "image_size", "loss", "loss_kwargs", "optimizer", "ema_decay")
# Settings a resumed run may change: the restored optimiser takes the new values (not the saved
# ones) and the first epoch trained with them records the change in the history.
RESUMABLE_FIELDS = ("lr", "weight_decay", "momentum")


def write_checkpoint(directory: str | Path, state: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
    """Write ``state`` (model, optimizer, ..., ``epoch``, ``config``) into a checkpoint directory."""
    torch.save(dict(state), Path(directory) / CHECKPOINT_FILE)
    (Path(directory) / CHECKPOINT_CONFIG).write_text(json.dumps(
        {"epoch": state["epoch"], "config": state["config"], "metrics": dict(metrics)}, indent=2) + "\n")


def load_checkpoint_state(checkpoint, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict saved in a Ray checkpoint by :func:`train_loop_per_worker` (any storage).

    Read straight from the checkpoint's filesystem into memory, not through
    ``Checkpoint.as_directory()``: that shares one download folder per node, and a rank arriving
    after another has finished downloading downloads again over the file the first is reading
    (a resumed group then fails with a "corrupted" checkpoint).
    """
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        with checkpoint.filesystem.open_input_file(path) as f:
            data = f.readall()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {checkpoint.path} has no {CHECKPOINT_FILE}; "
                                "it was not written by unet.training") from None
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path}: cannot load {CHECKPOINT_FILE} ({len(data)} bytes): {e}") from e


@dataclasses.dataclass
class ResumePoint:
    """The newest checkpoint of a run that loads (None: start from scratch), and the ones skipped."""

    checkpoint: Any = None
    state: dict[str, Any] | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)  # "<path>: <why it does not load>"

    @property
    def epoch(self) -> int:
        """Epochs finished at this point (0 = none)."""
        return int(self.state["epoch"]) if self.state is not None else 0


def run_checkpoints(run_path: str, filesystem) -> list:
    """The checkpoints Ray recorded for the run at ``run_path`` (a path on ``filesystem``), the
    latest first, then the others newest first; [] when the run has none."""
    from pyarrow.fs import FileType
    from ray.train import Result

    snapshot = posixpath.join(run_path.rstrip("/"), SNAPSHOT_FILE)
    if filesystem.get_file_info(snapshot).type == FileType.NotFound:
        return []
    return run_checkpoints_of(Result.from_path(run_path, storage_filesystem=filesystem))


def resume_point(checkpoints: Sequence, first_state: dict[str, Any] | None = None) -> ResumePoint:
    """The first of ``checkpoints`` (newest first) that loads, with its state.

    A checkpoint whose ``train_state.pt`` is missing or does not load (a partial upload) is
    skipped and named in ``skipped``; other storage errors (the store is down) propagate, so a
    network failure never silently rewinds a run. ``first_state``: the first one's state, already
    loaded.
    """
    point = ResumePoint()
    for i, checkpoint in enumerate(checkpoints):
        try:
            state = first_state if i == 0 and first_state is not None else load_checkpoint_state(checkpoint)
        except (FileNotFoundError, ValueError) as e:
            point.skipped.append(f"{checkpoint.path}: {e}")
            continue
        point.checkpoint, point.state = checkpoint, state
        break
    return point


def apply_resumable_settings(cfg: TrainConfig, saved: Mapping[str, Any], optimizer, scheduler) -> dict[str, list]:
    """Give a restored optimiser (and its LR schedule) the settings of ``cfg`` where they differ
    from ``saved`` (the checkpoint's config); returns ``{setting: [old, new]}`` of what changed.

    ``optimizer.load_state_dict`` brings back the saved learning rate and weight decay; without
    this a new ``--lr`` on resume would be silently overwritten."""
    changed = {k: [saved.get(k), getattr(cfg, k)] for k in RESUMABLE_FIELDS
               if k in saved and saved.get(k) != getattr(cfg, k)
               and (k != "momentum" or "momentum" in optimizer.param_groups[0])}  # AdamW has none
    if not changed:
        return {}
    for group in optimizer.param_groups:
        if "weight_decay" in changed:
            group["weight_decay"] = cfg.weight_decay
        if "momentum" in changed:
            group["momentum"] = cfg.momentum
        if "lr" in changed:
            group["initial_lr"] = cfg.lr
    if "lr" in changed:
        # LambdaLR scales base_lrs (restored with the saved lr) by the schedule's factor.
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
    return changed


def read_checkpoint_config(checkpoint) -> dict[str, Any]:
    """``config.json`` of a checkpoint (the metadata without loading the weights)."""
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_CONFIG}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {checkpoint.path}: cannot read {CHECKPOINT_CONFIG}: {e}") from e


def previous_result(cfg: TrainConfig):
    """Ray's ``Result`` of an earlier run at storage/name, or None when there is none."""
    from ray.train import Result

    if not storage.exists(storage.join(cfg.run_uri, SNAPSHOT_FILE)):
        return None
    fs, path = storage.get_filesystem(cfg.run_uri)
    return Result.from_path(path, storage_filesystem=fs)


def run_checkpoints_of(result) -> list:
    """:func:`run_checkpoints` of a Ray ``Result`` (latest first, then newest first)."""
    others = sorted(((m or {}).get("epoch", 0), c.path, c) for c, m in (result.best_checkpoints or []))
    ordered = [result.checkpoint] if result.checkpoint is not None else []
    return ordered + [c for _, path, c in reversed(others) if not ordered or path != ordered[0].path]


def check_same_run(cfg: TrainConfig, saved: Mapping[str, Any], where: str) -> None:
    new = cfg.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in IDENTITY_FIELDS if saved.get(k) != new[k]]
    if diffs:
        raise UsageError(f"run {cfg.run_uri} exists (checkpoint {where}) with different settings "
                         f"({'; '.join(diffs)}); use another --name to start a new run, or the old "
                         "settings to resume it")


def best_checkpoint(result, monitor: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(checkpoint, its metrics, its state) of the best checkpoint that loads."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m and monitor in m]
    if not candidates:
        raise RuntimeError(f"run {result.path} has no checkpoint with {monitor} to export")
    # Highest score; on a tie the later epoch (it trained longer for the same score).
    candidates.sort(key=lambda cm: (cm[1][monitor], cm[1]["epoch"]), reverse=True)
    point = resume_point([c for c, _ in candidates])
    for skipped in point.skipped:
        logger.warning("checkpoint %s; exporting the best checkpoint that loads instead", skipped)
    if point.checkpoint is None:
        raise UsageError(f"run {result.path}: no checkpoint loads ({'; '.join(point.skipped)})")
    metrics = next(m for c, m in candidates if c is point.checkpoint)
    return point.checkpoint, metrics, point.state


def export_best(cfg: TrainConfig, result, *, command: str | None = None,
                plan: ResourcePlan | None = None) -> tuple[str, int, dict[str, Any], list[dict[str, Any]]]:
    """Save the best checkpoint of ``result`` as a model artifact at ``cfg.export_uri``.

    Returns (artifact URI, best epoch, its metrics, full history from the latest checkpoint).
    """
    import ray

    from unet.artifact import save_artifact

    best_ckpt, best_metrics, best = best_checkpoint(result, cfg.monitor)
    latest = resume_point(run_checkpoints_of(result)).state or best
    model = build_model(cfg.model, **cfg.model_kwargs)
    model.load_state_dict(best.get("ema_model") or best["model"])  # what was validated
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
    if getattr(model, "encoder_provenance", None):
        provenance["encoder"] = model.encoder_provenance
    uri = save_artifact(model, cfg.export_uri, architecture=cfg.model, model_kwargs=model.model_kwargs(),
                        input_size=tuple(cfg.image_size), normalization=model.input_normalization, threshold=0.5,
                        provenance=provenance, name=cfg.name)  # model_id = "<run name>-<sha12>"
    return uri, int(best["epoch"]), best_metrics, history
