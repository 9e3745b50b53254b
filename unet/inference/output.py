"""The output format: schema of the mask rows, and how parts are assembled, written and read back.

The meaning of each column: the README's "Bulk inference" output table.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from ..runtime import UsageError
from .plan import Chunk

__all__ = ["ASSIGNMENT_SCHEMA", "FRAGMENT_SUMMARY_SCHEMA", "OUTPUT_SCHEMA", "PIPELINE_SCHEMA", "PartAssembler",
           "assemble_part", "delete_parts", "fragment_assignments", "fragment_file", "list_parts", "output_schema",
           "part_bytes", "part_name", "pipeline_schema", "read_footer", "write_fragments"]

OUTPUT_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("mask_png", pa.binary()),
    # Only with save_probabilities (jobs.infer --save-probabilities); null otherwise and on error rows.
    pa.field("probability_png", pa.binary()),
    pa.field("tumour_pixels", pa.int64()),
    pa.field("tumour_fraction", pa.float32()),
    pa.field("bbox", pa.list_(pa.int32())),
    pa.field("confidence", pa.float32()),
    # From the image-level head; null for models without one and on error rows.
    pa.field("lesion_probability", pa.float32()),
    pa.field("malignant_probability", pa.float32()),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
# Bookkeeping columns that travel with each row through the pipeline and are dropped on write:
# which chunk (= output part) the row belongs to, its position in the chunk, and — on the one
# end-of-archive marker row per tar (_seq == -1) — how many rows the chunk has.
INTERNAL_FIELDS = [pa.field("_chunk", pa.string()), pa.field("_seq", pa.int64()), pa.field("_n", pa.int64())]
PIPELINE_SCHEMA = pa.schema(INTERNAL_FIELDS + list(OUTPUT_SCHEMA))


def output_schema(dicom_columns: Iterable[str] = ()) -> pa.Schema:
    """:data:`OUTPUT_SCHEMA` plus the identifying DICOM columns a run asked for
    (:data:`unet.dicom.DICOM_COLUMNS`, strings; null on rows from other files)."""
    return pa.schema(list(OUTPUT_SCHEMA) + [pa.field(name, pa.string()) for name in dicom_columns])


def pipeline_schema(dicom_columns: Iterable[str] = ()) -> pa.Schema:
    return pa.schema(INTERNAL_FIELDS + list(output_schema(dicom_columns)))


# What the driver receives instead of the rows (write_fragments): per fragment file, the chunk,
# the positions it holds, the chunk's row count if the block carried its end marker (else -1)
# and the file name ("" when the block held only the marker). A few bytes per image, whatever the
# masks weigh.
FRAGMENT_SUMMARY_SCHEMA = pa.schema([pa.field("_chunk", pa.string()), pa.field("_seqs", pa.list_(pa.int64())),
                                     pa.field("_n", pa.int64()), pa.field("fragment", pa.string())])
# The same, one row per position (and per end marker), as PartAssembler takes rows; for each
# position of a complete chunk, the fragment to take its row from.
ASSIGNMENT_SCHEMA = pa.schema(INTERNAL_FIELDS + [pa.field("fragment", pa.string())])

FORMAT_VERSION = "1"
PART_RE = re.compile(r"^part-[0-9a-f]{40}\.parquet$")
TMP_PART_RE = re.compile(r"^\.part-[0-9a-f]{40}\.parquet\.tmp-")  # unet.storage.write_bytes temporaries
META_FORMAT = b"unet.infer.format"
META_UNITS = b"unet.infer.units"
META_KIND = b"unet.infer.kind"
META_ERRORS = b"unet.infer.errors"
META_MODEL = b"unet.infer.model_id"
META_POSTPROCESS = b"unet.infer.postprocess"  # JSON: threshold, gate, min area, largest component, tta, optional columns
META_INPUT = b"unet.infer.input"  # the input root URI that the unit keys are relative to


def part_name(chunk_key: str) -> str:
    return f"part-{chunk_key}.parquet"


class PartAssembler:
    """Groups streamed rows by chunk, drops duplicates, writes each part once it is complete.

    ``write(chunk, table)`` is called exactly once per chunk, with the rows sorted by position.
    Duplicates (a retried task or a restarted actor sending rows again) are dropped by position.
    Rows are any table with the ``_chunk``, ``_seq`` and ``_n`` columns (the run feeds it
    :data:`ASSIGNMENT_SCHEMA` rows); ``empty`` is the schema of a chunk without rows.
    """

    def __init__(self, chunks: dict[str, Chunk], write, empty: pa.Schema = PIPELINE_SCHEMA):
        self.chunks = chunks
        self.write = write
        self.empty = empty
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
            table = (pa.concat_tables(pieces) if pieces else self.empty.empty_table()).sort_by("_seq")
            self.seen.pop(key, None)
            self.written.add(key)
            self.write(chunk, table)

    def incomplete(self) -> list[str]:
        return [f"{k} ({len(self.seen.get(k, ()))}/{c.expected if c.expected is not None else '?'} rows)"
                for k, c in self.chunks.items() if k not in self.written]


def part_bytes(chunk: Chunk, table: pa.Table, model_id: str, postprocess: dict | None = None,
               input_root: str | None = None, dicom_columns: tuple[str, ...] = ()) -> tuple[bytes, int, int]:
    """Serialise a part (exact OUTPUT_SCHEMA + footer metadata); returns (bytes, ok, errors).

    ``postprocess``: the post-processing the masks were made with, recorded in the footer so that
    an incremental run can tell when it would mix settings; ``input_root`` likewise the input.
    """
    schema = output_schema(dicom_columns)
    for name in dicom_columns:  # a part without rows was assembled without them
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    table = table.select(schema.names).cast(schema)
    errors = int(pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0)
    units = table.column("image_id").to_pylist() if chunk.kind == "image" else [chunk.unit_key]
    table = table.replace_schema_metadata({
        META_FORMAT: FORMAT_VERSION.encode(), META_KIND: chunk.kind.encode(),
        META_UNITS: json.dumps(units).encode(), META_ERRORS: str(errors).encode(),
        META_MODEL: model_id.encode(),
        **({META_POSTPROCESS: json.dumps(postprocess, sort_keys=True).encode()} if postprocess is not None
           else {}),
        **({META_INPUT: input_root.encode()} if input_root is not None else {})})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes(), table.num_rows - errors, errors


def fragment_name(seqs: list[int]) -> str:
    """Name of the fragment holding these (sorted) positions of a chunk: the same rows always give
    the same name, so a retried task overwrites its own fragment instead of adding one."""
    digest = hashlib.sha1(",".join(map(str, seqs)).encode()).hexdigest()[:16]
    return f"{seqs[0]:09d}-{seqs[-1]:09d}-{digest}"


def fragment_file(prefix: str, chunk_key: str, name: str) -> str:
    """A fragment's file name: ``<prefix><chunk>-<fragment_name>.parquet``."""
    return f"{prefix}{chunk_key}-{name}.parquet"


