"""What runs on every Ray Train worker: train one epoch, validate, reduce, report a checkpoint.

:func:`train_loop_per_worker` builds model/loss/optimiser/scheduler, resumes from
``ray.train.get_checkpoint()``, then per epoch runs :func:`train_one_epoch`, :func:`validate`
(TP/FP/FN counts on every rank, one ``all_reduce``, scores computed once), a rank-0 log line
(:func:`log_epoch`) and ``ray.train.report`` with a checkpoint.

A resumed run continues the sequence of an uninterrupted one: the train split continues its shard
order and augmentations (``unet.training.driver.ResumedTrainSplit``), torch/NumPy are reseeded
from ``(seed, epoch, rank)`` every epoch, and every epoch's record holds ``train_samples_sha256``
(the multiset of (sample id, augmented image) all ranks trained on), so two runs can be compared.
With ``augment_on="gpu"`` the worker augments on its device, each batch's draw a function of
``(seed, epoch, rank, step)`` (:class:`unet.data.gpu_augment.DeviceTransform`): new every epoch,
and a resumed run draws what an uninterrupted one draws in its epochs; which sample gets which
draw follows the order in which the batches arrive.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import platform
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from unet import faults
from unet.metrics import MetricAccumulator, auroc, scores_from_counts
from unet.models import build_model
from unet.postprocess import image_probabilities
from unet.shards import CLASSES

from .checkpoints import (
    ResumePoint,
    apply_resumable_settings,
    resume_point,
    run_checkpoints,
    write_checkpoint,
)
from .config import TrainConfig
from .optim import autocast, build_loss_fn, build_optimizer, build_scheduler

__all__ = ["epoch_seed", "evaluate", "log_epoch", "reduce_metrics", "sample_fingerprints", "samples_digest", "scores",
           "train_loop_per_worker", "train_one_epoch", "validate"]

logger = logging.getLogger("unet.train")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_one_epoch(model: nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, cfg: TrainConfig,
                    scaler: torch.amp.GradScaler | None = None,
                    seen: list[str] | None = None,
                    on_device: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                    ema: AveragedModel | None = None) -> tuple[float, int, float]:
    """One pass over this rank's batches; returns (sum of per-image loss, images, seconds spent
    waiting for the next batch) on this rank. A large wait means the input pipeline, not the
    model, sets the pace (give Ray Data more CPUs: ``--data-cpus``, or ``augment_on="gpu"``).
    ``seen``, if given, receives :func:`sample_fingerprints` of every batch's model input.
    ``on_device(image, mask, step=k)``, if given, turns batch ``k`` into model inputs once on the
    device (``augment_on="gpu"``: :class:`unet.data.gpu_augment.DeviceTransform`). ``ema``, if
    given, averages the weights after every optimiser step (``cfg.ema_decay``)."""
    model.train()
    loss_sum, images, wait_s = 0.0, 0, 0.0
    it = iter(batches)
    for step in itertools.count():
        t = time.perf_counter()
        batch = next(it, None)
        wait_s += time.perf_counter() - t
        if batch is None:
            break
        x = batch["image"].to(device, non_blocking=True)
        y = batch["mask"].to(device, non_blocking=True)
        if on_device is not None:
            x, y = on_device(x, y, step=step)
        if seen is not None:
            seen.extend(sample_fingerprints(batch["id"], batch["image"] if on_device is None else x.cpu()))
        optimizer.zero_grad(set_to_none=True)
        with autocast(cfg.amp, device):
            out = model(x)
        masks, class_logits = out if isinstance(out, tuple) else (out, None)
        # The loss in float32: soft Dice sums over whole images, which bf16/fp16 would round badly.
        loss = loss_fn([o.float() for o in masks] if isinstance(masks, list) else masks.float(), y)
        if class_logits is not None:  # the image-level head learns normal/benign/malignant jointly
            labels = class_targets(batch["class"], batch["id"], device)
            loss = loss + cfg.class_loss_weight * F.cross_entropy(class_logits.float(), labels)
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
        if ema is not None:
            ema.update_parameters(_unwrap(model))
        loss_sum += value * x.shape[0]
        images += x.shape[0]
    return loss_sum, images, wait_s


def sample_fingerprints(ids: Sequence[str], images) -> list[str]:
    """``"<id> <digest of its float32 model input>"`` per sample: equal for two samples exactly
    when the same image got the same augmentation (seed) and normalisation."""
    arrays = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return [f"{i} {hashlib.blake2b(np.ascontiguousarray(a, dtype=np.float32).tobytes(), digest_size=8).hexdigest()}"
            for i, a in zip(ids, arrays, strict=True)]


def samples_digest(fingerprints: Iterable[str]) -> str:
    """One SHA-256 over a multiset of :func:`sample_fingerprints` (order-free: ranks and the
    streaming split deal samples out in an order that varies from run to run)."""
    return hashlib.sha256("\n".join(sorted(fingerprints)).encode("utf-8")).hexdigest()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch/NumPy seed of one rank in one epoch: a resumed run draws what an uninterrupted
    run draws in that epoch (dropout masks, any random op), not epoch 1's numbers again."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank)) % (2**31)


def class_targets(classes: Sequence[str], ids: Sequence[str], device: torch.device) -> torch.Tensor:
    """Class names -> indices into :data:`unet.shards.CLASSES` (the image head's outputs)."""
    try:
        return torch.tensor([CLASSES.index(c) for c in classes], device=device)
    except ValueError:
        bad = next(i for i, c in zip(ids, classes, strict=True) if c not in CLASSES)
        raise ValueError(f"image {bad!r} has class {classes[list(ids).index(bad)]!r}; expected one of "
                         f"{CLASSES}") from None


def new_accumulators() -> dict[str, MetricAccumulator]:
    """One accumulator for all images and one per class."""
    return {"overall": MetricAccumulator(), **{c: MetricAccumulator() for c in CLASSES}}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
             cfg: TrainConfig | None = None, images: list | None = None) -> dict[str, MetricAccumulator]:
    """Accumulate TP/FP/FN/TN of thresholded predictions (sigmoid > 0.5) on *this rank's* batches.

    Returns accumulators (overall and per class) that still have to be summed across ranks
    (:func:`reduce_metrics`); nothing is averaged per batch. ``images``, if given, receives one
    ``(class, dice, any predicted pixel, p(lesion) or NaN)`` tuple per image (:func:`image_scores`).
    """
    model.eval()
    accs = new_accumulators()
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device) > 0.5
        with autocast(cfg.amp if cfg is not None else "none", device):
            logits, class_logits = model.predict_all(x)
        pred = logits.float() > 0  # sigmoid(z) > 0.5  <=>  z > 0
        c = accs["overall"].update(pred, target)
        classes = np.asarray(batch["class"], dtype=object)
        if images is not None:
            dice = scores_from_counts(c[:, 0], c[:, 1], c[:, 2])["dice"]
            lesion = image_probabilities(None if class_logits is None else
                                         torch.softmax(class_logits.float(), dim=1).cpu().numpy())[0]
            if lesion is None:
                lesion = np.full(len(classes), np.nan)
            images.extend(zip(classes.tolist(), dice.tolist(), (c[:, 0] + c[:, 1] > 0).tolist(),
                              lesion.tolist(), strict=True))
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
             ) -> tuple[dict[str, MetricAccumulator], list[float], list[tuple]]:
    """Distributed validation: rank 0's weights/buffers on every rank, each rank scores its own
    images, counts summed over ranks, per-image rows gathered from all ranks. Every rank must call
    it (it holds collectives)."""
    _sync_buffers(model)
    # The plain module, not DDP: ranks see different numbers of validation batches, and DDP's
    # forward may start collectives (buffer sync) that would then not line up.
    images: list = []
    accs = evaluate(_unwrap(model), batches, device, cfg, images=images)
    accs, extra = reduce_metrics(accs, extra, device)
    return accs, extra, [row for rank_rows in _gather(images) for row in rank_rows]


