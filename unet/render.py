"""An inference output back into files a person can open: mask PNGs, overlays, an index.html.

``jobs.render`` is the command; :func:`render` the library call. Into ``to`` (a local folder,
created if missing) it writes:

* ``masks/<name>``: each ``ok`` row's ``mask_png`` as stored (8-bit grey PNG, 0 = background,
  255 = tumour, the image's original size);
* ``overlays/<name>`` (when ``images`` is given): the input image in grey with the mask's outline
  drawn in yellow;
* ``index.html``: a contact sheet of the first rows (thumbnails in ``thumbs/``) with ``image_id``,
  ``tumour_fraction``, ``confidence`` and the image head's ``lesion_probability`` /
  ``malignant_probability`` when not null, then tables of the error rows (id and error; never
  drawn), of renamed ids, and of overlays that could not be drawn;
* ``files.csv``: one line per row read (``image_id, status, mask, overlay, note``): the complete
  mapping from ids to files, with the error or the reason for a rename.

**Naming rule.** ``<name>`` is ``image_id`` with its image extension (.png .jpg .jpeg .bmp .tif
.tiff, any case) replaced by ``.png``, or ``.png`` appended when it has none (``t.parquet#3`` ->
``t.parquet#3.png``); ``/`` in an id makes folders. Ids are made safe first and every change is
recorded: an absolute id loses its leading ``/`` (or drive), ``..`` and ``.`` components become
``__`` and ``_``, backslashes, NUL and other control characters become ``_``, empty components are
dropped, a folder name ending in ``.png`` gets a trailing ``_`` (so a folder never takes a mask's
name) and an over-long name is shortened with a hash. Two rows that would get the same file (ids
that differ only in extension or letter case, duplicate ids, an id that sanitises onto another)
never overwrite each other: the later row gets ``<stem>~2.png``, ``~3``, ... Nothing is written
outside ``to``: paths are built from sanitised components only, folders are created one at a time,
and an existing symbolic link or file standing where a folder should be stops the run.

**Reading.** The output's Parquet parts (``*.parquet`` under it; files and folders whose names
start with ``_`` or ``.`` are bookkeeping and skipped, as pyarrow.dataset does) are read one at a
time in batches of :data:`BATCH_ROWS` rows. Memory holds one batch, the sheet's rows and at most
:data:`TABLE_ROWS` lines of each table; the set of file names already used lives in an on-disk
SQLite table.

**Overlays** are drawn for rows that came from image files: ``images`` is the folder or ``s3://``
prefix (or the single image file) that ``jobs.infer`` read, and a row's image is
``<images>/<image_id>``, decoded as inference decoded it (:func:`unet.inference.decode_image`: EXIF
orientation, 8-bit grey). Rows from tar shards or Parquet tables (told by their ``source_uri``) get
no overlay; they are counted in :attr:`RenderSummary.overlays_unsupported`. A missing, unreadable
or differently sized image is listed under "overlays not drawn"; its mask is still written.

Example::

    from unet.render import render
    summary = render("s3://bucket/masks/", "runs/masks-view", images="s3://bucket/scans/", limit=200)
    print(summary.line())
"""

from __future__ import annotations

import csv
import html
import math
import os
import posixpath
import re
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .codec import decode_png, encode_png
from .inference.decode import DEFAULT_MAX_PIXELS, decode_image, describe_error
from .inference.plan import PARQUET_SUFFIXES, TAR_SUFFIXES, fs_path, input_root
from .inference.read import DEFAULT_MAX_BYTES
from .runtime import UsageError
from .safe_names import Names, Writer, file_name, is_plain_relative

__all__ = ["BATCH_ROWS", "DEFAULT_SHEET_ROWS", "TABLE_ROWS", "RenderSummary", "draw_outline",
           "iter_output_rows", "list_output_parts", "render"]

BATCH_ROWS = 64  # rows decoded at a time from a part
DEFAULT_SHEET_ROWS = 100  # rows on the contact sheet without a limit
TABLE_ROWS = 1000  # lines per table in index.html; files.csv has them all
THUMB_SIDE = 192  # longest side of a contact-sheet thumbnail, pixels
OUTLINE_BGR = (0, 255, 255)  # yellow: stands out on grey and means none of the evaluation colours

# Columns read; the first three must be there, the others may be missing in older outputs.
REQUIRED_COLUMNS = ("image_id", "status", "mask_png")
OPTIONAL_COLUMNS = ("source_uri", "error", "height", "width", "tumour_fraction", "confidence",
                    "lesion_probability", "malignant_probability")


