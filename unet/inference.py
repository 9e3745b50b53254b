"""Bulk inference: map a model artifact over a large image archive and write one mask row per input.

Inputs (local paths or ``s3://`` URIs; a folder/prefix is walked recursively, a single file works too):

* image files: ``.png .jpg .jpeg .bmp .tif .tiff`` (any case) — ``image_id`` is the path relative
  to the input folder, e.g. ``benign/benign (3).png``;
* tar archives (WebDataset-style shards; ``.tar``, ``.tar.gz``, ``.tgz``) of image files —
  ``image_id`` is ``"<tar path>/<member>"``; non-image members (``.json``, ``.cls``...) and directory
  entries are not inputs and are skipped;
* Parquet tables holding encoded image bytes in ``image_column`` (default ``image``) —
  ``image_id`` is the value of ``id_column`` when given, else ``"<file path>#<row>"``.

Output: Parquet files ``<output>/part-<sha1>.parquet``, exactly one row per input, always::

    column           type                    meaning
    image_id         string                  see above; unique per input
    source_uri       string                  where the image came from: file URI, "<tar URI>#<member>"
                                             or "<parquet URI>#row=<n>"
    status           string                  "ok" or "error"
    error            string (null if ok)     what went wrong, naming the problem (see below)
    height, width    int32 (null on error)   original size (after EXIF orientation)
    mask_png         binary (null on error)  8-bit greyscale PNG, 0 = background, 255 = tumour,
                                             original height x width
    tumour_pixels    int64 (null on error)   number of 255 pixels in the mask
    tumour_fraction  float32 (null on error) tumour_pixels / (height * width)
    bbox             list<int32> or null     [x0, y0, x1, y1], half-open (mask[y0:y1, x0:x1] holds
                                             the tumour); null when the mask is empty or on error
    confidence       float32 (null on error) mean probability inside the predicted mask, or the
                                             maximum probability when the mask is empty
    model_id         string                  "<name>-<sha256(weights)[:12]>" (unet.artifact)
    processed_at     timestamp[us, UTC]      when the mask was computed

Read it with ``pandas.read_parquet(output)``, ``duckdb.sql("select * from '<output>/*.parquet'")``
or ``pyarrow.dataset.dataset(output)``; files and folders starting with ``_`` are bookkeeping
(``_tmp/`` while running, ``_runs/`` run records) and those readers skip them.

What happens to a pixel: decode with PIL, apply EXIF orientation, convert to 8-bit grey (see
:func:`to_gray_uint8` for 16-bit, float, alpha, palette and CMYK), resize to the model's
``input_size`` and normalise as its config says (:mod:`unet.transforms`), run the model (optionally
averaged with its horizontal flip), sigmoid, resize the probability back to the original size
(:func:`unet.transforms.resize_probability`), threshold (``prob >= threshold``, the artifact's
threshold unless overridden — the same rule as :mod:`unet.evaluation`), optionally keep the
largest 8-connected component, PNG-encode.

Nothing lost, nothing twice — the design:

* **Work units and parts.** The input listing is streamed (:func:`unet.storage.iter_files` lists
  one directory at a time) and cut into *chunks*: up to ``chunk_size`` image files in listing
  order, one whole tar archive, or ``chunk_size`` rows of one Parquet file. Each chunk becomes
  exactly one output file named ``part-<sha1 of the chunk's unit keys>.parquet``, so the same
  input gives the same file names and a rerun overwrites instead of duplicating.
* **Bounded memory.** The driver never holds the listing: it writes the plan (one small row per
  image file / tar / Parquet row range) to ``<output>/_tmp/plan-<run>/`` as Parquet, and Ray Data
  streams it through read/decode tasks -> a model actor pool -> post-processing tasks. The driver
  collects the post-processed rows (masks are small PNGs) per chunk and writes a part as soon as
  all of its rows are in, so it holds only the chunks in flight. A tar is one chunk, so keep
  shards to a sensible size (WebDataset's usual 1-10k samples).
* **Atomic parts.** A part is serialised in memory and written in one go: locally to a temporary
  name renamed into place, on S3 as one upload (S3 publishes an object only when it is complete).
  An interrupted job therefore leaves only complete parts behind.
* **Exactly once.** Every row carries its chunk and its position in the chunk; the driver drops
  duplicates (a task or a killed actor retried by Ray) and writes a part only when every position
  is present (for a tar, the read task sends the member count after the last member). A chunk
  still incomplete when the stream ends is a bug and fails the job loudly.
* **Full runs** (default) plan every input; before any work they delete ``part-*.parquet`` files
  that are not in the plan (left by an earlier run over different inputs or chunking) so that
  the output ends as exactly one row per current input.
* **Incremental runs** (``incremental=True``) skip inputs already in the output. Each part's
  Parquet footer lists the unit keys it covers (relative file paths, tar paths,
  ``"<file>#rows=a-b"`` ranges); the driver streams those lists, one footer at a time, into an
  on-disk SQLite index and streams the listing against it, so past ids are never all in memory.
  New inputs form new chunks (new part names); old parts are never rewritten. An interrupted run
  — full or incremental — is completed by rerunning with ``incremental=True``. With
  ``retry_errors=True`` parts that contain error rows are deleted first and their inputs redone.
  Inputs are keyed by path: a file changed in place is not redone incrementally (run a full run).

Error rows (the job goes on): unreadable file, zero-byte file, bytes that are not an image,
truncated image, an image over ``max_pixels`` (decompression bombs; checked from the header,
before decoding) or a file/member over ``max_bytes``, a tar member whose path is absolute or
contains ``..``, a tar member that is a link, a duplicate member name, an unreadable tar (one row
named after the archive), a null image or id in a Parquet row. Only one job may write to an output
folder at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import sqlite3
import tarfile
import tempfile
import time
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from . import storage
from .transforms import normalize, resize_image, resize_probability

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "OUTPUT_SCHEMA",
    "PARQUET_SUFFIXES",
    "TAR_SUFFIXES",
    "DecodeError",
    "InferenceConfig",
    "InferenceSummary",
    "Predictor",
    "decode_image",
    "mask_statistics",
    "postprocess_probability",
    "run_inference",
    "to_gray_uint8",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)

OUTPUT_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("mask_png", pa.binary()),
    pa.field("tumour_pixels", pa.int64()),
    pa.field("tumour_fraction", pa.float32()),
    pa.field("bbox", pa.list_(pa.int32())),
    pa.field("confidence", pa.float32()),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
# Bookkeeping columns that travel with each row through the pipeline and are dropped on write:
# which chunk (= output part) the row belongs to, its position in the chunk, and — on the one
# end-of-archive marker row per tar (_seq == -1) — how many rows the chunk has.
_INTERNAL_FIELDS = [pa.field("_chunk", pa.string()), pa.field("_seq", pa.int64()), pa.field("_n", pa.int64())]
_PIPELINE_SCHEMA = pa.schema(_INTERNAL_FIELDS + list(OUTPUT_SCHEMA))

FORMAT_VERSION = "1"
PART_RE = re.compile(r"^part-[0-9a-f]{40}\.parquet$")
META_FORMAT = b"unet.infer.format"
META_UNITS = b"unet.infer.units"
META_KIND = b"unet.infer.kind"
META_ERRORS = b"unet.infer.errors"
META_MODEL = b"unet.infer.model_id"

DEFAULT_MAX_PIXELS = 50_000_000  # a 7000 x 7000 image; ultrasound frames are < 1 MP
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Plan rows per read/decode task: small enough to spread decoding over all CPUs, large enough
# that task overhead (~ms) stays small next to decoding (~ms per image).
READ_ROWS_PER_TASK = 16
# Decoded rows per batch handed downstream (bounds a read task's memory inside a big tar).
ROWS_PER_BATCH = 32
PLAN_ROWS_PER_FILE = 50_000
MAX_PENDING_WRITES = 8
# Test hook (documented for tests only): "<marker path>:<call number>" makes a Predictor actor
# call os._exit on that call of its own if the marker file does not exist yet (it creates it
# first), i.e. exactly one actor death per job — to prove exactly-once output under failures.
CRASH_ENV = "UNET_INFER_TEST_CRASH"


# =============================================================================================
# Configuration and summary
# =============================================================================================

@dataclass(frozen=True)
class InferenceConfig:
    """Everything one inference run needs (S3 endpoint and credentials come from the AWS_* env).

    Args:
        model: pretrained name, artifact directory or URI (:func:`unet.artifact.load_artifact`).
        input: folder/prefix, tar, Parquet or image file URI.
        output: folder/prefix URI for the Parquet parts.
        image_column / id_column: Parquet inputs: column with encoded image bytes / with ids.
        chunk_size: images (or Parquet rows) per output part.
        workers, batch_size, gpus_per_worker, cpus_per_worker: the model actor pool.
        threshold: probability threshold; None = the artifact's.
        tta: average with the horizontally flipped prediction.
        largest_component: keep only the largest connected tumour region.
        incremental: skip inputs already in the output; retry_errors: redo parts with errors.
        max_pixels / max_bytes: larger images / files become error rows.
        exclude: glob patterns on the relative path (e.g. ``*_mask*.png``) of files to ignore.
        check_resources: refuse a request the cluster cannot hold (off for autoscaling clusters).
    """

    model: str
    input: str
    output: str
    image_column: str = "image"
    id_column: str | None = None
    chunk_size: int = 1000
    workers: int = 1
    batch_size: int = 16
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threshold: float | None = None
    tta: bool = False
    largest_component: bool = False
    incremental: bool = False
    retry_errors: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    exclude: tuple[str, ...] = ()
    check_resources: bool = True

    def __post_init__(self):
        for name in ("chunk_size", "workers", "batch_size", "max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker must be >= 0 and cpus_per_worker > 0; got "
                             f"{self.gpus_per_worker!r} and {self.cpus_per_worker!r}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), e.g. 0.5; got {self.threshold!r}")
        if self.retry_errors and not self.incremental:
            raise ValueError("retry_errors only makes sense with incremental (a full run redoes everything)")
        if not self.image_column:
            raise ValueError("image_column must name the Parquet column holding image bytes")


@dataclass
class InferenceSummary:
    """What a run did (also written to ``<output>/_runs/``)."""

    output: str
    model_id: str
    mode: str
    parts_written: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    units_planned: int = 0
    units_skipped: int = 0
    parts_deleted: int = 0
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# =============================================================================================
# Decoding
# =============================================================================================

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


def _describe(error: BaseException) -> str:
    if isinstance(error, DecodeError):
        return str(error)
    return f"{type(error).__name__}: {error}"


# =============================================================================================
# Listing and planning (driver)
# =============================================================================================

@dataclass(frozen=True)
class _Unit:
    """One listed input: an image file, a tar archive, or a row range of a Parquet file."""

    kind: str  # "image" | "tar" | "parquet"
    rel: str  # path relative to the input root
    row_start: int = 0
    row_end: int = 0

    @property
    def key(self) -> str:
        return f"{self.rel}#rows={self.row_start}-{self.row_end}" if self.kind == "parquet" else self.rel


def _kind_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _input_root(uri: str, fs: pafs.FileSystem, path: str) -> tuple[str, str, bool]:
    """(root path, root URI, is_single_file) of the input; raises if it does not exist."""
    with storage.errors(uri, "read input"):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        if storage.is_s3(uri):
            # iter_files tells a missing bucket from a missing prefix and names the env vars.
            next(storage.iter_files(uri), None)
        raise storage.StorageNotFoundError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        root = posixpath.dirname(path) if storage.is_s3(uri) else os.path.dirname(path)
        return root, (f"s3://{root}" if storage.is_s3(uri) else root), True
    return path, (f"s3://{path}" if storage.is_s3(uri) else path), False


def _iter_listed(uri: str, fs: pafs.FileSystem, root: str, single: bool) -> Iterator[tuple[str, str]]:
    """Yield (relative path, kind) of every input file under the root, streaming."""
    if single:
        path = uri[len("s3://"):] if storage.is_s3(uri) else storage.get_filesystem(uri)[1]
        name = posixpath.basename(path.rstrip("/")) if storage.is_s3(uri) else os.path.basename(path)
        kind = _kind_of(name)
        if kind is None:
            raise ValueError(f"input {uri} is a file of unsupported type; expected a folder/prefix, or an "
                             f"image ({', '.join(IMAGE_SUFFIXES)}), tar ({', '.join(TAR_SUFFIXES)}) or "
                             f"Parquet file")
        yield name, kind
        return
    prefix = root.rstrip("/") + "/"
    for file_uri in storage.iter_files(uri):
        path = file_uri[len("s3://"):] if storage.is_s3(file_uri) else file_uri
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        if os.sep != "/":
            rel = rel.replace(os.sep, "/")
        kind = _kind_of(rel)
        if kind is not None:
            yield rel, kind


def _parquet_row_count(fs: pafs.FileSystem, path: str, uri: str, image_column: str,
                       id_column: str | None) -> int:
    """Rows in a Parquet input, after checking it has the configured columns (fail fast)."""
    with storage.errors(uri, "read Parquet footer of"):
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    names = meta.schema.to_arrow_schema().names
    for what, column in (("image_column", image_column), ("id_column", id_column)):
        if column is not None and column not in names:
            raise ValueError(f"Parquet input {uri} has no column {column!r} ({what}); its columns are "
                             f"{names}. Pass --image-column / --id-column.")
    image_type = meta.schema.to_arrow_schema().field(image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or pa.types.is_binary_view(image_type)):
        raise ValueError(f"Parquet input {uri}: column {image_column!r} is {image_type}, expected binary "
                         f"(encoded image bytes)")
    return meta.num_rows


def _subtract(total: tuple[int, int], done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of the half-open range ``total`` not covered by the ``done`` ranges."""
    out, cursor = [], total[0]
    for a, b in sorted(done):
        if b <= cursor:
            continue
        if a > cursor:
            out.append((cursor, min(a, total[1])))
        cursor = max(cursor, b)
        if cursor >= total[1]:
            break
    if cursor < total[1]:
        out.append((cursor, total[1]))
    return [(a, b) for a, b in out if b > a]