def image_scores(images: Sequence[tuple[str, float, bool, float]], gate: float = 0.5) -> dict[str, float]:
    """The two failure modes, scored separately, from per-image ``(class, dice, any, p_lesion)``.

    ``val_lesion_dice``: mean Dice over benign/malignant images; ``val_false_lesion_rate``: share of
    normal images with any predicted pixel. With an image head (p_lesion not NaN) also their values
    when masks with ``p_lesion < gate`` are emptied (``*_gated``) and the head's ``val_gate_auroc``.
    """
    if not images:
        return {}
    cls = np.asarray([r[0] for r in images], dtype=object)
    dice, any_, p = (np.asarray([r[k] for r in images], dtype=np.float64) for k in (1, 2, 3))
    lesion, normal = cls != "normal", cls == "normal"
    mean = lambda v: float(v.mean()) if v.size else math.nan  # noqa: E731
    out = {"val_lesion_dice": mean(dice[lesion]), "val_false_lesion_rate": mean(any_[normal])}
    if not np.isnan(p).any():
        kept = p >= gate
        out |= {"val_lesion_dice_gated": mean(np.where(kept, dice, 0.0)[lesion]),
                "val_false_lesion_rate_gated": mean((any_ * kept)[normal]),
                "val_gate_auroc": auroc(p, lesion)}
    return out


