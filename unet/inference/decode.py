"""Image bytes -> 8-bit grey pixels, for any file a scanner or a PACS export may produce.

One function decides how awkward encodings (16-bit, float, alpha, palette, CMYK, EXIF-rotated)
become the ``(H, W) uint8`` grey image the models take, and which inputs are unusable
(:class:`DecodeError`, whose message ends up in the output's ``error`` column).

Example:
    >>> import io, numpy as np
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.fromarray(np.full((2, 3), 257 * 40, np.uint16)).save(buf, "PNG")
    >>> decode_image(buf.getvalue()).tolist()   # 16-bit scales to 8-bit: 257 * v -> v
    [[40, 40, 40], [40, 40, 40]]
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "DecodeError", "decode_image", "describe_error", "to_gray_uint8"]

DEFAULT_MAX_PIXELS = 50_000_000  # a 7000 x 7000 image; ultrasound frames are < 1 MP


class DecodeError(ValueError):
    """An input that is not a usable image; the message becomes the row's ``error``."""


@contextlib.contextmanager
def _no_pil_pixel_limit():
    # PIL's own bomb guard raises above 2 x MAX_IMAGE_PIXELS and only warns above 1 x; we check
    # the header size against max_pixels ourselves (before any pixel is decoded), so switch
    # PIL's off while decoding to make our limit the one that applies, in either direction.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_gray_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W) uint8 grey.

    Rules: 16-bit modes (``I;16*``) scale linearly, 65535 -> 255 (``round(v / 257)``), so a 16-bit
    copy of an 8-bit image decodes to the same pixels; 32-bit integer ``I`` does the same when
    its values fit 0..65535, else is stretched min..max; float ``F`` in [0, 1] scales by 255,
    else is stretched min..max; every other mode (1, L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, ...)
    goes through PIL's ``convert("L")`` (ITU-R 601 luma; alpha is ignored, palettes resolved).
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
    except ValueError:  # modes PIL cannot take to L directly (e.g. HSV) go through RGB
        grey = img.convert("RGB").convert("L")
    return np.asarray(grey, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (H, W) uint8 grey, EXIF orientation applied.

    Raises:
        DecodeError: empty input, not an image, truncated/corrupt data, or more than
            ``max_pixels`` pixels (checked from the header, before decoding).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with _no_pil_pixel_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd EXIF/metadata; the result is what counts
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise DecodeError(f"not a readable image (PNG, JPEG, BMP or TIFF expected; first bytes "
                              f"{data[:8]!r})") from e
        width, height = img.size
        if width * height > max_pixels:
            raise DecodeError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                              f"{max_pixels} (max_pixels / --max-pixels); possible decompression bomb")
        if width < 1 or height < 1:
            raise DecodeError(f"image has no pixels ({width}x{height})")
        try:
            img = ImageOps.exif_transpose(img)
            grey = to_gray_uint8(img)
        except Exception as e:  # noqa: BLE001 - any decoder failure means this input is unusable
            raise DecodeError(f"cannot decode {img.format or 'image'} data: {type(e).__name__}: {e}") from e
    return grey


def describe_error(error: BaseException) -> str:
    if isinstance(error, DecodeError):
        return str(error)
    return f"{type(error).__name__}: {error}"
