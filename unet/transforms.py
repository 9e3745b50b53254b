"""Deterministic pixel transforms shared by training, evaluation and inference.

One place decides how an 8-bit grey image becomes a model input and how a prediction goes
back to the original size, so training and serving cannot drift apart.
"""

from __future__ import annotations

import cv2
import numpy as np


# Default intensity normalisation (stored in every model artifact's config.json).
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25


def single_threaded_opencv() -> None:
    """Make OpenCV run on the calling thread only. For Ray tasks sized at a CPU or less (decode,
    post-processing): OpenCV's own pool would otherwise spread resizes over every core and
    compete with the model actors' threads."""
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W) uint8 grey image to `size` = (height, width) with area/linear interpolation."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrinking = image.shape[0] > h or image.shape[1] > w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W) label mask to `size` = (height, width) with nearest neighbour (labels stay labels)."""
    h, w = size
    if mask.shape[:2] == (h, w):
        return mask
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def quantize_probability(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (any shape) -> uint8 ``round(p * 255)``, at the model's size.

    What the inference model actor hands on (a quarter of float32's bytes), and what evaluation and
    calibration use too, so that their masks are the job's masks exactly; the error is at most
    1/510, far below any threshold step.
    """
    return np.rint(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8)


def resize_probability(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W) probability map back to `size` = (height, width), bilinear -> float32 in [0, 1].

    A uint8 map (:func:`quantize_probability`) is resized as uint8 (OpenCV's fast fixed-point path),
    then divided by 255; a float map is resized as it is.
    """
    h, w = size
    if prob.shape[:2] != (h, w):
        prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    return prob.astype(np.float32) / 255.0 if prob.dtype == np.uint8 else prob


def normalize(image: np.ndarray, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> np.ndarray:
    """uint8 (…, H, W) → float32 ((x / 255) - mean) / std."""
    return ((image.astype(np.float32) / 255.0) - mean) / std


def preprocess(image: np.ndarray, size: tuple[int, int], mean: float = DEFAULT_MEAN,
               std: float = DEFAULT_STD) -> np.ndarray:
    """(H, W) uint8 grey → (1, h, w) float32 model input."""
    return normalize(resize_image(image, size), mean, std)[None]
