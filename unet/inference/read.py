"""Worker side, first stage: plan rows -> decoded images at the model's input size (Ray Data tasks).

Every input becomes exactly one row (a DICOM file: one per frame), carrying either an image or an
``error``; nothing here raises for a bad input. Rows carry their chunk and position in it
(``_chunk``, ``_seq``) so the driver can assemble each output part exactly once; a tar or a DICOM
file, whose row count is unknown until it is read, sends one end marker row (``_seq == -1``,
``_n`` = rows) after its last row.

Reads go through :class:`RetryingReader`: a transient failure (a reset connection, a timeout, a
5xx from the store) reopens the file and carries on from the same byte, up to
:data:`READ_ATTEMPTS` attempts like the S3 client's own retries, so one hiccup in the middle of a
tar or a Parquet file does not turn the rest of it into error rows.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from ..storage import READ_ATTEMPTS, is_transient
from ..dicom import has_dicom_marker, may_be_dicom, read_dicom
from ..transforms import resize_image, single_threaded_opencv
from .decode import DecodeError, decode_image, describe_error
from .plan import escape_name, fs_path, kind_of

__all__ = ["DEFAULT_MAX_BYTES", "READ_ATTEMPTS", "ROWS_PER_BATCH", "RetryingReader", "is_transient", "open_input",
           "read_and_decode", "read_and_decode_plan"]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Decoded rows per batch handed downstream (bounds a read task's memory inside a big tar).
ROWS_PER_BATCH = 32
TAR_BUFFER_BYTES = 4 * 1024 * 1024
class RetryingReader(io.RawIOBase):
    """A read-only, seekable file that survives transient read errors.

    ``opener()`` opens the file (a pyarrow ``NativeFile`` or a Python binary file); when opening or
    reading fails with a transient error (:func:`is_transient`) the file is reopened and the read
    repeated from the same offset, up to :data:`READ_ATTEMPTS` attempts with growing waits. What
    still fails is raised. ``retries`` counts the extra attempts made.
    """

    def __init__(self, opener):
        super().__init__()
        self._opener = opener
        self._file = None
        self._pos = 0
        self.retries = 0
        self._call(lambda f: None)  # open now: a missing file fails here

    def _call(self, op):
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                if self._file is None:
                    self._file = self._opener()
                return op(self._file)
            except OSError as e:
                if attempt == READ_ATTEMPTS or not is_transient(e):
                    raise
                self._drop()
                self.retries += 1
                storage.retry_wait(attempt)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # the connection is already broken; a new one is opened

    def _read_at(self, f, n: int) -> bytes:
        if f.tell() != self._pos:
            f.seek(self._pos)
        return f.read(n)

    def read(self, size: int | None = -1) -> bytes:
        # One request for the whole rest (io.RawIOBase.readall would read 8 KiB at a time: on S3
        # each of those is a request).
        if size is None or size < 0:
            size = max(self.size() - self._pos, 0)
        data = self._call(lambda f: self._read_at(f, size))
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def size(self) -> int:
        return self._call(lambda f: f.size() if hasattr(f, "size") else os.fstat(f.fileno()).st_size)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: None}[whence]
        self._pos = (self.size() if base is None else base) + offset
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_input(fs: pafs.FileSystem, path: str) -> RetryingReader:
    """Open an input file for reading, with retries (:class:`RetryingReader`).

    Local names that are not UTF-8 (pyarrow cannot take them) are opened with Python's ``open``.
    """
    try:
        path.encode()
        local_bytes_name = False
    except UnicodeEncodeError:
        local_bytes_name = isinstance(fs, pafs.LocalFileSystem)
    return RetryingReader((lambda: open(path, "rb")) if local_bytes_name else (lambda: fs.open_input_file(path)))


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

    def __init__(self, input_size: tuple[int, int], dicom_columns: tuple[str, ...] = ()):
        self.input_size = tuple(input_size)
        self.dicom_columns = tuple(dicom_columns)
        self._clear()

    def _clear(self) -> None:
        self.cols: dict[str, list] = {k: [] for k in ("_chunk", "_seq", "_n", "image_id", "source_uri", "height",
                                                      "width", "error", "x", *self.dicom_columns)}

    def __len__(self) -> int:
        return len(self.cols["_chunk"])

    def add(self, chunk: str, seq: int, image_id: str, source_uri: str, *, image: np.ndarray | None = None,
            error: str | None = None, n: int = -1, dicom: dict | None = None) -> None:
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
        for name in self.dicom_columns:  # "" = null, as error
            c[name].append((dicom or {}).get(name) or "")

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
            **{name: np.array(c[name], dtype=object) for name in self.dicom_columns},
        }
        self._clear()
        return batch


def _read_limited(fs: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    with open_input(fs, path) as f:
        size = f.size()
        if size > max_bytes:
            raise DecodeError(f"file is {size} bytes, over the limit of {max_bytes} (max_bytes / --max-bytes)")
        return f.read()


def _decode_or_error(data_fn, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(data_fn(), max_pixels=max_pixels), None
    except Exception as e:  # noqa: BLE001 - one bad input becomes an error row; the job goes on
        return None, describe_error(e)


def _dicom_frames(data_fn, rows: _Rows, max_pixels: int) -> tuple[list[tuple[str, np.ndarray | None, str | None]],
                                                                        dict]:
    """A DICOM file -> ([(id suffix, image, error)], identifying values): one item per frame,
    suffixed ``#frame=N`` (N from 1, as DICOM numbers frames) when there are several; one error
    item when the file cannot be read. ``data_fn`` gives its bytes."""
    try:
        frames, ids = read_dicom(data_fn(), max_pixels=max_pixels, columns=rows.dicom_columns)
    except Exception as e:  # noqa: BLE001 - one bad file becomes one error row; the job goes on
        return [("", None, describe_error(e))], {}
    if len(frames) == 1:
        return [("", frames[0], None)], ids
    return [(f"#frame={i}", frame, None) for i, frame in enumerate(frames, 1)], ids


def _dicom_rows(fs, path: str, rel: str, uri: str, chunk: str, rows: _Rows, max_pixels: int,
                max_bytes: int) -> Iterator[None]:
    """Add one row per frame of a DICOM file (its own chunk) and the end marker; yield when a batch is full."""
    items, ids = _dicom_frames(lambda: _read_limited(fs, path, max_bytes), rows, max_pixels)
    for seq, (suffix, image, error) in enumerate(items):
        rows.add(chunk, seq, rel + suffix, uri + suffix, image=image, error=error, dicom=ids)
        if len(rows) >= ROWS_PER_BATCH:
            yield
    rows.add(chunk, -1, rel, uri, n=len(items))


def _tar_rows(fs, path: str, rel: str, uri: str, chunk: str, rows: _Rows, max_pixels: int,
              max_bytes: int) -> Iterator[None]:
    """Add one row per image member (a DICOM member: per frame; and per unsafe member) of a tar;
    yield whenever a batch is full."""
    seq = 0
    seen: set[str] = set()

    def add(name: str, image=None, error=None, suffix="", dicom=None):
        nonlocal seq
        escaped = escape_name(name)  # member names that are not UTF-8: escaped, reversible ids
        rows.add(chunk, seq, f"{rel}/{escaped}{suffix}", f"{uri}#{escaped}{suffix}", image=image, error=error,
                 dicom=dicom)
        seq += 1

    try:
        # Buffered: tarfile reads 10 KiB records, which would otherwise each be a request on S3;
        # tarfile itself recognises .tar.gz.
        with io.BufferedReader(open_input(fs, path), TAR_BUFFER_BYTES) as raw, \
                tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir():
                    continue
                unsafe = _unsafe_member(name)
                kind = kind_of(name)
                data_fn = (lambda m=member: tar.extractfile(m).read())
                if unsafe is None and kind not in ("image", "dicom"):
                    # WebDataset side files (.json, .cls, ...) are not inputs; a file without an
                    # extension is when it carries the DICM marker. (A streamed member is read once.)
                    file = tar.extractfile(member) if may_be_dicom(name) and member.isfile() else None
                    head = file.read(132) if file is not None else b""
                    if not has_dicom_marker(head):
                        continue
                    kind, data_fn = "dicom", (lambda f=file, h=head: h + f.read())
                if unsafe is not None:
                    add(name, error=f"{unsafe}; not read")
                elif not member.isfile():
                    add(name, error=f"tar member is {_link_kind(member)}, not image data; not read")
                elif name in seen:
                    add(name, error="duplicate tar member name (an earlier member has the same path); not read")
                elif member.size > max_bytes:
                    add(name, error=f"tar member is {member.size} bytes, over the limit of {max_bytes} "
                                    f"(max_bytes / --max-bytes)")
                elif kind == "dicom":
                    seen.add(name)
                    items, ids = _dicom_frames(data_fn, rows, max_pixels)
                    for suffix, image, error in items:
                        add(name, image=image, error=error, suffix=suffix, dicom=ids)
                else:
                    seen.add(name)
                    image, error = _decode_or_error(data_fn, max_pixels)
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
                  image_column: str, id_column: str | None, max_pixels: int, max_bytes: int) -> Iterator[None]:
    """Add one row per Parquet row in [start, end); yield whenever a batch is full."""
    row = start

    def ident(value, r):
        return f"{rel}#{r}" if id_column is None else (None if value is None else str(value))

    try:
        with open_input(fs, path) as f:
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
                    elif len(data) > max_bytes:
                        rows.add(chunk, r - start, image_id, source,
                                 error=f"image cell is {len(data)} bytes, over the limit of {max_bytes} "
                                       f"(max_bytes / --max-bytes)")
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


def read_and_decode_plan(tasks: pa.Table, *, plan_fs: pafs.FileSystem, **decode) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: read tasks (``path``, ``row_group`` of a plan file, :attr:`PlanWriter.tasks
    <unet.inference.plan.PlanWriter>`) -> :func:`read_and_decode` of those plan rows. One step, so a
    read task starts decoding at once, with no plan rows passed between processes."""
    for task in tasks.to_pylist():
        with plan_fs.open_input_file(task["path"]) as f:
            plan = pq.ParquetFile(f).read_row_group(task["row_group"])
        yield from read_and_decode(plan, **decode)