def write_fragments(rows: pa.Table, *, fs: pafs.FileSystem, directory: str, uri: str, prefix: str) -> pa.Table:
    """Ray Data UDF, the pipeline's last step: write each chunk's rows of this block as one fragment
    file in ``directory`` (:func:`fragment_file`), and return only their summaries
    (:data:`FRAGMENT_SUMMARY_SCHEMA`), so the rows never travel to the driver.

    ``fs`` is the output's file system, pickled with its settings (workers may lack the driver's
    AWS_* environment); ``uri`` names ``directory`` in errors. End markers (``_seq < 0``) are not
    written: their count travels in the summary's ``_n``. The files lie flat in ``directory``, not
    in a folder per run or chunk: on stores with real folders (SeaweedFS) deleting several objects
    of a folder tree can leave empty folders behind, and single files deleted one by one do not.
    """
    keys = rows.column("_chunk")
    out: dict[str, list] = {name: [] for name in FRAGMENT_SUMMARY_SCHEMA.names}
    for key in pc.unique(keys).to_pylist():
        chunk_rows = rows.filter(pc.equal(keys, key))
        markers = chunk_rows.filter(pc.less(chunk_rows.column("_seq"), 0))
        data = chunk_rows.filter(pc.greater_equal(chunk_rows.column("_seq"), 0)).sort_by("_seq")
        seqs = data.column("_seq").to_pylist()
        name = fragment_name(seqs) if seqs else ""
        if seqs:
            sink = pa.BufferOutputStream()
            pq.write_table(data, sink)
            file = fragment_file(prefix, key, name)
            storage.write_bytes(storage.join(uri, file), sink.getvalue().to_pybytes(), at=(fs, f"{directory}/{file}"))
        out["_chunk"].append(key)
        out["_seqs"].append(seqs)
        out["_n"].append(int(markers.column("_n")[0].as_py()) if markers.num_rows else -1)
        out["fragment"].append(name)
    return pa.table(out, schema=FRAGMENT_SUMMARY_SCHEMA)


def fragment_assignments(summaries: pa.Table) -> pa.Table:
    """Fragment summaries -> :data:`ASSIGNMENT_SCHEMA` rows for :class:`PartAssembler`: one per
    position (``_n`` null) and one end marker (``_seq`` -1) per summary that carried a count."""
    summaries = summaries.combine_chunks()
    seqs = (summaries.column("_seqs").chunk(0) if summaries.num_rows
            else pa.array([], FRAGMENT_SUMMARY_SCHEMA.field("_seqs").type))
    parents = pc.list_parent_indices(seqs)
    markers = summaries.filter(pc.greater_equal(summaries.column("_n"), 0))
    return pa.concat_tables([
        pa.Table.from_arrays([summaries.column("_chunk").take(parents), pc.list_flatten(seqs),
                              pa.nulls(len(parents), pa.int64()), summaries.column("fragment").take(parents)],
                             schema=ASSIGNMENT_SCHEMA),
        pa.Table.from_arrays([markers.column("_chunk"), pa.array([-1] * markers.num_rows, pa.int64()),
                              markers.column("_n"), pa.array([""] * markers.num_rows, pa.string())],
                             schema=ASSIGNMENT_SCHEMA)])


