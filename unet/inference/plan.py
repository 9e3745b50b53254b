"""Driver side: stream the input listing into chunks (one per output part) and write the plan.

Nothing here holds the whole listing: files are handled in batches of 1000 as
:func:`unet.storage.iter_files` yields them, an incremental run checks them against an on-disk
SQLite index of what the output already holds, and plan rows go to Parquet files as they come.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import hashlib
import os
import posixpath
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from ..dicom import DICOM_SUFFIXES, has_dicom_marker, may_be_dicom
from ..runtime import UsageError

if TYPE_CHECKING:
    from .run import InferenceConfig

__all__ = ["DICOM_SUFFIXES", "IMAGE_SUFFIXES", "PARQUET_SUFFIXES", "READ_ROWS_PER_TASK", "TAR_SUFFIXES", "Chunk", "DoneIndex", "PlanWriter",
           "Unit", "escape_name", "fs_path", "input_root", "kind_of", "plan_inputs", "subtract_ranges"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
PLAN_ROWS_PER_FILE = 50_000
# Plan rows per read/decode task (a row group of a plan file): enough images that scheduling
# (~ms per task) stays small next to decoding (~ms per image), few enough to spread over all CPUs.
READ_ROWS_PER_TASK = 64


def escape_name(name: str) -> str:
    r"""A file or tar member name as an ``image_id``: unchanged when it is UTF-8; otherwise (Python
    holds the bytes that are not UTF-8 as surrogates) each such byte becomes ``%XX`` and each ``%``
    ``%25``, so ``urllib.parse.unquote_to_bytes(image_id)`` gives the name's bytes back.

    >>> escape_name(b"scan-\xe9.png".decode("utf-8", "surrogateescape")), escape_name("100%-é.png")
    ('scan-%E9.png', '100%-é.png')
    """
    if not any("\udc80" <= ch <= "\udcff" for ch in name):
        return name
    return "".join("%25" if ch == "%" else f"%{ord(ch) - 0xDC00:02X}" if "\udc80" <= ch <= "\udcff" else ch
                   for ch in name)


@dataclass(frozen=True)
class Unit:
    """One listed input: an image file, a DICOM file, a tar archive, or a row range of a Parquet file."""

    kind: str  # "image" | "dicom" | "tar" | "parquet"
    rel: str  # path relative to the input root, escaped (escape_name) when it is not UTF-8
    row_start: int = 0
    row_end: int = 0
    raw_rel: bytes | None = None  # the path's bytes when they are not UTF-8 (rel is then escaped)
    error: str | None = None  # already known to be unreadable (a Parquet file without a footer)

    @property
    def key(self) -> str:
        return f"{self.rel}#rows={self.row_start}-{self.row_end}" if self.kind == "parquet" else self.rel


def kind_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    if lower.endswith(DICOM_SUFFIXES):
        return "dicom"
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def fs_path(root: str, rel: str, s3: bool) -> str:
    return posixpath.join(root, rel) if s3 else os.path.join(root, *rel.split("/"))


def sniff_dicom(fs: pafs.FileSystem, path: str) -> bool:
    """Whether the file at ``path`` (named without an extension, :func:`unet.dicom.may_be_dicom`)
    is DICOM: reads its first 132 bytes. A file that cannot be read counts as DICOM, so that it
    becomes an error row naming it rather than vanishing from the output."""
    from .read import open_input  # read imports this module

    try:
        with open_input(fs, path) as f:
            return has_dicom_marker(f.read(132))
    except OSError:
        return True


def input_root(uri: str, fs: pafs.FileSystem, path: str) -> tuple[str, str, bool]:
    """(root path, root URI, is_single_file) of the input; raises if it does not exist."""
    try:
        path.encode()
    except UnicodeEncodeError:  # pyarrow takes UTF-8 paths only; names below the root may be anything
        raise UsageError(f"--input {uri.encode('utf-8', 'surrogateescape')!r} is not a UTF-8 path; pass a "
                         f"folder above it (names inside the input folder need not be UTF-8)") from None
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


def iter_listed(uri: str, fs: pafs.FileSystem, root: str, single: bool,
                 skip_prefix: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield (relative path, kind) of every input file under the root, streaming; relative paths
    starting with ``skip_prefix`` (the output folder, when it lies inside the input) are left out."""
    if single:
        path = uri[len("s3://"):] if storage.is_s3(uri) else storage.get_filesystem(uri)[1]
        name = posixpath.basename(path.rstrip("/")) if storage.is_s3(uri) else os.path.basename(path)
        kind = kind_of(name)
        if kind is None and may_be_dicom(name) and sniff_dicom(fs, path):
            kind = "dicom"
        if kind is None:
            raise UsageError(f"input {uri} is a file of unsupported type; expected a folder/prefix, or an "
                             f"image ({', '.join(IMAGE_SUFFIXES)}), DICOM ({', '.join(DICOM_SUFFIXES)}, or no "
                             f"extension and the DICM marker), tar ({', '.join(TAR_SUFFIXES)}) or Parquet file")
        yield name, kind
        return
    prefix = root.rstrip("/") + "/"
    for file_uri in storage.iter_files(uri):
        path = file_uri[len("s3://"):] if storage.is_s3(file_uri) else file_uri
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        kind = kind_of(rel) or ("dicom?" if may_be_dicom(rel) else None)  # "dicom?": sniffed when planned
        if kind is not None and not (skip_prefix and rel.startswith(skip_prefix)):
            yield rel, kind