def scores(accs: Mapping[str, MetricAccumulator], images: Sequence[tuple] = ()) -> dict[str, Any]:
    """Flat metrics for logging/reporting: ``val_dice``/``val_iou`` (from summed counts), their
    per-image means, image count, raw counts, per-class Dice/IoU and :func:`image_scores`."""
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
    return out | image_scores(images)


def log_epoch(record: Mapping[str, Any], epochs: int) -> None:
    """The one per-epoch log line (call on rank 0 only)."""
    failure_modes = ""
    if "val_lesion_dice" in record:
        failure_modes = (f"  lesion dice {record['val_lesion_dice']:.4f}  false lesions "
                         f"{record['val_false_lesion_rate']:.0%}")
    if "val_gate_auroc" in record:
        failure_modes += (f" (gated {record['val_lesion_dice_gated']:.4f} / "
                          f"{record['val_false_lesion_rate_gated']:.0%}, gate AUROC {record['val_gate_auroc']:.3f})")
    logger.info(
        "epoch %d/%d  loss %.4f  val_dice %.4f (per image %.4f)  val_iou %.4f%s  lr %.2e  %.1f img/s  "
        "data wait %.0f%%  epoch %.1fs  elapsed %.1fs",
        record["epoch"], epochs, record["train_loss"], record["val_dice"], record["val_dice_per_image"],
        record["val_iou"], failure_modes, record["lr"], record["images_per_s"], 100 * record.get("data_wait", 0.0),
        record["epoch_s"], record["elapsed_s"])


class _QueueHandler(logging.Handler):
    """Puts ``(level, message)`` into the driver's relay queue (``unet.training.driver.WorkerLogRelay``)."""

    def __init__(self, queue: Any):
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait((record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - logging's rule: report on stderr (the worker's log), never raise
            self.handleError(record)


def _setup_worker_logging(log_queue: Any = None) -> None:
    # Stdout goes to the worker's log file, and to the driver when Ray forwards worker output
    # (log_to_driver, Ray's default); without a handler logging would drop INFO lines. Quiet jobs
    # turn forwarding off and pass a queue instead, whose lines the driver logs as its own.
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[unet.train] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for handler in [h for h in logger.handlers if isinstance(h, _QueueHandler)]:
        logger.removeHandler(handler)
    if log_queue is not None:
        logger.addHandler(_QueueHandler(log_queue))


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


def _committed() -> None:
    # Ray's controller collects reports by polling: dying right after a report can lose it (the
    # previous epoch's checkpoint never registered, the restart begins at epoch 1). A fault drill
    # waits until every checkpoint reported so far is committed, so it tests resume, not that race.
    import ray.train

    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)


