"""From probabilities to the mask a reader sees: threshold, image-level gate, small-component
removal, largest component — the same steps in evaluation, calibration and inference.

NumPy and SciPy only (no torch): inference runs it in light post-processing tasks. The values come
from :class:`unet.settings.ModelSettings` (chosen on validation by ``jobs.calibrate``).

Example:
    >>> import numpy as np
    >>> prob = np.zeros((8, 8), np.float32); prob[1:4, 1:4] = 0.9; prob[6, 6] = 0.8
    >>> int(final_mask(prob, threshold=0.5).sum()), int(final_mask(prob, threshold=0.5, min_area=0.05).sum())
    (10, 9)
    >>> bool(final_mask(prob, threshold=0.5, lesion_probability=0.2, gate_threshold=0.3).any())
    False
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from unet.shards import CLASSES

__all__ = ["CONNECTIVITY", "final_mask", "image_probabilities"]

CONNECTIVITY = np.ones((3, 3), bool)  # 8-connected components


def image_probabilities(class_prob: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(p(lesion) = 1 - p(normal), p(malignant))`` per image from an image head's class
    probabilities ``(B, len(CLASSES))`` in :data:`unet.shards.CLASSES` order; (None, None) without."""
    if class_prob is None:
        return None, None
    class_prob = np.asarray(class_prob, dtype=np.float32)
    if class_prob.ndim != 2 or class_prob.shape[1] != len(CLASSES):
        raise ValueError(f"class probabilities must be (B, {len(CLASSES)}) in the order {CLASSES}; "
                         f"got shape {class_prob.shape}")
    return 1.0 - class_prob[:, CLASSES.index("normal")], class_prob[:, CLASSES.index("malignant")]


def final_mask(prob: np.ndarray, *, threshold: float, lesion_probability: float | None = None,
               gate_threshold: float | None = None, min_area: float = 0.0,
               largest_component: bool = False) -> np.ndarray:
    """The bool mask for one (H, W) probability map at the image's own size.

    Steps, in order: ``prob >= threshold``; emptied when ``lesion_probability`` (from an image
    head) is below ``gate_threshold`` (no gate when either is None or NaN); components smaller than
    ``min_area`` × H × W pixels removed; only the largest component kept if ``largest_component``.
    """
    mask = np.asarray(prob) >= threshold
    gated = (gate_threshold is not None and lesion_probability is not None
             and not math.isnan(lesion_probability) and lesion_probability < gate_threshold)
    if gated or not mask.any():
        return np.zeros_like(mask) if gated else mask
    if min_area > 0 or largest_component:
        labels, count = ndimage.label(mask, structure=CONNECTIVITY)
        if count:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            keep = sizes >= min_area * mask.size
            keep[0] = False
            if largest_component and keep.any():
                keep = np.zeros_like(keep)
                keep[int(sizes.argmax())] = sizes.max() >= min_area * mask.size
            mask = keep[labels]
    return mask
