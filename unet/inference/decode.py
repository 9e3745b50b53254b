"""Image bytes -> 8-bit grey pixels, for any file a scanner or a PACS export may produce.

:func:`decode_image` reads untrusted bytes (size limits, clear errors: :class:`DecodeError`, whose
message ends up in the output's ``error`` column); how awkward encodings (16-bit, float, alpha,
palette, CMYK, EXIF-rotated) become the ``(H, W) uint8`` grey image the models take is decided by
:mod:`unet.codec`, which ``jobs.prepare`` uses for training images too.

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
from PIL import Image, UnidentifiedImageError

from ..codec import image_pixels

__all__ = ["DEFAULT_MAX_PIXELS", "DecodeError", "decode_image", "describe_error"]

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
            grey = image_pixels(img)  # EXIF orientation, then the grey rules
        except Exception as e:  # noqa: BLE001 - any decoder failure means this input is unusable
            raise DecodeError(f"cannot decode {img.format or 'image'} data: {type(e).__name__}: {e}") from e
    return grey


def describe_error(error: BaseException) -> str:
    if isinstance(error, DecodeError):
        return str(error)
    return f"{type(error).__name__}: {error}"
