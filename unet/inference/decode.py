"""Image bytes -> 8-bit grey pixels, for any file a scanner or a PACS export may produce.

:func:`decode_image` reads untrusted bytes (size limits, clear errors: :class:`DecodeError`, whose
message ends up in the output's ``error`` column); how awkward encodings (16-bit, float, alpha,
palette, CMYK, EXIF-rotated) become the ``(H, W) uint8`` grey image the models take is decided by
:mod:`unet.codec`, which ``jobs.prepare`` uses for training images too. Bytes that are a DICOM file
(a Parquet cell, say) are read by :mod:`unet.dicom`, when they hold one frame.

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
from ..dicom import DicomError, has_dicom_marker, read_dicom

__all__ = ["DEFAULT_MAX_PIXELS", "FORMATS", "DecodeError", "decode_image", "describe_error"]

DEFAULT_MAX_PIXELS = 50_000_000  # a 7000 x 7000 image; ultrasound frames are < 1 MP


class DecodeError(ValueError):
    """An input that is not a usable image; the message becomes the row's ``error``."""


# The formats the job documents. Image.open would otherwise try every format Pillow knows, and some
# do real work while merely opening: ICO decodes its largest frame (an 8000 x 8000 PNG inside a
# 62 KB icon) before any size can be checked, EPS runs Ghostscript where it is installed.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int):
    # PIL checks every size it meets (the image, and frames or tiles inside it) against
    # 2 x MAX_IMAGE_PIXELS and only warns above 1 x; half of max_pixels makes PIL's own hard limit
    # the same as ours. We also check the header size ourselves, for a message that names the flag.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels / 2
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _bomb(error: Exception, max_pixels: int) -> DecodeError:
    size = error.args[0].split(" pixels)")[0].split("(")[-1] if error.args else "?"
    return DecodeError(f"image (or a frame inside it) has {size} pixels, over the limit of {max_pixels} "
                       f"(max_pixels / --max-pixels); possible decompression bomb")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (H, W) uint8 grey, EXIF orientation applied.

    Raises:
        DecodeError: empty input, not an image, truncated/corrupt data, or more than
            ``max_pixels`` pixels (checked from the header, before decoding), or a format other
            than PNG, JPEG, BMP and TIFF (:data:`FORMATS`) and single-frame DICOM.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if has_dicom_marker(data):
        try:
            frames, _ = read_dicom(data, max_pixels=max_pixels)
        except DicomError as e:
            raise DecodeError(str(e)) from e
        if len(frames) != 1:
            raise DecodeError(f"multi-frame DICOM ({len(frames)} frames) where one image is expected; as a file "
                              f"or a tar member each frame is a row")
        return frames[0]
    with _pil_pixel_limit(max_pixels), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd EXIF/metadata; the result is what counts
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError as e:
            raise DecodeError(f"not a readable image (PNG, JPEG, BMP or TIFF expected; first bytes "
                              f"{data[:8]!r})") from e
        except Image.DecompressionBombError as e:
            raise _bomb(e, max_pixels) from e
        width, height = img.size
        if width * height > max_pixels:
            raise DecodeError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                              f"{max_pixels} (max_pixels / --max-pixels); possible decompression bomb")
        if width < 1 or height < 1:
            raise DecodeError(f"image has no pixels ({width}x{height})")
        try:
            grey = image_pixels(img)  # EXIF orientation, then the grey rules
        except Image.DecompressionBombError as e:  # a frame or tile inside the image is too large
            raise _bomb(e, max_pixels) from e
        except Exception as e:  # noqa: BLE001 - any decoder failure means this input is unusable
            raise DecodeError(f"cannot decode {img.format or 'image'} data: {type(e).__name__}: {e}") from e
    return grey


def describe_error(error: BaseException) -> str:
    if isinstance(error, (DecodeError, DicomError)):
        return str(error)
    return f"{type(error).__name__}: {error}"