def parquet_row_count(fs: pafs.FileSystem, path: str, uri: str, image_column: str,
                      id_column: str | None) -> int | str:
    """Rows in a Parquet input, after checking it has the configured columns (fail fast); or, for
    a file whose footer cannot be read (zero bytes, not Parquet, truncated, unreadable after
    retries), the message its one error row gets."""
    from .read import describe_error, open_input  # read imports this module

    try:
        with open_input(fs, path) as f:
            meta = pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException) as e:
        return f"unreadable Parquet file (no rows read): {describe_error(e)}"
    names = meta.schema.to_arrow_schema().names
    for what, column in (("image_column", image_column), ("id_column", id_column)):
        if column is not None and column not in names:
            raise UsageError(f"Parquet input {uri} has no column {column!r} ({what}); its columns are "
                             f"{names}. Pass --image-column / --id-column.")
    image_type = meta.schema.to_arrow_schema().field(image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or pa.types.is_binary_view(image_type)):
        raise UsageError(f"Parquet input {uri}: column {image_column!r} is {image_type}, expected binary "
                         f"(encoded image bytes)")
    return meta.num_rows


def subtract_ranges(total: tuple[int, int], done: list[tuple[int, int]]) -> list[tuple[int, int]]:
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


class DoneIndex:
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
class Chunk:
    """One future output part: ``part-<key>.parquet``."""

    key: str
    kind: str
    expected: int | None  # rows in the part; None for a tar until its end marker arrives
    unit_key: str | None  # the single unit of a tar/parquet chunk (image chunks: the image ids)


def chunk_key(kind: str, unit_keys: list[str]) -> str:
    """sha1 of the chunk's kind and unit keys: the same inputs always give the same part name."""
    digest = hashlib.sha1(kind.encode())
    for k in unit_keys:
        digest.update(b"\n" + k.encode())
    return digest.hexdigest()


