"""The driver of a training run: datasets, the ``TorchTrainer``, resume, export — :func:`fit`.

:func:`fit` connects to or starts Ray, plans resources (:mod:`.resources`), resumes or skips a
finished run (:mod:`.checkpoints`), runs ``TorchTrainer.fit()`` over :func:`build_datasets` with
:func:`unet.training.loop.train_loop_per_worker` on every worker, and exports the best checkpoint
(by ``monitor``, default the validation Dice) as a model artifact with the run's provenance.

:class:`SplitValDataConfig` splits ``train`` equally across ranks (DDP needs the same number of
steps on every rank) and ``val`` *unequally* so that every validation image is scored exactly once
(an equal split drops rows to even the shards out).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.train import DataConfig

from unet import faults, storage, tracking
from unet.autoscaling import discover_node_types
from unet.models import build_model
from unet.runtime import UsageError, init_ray, is_quiet, require_cuda
from unet.shards import MANIFEST, manifest_sha256, read_manifest

from .checkpoints import check_same_run, export_best, previous_result, resume_point, run_checkpoints, run_checkpoints_of
from .config import SMOKE_PHANTOMS, TrainConfig
from .loop import train_loop_per_worker
from .resources import ResourcePlan, plan_resources

__all__ = ["FitOutcome", "ResumedTrainSplit", "SplitValDataConfig", "WorkerLogRelay", "build_datasets", "build_trainer",
           "continue_at", "fit"]

logger = logging.getLogger("unet.train")


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


def continue_at(dataset, epochs_done: int):
    """A copy of a lazy ``dataset`` whose next pass is pass number ``epochs_done`` (from 0).

    Ray Data counts a Dataset's passes in its context's execution index; the shard order
    (``FileShuffleConfig(reseed_after_execution=True)``) and the augmentation epoch
    (:class:`unet.data.BatchTransform`) both derive from it. A resumed run sets it to the epochs
    already trained, so it continues their sequence instead of replaying the first epoch's.
    Private Ray API (the same counter ``unet.data`` reads), hence kept in this one place.
    """
    out = dataset.copy(dataset, _deep_copy=True)  # its own plan and context (the counter)
    out.context._execution_idx = int(epochs_done)
    return out


class ResumedTrainSplit:
    """The train split for a worker group that Ray (re)starts: a dataset factory (Ray Train calls
    it at every worker-group start), continuing after the checkpoint the group resumes from.

    Ray restarts a failed group inside one ``fit()`` with the same datasets, which would start
    their pass counter from where the driver built them; the factory looks up the run's newest
    checkpoint that loads (the one :func:`unet.training.loop.train_loop_per_worker` resumes from)
    and hands out the split at that epoch (:func:`continue_at`).
    """

    def __init__(self, dataset, run_uri: str):
        self.dataset = dataset
        self.filesystem, self.run_path = storage.get_filesystem(run_uri)

    def __call__(self):
        return continue_at(self.dataset, resume_point(run_checkpoints(self.run_path, self.filesystem)).epoch)


def build_datasets(cfg: TrainConfig, epoch_offset: int = 0) -> dict[str, Any]:
    """``{"train": ..., "val": ...}`` Ray Datasets of model batches from ``cfg.data``.

    ``train`` stays lazy and streams (new shard order and augmentations every epoch; a run resumed
    after ``epoch_offset`` finished epochs continues their sequence: :func:`continue_at`). ``val`` is
    decoded once and materialised in the object store: it is small (BUSI: ~100 images, 13 MB at
    128 px) and identical every epoch, so re-reading it would only add a pipeline start per epoch.

    With ``cfg.augment_on_device`` (``augment_on="gpu"``) the train split is decoded and resized
    once too, as uint8 (BUSI train: ~550 images, 72 MB at 256 px), and materialised; every pass
    is a new global shuffle of it (``random_shuffle`` reseeded per pass, the same pass counter as
    the streaming split's shard order) and the workers augment and normalise on their device.
    """
    import ray.data

    from unet.data import AugmentConfig, read_split

    if cfg.oversample:
        _check_classes(cfg.data, cfg.oversample)
    size = tuple(cfg.image_size)
    # A pretrained encoder expects the normalisation its weights were trained with.
    norm = build_model(cfg.model, **cfg.model_kwargs).input_normalization
    if cfg.augment_on_device:
        decoded = read_split(cfg.data, cfg.split("train"), size=size, normalize=False, shuffle=False,
                             max_block_mib=cfg.max_block_mib, oversample=cfg.oversample).materialize()
        train = decoded.random_shuffle(seed=ray.data.RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
    else:
        train = read_split(cfg.data, cfg.split("train"), size=size, augment=AugmentConfig() if cfg.augment else None,
                           shuffle=True, seed=cfg.seed, max_block_mib=cfg.max_block_mib, oversample=cfg.oversample,
                           **norm)
    return {
        "train": continue_at(train, epoch_offset),
        "val": read_split(cfg.data, cfg.split("val"), size=size, **norm).materialize(),
    }


def _check_classes(data: str, oversample: Mapping[str, int]) -> None:
    """A class to oversample that the train split does not have is a typo, not a no-op."""
    if not storage.exists(storage.join(data, MANIFEST)):
        return
    classes = sorted(k for k in read_manifest(data)["counts"]["train"] if k != "total")
    unknown = sorted(set(oversample) - set(classes))
    if unknown:
        raise UsageError(f"oversample: class(es) {unknown} not in the train split of {data}, which has {classes}")


def make_smoke_data(cfg: TrainConfig) -> str:
    """Write tiny phantom shards for ``--smoke-test`` under the run directory; returns their URI.

    Idempotent: an existing manifest there is reused.
    """
    from unet.prepare import PrepareConfig, prepare

    out = storage.join(cfg.run_uri, "smoke-data")
    if not storage.exists(storage.join(out, MANIFEST)):
        # Small shards: several blocks per split, so both ranks get some of the val split.
        prepare(PrepareConfig(source="phantoms", out=out, num=SMOKE_PHANTOMS, seed=cfg.seed,
                              size=(64, 64), shard_size=4), command="unet.train --smoke-test")
    return out


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def build_trainer(cfg: TrainConfig, plan: ResourcePlan, datasets: Mapping[str, Any], *,
                  train_loop=train_loop_per_worker, loop_config: Mapping[str, Any] | None = None,
                  command: str | None = None, log_queue: Any = None, callbacks: Sequence[Any] = ()):
    """The ``TorchTrainer`` for ``cfg`` (gloo on CPU, nccl on GPU), checkpointing to storage/name.

    ``train_loop``/``loop_config`` default to :func:`train_loop_per_worker` with the config; tests
    pass their own loop to exercise pieces (e.g. :func:`validate`) under the same trainer setup.
    ``log_queue``: where workers also send their log lines (:class:`WorkerLogRelay`), or None.
    ``callbacks``: Ray Train ``UserCallback``s, run in the controller (MLflow: :mod:`unet.tracking`).
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
        callbacks=list(callbacks),
    )
    if loop_config is None:
        loop_config = {"train": cfg.to_dict(), "torch_threads": plan.torch_threads,
                       "resources_per_worker": plan.resources_per_worker(), "command": command,
                       "fault_drill": faults.current(), "log_queue": log_queue}
    return TorchTrainer(
        train_loop,
        train_loop_config=dict(loop_config),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
        datasets=dict(datasets),
        dataset_config=SplitValDataConfig(),
    )