@dataclass
class RenderSummary:
    """What a render wrote; ``line()`` is the one line the job prints."""

    to: str
    index: str
    rows: int = 0  # rows read (ok + error), at most the limit
    masks: int = 0
    overlays: int = 0
    errors: int = 0  # status = error rows, listed in index.html and files.csv
    renamed: int = 0
    overlay_problems: int = 0  # image missing, unreadable or not the mask's size
    overlays_unsupported: int = 0  # rows from tar/Parquet inputs (no overlay by design)
    bad_rows: int = 0  # ok rows whose mask cannot be decoded: listed with the errors
    truncated: bool = False  # stopped at the limit with rows left
    with_overlays: bool = False  # images were given

    def line(self) -> str:
        items = [f"{self.masks} masks"]
        if self.with_overlays:
            items.append(f"{self.overlays} overlays")
        items.append(f"{self.errors + self.bad_rows} errors listed")
        if self.renamed:
            items.append(f"{self.renamed} ids renamed (see files.csv)")
        if self.overlay_problems:
            items.append(f"{self.overlay_problems} overlays not drawn")
        if self.overlays_unsupported:
            items.append(f"{self.overlays_unsupported} rows from tar/Parquet inputs without overlay "
                         f"(only image-file inputs are supported)")
        head = f"rendered {self.rows} rows" + (" (--limit reached)" if self.truncated else "")
        return f"{head}: {', '.join(items)}; index: {self.index}"


# --- reading the output ------------------------------------------------------------------------

def list_output_parts(uri: str) -> Iterator[str]:
    """URIs of the Parquet parts of an inference output (a folder/prefix, or one part file),
    streamed; bookkeeping (names starting with ``_`` or ``.``) is skipped. Raises
    :class:`unet.storage.StorageNotFoundError` when nothing is at ``uri``."""
    fs, path = storage.get_filesystem(uri)
    with storage.errors(uri, "read inference output"):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        if storage.is_s3(uri):
            try:  # a missing bucket, or wrong settings, gets its own message naming what to check
                next(storage.iter_files(uri), None)
            except storage.BucketNotFoundError:
                raise
            except storage.StorageNotFoundError:
                pass
        raise storage.StorageNotFoundError(f"inference output {uri} does not exist")
    if info.type == pafs.FileType.File:
        yield uri
        return
    root = uri.rstrip("/")
    for part in storage.iter_files(root, suffixes=PARQUET_SUFFIXES):
        rel = part[len(root) + 1:] if part.startswith(root + "/") else posixpath.basename(part)
        if not any(c.startswith(("_", ".")) for c in rel.split("/")):
            yield part


def iter_output_rows(part_uri: str) -> Iterator[dict]:
    """The rows of one part as dicts, :data:`BATCH_ROWS` at a time from disk."""
    fs, path = storage.get_filesystem(part_uri)
    with storage.errors(part_uri, "read"):
        f = fs.open_input_file(path)
    with f:
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowInvalid as e:
            raise UsageError(f"{part_uri}: not a readable Parquet file ({e}); is it an output of jobs.infer?") from e
        names = pf.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UsageError(f"{part_uri}: no column(s) {missing}; not an output of jobs.infer "
                             f"(its columns are {names})")
        columns = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in names]
        try:
            with storage.errors(part_uri, "read"):
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    yield from batch.to_pylist()
        except pa.ArrowInvalid as e:
            raise UsageError(f"{part_uri}: damaged Parquet data ({e})") from e


# --- images for the overlays -------------------------------------------------------------------

def _from_archive(source_uri: str | None) -> bool:
    """True for rows that came from a tar member or a Parquet row (see the output's source_uri)."""
    if not source_uri:
        return False
    lower = source_uri.lower()
    if re.search(r"#row=\d+$", lower) and lower.rsplit("#row=", 1)[0].endswith(PARQUET_SUFFIXES):
        return True
    return any(f"{suffix}#" in lower for suffix in TAR_SUFFIXES)


class _Images:
    """Finds and decodes a row's input image under the folder/prefix (or file) inference read."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, path = storage.get_filesystem(uri)
        self.root, _, self.single = input_root(uri, self.fs, path)
        self.s3 = storage.is_s3(uri)
        self.single_name = posixpath.basename(path.rstrip("/")) if self.single else None
        self.single_path = path

    def read(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 grey as inference saw it; ``ValueError`` / ``OSError`` say why not."""
        if self.single:
            if image_id != self.single_name:
                raise ValueError(f"--images is the single file {self.uri}, not this row's image")
            path, where = self.single_path, self.uri
        else:
            if not is_plain_relative(image_id):
                raise ValueError("the id is not a plain relative path; its image is not looked up")
            path = fs_path(self.root, image_id, self.s3)
            where = storage.join(self.uri, image_id)
        with storage.errors(where, "read image"):
            with self.fs.open_input_file(path) as f:
                if f.size() > DEFAULT_MAX_BYTES:
                    raise ValueError(f"{where} is {f.size()} bytes, over {DEFAULT_MAX_BYTES}")
                data = f.read()
        try:
            return decode_image(data, max_pixels=DEFAULT_MAX_PIXELS)
        except Exception as e:  # noqa: BLE001 - any decoder failure: this overlay is not drawn
            raise ValueError(f"{where}: {describe_error(e)}") from e


