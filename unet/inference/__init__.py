"""Bulk inference: map a model artifact over a large image archive and write one mask row per input.

Inputs (local paths or ``s3://`` URIs; a folder/prefix is walked recursively, a single file works too):

* image files: ``.png .jpg .jpeg .bmp .tif .tiff`` (any case) — ``image_id`` is the path relative
  to the input folder, e.g. ``benign/benign (3).png``;
* tar archives (WebDataset-style shards; ``.tar``, ``.tar.gz``, ``.tgz``) of image files —
  ``image_id`` is ``"<tar path>/<member>"``; non-image members (``.json``, ``.cls``...) and directory
  entries are not inputs and are skipped;
* Parquet tables holding encoded image bytes in ``image_column`` (default ``image``) —
  ``image_id`` is the value of ``id_column`` when given, else ``"<file path>#<row>"``.

Output: Parquet files ``<output>/part-<sha1>.parquet``, exactly one row per input, always, with the
columns of :data:`OUTPUT_SCHEMA`; what each means is in the README's "Bulk inference" table
(``image_id`` as above, ``status`` ``"ok"``/``"error"``, the mask as a PNG with its size, pixel
count, bounding box and confidence, the image head's ``lesion_probability`` and
``malignant_probability``, ``model_id``, ``processed_at``; every per-image value is null on error
rows). A tar holding two members of one name gives two rows with that id: the second is an error
row.

Read it with ``pandas.read_parquet(output)``, ``duckdb.sql("select * from '<output>/*.parquet'")``
or ``pyarrow.dataset.dataset(output)``; files and folders starting with ``_`` are bookkeeping
(``_tmp/`` with the run's plan and fragments, and the run's lease ``_lease.json``, while running;
``_runs/`` one JSON record per run; :mod:`unet.inference.lease`) and those readers skip them. pandas turns the nullable
integer columns into floats unless given ``dtype_backend="pyarrow"``.
Files matching ``exclude`` globs, and the output folder itself when it lies inside the input,
are not inputs.

What happens to a pixel: decode with PIL, apply EXIF orientation, convert to 8-bit grey (see
:func:`unet.codec.to_grey8` for 16-bit, float, alpha, palette and CMYK), resize to the model's
``input_size`` and normalise as its config says (:mod:`unet.transforms`), run the model
(:meth:`unet.models.SegmentationModel.predict_proba`: sigmoid, and softmax of the image head if
the model has one; averaged with the horizontal flip when ``tta``), quantise the probability to
uint8 (:func:`unet.transforms.quantize_probability`, what the model actor hands on), resize it back
to the original size (:func:`unet.transforms.resize_probability`), then
:func:`unet.postprocess.final_mask` — threshold (``prob >= threshold``), empty the mask when the
image's ``lesion_probability`` is below ``gate_threshold``, remove regions under ``min_area`` of the
image, optionally keep the largest 8-connected component: the same rule as :mod:`unet.evaluation`
— and PNG-encode. Every one of these values is the artifact's
(:class:`unet.settings.ModelSettings`, chosen on validation) unless :class:`InferenceConfig`
overrides it; the run record in ``_runs/`` holds the values used, and each part's footer too.

Nothing lost, nothing twice — the design:

* **Work units and parts.** The input listing is streamed (:func:`unet.storage.iter_files` yields
  S3 keys a page at a time, local files a folder at a time) and cut into *chunks*: up to ``chunk_size`` image files in listing
  order, one whole tar archive, or ``chunk_size`` rows of one Parquet file. Each chunk becomes
  exactly one output file named ``part-<sha1 of the chunk's unit keys>.parquet``, so the same
  input gives the same file names and a rerun overwrites instead of duplicating.
* **Bounded memory.** The driver never holds the listing: it writes the plan (one small row per
  image file / tar / Parquet row range) to ``<output>/_tmp/<run id>/plan/`` as Parquet, and Ray Data
  streams it through read/decode tasks -> a model actor pool -> post-processing tasks.
* **No funnel through the driver.** The post-processing tasks write their rows where they are,
  as *fragment* files (``<output>/_tmp/<run id>-frag-<chunk>-...``), and send the driver only a
  summary per fragment (which positions of which chunk it holds: a few bytes per image, whatever
  the masks weigh; ``InferenceSummary.driver_bytes`` counts them). When a chunk's positions are
  all in, the driver starts a task, on any node, that assembles the part from its fragments,
  writes it and deletes them; the driver holds only positions of the chunks in flight. A tar is
  one chunk, so keep shards to a sensible size (WebDataset's usual 1-10k samples).
* **Atomic parts.** A part is serialised in memory and written in one go: locally to a temporary
  name renamed into place, on S3 as one upload (S3 publishes an object only when it is complete).
  An interrupted job therefore leaves only complete parts behind.
* **Exactly once.** Every row carries its chunk and its position in the chunk; the driver drops
  duplicate positions (a task or a killed actor retried by Ray), has a part written only when
  every position is present (for a tar, the read task sends the member count after the last
  member) and tells the part task which fragment to take each row from. A fragment's name comes
  from the positions it holds, so a retried task rewrites its own fragment; a retried part task
  rewrites the same part name, or keeps the part when an earlier attempt had written it. A chunk
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
  Each part's footer also records the model, the input root and the settings that change a mask
  (threshold, gate threshold, min area, TTA, largest component); an incremental run against an
  output whose parts differ in any of them refuses in one line (:class:`unet.runtime.UsageError`)
  before touching it: matching paths under another root are not the same files, and masks made
  two ways cannot be told apart. A full run redoes everything (parts from versions that did not
  record these are not compared).

Error rows (the job goes on): unreadable file, zero-byte file, bytes that are not an image or an
image in another format than PNG, JPEG, BMP or TIFF (an ``.ico`` or EPS named ``.png`` is never
opened), truncated image, an image or a frame inside it over ``max_pixels`` (decompression bombs;
checked from the header, before decoding, and Pillow's own limit is set to the same) or a
file/member/Parquet image cell over ``max_bytes``, a tar member whose path is absolute or contains
``..``, a tar member that is a link, a duplicate member name, an unreadable tar (one row named
after the archive), a zero-byte or corrupt Parquet file (one row, ``image_id`` the file's path), a
null image or id in a Parquet row. Reads that fail transiently (reset connection, timeout, 5xx)
are retried from the same byte up to 3 attempts (:class:`unet.inference.read.RetryingReader`);
only what still fails becomes an error row. File and tar member names that are not UTF-8 are
inputs like any other: their ``image_id`` writes each byte that is not UTF-8 as ``%XX`` and ``%``
as ``%25`` (``urllib.parse.unquote_to_bytes(image_id)`` gives the bytes back). In local folders,
links to files are read as files and links to folders are not followed (no loops, no walking
``/``, no file listed twice through a linked folder). Only one job may write to an output
folder at a time.
"""

from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from .model import Predictor, mask_statistics, postprocess_probability
from .output import OUTPUT_SCHEMA
from .plan import IMAGE_SUFFIXES, PARQUET_SUFFIXES, TAR_SUFFIXES
from .read import DEFAULT_MAX_BYTES
from .run import InferenceConfig, InferenceSummary, run_inference

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
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
]