class WorkerLogRelay:
    """Brings the workers' ``unet.train`` log lines to this driver's log when Ray does not.

    Quiet jobs start Ray with ``log_to_driver=False`` (worker output stays in the workers' log
    files), but the per-epoch line of rank 0 (:func:`unet.training.loop.log_epoch`) is the job's
    own progress and must reach the terminal or ``ray job logs``. The workers put ``(level,
    message)`` into :attr:`queue` (a ``ray.util.queue.Queue``, an actor that holds no CPU); a
    driver thread logs each one on the ``unet.train`` logger. :meth:`close` logs what is left.
    """

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unet-train-log-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._log(self.queue.get(timeout=0.5))
            except Empty:
                continue

    @staticmethod
    def _log(item: tuple[int, str]) -> None:
        level, message = item
        logger.log(level, message)

    def close(self) -> None:
        """Stop the thread, log the lines still queued, remove the queue actor."""
        self._stop.set()
        self._thread.join()
        for item in self.queue.get_nowait_batch(self.queue.qsize()):
            self._log(item)
        self.queue.shutdown()


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


def check_runnable(cfg: TrainConfig) -> None:
    """Refuse, before Ray starts, a resolved config that names no data or a model that cannot be built.

    Raises:
        UsageError: no ``data`` (and no smoke test), or ``model``/``model_kwargs`` that
            :func:`unet.models.build_model` refuses (unknown argument or encoder, bad value).
    """
    if not cfg.data and not cfg.smoke_test:
        raise UsageError("no training data: pass --data URI of prepared shards (jobs.prepare), "
                         "or --smoke-test to generate phantoms")
    try:
        build_model(cfg.model, **cfg.model_kwargs)
    except (KeyError, TypeError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f"model {cfg.model!r} with model_kwargs {cfg.model_kwargs}: {message}") from e


