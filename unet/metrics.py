"""Binary segmentation metrics: confusion counts, Dice/IoU/precision/recall, HD95, accumulation.

The habit (torchvision references, MONAI): count TP/FP/FN/TN per image, sum the counts over
batches and across ranks, and compute scores once at the end. Never average per-batch Dice.

Two aggregates are reported by :class:`MetricAccumulator`:

* **micro** ("aggregate"): scores of the summed counts over the whole set — every pixel counts
  equally, so large lesions dominate;
* **macro** ("per image"): the mean over images of each image's score — every image counts
  equally; this is the "mean Dice" most BUSI papers report.

Empty-mask rule (normal images have an empty ground truth), applied by :func:`scores_from_counts`:

* ``tp + fp + fn == 0`` (empty truth, empty prediction): dice = iou = precision = recall = 1.0;
* precision = ``tp / (tp + fp)`` if ``tp + fp > 0`` else (1.0 if ``fn == 0`` else 0.0);
* recall    = ``tp / (tp + fn)`` if ``tp + fn > 0`` else (1.0 if ``fp == 0`` else 0.0);
* dice = ``2tp / (2tp + fp + fn)`` and iou = ``tp / (tp + fp + fn)`` are 0.0 whenever exactly one
  of prediction and truth is empty.

HD95 (:func:`hd95`) is in pixels (or in the units of ``spacing``); both empty -> 0.0, exactly one
empty -> NaN (the distance is undefined). Aggregates take the NaN-ignoring mean and report how many
images were NaN, so undefined cases are never silently dropped.

Inputs to :func:`counts` and :func:`hd95` may be numpy arrays or torch tensors (any device) of
shape ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``; bool, integer (non-zero = foreground, so 0/255
masks work) or float holding only {0, 1}. Threshold probabilities before calling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "MetricAccumulator",
    "auroc",
    "counts",
    "hd95",
    "hd95_per_image",
    "scores_from_counts",
]

ArrayLike = np.ndarray | torch.Tensor


def _binary_batch(x: Any, name: str) -> ArrayLike:
    """Return ``x`` as a bool ``(B, H, W)`` array/tensor (same library and device as given)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype == torch.bool:
            b = t
        elif t.is_floating_point():
            if not bool(((t == 0) | (t == 1)).all()):
                raise ValueError(f"{name} is a float tensor with values other than 0 and 1; threshold it first")
            b = t != 0
        else:
            b = t != 0
    else:
        a = np.asarray(x)
        if a.dtype == np.bool_:
            b = a
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isin(a, (0.0, 1.0)).all():
                raise ValueError(f"{name} is a float array with values other than 0 and 1; threshold it first")
            b = a != 0
        elif np.issubdtype(a.dtype, np.integer):
            b = a != 0
        else:
            raise ValueError(f"{name} has dtype {a.dtype}; expected bool, integer or float {{0, 1}}")
    if b.ndim == 2:
        return b[None]
    if b.ndim == 3:
        return b
    if b.ndim == 4 and b.shape[1] == 1:
        return b[:, 0]
    raise ValueError(f"{name} must have shape (H, W), (B, H, W) or (B, 1, H, W); got {tuple(b.shape)}")


def _binary_pair(pred: Any, target: Any) -> tuple[ArrayLike, ArrayLike]:
    p = _binary_batch(pred, "pred")
    t = _binary_batch(target, "target")
    # Mixed inputs: count where the tensor lives (e.g. on the GPU) rather than copying it back.
    if isinstance(p, torch.Tensor) and not isinstance(t, torch.Tensor):
        t = torch.from_numpy(np.ascontiguousarray(t)).to(p.device)
    elif isinstance(t, torch.Tensor) and not isinstance(p, torch.Tensor):
        p = torch.from_numpy(np.ascontiguousarray(p)).to(t.device)
    if tuple(p.shape) != tuple(t.shape):
        raise ValueError(f"pred shape {tuple(p.shape)} does not match target shape {tuple(t.shape)} (as (B, H, W))")
    return p, t


def counts(pred: Any, target: Any) -> np.ndarray:
    """Per-image confusion counts ``[tp, fp, fn, tn]`` as an int64 array of shape ``(B, 4)``.

    A 2-D input is one image (``B = 1``). Torch tensors are counted on their own device and only
    the ``B x 4`` numbers are copied to the host.
    """
    p, t = _binary_pair(pred, target)
    if isinstance(p, torch.Tensor):
        tp = (p & t).sum(dim=(1, 2))
        fp = (p & ~t).sum(dim=(1, 2))
        fn = (~p & t).sum(dim=(1, 2))
        tn = (~p & ~t).sum(dim=(1, 2))
        return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64).cpu().numpy()
    tp = np.count_nonzero(p & t, axis=(1, 2))
    fp = np.count_nonzero(p & ~t, axis=(1, 2))
    fn = np.count_nonzero(~p & t, axis=(1, 2))
    tn = np.count_nonzero(~p & ~t, axis=(1, 2))
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, when_zero: np.ndarray | float) -> np.ndarray:
    out = np.broadcast_to(np.asarray(when_zero, dtype=np.float64), num.shape).copy()
    np.divide(num, den, out=out, where=den > 0)
    return out


