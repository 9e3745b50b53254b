"""Distributed training on Ray Train (V2 ``TorchTrainer``): config, resources, loop, checkpoints.

The pieces, in the order a reader meets them in a run:

1. :mod:`.config` — :class:`TrainConfig`, every knob of a run (``jobs/train.py`` is the CLI).
2. :mod:`.resources` — :func:`plan_resources`: CPUs/GPUs per Train worker and what stays free
   for Ray Data; a request the cluster cannot hold is refused up front in one line.
3. :mod:`.optim` — loss, optimiser, per-epoch learning-rate schedule, mixed precision.
4. :mod:`.loop` — :func:`train_loop_per_worker`, run on every worker: train one epoch, validate
   (counts summed over ranks, scores computed once), report a checkpoint.
5. :mod:`.checkpoints` — checkpoint files, resume checks, export of the best checkpoint.
6. :mod:`.driver` — :func:`fit`: datasets, the ``TorchTrainer``, resume, export;
   :func:`fit_folds`: K-fold cross-validation over train+val and the ensemble of the folds.

Example::

    from unet.training import TrainConfig, fit
    outcome = fit(TrainConfig(smoke_test=True, storage="runs"))
    print(outcome.artifact)
"""

from .checkpoints import CHECKPOINT_FILE, export_best, load_checkpoint_state
from .config import MONITORS, PLACEMENT_STRATEGIES, TrainConfig, load_config_file, parse_workers
from .driver import FitOutcome, FoldsOutcome, SplitValDataConfig, build_datasets, build_trainer, fit, fit_folds
from .loop import evaluate, log_epoch, reduce_metrics, scores, train_loop_per_worker, train_one_epoch, validate
from .optim import (AMP_DTYPES, OPTIMIZERS, SCHEDULES, autocast, build_loss_fn, build_optimizer,
                    build_scheduler, lr_factor)
from .resources import ResourcePlan, plan_resources

__all__ = [
    "AMP_DTYPES", "CHECKPOINT_FILE", "MONITORS", "OPTIMIZERS", "PLACEMENT_STRATEGIES", "SCHEDULES",
    "FitOutcome", "FoldsOutcome", "ResourcePlan", "SplitValDataConfig", "TrainConfig",
    "autocast", "build_datasets", "build_loss_fn", "build_optimizer", "build_scheduler", "build_trainer",
    "evaluate", "export_best", "fit", "fit_folds", "load_checkpoint_state", "load_config_file", "log_epoch", "lr_factor",
    "parse_workers", "plan_resources", "reduce_metrics", "scores", "train_loop_per_worker", "train_one_epoch",
    "validate",
]
