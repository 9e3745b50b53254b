"""Pixel rules shared by every step: source files -> grey/mask pixels, and shard PNG cells.

Training data (:mod:`unet.sources`, run by ``jobs.prepare``) and inference inputs
(:func:`unet.inference.decode.decode_image`) go through the same functions here, so a model sees an
image the same way whichever door it came in by:

* :func:`image_pixels` / :func:`mask_pixels`: an opened Pillow image -> ``(H, W)`` pixels as a
  viewer shows them (EXIF orientation applied, :func:`orient`), then :func:`to_grey8` (images) or
  :func:`to_binary_mask` (masks).
* :func:`encode_png` / :func:`encode_mask_png`: what a shard (or an inference output) stores —
  8-bit grey PNG, masks as 0/255.
* :func:`decode_png`: a shard's PNG cell back to ``(H, W) uint8``, or a ``ValueError`` naming the
  sample and the column.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> to_grey8(Image.fromarray(np.full((1, 2), 257 * 40, np.uint16))).tolist()  # 16-bit: round(v / 257)
    [[40, 40]]
    >>> decode_png(encode_mask_png(np.eye(2, dtype=bool)), sample="a", column="mask_png").tolist()
    [[255, 0], [0, 255]]
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = ["decode_png", "encode_mask_png", "encode_png", "image_pixels", "mask_pixels", "orient",
           "to_binary_mask", "to_grey8"]


def orient(img: Image.Image) -> Image.Image:
    """A copy of `img` turned as a viewer shows it: EXIF orientation applied (tag 0x0112), fully
    decoded. Images and their masks both go through this, so a pair stays aligned whenever both
    files are stored as they are displayed (an annotation tool draws on the displayed image)."""
    return ImageOps.exif_transpose(img)


def to_grey8(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> (H, W) uint8 grey.

    Rules: 16-bit modes (``I;16*``) scale linearly, 65535 -> 255 (``round(v / 257)``), so a 16-bit
    copy of an 8-bit image decodes to the same pixels; 32-bit integer ``I`` does the same when
    its values fit 0..65535, else is stretched min..max; float ``F`` in [0, 1] scales by 255,
    else is stretched min..max; every other mode (1, L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, ...)
    goes through Pillow's ``convert("L")`` (ITU-R 601 luma; alpha is ignored, palettes resolved),
    and modes Pillow cannot take to L directly (e.g. HSV) through RGB first.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        values = np.asarray(img).astype(np.float32)
        return np.round(values / 257.0).astype(np.uint8)
    if mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "I" and lo >= 0 and hi <= 65535:
            scaled = values / 257.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            scaled = values * 255.0
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        return np.round(np.nan_to_num(np.clip(scaled, 0, 255))).astype(np.uint8)
    try:
        grey = img.convert("L")
    except ValueError:
        grey = img.convert("RGB").convert("L")
    return np.asarray(grey, dtype=np.uint8)


def to_binary_mask(img: Image.Image) -> np.ndarray:
    """Any Pillow mask -> (H, W) bool: True where any colour channel is non-zero (alpha ignored).

    Palettes are resolved to their colours first (index 0 need not be black), and other
    multi-channel modes (CMYK, YCbCr, ...) are read as RGB.
    """
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "F") and not img.mode.startswith("I"):
        img = img.convert("RGB")
    values = np.asarray(img)
    if values.ndim == 3:
        values = values[..., :3] if values.shape[2] >= 3 else values[..., :1]  # drop alpha
        return (values > 0).any(axis=2)
    return values > 0


def image_pixels(img: Image.Image) -> np.ndarray:
    """An opened source image -> (H, W) uint8 grey as displayed (:func:`orient`, :func:`to_grey8`)."""
    return to_grey8(orient(img))


def mask_pixels(img: Image.Image) -> np.ndarray:
    """An opened mask file -> (H, W) bool as displayed (:func:`orient`, :func:`to_binary_mask`)."""
    return to_binary_mask(orient(img))


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (OpenCV's default compression: same array, same bytes)."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:  # cv2 reports failure by a flag, not an exception
        raise ValueError(f"could not PNG-encode an array of shape {array.shape} and dtype {array.dtype}")
    return encoded.tobytes()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """(H, W) mask (bool, or non-zero = lesion) -> 8-bit PNG with values 0/255."""
    return encode_png(np.where(np.asarray(mask) > 0, np.uint8(255), np.uint8(0)))


def decode_png(data: bytes | None, *, sample: str, column: str, where: str | None = None) -> np.ndarray:
    """A shard's PNG cell (``image_png``, ``mask_png``, ``pred_png``) -> (H, W) uint8.

    Shards hold 8-bit grey PNGs (:func:`encode_png`); colour PNGs are read as grey (luma). A
    missing cell, bytes that are not a PNG, or a 16-bit PNG raise ``ValueError`` naming the
    sample, the column and, when given, `where` (e.g. the shard's URI).
    """
    context = f"{where + ': ' if where else ''}sample {sample!r}: column {column!r}"
    if not data:
        raise ValueError(f"{context} is empty; re-run jobs.prepare")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{context} holds no decodable PNG ({len(data)} bytes)")
    if img.ndim == 3:  # tolerate colour PNGs; the contract says 8-bit grey
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:
        raise ValueError(f"{context} is a {img.dtype} PNG; prepared shards hold 8-bit PNGs")
    return img
