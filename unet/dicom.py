"""DICOM files -> 8-bit grey frames, with pydicom (clinical ultrasound archives are DICOM).

:func:`read_dicom` takes the bytes of a DICOM Part 10 file (the ``DICM`` marker after the 128-byte
preamble, :func:`has_dicom_marker`) and returns one ``(H, W) uint8`` grey image per frame — a cine
clip has many — plus, when asked, the identifying attributes of :data:`DICOM_COLUMNS`. Pixels go
through the same grey rule as every other input (:func:`unet.codec.to_grey8`): 8-bit
``MONOCHROME2`` as it is, 16-bit scaled ``round(v / 257)`` as a 16-bit PNG, ``RGB`` and
``YBR_FULL``/``YBR_FULL_422`` (which pydicom turns into RGB) by ITU-R 601 luma as a colour PNG;
``MONOCHROME1`` (white = 0) is inverted after that. Stored values are used as they are (no
modality or VOI LUT). Compressed transfer syntaxes are decoded by pydicom's own decoders (RLE,
Deflate) and the pylibjpeg plugins (JPEG baseline/extended/lossless and JPEG-LS via libjpeg,
JPEG 2000 via openjpeg); any other (MPEG-2, H.264, HEVC video, ...) raises :class:`DicomError`
naming the syntax.

Example:
    >>> has_dicom_marker(bytes(128) + b"DICM"), may_be_dicom("exam/IM000001"), may_be_dicom("notes.txt")
    (True, True, False)
"""

from __future__ import annotations

import io
import posixpath
import re

import numpy as np
from PIL import Image

from .codec import to_grey8

__all__ = ["DICOM_COLUMNS", "DICOM_SUFFIXES", "DicomError", "has_dicom_marker", "may_be_dicom", "read_dicom"]

DICOM_SUFFIXES = (".dcm", ".dicom")
# Identifying attributes an output may carry when asked (jobs.infer --dicom-columns); never by default.
DICOM_COLUMNS = ("PatientID", "StudyInstanceUID", "SOPInstanceUID")
MARKER_END = 132  # 128-byte preamble + b"DICM"
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422")


class DicomError(ValueError):
    """A DICOM file that cannot give grey frames; the message names what is wrong."""


def has_dicom_marker(head: bytes) -> bool:
    """Whether ``head`` (at least the first 132 bytes of a file) starts a DICOM Part 10 file."""
    return len(head) >= MARKER_END and head[128:MARKER_END] == b"DICM"


def may_be_dicom(name: str) -> bool:
    """Whether a file of this name is worth opening to look for the ``DICM`` marker: it has no
    extension (``IM000001``, DICOMDIR exports) or its last dotted part is a number (files named
    by their UID, ``1.2.840.113619.2.55.3.604``). Hidden files (``.DS_Store``) are not."""
    base = posixpath.basename(name.replace("\\", "/"))
    if not base or base.startswith(".") or base == "DICOMDIR":
        return False
    return "." not in base or re.fullmatch(r"\d+", base.rsplit(".", 1)[1]) is not None


def _grey(frame: np.ndarray, photometric: str) -> np.ndarray:
    """One decoded frame -> (H, W) uint8 by :func:`unet.codec.to_grey8`, as the same pixels in a PNG."""
    if frame.ndim == 3:  # RGB (pydicom has turned YBR into RGB)
        if frame.dtype != np.uint8:
            raise DicomError(f"{frame.dtype} colour pixel data is not supported (8-bit RGB/YBR expected)")
        image = Image.fromarray(frame, "RGB")
    elif frame.dtype == np.uint8:
        image = Image.fromarray(frame, "L")
    elif frame.dtype == np.uint16:
        image = Image.fromarray(frame)  # I;16: round(v / 257), as a 16-bit PNG
    elif frame.dtype.kind in "iu":
        image = Image.fromarray(frame.astype(np.int32), "I")  # signed data: stretched min..max
    else:
        image = Image.fromarray(frame.astype(np.float32), "F")
    grey = to_grey8(image)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def read_dicom(data: bytes, *, max_pixels: int | None = None,
               columns: tuple[str, ...] = ()) -> tuple[list[np.ndarray], dict[str, str | None]]:
    """A DICOM file's bytes -> (grey frames, ``{attribute: value or None}`` for ``columns``).

    ``max_pixels`` bounds Rows x Columns x NumberOfFrames, checked from the header before any pixel
    is decoded. Raises :class:`DicomError` for anything that is not a readable DICOM image.
    """
    import pydicom
    from pydicom.pixels import get_decoder, iter_pixels

    unknown = [c for c in columns if c not in DICOM_COLUMNS]
    if unknown:
        raise ValueError(f"unknown DICOM columns {unknown}; choose from {list(DICOM_COLUMNS)}")
    if not has_dicom_marker(data):
        raise DicomError(f"not a DICOM file: no 'DICM' marker at byte 128 (first bytes {data[:8]!r})")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        syntax = ds.file_meta.TransferSyntaxUID
        ids = {c: (str(ds.get(c, "") or "") or None) for c in columns}
        if "PixelData" not in ds:
            raise DicomError("DICOM file holds no image (no Pixel Data): e.g. a report or a DICOMDIR")
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation)
    except DicomError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged header: this file is unusable
        raise DicomError(f"unreadable DICOM file: {type(e).__name__}: {e}") from e
    if rows < 1 or cols < 1 or frames < 1:
        raise DicomError(f"DICOM image has no pixels ({rows} rows x {cols} columns x {frames} frames)")
    if max_pixels is not None and rows * cols * frames > max_pixels:
        raise DicomError(f"DICOM image is {cols}x{rows} x {frames} frame(s) = {rows * cols * frames} pixels, over "
                         f"the limit of {max_pixels} (max_pixels / --max-pixels); possible decompression bomb")
    if photometric not in PHOTOMETRIC:
        raise DicomError(f"DICOM PhotometricInterpretation {photometric!r} is not supported "
                         f"({', '.join(PHOTOMETRIC)} are)")
    name = f"{syntax.name} ({syntax})" if syntax.name != syntax else str(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as e:
        raise DicomError(f"no decoder for DICOM transfer syntax {name}; not read") from e
    if not decoder.is_available:
        raise DicomError(f"no decoder installed for DICOM transfer syntax {name} "
                         f"(needs one of: {'; '.join(decoder.missing_dependencies)})")
    out = []
    try:
        for frame in iter_pixels(ds):
            out.append(_grey(frame, photometric))
    except DicomError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or truncated pixel data
        raise DicomError(f"cannot decode DICOM pixel data ({name}), frame {len(out) + 1} of {frames}: "
                         f"{type(e).__name__}: {e}") from e
    return out, ids