def fit(cfg: TrainConfig, *, command: str | None = None) -> FitOutcome:
    """Train (or resume, or just re-export) the run described by ``cfg``; export the best model.

    ``command`` is recorded in checkpoints and the artifact's provenance (default: this process's
    command line).
    """
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    check_runnable(cfg)
    command = command or shlex.join([os.path.basename(sys.executable), *sys.argv])
    started = init_ray(cfg.address, cfg.num_cpus)
    tracker = tracking.NoRun()
    try:
        import ray

        if cfg.smoke_test and not cfg.data:
            cfg = dataclasses.replace(cfg, data=make_smoke_data(cfg))
        tracker = tracking.start(cfg, command=command)  # --mlflow: fed by a driver thread; else a no-op
        previous = previous_result(cfg)
        plan, done = None, 0
        if previous is not None and previous.checkpoint is not None:
            point = resume_point(run_checkpoints_of(previous))
            for skipped in point.skipped:
                logger.warning("checkpoint %s; resuming from the newest checkpoint that loads", skipped)
            if point.state is None:
                raise UsageError(f"run {cfg.run_uri}: no checkpoint loads ({'; '.join(point.skipped)}); delete "
                                 "the run directory or use another --name to start afresh")
            check_same_run(cfg, point.state.get("config", {}), point.checkpoint.path)
            done = point.epoch
            if done >= cfg.epochs:
                logger.info("run %s already finished %d/%d epochs; exporting its best checkpoint",
                            cfg.run_uri, done, cfg.epochs)
                uri, best_epoch, best_metrics, history = export_best(cfg, previous, command=command)
                tracker.finish(uri, history)
                return FitOutcome(uri, cfg.run_uri, best_epoch, best_metrics, history, False, None, None,
                                  time.perf_counter() - t0)
            logger.info("run %s has %d/%d epochs; resuming from %s", cfg.run_uri, done, cfg.epochs,
                        point.checkpoint.path)
        plan = plan_resources(cfg, ray.cluster_resources(), _alive_nodes(), discover_node_types(cfg.node_types))
        # On an autoscaling cluster the probe waits for the GPU node the autoscaler adds for it.
        if cfg.use_gpu and (cfg.check_resources or plan.node_types):
            require_cuda(plan.gpus_per_worker, "--use-gpu")
        logger.info("resources: %s", plan.describe())
        if not storage.exists(storage.join(cfg.data, MANIFEST)):
            logger.warning("%s has no %s; provenance will not pin the data version", cfg.data, MANIFEST)
        # A quiet job's Ray does not forward worker output: the workers' lines (one per epoch)
        # come through a relay instead. A Ray started elsewhere (tests, notebooks) forwards it.
        relay = WorkerLogRelay() if started and is_quiet() else None
        try:
            datasets = build_datasets(cfg)
            datasets["train"] = ResumedTrainSplit(datasets["train"], cfg.run_uri)
            trainer = build_trainer(cfg, plan, datasets, command=command,
                                    log_queue=relay.queue if relay else None, callbacks=tracker.callbacks)
            result = trainer.fit()
        finally:
            if relay is not None:
                relay.close()
        uri, best_epoch, best_metrics, history = export_best(cfg, result, command=command, plan=plan)
        tracker.finish(uri, history)
        start_epoch = (result.metrics or {}).get("start_epoch")
        return FitOutcome(uri, cfg.run_uri, best_epoch, best_metrics, history, True, start_epoch, plan,
                          time.perf_counter() - t0)
    finally:
        tracker.close()  # FAILED unless finished; before Ray (its queue) goes
        if started:
            import ray

            ray.shutdown()


@dataclass
class FoldsOutcome:
    """What :func:`fit_folds` did: one :class:`FitOutcome` per fold and the ensemble of their models."""

    folds: list[FitOutcome]
    artifact: str                 # URI of the ensemble artifact (every fold's model, probabilities averaged)
    data: str                     # the prepared data the folds were drawn from
    seconds: float


def fit_folds(cfg: TrainConfig, *, command: str | None = None) -> FoldsOutcome:
    """K-fold cross-validation over train+val (``cfg.folds``): :func:`fit` each fold in turn (a fold
    already finished is only re-exported, an interrupted one resumes), then write the ensemble of the
    K models (float16 weights) to ``cfg.export_uri``. Calibrate it on the folds' own held-out images
    with ``jobs.calibrate --split oof`` (:func:`unet.calibration.predict_out_of_fold`).
    """
    from unet.artifact import save_ensemble

    t0 = time.perf_counter()
    cfg = cfg.resolved()
    if cfg.folds is None or cfg.fold is not None:
        raise UsageError("fit_folds needs folds=K and no fold (one fold: fit with fold=k)")
    check_runnable(cfg)
    if cfg.smoke_test and not cfg.data:  # one set of phantoms for all folds, so the folds partition it
        cfg = dataclasses.replace(cfg, data=make_smoke_data(cfg))
    outcomes = []
    for k in range(cfg.folds):
        logger.info("fold %d of %d (validated on val@fold%dof%d)", k + 1, cfg.folds, k, cfg.folds)
        outcomes.append(fit(cfg.for_fold(k), command=command))
    artifact, _, _ = save_ensemble([o.artifact for o in outcomes], cfg.export_uri, name=cfg.name,
                                   weights_dtype="float16",
                                   provenance={"command": command, "folds": cfg.folds, "data": cfg.data,
                                               "data_manifest_sha256": manifest_sha256(cfg.data) if cfg.data else None})
    return FoldsOutcome(outcomes, artifact, cfg.data, time.perf_counter() - t0)