class PlanWriter:
    """Writes plan rows to Parquet files under the run's temporary folder, a file at a time, in row
    groups of :data:`READ_ROWS_PER_TASK` rows: :attr:`tasks` lists one ``(file, row group)`` per
    read task (:func:`unet.inference.read.read_and_decode_plan`)."""

    SCHEMA = pa.schema([("chunk", pa.string()), ("seq", pa.int64()), ("kind", pa.string()),
                        ("rel", pa.string()), ("row_start", pa.int64()), ("row_end", pa.int64()),
                        ("raw_rel", pa.binary()), ("error", pa.string())])

    def __init__(self, fs: pafs.FileSystem, directory: str, uri: str):
        self.fs, self.directory, self.uri = fs, directory, uri
        self.rows: dict[str, list] = {name: [] for name in self.SCHEMA.names}
        self.files: list[str] = []
        self.tasks: list[dict] = []
        self.total = 0

    def add(self, chunk: str, seq: int, unit: Unit) -> None:
        for name, value in zip(self.SCHEMA.names, (chunk, seq, unit.kind, unit.rel, unit.row_start, unit.row_end,
                                                   unit.raw_rel, unit.error)):
            self.rows[name].append(value)
        self.total += 1
        if len(self.rows["chunk"]) >= PLAN_ROWS_PER_FILE:
            self.flush()

    def flush(self) -> None:
        if not self.rows["chunk"]:
            return
        path = f"{self.directory}/plan-{len(self.files):06d}.parquet"
        with storage.errors(self.uri, "write plan to"):
            if isinstance(self.fs, pafs.LocalFileSystem):
                self.fs.create_dir(self.directory, recursive=True)
            pq.write_table(pa.table(self.rows, schema=self.SCHEMA), path, filesystem=self.fs,
                           row_group_size=READ_ROWS_PER_TASK)
        self.files.append(path)
        groups = -(-len(self.rows["chunk"]) // READ_ROWS_PER_TASK)
        self.tasks += [{"path": path, "row_group": g} for g in range(groups)]
        self.rows = {name: [] for name in self.SCHEMA.names}


def plan_inputs(config: InferenceConfig, in_fs: pafs.FileSystem, root: str, root_uri: str, single: bool,
                done: DoneIndex | None, plan: PlanWriter) -> tuple[dict[str, Chunk], int, int]:
    """Stream the listing into chunks and plan rows; skip units in ``done`` (incremental runs).

    Units are image files, DICOM files, tar archives and Parquet row ranges. Returns (chunks by
    key, units planned, units skipped as already done). Image files fill chunks of ``chunk_size``
    in listing order; a DICOM file (whose frame count is known only once read) and a tar are one
    chunk each; a Parquet file's rows not yet done are cut into ranges of ``chunk_size`` rows, one
    chunk each. Files without an extension are DICOM when they carry the DICM marker (read here,
    16 at a time) and otherwise not inputs.
    """
    chunks: dict[str, Chunk] = {}
    planned = skipped = 0
    images: list[Unit] = []  # the open image chunk

    def close_images() -> None:
        if images:
            key = chunk_key("image", [u.key for u in images])
            chunks[key] = Chunk(key, "image", len(images), None)
            for seq, unit in enumerate(images):
                plan.add(key, seq, unit)
            images.clear()

    def single_unit_chunk(unit: Unit, expected: int | None) -> None:
        key = chunk_key(unit.kind, [unit.key])
        chunks[key] = Chunk(key, unit.kind, expected, unit.key)
        plan.add(key, 0, unit)

    def handle(batch: list[tuple[str, str, bytes | None]]) -> None:
        nonlocal planned, skipped
        new = done.filter_new([rel for rel, kind, _ in batch if kind != "parquet"]) if done else None
        candidates = [(rel, raw) for rel, kind, raw in batch if kind == "dicom?" and (new is None or rel in new)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            is_dicom = dict(zip((rel for rel, _ in candidates), pool.map(
                lambda c: sniff_dicom(in_fs, fs_path(root, os.fsdecode(c[1]) if c[1] else c[0],
                                                     storage.is_s3(root_uri))), candidates)))
        for rel, kind, raw in batch:
            if kind == "dicom?":
                if not is_dicom.get(rel, True):  # no DICM marker: not an input
                    continue
                kind = "dicom"
            if kind == "parquet":
                n = parquet_row_count(in_fs, fs_path(root, os.fsdecode(raw) if raw else rel, storage.is_s3(root_uri)),
                                      f"{root_uri.rstrip('/')}/{rel}", config.image_column, config.id_column)
                done_ranges = done.parquet_ranges(rel) if done else []
                if isinstance(n, str):  # unreadable: one error row naming the file, key rows=0-0
                    if (0, 0) in done_ranges:
                        skipped += 1
                    else:
                        planned += 1
                        single_unit_chunk(Unit("parquet", rel, 0, 0, raw, error=n), 1)
                    continue
                todo = subtract_ranges((0, n), done_ranges)
                windows = [(s, min(s + config.chunk_size, b)) for a, b in todo
                           for s in range(a, b, config.chunk_size)]
                skipped += len(done_ranges)
                for a, b in windows:
                    planned += 1
                    single_unit_chunk(Unit("parquet", rel, a, b, raw), b - a)
                continue
            if new is not None and rel not in new:
                skipped += 1
                continue
            planned += 1
            if kind in ("tar", "dicom"):
                single_unit_chunk(Unit(kind, rel, raw_rel=raw), None)
            else:
                images.append(Unit("image", rel, raw_rel=raw))
                if len(images) >= config.chunk_size:
                    close_images()

    batch: list[tuple[str, str, bytes | None]] = []
    out_path = storage.get_filesystem(config.output)[1].rstrip("/")
    inside = (storage.is_s3(config.input) == storage.is_s3(config.output)
              and out_path.startswith(root.rstrip("/") + "/"))
    skip_prefix = out_path[len(root.rstrip("/")) + 1:] + "/" if inside else None
    for name, kind in iter_listed(config.input, in_fs, root, single, skip_prefix):
        rel = escape_name(name)  # a name that is not UTF-8 is still an input, with an escaped id
        if any(fnmatch.fnmatchcase(rel, pattern) for pattern in config.exclude):
            continue
        batch.append((rel, kind, None if rel == name else os.fsencode(name)))
        if len(batch) >= 1000:
            handle(batch)
            batch = []
    handle(batch)
    close_images()
    plan.flush()
    return chunks, planned, skipped
