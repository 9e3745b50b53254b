"""Summaries of per-image scores: means with percentile-bootstrap intervals, per class, and the
two failure modes the project reports: false lesions on normal images and Dice on lesion images
(with the missed-lesion rate beside it). For models with an image-level head, how well its
``p(lesion)`` separates lesion from normal images (AUROC) and what the gate keeps and removes.

Every interval resamples images (the unit that is independent), with a fixed random stream per
group so that adding a group never changes another group's interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from unet import metrics as M
from unet.shards import CLASSES

__all__ = ["SCORES", "auroc_ci", "bootstrap_ci", "summarize"]

SCORES = ("dice", "iou", "precision", "recall", "hd95")
# Fixed stream ids per group so that one group's CI does not change when another group is added.
_GROUP_STREAM = {"overall": 0, "benign": 1, "malignant": 2, "normal": 3, "false_lesion": 4, "missed_lesion": 5,
                 "lesion": 6, "gate_auroc": 7, "gate_sensitivity": 8, "gate_specificity": 9, "malignant_auroc": 10}


def bootstrap_ci(values: np.ndarray, *, n_bootstrap: int, seed: int | Sequence[int], ci: float = 0.95,
                 statistic: str = "mean", pooled: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over images (resampled with replacement).

    ``statistic="mean"``: NaN-ignoring mean of ``values`` (one per image). ``statistic="dice"`` or
    ``"iou"``: the micro score of summed counts, with ``pooled`` an ``(n, 3)`` array of per-image
    ``tp, fp, fn``. Resamples whose statistic is undefined (all NaN) are left out of the percentiles.
    Returns ``(nan, nan)`` for no images or ``n_bootstrap == 0``.
    """
    n = len(values) if pooled is None else len(pooled)
    if n == 0 or n_bootstrap <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.empty(n_bootstrap, dtype=np.float64)
    # Chunked so memory stays ~ 4M indices whatever the set size.
    chunk = max(1, min(n_bootstrap, 4_000_000 // n))
    for start in range(0, n_bootstrap, chunk):
        stop = min(n_bootstrap, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        if statistic == "mean":
            v = values[idx]
            defined = ~np.isnan(v)
            k = defined.sum(axis=1)
            s = np.where(defined, v, 0.0).sum(axis=1)
            stats[start:stop] = np.divide(s, k, out=np.full(len(k), np.nan), where=k > 0)
        elif statistic in ("dice", "iou"):
            tp, fp, fn = (pooled[:, j][idx].sum(axis=1) for j in range(3))
            stats[start:stop] = M.scores_from_counts(tp, fp, fn)[statistic]
        else:
            raise ValueError(f"statistic must be 'mean', 'dice' or 'iou'; got {statistic!r}")
    return _percentile_interval(stats, ci)


def _percentile_interval(stats: np.ndarray, ci: float) -> tuple[float, float]:
    """The central ``ci`` interval of the defined (non-NaN) bootstrap statistics; NaNs if none."""
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def auroc_ci(scores: np.ndarray, positive: np.ndarray, *, n_bootstrap: int, seed: int | Sequence[int],
             ci: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`unet.metrics.auroc` over images resampled with
    replacement; resamples that lack either class are left out. ``(nan, nan)`` when undefined."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n = len(scores)
    if n == 0 or n_bootstrap <= 0 or positive.all() or not positive.any():
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    stats = np.array([M.auroc(scores[i], positive[i]) for i in idx])
    return _percentile_interval(stats, ci)


def _stat(mean: float, ci: tuple[float, float], **extra: Any) -> dict[str, Any]:
    return {"mean": mean, "ci_low": ci[0], "ci_high": ci[1], **extra}


def _nanmean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def _group_summary(df: pd.DataFrame, *, n_bootstrap: int, seed: int, stream: int, ci: float) -> dict:
    """Means with CIs for one group of images; every metric uses the same resamples (same seed)."""
    key = [seed, stream]
    out: dict[str, Any] = {"images": int(len(df))}
    for name in SCORES:
        v = df[name].to_numpy(dtype=np.float64)
        extra = {}
        if name == "hd95":
            defined = int((~np.isnan(v)).sum())
            extra = {"images_defined": defined, "images_undefined": int(len(v) - defined)}
        out[name] = _stat(_nanmean(v), bootstrap_ci(v, n_bootstrap=n_bootstrap, seed=key, ci=ci), **extra)
    pooled = df[["tp", "fp", "fn"]].to_numpy(dtype=np.float64)
    micro = M.scores_from_counts(*pooled.sum(axis=0)) if len(df) else {"dice": math.nan, "iou": math.nan}
    for name in ("dice", "iou"):
        ci_ = bootstrap_ci(np.empty(0), n_bootstrap=n_bootstrap, seed=key, ci=ci, statistic=name, pooled=pooled)
        out[f"{name}_micro"] = _stat(float(micro[name]), ci_)
    out["tp"], out["fp"], out["fn"], out["tn"] = (int(df[c].sum()) for c in ("tp", "fp", "fn", "tn"))
    return out


def _rate(flags: np.ndarray, *, n_bootstrap: int, seed: int, stream: int, ci: float) -> dict:
    v = flags.astype(np.float64)
    mean = float(v.mean()) if v.size else math.nan
    return _stat(mean, bootstrap_ci(v, n_bootstrap=n_bootstrap, seed=[seed, stream], ci=ci),
                 images=int(v.size), count=int(v.sum()))


def _auroc(scores: np.ndarray, positive: np.ndarray, *, n_bootstrap: int, seed: int, stream: int,
           ci: float) -> dict:
    return _stat(M.auroc(scores, positive),
                 auroc_ci(scores, positive, n_bootstrap=n_bootstrap, seed=[seed, stream], ci=ci),
                 images=int(len(scores)), positive=int(np.sum(positive)))


def _image_head(per_image: pd.DataFrame, gate_threshold: float | None, kw: dict) -> dict[str, Any]:
    """``gate`` and ``malignant_auroc`` from the per-image ``lesion_probability`` /
    ``malignant_probability`` columns; both None for a model without an image head (columns absent
    or all NaN)."""
    if "lesion_probability" not in per_image or per_image["lesion_probability"].isna().all():
        return {"gate": None, "malignant_auroc": None}
    has = per_image[per_image["lesion_probability"].notna()]
    p = has["lesion_probability"].to_numpy(dtype=np.float64)
    lesion = (has["class"] != "normal").to_numpy()
    # Same rule as unet.postprocess.final_mask: an image is gated when p(lesion) < gate_threshold.
    kept = np.ones(len(p), bool) if gate_threshold is None else ~(p < gate_threshold)
    gate = {
        "threshold": gate_threshold,
        "auroc": _auroc(p, lesion, stream=_GROUP_STREAM["gate_auroc"], **kw),
        "sensitivity": _rate(kept[lesion], stream=_GROUP_STREAM["gate_sensitivity"], **kw),
        "specificity": _rate(~kept[~lesion], stream=_GROUP_STREAM["gate_specificity"], **kw),
    }
    malignant = None
    if "malignant_probability" in has:
        among = has[lesion & has["malignant_probability"].notna().to_numpy()]
        malignant = _auroc(among["malignant_probability"].to_numpy(dtype=np.float64),
                           (among["class"] == "malignant").to_numpy(), stream=_GROUP_STREAM["malignant_auroc"], **kw)
    return {"gate": gate, "malignant_auroc": malignant}


def summarize(per_image: pd.DataFrame, *, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95,
              gate_threshold: float | None = None) -> dict:
    """Summaries overall, per class (classes present only), the failure rates and the image head.

    Keys: ``overall`` and ``per_class[cls]`` each hold ``images``, ``{dice,iou,precision,recall,
    hd95}`` and ``{dice,iou}_micro`` as ``{"mean", "ci_low", "ci_high"}`` (hd95 also counts the
    images where it is defined/undefined) plus summed ``tp, fp, fn, tn``;
    ``false_lesion_rate`` (normal images with any predicted pixel) and ``missed_lesion_rate``
    (benign/malignant images with none), each ``{"mean", "ci_low", "ci_high", "images", "count"}``;
    ``lesion_dice``: mean per-image Dice over benign+malignant images (``{"mean", "ci_low",
    "ci_high", "images"}``).

    For a model with an image head (a ``lesion_probability`` column that is not all NaN), ``gate``
    holds ``threshold`` (``gate_threshold``, the one used; None = no gate), ``auroc`` of
    ``lesion_probability`` for lesion vs normal images (with ``positive``: the lesion images), and
    at that threshold ``sensitivity`` (share of lesion images kept) and ``specificity`` (share of
    normal images gated) as rates; ``malignant_auroc`` is the AUROC of ``malignant_probability``
    for malignant vs benign among the lesion images. Both are None without a head. AUROCs are NaN
    when a class is missing; every interval is a percentile bootstrap over images.
    """
    if len(per_image) == 0:
        raise ValueError("no images to summarise: the split is empty")
    kw = dict(n_bootstrap=n_bootstrap, seed=seed, ci=ci)
    per_class = {
        cls: _group_summary(per_image[per_image["class"] == cls], stream=_GROUP_STREAM[cls], **kw)
        for cls in CLASSES if (per_image["class"] == cls).any()
    }
    normal = per_image[per_image["class"] == "normal"]
    lesion = per_image[per_image["class"] != "normal"]
    lesion_dice = lesion["dice"].to_numpy(dtype=np.float64)
    return {
        "overall": _group_summary(per_image, stream=_GROUP_STREAM["overall"], **kw),
        "per_class": per_class,
        "lesion_dice": _stat(_nanmean(lesion_dice), bootstrap_ci(lesion_dice, seed=[seed, _GROUP_STREAM["lesion"]],
                                                                 n_bootstrap=n_bootstrap, ci=ci),
                             images=int(len(lesion))),
        "false_lesion_rate": _rate((normal["pred_pixels"] > 0).to_numpy(), stream=_GROUP_STREAM["false_lesion"], **kw),
        "missed_lesion_rate": _rate((lesion["pred_pixels"] == 0).to_numpy(), stream=_GROUP_STREAM["missed_lesion"], **kw),
        **_image_head(per_image, gate_threshold, kw),
    }
