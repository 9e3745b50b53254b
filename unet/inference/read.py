"""Worker side, first stage: plan rows -> decoded images at the model's input size (Ray Data tasks).

Every input becomes exactly one row, carrying either an image or an ``error``; nothing here raises
for a bad input. Rows carry their chunk and position in it (``_chunk``, ``_seq``) so the driver can
assemble each output part exactly once; a tar, whose member count is unknown until its end, sends
one end marker row (``_seq == -1``, ``_n`` = rows) after its last member.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from ..transforms import resize_image, single_threaded_opencv
from .decode import DecodeError, decode_image, describe_error
from .plan import fs_path, kind_of

__all__ = ["DEFAULT_MAX_BYTES", "ROWS_PER_BATCH", "read_and_decode", "read_plan_file"]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Decoded rows per batch handed downstream (bounds a read task's memory inside a big tar).
ROWS_PER_BATCH = 32
TAR_BUFFER_BYTES = 4 * 1024 * 1024


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
        x = np.zeros(self.input_size, np.uint8)
        if image is not None:
            try:
                x = resize_image(image, self.input_size)
            except Exception as e:  # noqa: BLE001 - e.g. a shape OpenCV cannot resize: an error row
                image, error = None, f"cannot resize a {image.shape} image: {describe_error(e)}"
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
        c["x"].append(x)

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
        return None, describe_error(e)


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
        # Buffered: tarfile reads 10 KiB records, which would otherwise each be a request on S3;
        # compression=None: tarfile itself recognises .tar.gz.
        with fs.open_input_stream(path, compression=None, buffer_size=TAR_BUFFER_BYTES) as raw, \
                tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir():
                    continue
                unsafe = _unsafe_member(name)
                if unsafe is None and kind_of(name) != "image":
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
        rows.add(chunk, seq, rel, uri, error=f"unreadable tar archive {where}: {describe_error(e)}")
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
        message = f"unreadable Parquet data at row {row}: {describe_error(e)}"
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
    single_threaded_opencv()
    rows = _Rows(input_size)
    s3 = storage.is_s3(root_uri)
    for unit in plan.to_pylist():
        rel, chunk = unit["rel"], unit["chunk"]
        path = fs_path(root, rel, s3)
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