class _DoneIndex:
    """On-disk set of unit keys already in the output (SQLite, so memory stays flat)."""

    def __init__(self, directory: str):
        self._db = sqlite3.connect(os.path.join(directory, "done.sqlite"))
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE done (key TEXT PRIMARY KEY) WITHOUT ROWID")
        self.count = 0

    def add(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._db.executemany("INSERT OR IGNORE INTO done VALUES (?)", ((k,) for k in keys))
        self.count += len(keys)

    def filter_new(self, keys: list[str]) -> set[str]:
        """The subset of ``keys`` not yet done."""
        done: set[str] = set()
        for i in range(0, len(keys), 500):
            batch = keys[i:i + 500]
            rows = self._db.execute(f"SELECT key FROM done WHERE key IN ({','.join('?' * len(batch))})", batch)
            done.update(r[0] for r in rows)
        return {k for k in keys if k not in done}

    def parquet_ranges(self, rel: str) -> list[tuple[int, int]]:
        """Row ranges of Parquet file ``rel`` already done."""
        prefix = f"{rel}#rows="
        rows = self._db.execute("SELECT key FROM done WHERE key >= ? AND key < ?", (prefix, prefix[:-1] + ">"))
        out = []
        for (key,) in rows:
            a, b = key[len(prefix):].split("-")
            out.append((int(a), int(b)))
        return out

    def close(self) -> None:
        self._db.close()


@dataclass
class _Chunk:
    key: str
    kind: str
    expected: int | None  # rows in the part; None for a tar until its end marker arrives
    unit_key: str | None  # the single unit of a tar/parquet chunk (image chunks: the image ids)


def _chunk_key(kind: str, unit_keys: list[str]) -> str:
    digest = hashlib.sha1(kind.encode())
    for k in unit_keys:
        digest.update(b"\n" + k.encode())
    return digest.hexdigest()


def part_name(chunk_key: str) -> str:
    return f"part-{chunk_key}.parquet"


class _PlanWriter:
    """Writes plan rows to Parquet files under the run's temporary folder, a file at a time."""

    SCHEMA = pa.schema([("chunk", pa.string()), ("seq", pa.int64()), ("kind", pa.string()),
                        ("rel", pa.string()), ("row_start", pa.int64()), ("row_end", pa.int64())])

    def __init__(self, fs: pafs.FileSystem, directory: str, uri: str):
        self.fs, self.directory, self.uri = fs, directory, uri
        self.rows: dict[str, list] = {name: [] for name in self.SCHEMA.names}
        self.files: list[str] = []
        self.total = 0

    def add(self, chunk: str, seq: int, unit: _Unit) -> None:
        for name, value in zip(self.SCHEMA.names, (chunk, seq, unit.kind, unit.rel, unit.row_start, unit.row_end)):
            self.rows[name].append(value)
        self.total += 1
        if len(self.rows["chunk"]) >= PLAN_ROWS_PER_FILE:
            self.flush()

    def flush(self) -> None:
        if not self.rows["chunk"]:
            return
        path = f"{self.directory}/plan-{len(self.files):06d}.parquet"
        with storage.errors(self.uri, "write plan to"):
            pq.write_table(pa.table(self.rows, schema=self.SCHEMA), path, filesystem=self.fs)
        self.files.append(path)
        self.rows = {name: [] for name in self.SCHEMA.names}


def _fs_path(root: str, rel: str, s3: bool) -> str:
    return posixpath.join(root, rel) if s3 else os.path.join(root, *rel.split("/"))


def _plan(config: InferenceConfig, in_fs: pafs.FileSystem, root: str, root_uri: str, single: bool,
          done: _DoneIndex | None, plan: _PlanWriter) -> tuple[dict[str, _Chunk], int, int]:
    """Stream the listing into chunks and plan rows. Returns (chunks, units planned, units skipped)."""
    chunks: dict[str, _Chunk] = {}
    planned = skipped = 0
    images: list[_Unit] = []  # the open image chunk

    def close_images() -> None:
        if images:
            key = _chunk_key("image", [u.key for u in images])
            chunks[key] = _Chunk(key, "image", len(images), None)
            for seq, unit in enumerate(images):
                plan.add(key, seq, unit)
            images.clear()

    def single_unit_chunk(unit: _Unit, expected: int | None) -> None:
        key = _chunk_key(unit.kind, [unit.key])
        chunks[key] = _Chunk(key, unit.kind, expected, unit.key)
        plan.add(key, 0, unit)

    def handle(batch: list[tuple[str, str]]) -> None:
        nonlocal planned, skipped
        new = done.filter_new([rel for rel, kind in batch if kind != "parquet"]) if done else None
        for rel, kind in batch:
            if kind == "parquet":
                n = _parquet_row_count(in_fs, _fs_path(root, rel, storage.is_s3(root_uri)),
                                       f"{root_uri.rstrip('/')}/{rel}", config.image_column, config.id_column)
                done_ranges = done.parquet_ranges(rel) if done else []
                todo = _subtract((0, n), done_ranges)
                windows = [(s, min(s + config.chunk_size, b)) for a, b in todo
                           for s in range(a, b, config.chunk_size)]
                skipped += len(done_ranges)
                for a, b in windows:
                    planned += 1
                    single_unit_chunk(_Unit("parquet", rel, a, b), b - a)
                continue
            if new is not None and rel not in new:
                skipped += 1
                continue
            planned += 1
            if kind == "tar":
                single_unit_chunk(_Unit("tar", rel), None)
            else:
                images.append(_Unit("image", rel))
                if len(images) >= config.chunk_size:
                    close_images()

    batch: list[tuple[str, str]] = []
    for rel, kind in _iter_listed(config.input, in_fs, root, single):
        if any(fnmatch.fnmatchcase(rel, pattern) for pattern in config.exclude):
            continue
        batch.append((rel, kind))
        if len(batch) >= 1000:
            handle(batch)
            batch = []
    handle(batch)
    close_images()
    plan.flush()
    return chunks, planned, skipped


# =============================================================================================
# Read + decode (Ray Data map tasks)
# =============================================================================================

def _unsafe_member(name: str) -> str | None:
    """Why a tar member path is unsafe to treat as a relative path, or None."""
    normal = name.replace("\\", "/")
    if normal.startswith("/") or re.match(r"^[A-Za-z]:", normal):
        return f"unsafe tar member path {name!r}: absolute path"
    if ".." in normal.split("/"):
        return f"unsafe tar member path {name!r}: contains '..' (path traversal)"
    return None


def _link_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    return "not a regular file (device, FIFO or special entry)"


class _Rows:
    """Accumulates decoded rows and hands them downstream as numpy batches."""

    def __init__(self, input_size: tuple[int, int]):
        self.input_size = tuple(input_size)
        self._clear()

    def _clear(self) -> None:
        self.cols: dict[str, list] = {k: [] for k in
                                      ("_chunk", "_seq", "_n", "image_id", "source_uri", "height", "width", "error", "x")}

    def __len__(self) -> int:
        return len(self.cols["_chunk"])

    def add(self, chunk: str, seq: int, image_id: str, source_uri: str, *, image: np.ndarray | None = None,
            error: str | None = None, n: int = -1) -> None:
        if image is None and error is None and seq >= 0:
            raise AssertionError("a row needs an image or an error")
        c = self.cols
        c["_chunk"].append(chunk)
        c["_seq"].append(seq)
        c["_n"].append(n)
        c["image_id"].append(image_id)
        c["source_uri"].append(source_uri)
        c["height"].append(image.shape[0] if image is not None else 0)
        c["width"].append(image.shape[1] if image is not None else 0)
        # "" rather than None inside the pipeline: an all-null column does not survive Ray's
        # numpy conversion as strings (it comes back as float NaN).
        c["error"].append(error or "")
        c["x"].append(resize_image(image, self.input_size) if image is not None
                      else np.zeros(self.input_size, np.uint8))

    def flush(self) -> dict[str, np.ndarray]:
        c = self.cols
        batch = {
            "_chunk": np.array(c["_chunk"], dtype=object),
            "_seq": np.array(c["_seq"], dtype=np.int64),
            "_n": np.array(c["_n"], dtype=np.int64),
            "image_id": np.array(c["image_id"], dtype=object),
            "source_uri": np.array(c["source_uri"], dtype=object),
            "height": np.array(c["height"], dtype=np.int32),
            "width": np.array(c["width"], dtype=np.int32),
            "error": np.array(c["error"], dtype=object),
            "x": np.stack(c["x"]) if c["x"] else np.zeros((0, *self.input_size), np.uint8),
        }
        self._clear()
        return batch


def _read_limited(fs: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    with fs.open_input_file(path) as f:
        size = f.size()
        if size > max_bytes:
            raise DecodeError(f"file is {size} bytes, over the limit of {max_bytes} (max_bytes / --max-bytes)")
        return f.read()


def _decode_or_error(data_fn, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(data_fn(), max_pixels=max_pixels), None
    except Exception as e:  # noqa: BLE001 - one bad input becomes an error row; the job goes on
        return None, _describe(e)


def _tar_rows(fs, path: str, rel: str, uri: str, chunk: str, rows: _Rows, max_pixels: int,
              max_bytes: int) -> Iterator[None]:
    """Add one row per image member (and unsafe member) of a tar; yield whenever a batch is full."""
    seq = 0
    seen: set[str] = set()

    def add(name: str, image=None, error=None):
        nonlocal seq
        rows.add(chunk, seq, f"{rel}/{name}", f"{uri}#{name}", image=image, error=error)
        seq += 1

    try:
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir():
                    continue
                unsafe = _unsafe_member(name)
                if unsafe is None and _kind_of(name) != "image":
                    continue  # WebDataset side files (.json, .cls, ...) are not inputs
                if unsafe is not None:
                    add(name, error=f"{unsafe}; not read")
                elif not member.isfile():
                    add(name, error=f"tar member is {_link_kind(member)}, not image data; not read")
                elif name in seen:
                    add(name, error="duplicate tar member name (an earlier member has the same path); not read")
                elif member.size > max_bytes:
                    add(name, error=f"tar member is {member.size} bytes, over the limit of {max_bytes} "
                                    f"(max_bytes / --max-bytes)")
                else:
                    seen.add(name)
                    image, error = _decode_or_error(lambda m=member: tar.extractfile(m).read(), max_pixels)
                    add(name, image=image, error=error)
                if len(rows) >= ROWS_PER_BATCH:
                    yield
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # The archive itself is broken (not a tar, truncated, unreadable): one row for the rest of it.
        where = f"after {seq} member(s)" if seq else "at the start"
        rows.add(chunk, seq, rel, uri, error=f"unreadable tar archive {where}: {_describe(e)}")
        seq += 1
    rows.add(chunk, -1, rel, uri, n=seq)  # end marker: the chunk has `seq` rows


def _parquet_rows(fs, path: str, rel: str, uri: str, chunk: str, start: int, end: int, rows: _Rows,
                  image_column: str, id_column: str | None, max_pixels: int) -> Iterator[None]:
    """Add one row per Parquet row in [start, end); yield whenever a batch is full."""
    row = start

    def ident(value, r):
        return f"{rel}#{r}" if id_column is None else (None if value is None else str(value))

    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            offsets, offset = [], 0
            for g in range(pf.num_row_groups):
                offsets.append(offset)
                offset += pf.metadata.row_group(g).num_rows
            groups = [g for g in range(pf.num_row_groups)
                      if offsets[g] < end and offsets[g] + pf.metadata.row_group(g).num_rows > start]
            columns = [image_column] + ([id_column] if id_column else [])
            position = offsets[groups[0]] if groups else start
            for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=groups, columns=columns):
                images = batch.column(image_column).to_pylist()
                ids = batch.column(id_column).to_pylist() if id_column else [None] * len(images)
                for data, id_value in zip(images, ids):
                    r, position = position, position + 1
                    if r < start or r >= end:
                        continue
                    image_id = ident(id_value, r)
                    source = f"{uri}#row={r}"
                    if image_id is None:
                        rows.add(chunk, r - start, f"{rel}#{r}", source,
                                 error=f"id column {id_column!r} is null in this row")
                    elif data is None:
                        rows.add(chunk, r - start, image_id, source, error=f"image column {image_column!r} is null")
                    else:
                        image, error = _decode_or_error(lambda d=data: d, max_pixels)
                        rows.add(chunk, r - start, image_id, source, image=image, error=error)
                    row = r + 1
                    if len(rows) >= ROWS_PER_BATCH:
                        yield
    except Exception as e:  # noqa: BLE001 - a damaged file: the remaining rows become error rows
        message = f"unreadable Parquet data at row {row}: {_describe(e)}"
        for r in range(row, end):
            rows.add(chunk, r - start, f"{rel}#{r}", f"{uri}#row={r}", error=message)
            if len(rows) >= ROWS_PER_BATCH:
                yield
        return
    for r in range(row, end):  # the file has fewer rows than when it was planned
        rows.add(chunk, r - start, f"{rel}#{r}", f"{uri}#row={r}",
                 error=f"row {r} is missing: the file has fewer rows than when the job was planned")


def read_plan_file(batch: pa.Table, *, fs: pafs.FileSystem) -> Iterator[pa.Table]:
    """Ray Data UDF: plan file paths -> the plan rows they hold."""
    for path in batch.column("path").to_pylist():
        with fs.open_input_file(path) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                yield pa.Table.from_batches([record_batch])


def read_and_decode(plan: pa.Table, *, fs: pafs.FileSystem, root: str, root_uri: str,
                    input_size: tuple[int, int], image_column: str, id_column: str | None,
                    max_pixels: int, max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: plan rows -> decoded rows resized to the model's input size (uint8 ``x``).

    Never raises for a bad input: every input becomes a row, failures carry ``error``.
    """
    rows = _Rows(input_size)
    s3 = storage.is_s3(root_uri)
    for unit in plan.to_pylist():
        rel, chunk = unit["rel"], unit["chunk"]
        path = _fs_path(root, rel, s3)
        uri = f"{root_uri.rstrip('/')}/{rel}"
        if unit["kind"] == "image":
            image, error = _decode_or_error(lambda: _read_limited(fs, path, max_bytes), max_pixels)
            rows.add(chunk, unit["seq"], rel, uri, image=image, error=error)
            if len(rows) >= ROWS_PER_BATCH:
                yield rows.flush()
        else:
            if unit["kind"] == "tar":
                gen = _tar_rows(fs, path, rel, uri, chunk, rows, max_pixels, max_bytes)
            else:
                gen = _parquet_rows(fs, path, rel, uri, chunk, unit["row_start"], unit["row_end"], rows,
                                    image_column, id_column, max_pixels)
            for _ in gen:
                yield rows.flush()
    if len(rows):
        yield rows.flush()


# =============================================================================================
# Model (Ray Data actor)
# =============================================================================================

class Predictor:
    """Ray Data actor: holds the model, maps a batch of uint8 ``x`` to foreground probabilities.

    CPU: channels-last tensors under ``torch.inference_mode``; GPU: the same under fp16 autocast.
    Rows with an error (and tar end markers) are passed through with an all-zero ``prob``.
    """

    def __init__(self, model, *, mean: float, std: float, tta: bool, use_gpu: bool, num_threads: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        self.mean, self.std, self.tta = mean, std, tta
        self.calls = 0

    def _maybe_crash(self) -> None:
        hook = os.environ.get(CRASH_ENV)
        if not hook:
            return
        marker, _, call = hook.rpartition(":")
        if self.calls == int(call) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"pid {os.getpid()}\n")
            os._exit(1)

    def _forward(self, x):
        out = self.model(x)
        if isinstance(out, (list, tuple)):  # deep supervision heads: the last is full resolution
            out = out[-1]
        return self.torch.sigmoid(out.float())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        self.calls += 1
        self._maybe_crash()
        x = batch.pop("x")
        ok = (batch["error"] == "") & (batch["_seq"] >= 0)
        prob = np.zeros(x.shape, np.float32)
        if ok.any():
            inputs = torch.from_numpy(normalize(x[ok], self.mean, self.std)[:, None])
            inputs = inputs.to(self.device).contiguous(memory_format=torch.channels_last)
            amp = (torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
                   else contextlib.nullcontext())
            with torch.inference_mode(), amp:
                p = self._forward(inputs)
                if self.tta:
                    p = (p + self._forward(inputs.flip(-1)).flip(-1)) / 2
            prob[ok] = p[:, 0].float().cpu().numpy()
        batch["prob"] = prob
        return batch


# =============================================================================================
# Post-processing (Ray Data map tasks)
# =============================================================================================

def postprocess_probability(prob: np.ndarray, size: tuple[int, int], threshold: float,
                            largest_component: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Model-size probability -> (bool mask, probability) at the original ``size`` = (h, w)."""
    full = resize_probability(np.ascontiguousarray(prob, dtype=np.float32), size)
    mask = full >= threshold
    if largest_component and mask.any():
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = labels == int(sizes.argmax())
    return mask, full


def mask_statistics(mask: np.ndarray, prob: np.ndarray) -> dict:
    """tumour_pixels, tumour_fraction, bbox (half-open [x0, y0, x1, y1] or None), confidence."""
    pixels = int(mask.sum())
    if pixels:
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        bbox = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
        confidence = float(prob[mask].mean())
    else:
        bbox, confidence = None, float(prob.max())
    return {"tumour_pixels": pixels, "tumour_fraction": pixels / mask.size, "bbox": bbox, "confidence": confidence}


def encode_mask_png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise ValueError(f"could not encode a {mask.shape} mask as PNG")
    return buf.tobytes()


def postprocess(batch: dict[str, np.ndarray], *, threshold: float, largest_component: bool,
                model_id: str) -> pa.Table:
    """Ray Data UDF: probabilities -> output rows (plus the internal chunk columns)."""
    n = len(batch["_seq"])
    now = _dt.datetime.now(_dt.timezone.utc)
    out: dict[str, list] = {name: [] for name in _PIPELINE_SCHEMA.names}
    for i in range(n):
        error = str(batch["error"][i]) or None
        seq = int(batch["_seq"][i])
        row = {"_chunk": batch["_chunk"][i], "_seq": seq, "_n": int(batch["_n"][i]),
               "image_id": batch["image_id"][i], "source_uri": batch["source_uri"][i],
               "model_id": model_id, "processed_at": now, "error": error,
               "status": "error" if error is not None or seq < 0 else "ok",
               "height": None, "width": None, "mask_png": None, "tumour_pixels": None,
               "tumour_fraction": None, "bbox": None, "confidence": None}
        if row["status"] == "ok":
            h, w = int(batch["height"][i]), int(batch["width"][i])
            try:
                mask, prob = postprocess_probability(batch["prob"][i], (h, w), threshold, largest_component)
                row.update(height=h, width=w, mask_png=encode_mask_png(mask), **mask_statistics(mask, prob))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for one huge image: an error row
                row.update(status="error", error=f"post-processing failed: {_describe(e)}")
        for name in out:
            out[name].append(row[name])
    return pa.table(out, schema=_PIPELINE_SCHEMA)


# =============================================================================================
# Collecting parts (driver)
# =============================================================================================

class _PartAssembler:
    """Groups streamed rows by chunk, drops duplicates, writes each part once it is complete."""

    def __init__(self, chunks: dict[str, _Chunk], write):
        self.chunks = chunks
        self.write = write
        self.pieces: dict[str, list[pa.Table]] = {}
        self.seen: dict[str, set[int]] = {}
        self.written: set[str] = set()
        self.duplicates = 0

    def add(self, table: pa.Table) -> None:
        keys = table.column("_chunk")
        for key in pc.unique(keys).to_pylist():
            self._add(key, table.filter(pc.equal(keys, key)))

    def _add(self, key: str, rows: pa.Table) -> None:
        chunk = self.chunks.get(key)
        if chunk is None:
            raise RuntimeError(f"received rows for chunk {key} that is not in this run's plan")
        if key in self.written:
            self.duplicates += rows.num_rows
            return
        seen = self.seen.setdefault(key, set())
        seqs = rows.column("_seq").to_pylist()
        keep = []
        for i, seq in enumerate(seqs):
            if seq < 0:
                chunk.expected = int(rows.column("_n")[i].as_py())
                keep.append(False)
            elif seq in seen:
                self.duplicates += 1
                keep.append(False)
            else:
                seen.add(seq)
                keep.append(True)
        if any(keep):
            self.pieces.setdefault(key, []).append(rows.filter(pa.array(keep)))
        if chunk.expected is not None and len(seen) >= chunk.expected:
            if len(seen) > chunk.expected or (seen and max(seen) >= chunk.expected):
                raise RuntimeError(f"chunk {key} got positions {sorted(seen)[:5]}... beyond its "
                                   f"{chunk.expected} rows")
            pieces = self.pieces.pop(key, [])
            table = (pa.concat_tables(pieces) if pieces else _PIPELINE_SCHEMA.empty_table()).sort_by("_seq")
            self.seen.pop(key, None)
            self.written.add(key)
            self.write(chunk, table)

    def incomplete(self) -> list[str]:
        return [f"{k} ({len(self.seen.get(k, ()))}/{c.expected if c.expected is not None else '?'} rows)"
                for k, c in self.chunks.items() if k not in self.written]


def _part_bytes(chunk: _Chunk, table: pa.Table, model_id: str) -> tuple[bytes, int, int]:
    """Serialise a part (exact OUTPUT_SCHEMA + footer metadata); returns (bytes, ok, errors)."""
    table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    errors = int(pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0)
    units = table.column("image_id").to_pylist() if chunk.kind == "image" else [chunk.unit_key]
    table = table.replace_schema_metadata({
        META_FORMAT: FORMAT_VERSION.encode(), META_KIND: chunk.kind.encode(),
        META_UNITS: json.dumps(units).encode(), META_ERRORS: str(errors).encode(),
        META_MODEL: model_id.encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes(), table.num_rows - errors, errors


# =============================================================================================
# Output folder bookkeeping (driver)
# =============================================================================================

def _list_parts(fs: pafs.FileSystem, out_path: str, out_uri: str) -> list[str]:
    with storage.errors(out_uri, "list output"):
        infos = fs.get_file_info(pafs.FileSelector(out_path, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos
                  if i.type == pafs.FileType.File and PART_RE.match(posixpath.basename(i.path)))


def _read_footer(fs: pafs.FileSystem, path: str, uri: str) -> tuple[list[str], int]:
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"{uri}: cannot read the Parquet footer of this output part ({e}); delete it or "
                         f"run without --incremental") from e
    if META_UNITS not in meta:
        raise ValueError(f"{uri}: not written by unet.inference (no {META_UNITS.decode()} footer entry); "
                         f"move it out of the output folder")
    return json.loads(meta[META_UNITS]), int(meta.get(META_ERRORS, b"0"))


def _delete_parts(fs, out_path: str, out_uri: str, names: Iterable[str]) -> int:
    count = 0
    for name in names:
        with storage.errors(storage.join(out_uri, name), "delete"):
            fs.delete_file(f"{out_path}/{name}")
        count += 1
    return count


# =============================================================================================
# The run
# =============================================================================================

def _check_resources(config: InferenceConfig) -> None:
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    need_cpu = config.workers * config.cpus_per_worker
    # Reading and post-processing need a CPU beside the model actors, or the pipeline stalls.
    if need_cpu + 0.5 > cpus:
        raise ValueError(f"--workers {config.workers} x --cpus-per-worker {config.cpus_per_worker} needs "
                         f"{need_cpu:g} CPUs plus some for reading, but the Ray cluster has {cpus:g}; "
                         f"use fewer workers (or --no-check-resources on an autoscaling cluster)")
    need_gpu = config.workers * config.gpus_per_worker
    if need_gpu > gpus:
        raise ValueError(f"--workers {config.workers} x --gpus-per-worker {config.gpus_per_worker} needs "
                         f"{need_gpu:g} GPUs but the Ray cluster has {gpus:g} (or pass "
                         f"--no-check-resources on an autoscaling cluster)")


def run_inference(config: InferenceConfig) -> InferenceSummary:
    """Run bulk inference as described in the module docstring; Ray must be initialised.

    Returns an :class:`InferenceSummary`; raises ``ValueError`` / ``OSError`` for bad inputs that
    stop the whole job (missing input, no such model, Parquet without the image column, ...).
    """
    import ray

    from .artifact import load_artifact

    started = time.monotonic()
    loaded = load_artifact(config.model)
    settings = loaded.config
    input_size = tuple(int(v) for v in settings["input_size"])
    mean, std = float(settings["normalization"]["mean"]), float(settings["normalization"]["std"])
    threshold = float(settings["threshold"]) if config.threshold is None else config.threshold
    if config.check_resources:
        _check_resources(config)

    in_fs, in_path = storage.get_filesystem(config.input)
    out_fs, out_path = storage.get_filesystem(config.output)
    out_path = out_path.rstrip("/")
    storage.makedirs(config.output)
    root, root_uri, single = _input_root(config.input, in_fs, in_path)
    if storage.is_s3(config.input):
        root_uri = "s3://" + root
    summary = InferenceSummary(config.output, loaded.model_id, "incremental" if config.incremental else "full")

    run_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    tmp_path, tmp_uri = f"{out_path}/_tmp", storage.join(config.output, "_tmp")
    with storage.errors(tmp_uri, "clear leftovers of an interrupted run in"):
        out_fs.delete_dir_contents(tmp_path, missing_dir_ok=True)
    plan_dir = f"{tmp_path}/plan-{run_id}"
    if not storage.is_s3(config.output):
        os.makedirs(plan_dir, exist_ok=True)

    existing = _list_parts(out_fs, out_path, config.output)
    with tempfile.TemporaryDirectory(prefix="unet-infer-") as scratch:
        done = None
        if config.incremental:
            done = _DoneIndex(scratch)
            retry = []
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                footers = pool.map(lambda n: (n, _read_footer(out_fs, f"{out_path}/{n}",
                                                              storage.join(config.output, n))), existing)
                for name, (units, errors) in footers:
                    if config.retry_errors and errors:
                        retry.append(name)
                    else:
                        done.add(units)
            summary.parts_deleted += _delete_parts(out_fs, out_path, config.output, retry)
            logger.info("incremental: %d units already in %d parts; %d parts with errors deleted for retry",
                        done.count, len(existing) - len(retry), len(retry))
        plan = _PlanWriter(out_fs, plan_dir, config.output)
        chunks, summary.units_planned, summary.units_skipped = _plan(config, in_fs, root, root_uri, single, done,
                                                                         plan)
        if done is not None:
            done.close()
    if not config.incremental:
        planned_names = {part_name(k) for k in chunks}
        stale = [n for n in existing if n not in planned_names]
        summary.parts_deleted += _delete_parts(out_fs, out_path, config.output, stale)
        if stale:
            logger.info("full run: deleted %d parts from earlier runs that are not in this plan", len(stale))
    logger.info("planned %d inputs in %d chunks (%d plan rows); skipped %d already done",
                summary.units_planned, len(chunks), plan.total, summary.units_skipped)

    if chunks:
        _execute(config, loaded, chunks, plan.files, out_fs, out_path, in_fs, root, root_uri,
                 input_size, mean, std, threshold, summary)
    with storage.errors(tmp_uri, "clean up"):
        if out_fs.get_file_info(tmp_path).type != pafs.FileType.NotFound:
            out_fs.delete_dir(tmp_path)
    summary.wall_s = round(time.monotonic() - started, 3)
    record = {"summary": summary.to_dict(), "config": dataclasses.asdict(config), "threshold": threshold,
              "input_size": list(input_size), "normalization": {"mean": mean, "std": std},
              "output_schema": [f"{f.name}: {f.type}" for f in OUTPUT_SCHEMA]}
    storage.write_bytes(storage.join(config.output, "_runs", f"run-{run_id}.json"),
                        (json.dumps(record, indent=2, default=str) + "\n").encode())
    return summary


def _execute(config, loaded, chunks, plan_files, out_fs, out_path, in_fs, root, root_uri,
             input_size, mean, std, threshold, summary) -> None:
    """Build the Ray Data pipeline over the plan and write parts as chunks complete."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    # The plan files are read by our own small task rather than ray.data.read_parquet, whose
    # file listing/footer pass costs seconds per run even for one tiny file. A plan file holds up
    # to PLAN_ROWS_PER_FILE rows; without splitting, one task would decode a whole file of images
    # serially, so a streaming repartition cuts them into small blocks.
    ds = ray.data.from_items([{"path": p} for p in plan_files])
    ds = ds.map_batches(read_plan_file, batch_format="pyarrow", batch_size=1, fn_kwargs=dict(fs=out_fs))
    ds = ds.repartition(target_num_rows_per_block=READ_ROWS_PER_TASK)
    # Half a CPU per read task: reads wait on storage as much as they decode. It also keeps the
    # remote args different from the model actors', which stops Ray Data from fusing decoding
    # into the actors (they would then decode serially instead of feeding the model).
    read_cpus = 0.5 if config.cpus_per_worker != 0.5 else 0.25
    ds = ds.map_batches(
        read_and_decode, batch_format="pyarrow", batch_size=None, num_cpus=read_cpus,
        fn_kwargs=dict(fs=in_fs, root=root, root_uri=root_uri, input_size=input_size,
                       image_column=config.image_column, id_column=config.id_column,
                       max_pixels=config.max_pixels, max_bytes=config.max_bytes))
    hook = os.environ.get(CRASH_ENV)
    ds = ds.map_batches(
        Predictor, batch_format="numpy", batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker or None,
        fn_constructor_kwargs=dict(model=loaded.model, mean=mean, std=std, tta=config.tta,
                                   use_gpu=config.gpus_per_worker > 0,
                                   num_threads=int(config.cpus_per_worker)),
        runtime_env={"env_vars": {CRASH_ENV: hook}} if hook else None)
    ds = ds.map_batches(postprocess, batch_format="numpy", batch_size=None,
                        fn_kwargs=dict(threshold=threshold, largest_component=config.largest_component,
                                       model_id=loaded.model_id))

    pending: list[concurrent.futures.Future] = []

    with concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="unet-infer-write") as pool:
        def write(chunk: _Chunk, table: pa.Table) -> None:
            name = part_name(chunk.key)

            def job():
                data, ok, errors = _part_bytes(chunk, table, loaded.model_id)
                storage.write_bytes(storage.join(config.output, name), data)
                return ok, errors

            pending.append(pool.submit(job))
            while len(pending) >= MAX_PENDING_WRITES:  # bound the parts held in memory
                _collect(pending, summary, wait=True)

        assembler = _PartAssembler(chunks, write)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
            assembler.add(batch)
            _collect(pending, summary, wait=False)
        while pending:
            _collect(pending, summary, wait=True)
    logger.debug("Ray Data stats:\n%s", ds.stats())
    if assembler.duplicates:
        logger.info("dropped %d duplicate rows from retried tasks", assembler.duplicates)
    missing = assembler.incomplete()
    if missing:
        raise RuntimeError(f"{len(missing)} chunk(s) did not receive all their rows and were not written "
                           f"(a bug; rerun with --incremental to complete): {missing[:5]}")


def _collect(pending: list, summary: InferenceSummary, wait: bool) -> None:
    if wait and pending:
        concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
    for future in [f for f in pending if f.done()]:
        pending.remove(future)
        ok, errors = future.result()  # a failed write raises here and stops the job
        summary.parts_written += 1
        summary.rows_ok += ok
        summary.rows_error += errors
