"""Segmentation losses on logits: soft Dice, BCE-with-logits, their weighted sum, deep supervision.

Every loss takes raw logits ``(B, 1, H, W)`` and a target of the same shape holding {0, 1}
(float, bool or integer; a ``(B, H, W)`` target is accepted for ``(B, 1, H, W)`` logits) and
returns a scalar tensor. All work is done in float32 so that mixed-precision logits cannot
overflow the Dice sums.

Empty masks (BUSI's "normal" images) are a first-class case: the Dice term carries a smoothing
constant, so an empty prediction on an empty mask gives a loss of ~0 and never NaN.

Example:
    >>> import torch
    >>> from unet.losses import build_loss
    >>> loss_fn = build_loss("dice_bce", dice_weight=1.0, bce_weight=0.5)
    >>> logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    >>> target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    >>> loss = loss_fn(logits, target)
    >>> loss.backward()
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "BCEWithLogitsLoss",
    "DeepSupervisionLoss",
    "DiceBCELoss",
    "SoftDiceLoss",
    "build_loss",
    "deep_supervision_weights",
]


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, target) as float32 tensors of one shape, or raise ValueError saying why."""
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (B, 1, H, W); got {tuple(logits.shape)}")
    if target.ndim == 3:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}; "
            "resize the mask to the model's output size"
        )
    return logits.float(), target.to(device=logits.device, dtype=torch.float32)


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


class SoftDiceLoss(nn.Module):
    """Soft Dice loss ``1 - (2|P∩T| + s) / (|P| + |T| + s)`` on ``P = sigmoid(logits)``.

    The Dice ratio is computed **per image** and then averaged over the batch (default), so each
    image counts equally whatever its lesion size — the same weighting as the per-image (macro)
    Dice that evaluation reports. With ``per_image=False`` the sums run over the whole batch
    ("batch-global" Dice), which weights large lesions more and is smoother when most images in a
    batch are empty.

    The smoothing ``s`` keeps the ratio defined when both prediction and mask are empty (normal
    images): a confident empty prediction then gives ``≈ 0`` loss, while ``k`` false-positive
    pixels cost about ``k / (k + s)``.

    Args:
        smooth: additive smoothing ``s`` (> 0). Default 1.0.
        per_image: compute Dice per image then average (True, default) or over the whole batch.
    """

    def __init__(self, smooth: float = 1.0, per_image: bool = True) -> None:
        super().__init__()
        smooth = _check_non_negative("smooth", smooth)
        if smooth == 0:
            raise ValueError("smooth must be > 0 so that empty masks do not give 0/0 = NaN; got 0")
        self.smooth = smooth
        self.per_image = bool(per_image)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _check_pair(logits, target)
        prob = torch.sigmoid(logits)
        dims = (1, 2, 3) if self.per_image else (0, 1, 2, 3)
        intersection = (prob * target).sum(dims)
        total = prob.sum(dims) + target.sum(dims)
        dice = (2.0 * intersection + self.smooth) / (total + self.smooth)
        return 1.0 - dice.mean()

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, per_image={self.per_image}"


class BCEWithLogitsLoss(nn.Module):
    """Pixel-wise binary cross-entropy on logits (numerically stable), mean over all pixels."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _check_pair(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target)


class DiceBCELoss(nn.Module):
    """Weighted sum ``dice_weight * SoftDice + bce_weight * BCE``.

    BCE gives dense, well-scaled gradients early in training; Dice counters the foreground/
    background imbalance of small lesions.

    Args:
        dice_weight: weight of the soft Dice term (>= 0). Default 1.0.
        bce_weight: weight of the BCE term (>= 0). Default 1.0. At least one weight must be > 0.
        smooth: Dice smoothing, see :class:`SoftDiceLoss`. Default 1.0.
        per_image: Dice per image (True) or batch-global, see :class:`SoftDiceLoss`.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = 1.0,
        per_image: bool = True,
    ) -> None:
        super().__init__()
        self.dice_weight = _check_non_negative("dice_weight", dice_weight)
        self.bce_weight = _check_non_negative("bce_weight", bce_weight)
        if self.dice_weight == 0 and self.bce_weight == 0:
            raise ValueError("dice_weight and bce_weight are both 0; set at least one of them > 0")
        self.dice = SoftDiceLoss(smooth=smooth, per_image=per_image)
        self.bce = BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}"


def deep_supervision_weights(num_heads: int) -> list[float]:
    """Weights for ``num_heads`` supervision heads ordered shallowest first, final head last.

    The final head gets the largest weight and each earlier head half of the next one's; the
    weights are normalised to sum to 1. E.g. 4 heads -> [1/15, 2/15, 4/15, 8/15].
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    raw = [0.5 ** (num_heads - 1 - i) for i in range(num_heads)]
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Apply ``base`` to every deep-supervision head and combine with halving weights.

    Order convention: a list of logits is ordered like UNet++'s heads ``[x_0_1, x_0_2, x_0_3, x_0_4]``
    — shallowest first, **the last entry is the final (full-depth) output** and gets the largest
    weight; see :func:`deep_supervision_weights`. Every head must have the target's shape.
    A single tensor (a model without deep supervision, or UNet++ in eval mode) is passed straight
    to ``base``, so one training loop serves every architecture.

    Args:
        base: a loss module ``base(logits, target) -> scalar``, e.g. ``build_loss("dice_bce")``.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not callable(base):
            raise ValueError(f"base must be a loss module called as base(logits, target); got {type(base).__name__}")
        self.base = base

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, target)
        outputs = list(outputs)
        if not outputs:
            raise ValueError("outputs is an empty list; expected one logits tensor per supervision head")
        weights = deep_supervision_weights(len(outputs))
        return sum(w * self.base(out, target) for w, out in zip(weights, outputs, strict=True))


LOSSES: dict[str, type[nn.Module]] = {
    "dice": SoftDiceLoss,
    "bce": BCEWithLogitsLoss,
    "dice_bce": DiceBCELoss,
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: ``"dice"``, ``"bce"`` or ``"dice_bce"``; kwargs go to its class.

    Raises:
        KeyError: unknown name (the message lists the valid names).
        ValueError: a bad argument value (the message names the argument).
        TypeError: an argument the chosen loss does not take.
    """
    try:
        cls = LOSSES[name]
    except KeyError as e:
        raise KeyError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}") from e
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"build_loss({name!r}): {e}") from e