def read_and_decode(plan: pa.Table, *, fs: pafs.FileSystem, root: str, root_uri: str,
                    input_size: tuple[int, int], image_column: str, id_column: str | None,
                    max_pixels: int, max_bytes: int, dicom_columns: tuple[str, ...] = ()
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: plan rows -> decoded rows resized to the model's input size (uint8 ``x``).

    Never raises for a bad input: every input becomes a row, failures carry ``error``.
    ``dicom_columns``: identifying DICOM attributes (:data:`unet.dicom.DICOM_COLUMNS`) to carry as
    columns of the same names ("" for other rows); none are read otherwise.
    """
    single_threaded_opencv()
    rows = _Rows(input_size, dicom_columns)
    s3 = storage.is_s3(root_uri)
    for unit in plan.to_pylist():
        rel, chunk = unit["rel"], unit["chunk"]
        # rel is the escaped id; raw_rel the name's bytes when it is not UTF-8 (unet.inference.plan)
        path = fs_path(root, os.fsdecode(unit["raw_rel"]) if unit.get("raw_rel") else rel, s3)
        uri = f"{root_uri.rstrip('/')}/{rel}"
        if unit.get("error"):  # found unreadable while planning (a Parquet file without a footer)
            rows.add(chunk, unit["seq"], rel, uri, error=unit["error"])
            if len(rows) >= ROWS_PER_BATCH:
                yield rows.flush()
        elif unit["kind"] == "image":
            image, error = _decode_or_error(lambda: _read_limited(fs, path, max_bytes), max_pixels)
            rows.add(chunk, unit["seq"], rel, uri, image=image, error=error)
            if len(rows) >= ROWS_PER_BATCH:
                yield rows.flush()
        else:
            if unit["kind"] == "tar":
                gen = _tar_rows(fs, path, rel, uri, chunk, rows, max_pixels, max_bytes)
            elif unit["kind"] == "dicom":
                gen = _dicom_rows(fs, path, rel, uri, chunk, rows, max_pixels, max_bytes)
            else:
                gen = _parquet_rows(fs, path, rel, uri, chunk, unit["row_start"], unit["row_end"], rows,
                                    image_column, id_column, max_pixels, max_bytes)
            for _ in gen:
                yield rows.flush()
    if len(rows):
        yield rows.flush()