def draw_outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = OUTLINE_BGR) -> np.ndarray:
    """Grey ``image`` (H, W) as BGR with the outline of ``mask`` (non-zero = tumour) drawn in ``colour``
    (holes outlined too); the line is about 1/300 of the longer side thick, at least 1 pixel."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(max(image.shape[:2]) / 300))
    cv2.drawContours(bgr, contours, -1, colour, thickness)
    return bgr


def _thumbnail(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    if scale >= 1:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


# --- the contact sheet -------------------------------------------------------------------------

@dataclass
class _Sheet:
    cards: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @staticmethod
    def add_line(table: list, line: tuple) -> None:
        if len(table) < TABLE_ROWS:
            table.append(line)


def _href(rel: str) -> str:
    return html.escape(urllib.parse.quote(rel), quote=True)


def _number(value, digits: int = 3) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return f"{value:.{digits}f}"


def _card(row: dict, thumb: str, mask: str, overlay: str | None) -> str:
    esc = html.escape
    facts = []
    for label, key in (("tumour fraction", "tumour_fraction"), ("confidence", "confidence"),
                       ("p(lesion)", "lesion_probability"), ("p(malignant)", "malignant_probability")):
        text = _number(row.get(key))
        if text is not None:
            facts.append(f"{label} {text}")
    links = f'<a href="{_href(mask)}">mask</a>' + (f' · <a href="{_href(overlay)}">overlay</a>' if overlay else "")
    return (f'<figure><a href="{_href(overlay or mask)}"><img src="{_href(thumb)}" loading="lazy" alt=""></a>'
            f'<figcaption><b>{esc(row["image_id"])}</b><br>{esc(", ".join(facts))}<br>{links}</figcaption></figure>')


def _table(title: str, header: tuple[str, ...], lines: list[tuple], total: int) -> str:
    if not total:
        return ""
    esc = html.escape
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in line) + "</tr>" for line in lines)
    more = f"<p>{total - len(lines)} more in files.csv.</p>" if total > len(lines) else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    return f"<h2>{esc(title)} ({total})</h2><table><tr>{head}</tr>{body}</table>{more}"


def _write_index(writer: Writer, sheet: _Sheet, summary: RenderSummary, masks_uri: str, sheet_rows: int) -> None:
    esc = html.escape
    shown = min(summary.rows, sheet_rows)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Masks: {esc(masks_uri)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMB_SIDE}px; font-size: 12px; overflow-wrap: anywhere; }}
figure img {{ max-width: {THUMB_SIDE}px; max-height: {THUMB_SIDE}px; display: block; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }}
</style></head><body>
<h1>Masks from {esc(masks_uri)}</h1>
<p>{esc(summary.line())}</p>
<h2>First {shown} rows</h2>
<p>{len(sheet.cards)} drawn; error rows among them are in the table below. Every row: files.csv.</p>
<div class="sheet">{"".join(sheet.cards)}</div>
{_table("Error rows", ("image_id", "error"), sheet.errors, summary.errors + summary.bad_rows)}
{_table("Renamed ids", ("image_id", "file", "why"), sheet.renamed, summary.renamed)}
{_table("Overlays not drawn", ("image_id", "why"), sheet.problems, summary.overlay_problems)}
</body></html>
"""
    writer.write("index.html", page.encode())


# --- the whole run -----------------------------------------------------------------------------

def _check_target(to: str) -> None:
    if "://" in to and not to.startswith("file://"):
        raise UsageError(f"--to {to}: expected a local folder (it is created if missing)")
    path = storage.get_filesystem(to)[1]
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--to {to} is a file; expected a folder (it is created if missing)")


