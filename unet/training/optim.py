"""Loss, optimiser, learning-rate schedule and mixed precision of a run, each from a registry.

The registries' keys are the valid ``optimizer``/``schedule``/``amp`` settings of
:class:`unet.training.TrainConfig` (and the choices of ``jobs.train``).

Schedules are per epoch (linear warm-up, then the decay), so that they stay right when an elastic
run changes its worker count, which changes the steps per epoch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from unet.losses import DeepSupervisionLoss, build_loss

__all__ = ["AMP_DTYPES", "OPTIMIZERS", "SCHEDULES", "autocast", "build_loss_fn", "build_optimizer",
           "build_scheduler", "lr_factor"]


def _adamw(params: Iterable[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _sgd(params: Iterable[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], Any], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,  # momentum, Nesterov
}

# Decay after warm-up as a function of t, the fraction of the decay phase already done.
SCHEDULES: dict[str, Callable[[float, Any], float]] = {
    "poly": lambda t, cfg: (1.0 - t) ** cfg.poly_power,
    "cosine": lambda t, cfg: 0.5 * (1.0 + math.cos(math.pi * t)),
    "constant": lambda t, cfg: 1.0,
}

# fp16 needs a GPU (the config refuses it on CPU); bf16 also works on CPU.
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_loss_fn(cfg: Any) -> nn.Module:
    """The configured loss, wrapped for deep supervision (a no-op for single-output models)."""
    return DeepSupervisionLoss(build_loss(cfg.loss, **cfg.loss_kwargs))


def build_optimizer(cfg: Any, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def lr_factor(epoch_index: int, cfg: Any) -> float:
    """Multiplier of ``cfg.lr`` during epoch ``epoch_index`` (0-based).

    Linear warm-up over ``warmup_epochs`` (from 1/(warmup+1) up to just below 1), then ``poly``:
    ``(1 - t)^power`` or ``cosine``: ``(1 + cos(pi t)) / 2``, with t the fraction of the decay phase
    already done — so the last epoch still learns (t < 1).
    """
    warm = cfg.warmup_epochs
    if epoch_index < warm:
        return (epoch_index + 1) / (warm + 1)
    t = (epoch_index - warm) / max(1, cfg.epochs - warm)
    return SCHEDULES[cfg.schedule](t, cfg)


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch ``LambdaLR`` for :func:`lr_factor`.

    The factor is a closure, so the scheduler's state dict keeps only its position: a resumed run
    with more ``epochs`` follows the new schedule from where it is.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))


def autocast(amp: str, device: torch.device):
    """The autocast context for ``amp`` (``none``/``bf16``/``fp16``) on ``device``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
