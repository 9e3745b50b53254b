"""Checkpoints of a run and the export of its best one as a model artifact.

Checkpoints live in ``<storage>/<name>/`` (local or ``s3://``; Ray writes through the pyarrow file
system from :func:`unet.storage.get_filesystem`). Each holds :data:`CHECKPOINT_FILE` (model,
optimiser, scheduler, epoch, config, history) and :data:`CHECKPOINT_CONFIG` (the same config and
metrics, readable without torch). Ray keeps the best ``keep`` checkpoints by ``monitor`` and always
the latest one too, so a crash resumes from the last epoch, not the best. Ray's
:data:`SNAPSHOT_FILE` indexes them: running the same command again finds it, continues an
unfinished run and only re-exports a finished one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unet import storage
from unet.models import build_model
from unet.runtime import UsageError
from unet.shards import manifest_sha256

from .config import TrainConfig
from .resources import ResourcePlan

__all__ = ["CHECKPOINT_CONFIG", "CHECKPOINT_FILE", "IDENTITY_FIELDS", "SNAPSHOT_FILE", "check_same_run",
           "export_best", "load_checkpoint_state", "previous_result", "read_checkpoint_config",
           "write_checkpoint"]

CHECKPOINT_FILE = "train_state.pt"  # inside each Ray checkpoint directory (ours, so torch.save is fine)
CHECKPOINT_CONFIG = "config.json"   # the same config, readable without torch
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's index of a run's checkpoints
# Fields that define *what* is trained: resuming a run with different values would silently mix
# two experiments (or fail deep inside load_state_dict), so fit() refuses with a clear message.
IDENTITY_FIELDS = ("data", "model", "model_kwargs", "image_size", "loss", "loss_kwargs")


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


def check_same_run(cfg: TrainConfig, saved: Mapping[str, Any], where: str) -> None:
    new = cfg.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in IDENTITY_FIELDS if saved.get(k) != new[k]]
    if diffs:
        raise UsageError(f"run {cfg.run_uri} exists (checkpoint {where}) with different settings "
                         f"({'; '.join(diffs)}); use another --name to start a new run, or the old "
                         "settings to resume it")


def best_checkpoint(result, monitor: str) -> tuple[Any, dict[str, Any]]:
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

    best_ckpt, best_metrics = best_checkpoint(result, cfg.monitor)
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
    if getattr(model, "encoder_provenance", None):
        provenance["encoder"] = model.encoder_provenance
    uri = save_artifact(model, cfg.export_uri, architecture=cfg.model, model_kwargs=model.model_kwargs(),
                        input_size=tuple(cfg.image_size), normalization=model.input_normalization, threshold=0.5,
                        provenance=provenance, name=cfg.name)  # model_id = "<run name>-<sha12>"
    return uri, int(best["epoch"]), best_metrics, history