def render(masks: str, to: str, *, images: str | None = None, limit: int | None = None,
           sheet_rows: int | None = None) -> RenderSummary:
    """Write the masks (and overlays) of the inference output ``masks`` into the local folder ``to``.

    Args:
        masks: the ``--output`` of ``jobs.infer``: folder, ``s3://`` prefix, or one part file.
        to: local folder, created if missing; files of an earlier render are overwritten.
        images: the ``--input`` of ``jobs.infer`` (image folder/prefix or single image): draw
            overlays. None: masks only.
        limit: read only the first ``limit`` rows (parts in listing order, rows in part order).
        sheet_rows: rows on the contact sheet; default ``limit``, else :data:`DEFAULT_SHEET_ROWS`.

    Raises :class:`unet.runtime.UsageError` / :class:`unet.storage.StorageError` for bad use (no such output, no
    parts, ``to`` is a file, missing ``images``), before anything is written.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1; got {limit}")
    sheet_rows = (limit if limit is not None else DEFAULT_SHEET_ROWS) if sheet_rows is None else sheet_rows
    _check_target(to)
    parts = list_output_parts(masks)
    first = next(parts, None)
    if first is None:
        raise UsageError(f"inference output {masks} holds no Parquet parts (part-*.parquet); is it the "
                         f"--output of jobs.infer?")
    source = _Images(images) if images is not None else None

    root = storage.get_filesystem(to)[1]
    os.makedirs(root, exist_ok=True)
    writer = Writer(root)
    summary = RenderSummary(to=writer.root, index=os.path.join(writer.root, "index.html"),
                            with_overlays=source is not None)
    sheet = _Sheet()
    # files.csv is streamed into a temporary and renamed at the end, so a stopped run leaves none.
    csv_tmp = os.path.join(writer.root, f".files.csv.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tempfile.TemporaryDirectory(prefix="unet-render-") as scratch, \
                open(csv_tmp, "x", newline="", encoding="utf-8") as csv_file:
            names = Names(scratch)
            table = csv.writer(csv_file)
            table.writerow(["image_id", "status", "mask", "overlay", "note"])
            try:
                for part in _chain(first, parts):
                    for row in iter_output_rows(part):
                        if limit is not None and summary.rows >= limit:
                            summary.truncated = True
                            break
                        _render_row(row, summary.rows < sheet_rows, writer, names, source, summary, sheet,
                                    table)
                        summary.rows += 1
                    if summary.truncated:
                        break
            finally:
                names.close()
        os.replace(csv_tmp, os.path.join(writer.root, "files.csv"))
    finally:
        if os.path.lexists(csv_tmp):
            os.remove(csv_tmp)
    _write_index(writer, sheet, summary, masks, sheet_rows)
    return summary


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _render_row(row: dict, on_sheet: bool, writer: Writer, names: Names, source: _Images | None,
                summary: RenderSummary, sheet: _Sheet, table) -> None:
    image_id = row["image_id"]
    if row["status"] != "ok":
        error = row.get("error") or f"status {row['status']!r}"
        summary.errors += 1
        sheet.add_line(sheet.errors, (image_id, error))
        table.writerow([image_id, row["status"], "", "", error])
        return
    try:
        mask = decode_png(row["mask_png"], sample=image_id, column="mask_png")
        height, width = row.get("height"), row.get("width")
        if height is not None and width is not None and mask.shape != (height, width):
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the row says {width}x{height}")
    except ValueError as e:
        # The row claims ok but carries no usable mask: listed with the errors, not drawn.
        summary.bad_rows += 1
        sheet.add_line(sheet.errors, (image_id, f"unusable mask: {e}"))
        table.writerow([image_id, "ok", "", "", f"unusable mask: {e}"])
        return

    rel, notes = file_name(image_id)
    rel, collided = names.claim(rel)
    if collided:
        notes.append("another row already has this file name")
    mask_rel = f"masks/{rel}"
    writer.write(mask_rel, row["mask_png"])
    summary.masks += 1
    note = "; ".join(notes)
    if notes:
        summary.renamed += 1
        sheet.add_line(sheet.renamed, (image_id, mask_rel, note))

    overlay_rel, shown = None, mask
    if source is not None:
        if _from_archive(row.get("source_uri")):
            summary.overlays_unsupported += 1
            note = "; ".join(filter(None, [note, "no overlay: tar/Parquet inputs are not supported"]))
        else:
            try:
                image = source.read(image_id)
                if image.shape != mask.shape:
                    raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, the mask "
                                     f"{mask.shape[1]}x{mask.shape[0]}: is --images the input this output "
                                     f"was made from?")
            except (ValueError, OSError) as e:
                summary.overlay_problems += 1
                sheet.add_line(sheet.problems, (image_id, str(e)))
                note = "; ".join(filter(None, [note, f"no overlay: {e}"]))
            else:
                shown = draw_outline(image, mask)
                overlay_rel = f"overlays/{rel}"
                writer.write(overlay_rel, encode_png(shown))
                summary.overlays += 1
    if on_sheet:
        thumb = f"thumbs/{len(sheet.cards):06d}.png"
        writer.write(thumb, encode_png(_thumbnail(shown)))
        sheet.cards.append(_card(row, thumb, mask_rel, overlay_rel))
    table.writerow([image_id, "ok", mask_rel, overlay_rel or "", note])