def assemble_part(chunk: Chunk, assigned: pa.Table, *, fs: pafs.FileSystem, fragments: str, fragments_uri: str,
                  prefix: str, out_path: str, out_uri: str, model_id: str, postprocess: dict | None = None,
                  input_root: str | None = None, dicom_columns: tuple[str, ...] = ()) -> tuple[int, int]:
    """Write a complete chunk's part from its fragments; returns (ok, error) rows.

    ``assigned`` (``_seq``, ``fragment``; from :class:`PartAssembler`) names, for each position,
    the fragment to take its row from, so rows that a retried task wrote twice are taken once;
    ``fragments``/``fragments_uri``/``prefix`` say where :func:`write_fragments` put them.
    The part is :func:`part_bytes` of the rows in position order, written atomically; then the
    fragments are deleted. Run again (a retried task), it finds fragments gone only if an earlier
    attempt had already written the whole part (fragment names carry this run's id, and they are
    deleted only after the part is in place) and then keeps that part.
    """
    name = part_name(chunk.key)
    path, uri = f"{out_path}/{name}", storage.join(out_uri, name)
    names = pc.unique(assigned.column("fragment")).to_pylist()
    files = [fragment_file(prefix, chunk.key, n) for n in names]
    pieces = []
    try:
        for fragment, file in zip(names, files):
            data = storage.read_bytes(storage.join(fragments_uri, file), at=(fs, f"{fragments}/{file}"))
            rows = pq.read_table(pa.BufferReader(data))
            mine = assigned.filter(pc.equal(assigned.column("fragment"), fragment)).column("_seq")
            pieces.append(rows.filter(pc.is_in(rows.column("_seq"), value_set=mine.combine_chunks())))
    except FileNotFoundError:
        with storage.errors(uri, "check"):
            done = fs.get_file_info(path).type == pafs.FileType.File
        if not done:
            raise
        errors = read_footer(fs, path, uri)[1]
        return assigned.num_rows - errors, errors
    table = pa.concat_tables(pieces) if pieces else pipeline_schema(dicom_columns).empty_table()
    if table.num_rows != assigned.num_rows:
        raise RuntimeError(f"chunk {chunk.key}: its fragments hold {table.num_rows} of the {assigned.num_rows} "
                           f"rows the pipeline reported (a bug; rerun with --incremental to complete)")
    data, ok, errors = part_bytes(chunk, table.sort_by("_seq"), model_id, postprocess, input_root, dicom_columns)
    storage.write_bytes(uri, data, at=(fs, path))
    for file in files:
        storage.delete(storage.join(fragments_uri, file), missing_ok=True, at=(fs, f"{fragments}/{file}"))
    return ok, errors


def list_parts(fs: pafs.FileSystem, out_path: str, out_uri: str) -> list[str]:
    """Names of the complete parts in the output; removes temporaries of interrupted local writes."""
    with storage.errors(out_uri, "list output"):
        infos = fs.get_file_info(pafs.FileSelector(out_path, recursive=False, allow_not_found=True))
    names = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File]
    for name in names:
        if TMP_PART_RE.match(name):
            with storage.errors(storage.join(out_uri, name), "delete leftover temporary"):
                fs.delete_file(f"{out_path}/{name}")
    return sorted(n for n in names if PART_RE.match(n))


def read_footer(fs: pafs.FileSystem, path: str, uri: str) -> tuple[list[str], int, str, dict | None, str | None]:
    """(unit keys, error rows, model_id, post-processing, input root) recorded in an output part's
    footer; the post-processing and input root are None for parts written before they were recorded."""
    def footer() -> dict:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).schema_arrow.metadata or {}

    try:
        meta = storage.retrying(footer)
    except (OSError, pa.ArrowInvalid) as e:
        raise UsageError(f"{uri}: cannot read the Parquet footer of this output part ({e}); delete it or "
                         f"run without --incremental") from e
    if META_UNITS not in meta:
        raise UsageError(f"{uri}: not written by unet.inference (no {META_UNITS.decode()} footer entry); "
                         f"move it out of the output folder")
    postprocess = json.loads(meta[META_POSTPROCESS]) if META_POSTPROCESS in meta else None
    input_root = meta[META_INPUT].decode() if META_INPUT in meta else None
    return (json.loads(meta[META_UNITS]), int(meta.get(META_ERRORS, b"0")), meta.get(META_MODEL, b"?").decode(),
            postprocess, input_root)


def delete_parts(fs: pafs.FileSystem, out_path: str, out_uri: str, names: Iterable[str]) -> int:
    """Delete the named parts from the output folder; returns how many."""
    count = 0
    for name in names:
        storage.delete(storage.join(out_uri, name), at=(fs, f"{out_path}/{name}"))
        count += 1
    return count