def _resume_point(checkpoint) -> ResumePoint:
    """Where this worker resumes: the checkpoint Ray hands over (the run's latest) or, if that one
    does not load, the newest of the run's other checkpoints that does."""
    if checkpoint is None:
        return ResumePoint()
    run_path = posixpath.dirname(checkpoint.path.rstrip("/"))
    point = resume_point([checkpoint])
    if point.state is None:
        point = resume_point([checkpoint, *(c for c in run_checkpoints(run_path, checkpoint.filesystem)
                                            if c.path != checkpoint.path)])
    # None loads (fit() refuses such a run before training; here they broke during it): start
    # again from epoch 1 rather than fail the same way on every restart.
    return point


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function. ``loop_config = {"train": TrainConfig.to_dict(), "torch_threads": n,
    "command": str, "fault_drill": unet.faults.current(), "log_queue": relay queue or None}``.
    Returns (rank 0's value reaches ``Result.return_value``) a small summary."""
    import ray.train
    import ray.train.torch

    _setup_worker_logging(loop_config.get("log_queue"))
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
    to_model = None
    if cfg.augment_on_device:  # the train split arrives decoded only (uint8): augment + normalise here
        from unet.data import AugmentConfig
        from unet.data.gpu_augment import DeviceTransform

        to_model = DeviceTransform(AugmentConfig() if cfg.augment else None, tuple(cfg.image_size),
                                   **model.input_normalization, seed=cfg.seed, rank=rank)
    start_epoch, history, hardware, commands = 1, [], None, []
    point = _resume_point(ray.train.get_checkpoint())
    if rank == 0:
        for skipped in point.skipped:
            logger.warning("checkpoint %s; resuming from the newest checkpoint that loads", skipped)
        if point.skipped and point.state is None:
            logger.warning("no checkpoint of this run loads; starting again from epoch 1")
    state = point.state
    if state is not None:
        model.load_state_dict(state["model"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state.get("history", []))
        commands = list(state.get("commands", []))
    model = ray.train.torch.prepare_model(model)
    ema = None
    if cfg.ema_decay is not None:  # the average of the weights is what is validated and exported
        ema = AveragedModel(_unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if state is not None and "ema_model" in state:
            ema.module.load_state_dict(state["ema_model"])
            ema.n_averaged.fill_(1)  # averaging goes on from the saved average, not from a fresh copy
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        changed = apply_resumable_settings(cfg, state.get("config", {}), optimizer, scheduler)
        if changed and rank == 0:
            logger.info("resuming with changed settings: %s",
                        ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    else:
        changed = {}
    loss_fn = build_loss_fn(cfg)
    if loop_config.get("command") and (not commands or commands[-1] != loop_config["command"]):
        commands.append(loop_config["command"])

    workers = _gather(_worker_info(device))
    hardware = {"workers": world, "worker_info": workers,
                "torch_threads": int(loop_config.get("torch_threads", 1)),
                "resources_per_worker": loop_config.get("resources_per_worker")}
    # After a fallback to an older checkpoint the epochs after it are trained again: new directory
    # names, so Ray's clean-up of the broken ones' entries never deletes the new checkpoints.
    redo = f"-redo{start_epoch}" if point.skipped else ""
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
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        np.random.seed(epoch_seed(cfg.seed, epoch, rank))
        lr = optimizer.param_groups[0]["lr"]
        train_batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, collate_fn=collate_torch,
            local_shuffle_buffer_size=max(4 * cfg.batch_size, 64),
            local_shuffle_seed=(cfg.seed * 1_000_003 + epoch * 101 + rank) % (2**31))
        seen: list[str] = []
        loss_sum, n_images, wait_s = train_one_epoch(
            model, train_batches, loss_fn, optimizer, device, cfg, scaler, seen=seen,
            on_device=functools.partial(to_model, epoch=epoch) if to_model is not None else None, ema=ema)
        samples = samples_digest(f for rank_seen in _gather(seen) for f in rank_seen)
        train_s = time.perf_counter() - t0
        scheduler.step()
        val_batches = val_shard.iter_torch_batches(batch_size=val_batch_size, collate_fn=collate_torch)
        accs, (loss_sum, n_images, train_s_sum, wait_s_sum), images = validate(
            ema.module if ema is not None else model, val_batches, device, cfg,
            extra=[loss_sum, n_images, train_s, wait_s])
        faults.maybe_crash(loop_config.get("fault_drill"), "train", epoch, rank, before_exit=_committed)
        epoch_s = time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(n_images, 1),
            "train_images": int(n_images),
            "lr": lr,
            "weight_decay": optimizer.param_groups[0].get("weight_decay"),
            "train_samples_sha256": samples,
            # all ranks' images over the mean rank's time spent training
            "images_per_s": n_images / max(train_s_sum / world, 1e-9),
            # share of the training time the ranks spent waiting for input batches
            "data_wait": wait_s_sum / max(train_s_sum, 1e-9),
            "epoch_s": epoch_s,
            "elapsed_s": elapsed_before + (time.perf_counter() - attempt_start),
            **scores(accs, images),
        }
        if changed and epoch == start_epoch:
            record["changed"] = changed  # settings this resumed run trains with, unlike the epochs before
        history.append(record)
        metrics = {**record, "start_epoch": start_epoch, "world_size": world,
                   "worker_nodes": [w["node_id"] for w in workers]}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint(tmp, {
                    "model": _unwrap(model).state_dict(),
                    **({"ema_model": ema.module.state_dict()} if ema is not None else {}),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "epoch": epoch,
                    "config": cfg.to_dict(),
                    "history": history,
                    "hardware": hardware,
                    "commands": commands,
                }, record)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                log_epoch(record, cfg.epochs)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:04d}{redo}")
    return {"start_epoch": start_epoch, "epochs": cfg.epochs, "world_size": world}