def scores_from_counts(tp: Any, fp: Any, fn: Any) -> dict[str, Any]:
    """Dice, IoU, precision and recall from confusion counts, with the module's empty-mask rule.

    Works elementwise on scalars or arrays: pass one image's counts, a column of per-image counts
    (``c[:, 0], c[:, 1], c[:, 2]`` from :func:`counts`) for per-image scores, or summed counts for the
    aggregate (micro) score. Returns Python floats for scalar input, float64 arrays otherwise.
    """
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    for name, v in (("tp", tp), ("fp", fp), ("fn", fn)):
        if np.any(v < 0) or not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must hold finite counts >= 0; got {v!r}")
    tp, fp, fn = np.broadcast_arrays(tp, fp, fn)
    scores = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "precision": _ratio(tp, tp + fp, np.where(fn == 0, 1.0, 0.0)),
        "recall": _ratio(tp, tp + fn, np.where(fp == 0, 1.0, 0.0)),
    }
    if tp.ndim == 0:
        return {k: float(v) for k, v in scores.items()}
    return scores


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-connected background neighbour (outside the image is background)."""
    return mask ^ ndimage.binary_erosion(mask)


def _hd95_2d(p: np.ndarray, t: np.ndarray, spacing: float | Sequence[float]) -> float:
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if p_any != t_any:
        return math.nan
    # Cropping to the tight bounding box of both masks is exact: every boundary pixel lies inside it
    # and a foreground pixel on its edge has a background neighbour outside it anyway.
    rows = np.flatnonzero((p | t).any(axis=1))
    cols = np.flatnonzero((p | t).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    bp, bt = _boundary(p[box]), _boundary(t[box])
    # distance_transform_edt gives each pixel's distance to the nearest zero, so on ~boundary it is
    # the distance to the nearest boundary pixel of the other mask.
    d_pred_to_true = ndimage.distance_transform_edt(~bt, sampling=spacing)[bp]
    d_true_to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing)[bt]
    return float(max(np.percentile(d_pred_to_true, 95), np.percentile(d_true_to_pred, 95)))


def _check_spacing(spacing: float | Sequence[float]) -> float | tuple[float, float]:
    values = (spacing,) if np.isscalar(spacing) else tuple(spacing)
    if len(values) not in (1, 2) or not all(isinstance(v, (int, float, np.number)) and v > 0 for v in values):
        raise ValueError(f"spacing must be a number > 0 or a pair (row, col) of numbers > 0; got {spacing!r}")
    return float(values[0]) if len(values) == 1 else (float(values[0]), float(values[1]))


def hd95_per_image(pred: Any, target: Any, spacing: float | Sequence[float] = 1.0) -> np.ndarray:
    """HD95 of every image in a batch as a float64 array of shape ``(B,)``; see :func:`hd95`."""
    spacing = _check_spacing(spacing)
    p, t = _binary_pair(pred, target)
    if isinstance(p, torch.Tensor):
        p, t = p.cpu().numpy(), t.cpu().numpy()
    return np.array([_hd95_2d(pi, ti, spacing) for pi, ti in zip(p, t, strict=True)], dtype=np.float64)


def hd95(pred: Any, target: Any, spacing: float | Sequence[float] = 1.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance between one predicted and one true mask.

    Definition (identical to MONAI's ``compute_hausdorff_distance(percentile=95, directed=False)``):
    the boundary of a mask is ``mask XOR binary_erosion(mask)`` (4-connected; pixels on the image
    edge are boundary); ``d(A->B)`` is the set of Euclidean distances from each boundary pixel of A to
    the nearest boundary pixel of B (via ``scipy.ndimage.distance_transform_edt``); the result is
    ``max(percentile95(d(P->T)), percentile95(d(T->P)))`` with numpy's default linear interpolation.
    Note this differs from medpy's ``hd95``, which takes one percentile of both sets concatenated.

    Empties: both masks empty -> 0.0; exactly one empty -> NaN (undefined; aggregates count them).

    Args:
        pred, target: one image each, shape ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``.
        spacing: pixel size, a number or a ``(row, col)`` pair; 1.0 gives pixels.
    """
    values = hd95_per_image(pred, target, spacing)
    if values.shape != (1,):
        raise ValueError(f"hd95 takes one image; got a batch of {values.shape[0]} — use hd95_per_image")
    return float(values[0])


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` images (Mann-Whitney U / (P N),
    ties counted half). NaN when either class is missing.

    Example:
        >>> auroc([0.9, 0.2, 0.6, 0.4], [True, False, True, False])
        1.0
    """
    from scipy.stats import rankdata

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and positive must be 1-D of the same length; got {s.shape} and {y.shape}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class MetricAccumulator:
    """Accumulate confusion counts (and optionally HD95) over batches, reduce across ranks, score once.

    Its whole state is one float64 vector of sums (:meth:`state`), so combining workers is a plain
    element-wise sum: :meth:`all_reduce` under ``torch.distributed``, or :meth:`merge` by hand.
    Float64 holds integer counts exactly up to 2**53 pixels.

    Args:
        with_hd95: also compute HD95 per image (costs a distance transform per image).
        spacing: pixel spacing passed to :func:`hd95`.

    Example:
        >>> acc = MetricAccumulator()
        >>> acc.update(pred_batch, mask_batch)            # doctest: +SKIP
        >>> acc.all_reduce()                              # doctest: +SKIP
        >>> acc.compute()["dice_macro"]                   # doctest: +SKIP
    """

    FIELDS = (
        "tp", "fp", "fn", "tn", "images",
        "dice_sum", "iou_sum", "precision_sum", "recall_sum",
        "hd95_sum", "hd95_images", "hd95_nan",
    )  # fmt: skip

    def __init__(self, with_hd95: bool = False, spacing: float | Sequence[float] = 1.0) -> None:
        self.with_hd95 = bool(with_hd95)
        self.spacing = _check_spacing(spacing)
        self._state = np.zeros(len(self.FIELDS), dtype=np.float64)

    def update(self, pred: Any, target: Any) -> np.ndarray:
        """Add a batch; returns its per-image counts ``(B, 4)`` (e.g. for per-image logging)."""
        c = counts(pred, target)
        per_image = scores_from_counts(c[:, 0], c[:, 1], c[:, 2])
        s = self._state
        s[0:4] += c.sum(axis=0)
        s[4] += c.shape[0]
        s[5:9] += [per_image[k].sum() for k in ("dice", "iou", "precision", "recall")]
        if self.with_hd95:
            h = hd95_per_image(pred, target, self.spacing)
            defined = ~np.isnan(h)
            s[9] += h[defined].sum()
            s[10] += defined.sum()
            s[11] += (~defined).sum()
        return c

    def state(self) -> np.ndarray:
        """A copy of the summable state vector (order :attr:`FIELDS`)."""
        return self._state.copy()

    def merge(self, other: MetricAccumulator | np.ndarray) -> MetricAccumulator:
        """Add another accumulator's (or state vector's) sums into this one; returns self."""
        vec = other.state() if isinstance(other, MetricAccumulator) else np.asarray(other, dtype=np.float64)
        if vec.shape != self._state.shape:
            raise ValueError(
                f"state vector must have shape {self._state.shape} (fields {self.FIELDS}); got {vec.shape}"
            )
        self._state += vec
        return self

    def all_reduce(self, device: torch.device | str | None = None) -> MetricAccumulator:
        """Sum the state over all ranks of the default ``torch.distributed`` group; returns self.

        A no-op when no process group is initialised (single process). ``device`` is where the
        reduction tensor lives: NCCL needs a CUDA device; defaults to the current CUDA device under
        NCCL and to the CPU otherwise.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        if device is None:
            nccl = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        vec = torch.from_numpy(self._state.copy()).to(device)
        torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.SUM)
        self._state = vec.cpu().numpy().astype(np.float64)
        return self

    def compute(self) -> dict[str, float]:
        """Scores of everything accumulated.

        Keys: ``images``; ``{dice,iou,precision,recall}_micro`` (scores of the summed counts);
        ``{dice,iou,precision,recall}_macro`` (mean of per-image scores); ``tp, fp, fn, tn``; and with
        HD95: ``hd95`` (mean over images where it is defined; NaN if none), ``hd95_images`` (how many
        were defined) and ``hd95_nan`` (how many had exactly one empty mask).
        """
        s = dict(zip(self.FIELDS, self._state.tolist(), strict=True))
        n = s["images"]
        if n == 0:
            raise ValueError("no images were accumulated; call update() (and all_reduce()) before compute()")
        micro = scores_from_counts(s["tp"], s["fp"], s["fn"])
        out: dict[str, float] = {"images": int(n)}
        for k in ("dice", "iou", "precision", "recall"):
            out[f"{k}_micro"] = micro[k]
            out[f"{k}_macro"] = s[f"{k}_sum"] / n
        for k in ("tp", "fp", "fn", "tn"):
            out[k] = int(s[k])
        if self.with_hd95:
            out["hd95"] = s["hd95_sum"] / s["hd95_images"] if s["hd95_images"] else math.nan
            out["hd95_images"] = int(s["hd95_images"])
            out["hd95_nan"] = int(s["hd95_nan"])
        return out
