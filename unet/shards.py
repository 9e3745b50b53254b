"""The prepared-data contract: what ``jobs.prepare`` writes and every later step reads.

``URI/{split}/part-NNNNN.parquet`` files with the columns of :data:`SHARD_SCHEMA` (one row per
image, PNG cells encoded by :mod:`unet.codec`), and ``URI/manifest.json`` (:data:`MANIFEST`:
schema version, counts per split and class, duplicate groups, the command and config, sha256 of
every shard). Writers: :mod:`unet.prepare`. Readers: :mod:`unet.data`, :mod:`unet.evaluation`,
:mod:`unet.train`.

Which rows a *split name* means is decided here too (:func:`split_shards`): ``train``, ``val`` and
``test`` are the prepared folders; ``train@fold2of5`` and ``val@fold2of5`` are cross-validation
folds drawn from train+val (the test split never takes part): the duplicate groups of train+val
are dealt into K folds, stratified by class (:func:`assign_folds`), ``val@fold2of5`` is fold 2 and
``train@fold2of5`` the other four. Near-duplicates stay in one fold, as they stay in one split.

Example::

    from unet.shards import CLASSES, read_manifest, split_shards
    manifest = read_manifest("runs/phantoms_prepared")
    manifest["counts"]["train"]   # {"benign": .., "malignant": .., "normal": .., "total": ..}
    shards, groups = split_shards("runs/phantoms_prepared", "val@fold0of5")  # rows whose group is in groups
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from unet import storage

__all__ = ["CLASSES", "FOLD_SOURCES", "MANIFEST", "SCHEMA_VERSION", "SHARD_SCHEMA", "SPLITS", "assign_folds",
           "fold_split", "manifest_sha256", "parse_split", "read_manifest", "split_ids", "split_shards"]

SCHEMA_VERSION = 1
CLASSES = ("benign", "malignant", "normal")
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FOLD_SOURCES = ("train", "val")  # cross-validation folds are drawn from these; test never takes part
_FOLD_SPLIT = re.compile(r"^(train|val)@fold(\d+)of(\d+)$")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("class", pa.string(), nullable=False),
        pa.field("image_png", pa.binary(), nullable=False),  # 8-bit grey PNG
        pa.field("mask_png", pa.binary(), nullable=False),  # 8-bit PNG, values 0/255
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # id of the group's first member
        pa.field("source", pa.string(), nullable=False),  # "busi:benign/benign (1).png", "phantoms:seed=0,index=3"
    ],
    metadata={"unet.schema_version": str(SCHEMA_VERSION)},
)


def read_manifest(uri: str, **storage_kw) -> dict:
    """Load ``uri/manifest.json`` written by :func:`unet.prepare.prepare`."""
    manifest_uri = storage.join(uri, MANIFEST)
    raw = storage.read_bytes(manifest_uri, **storage_kw)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_uri} is not valid JSON: {e}") from e


def manifest_sha256(uri: str, **storage_kw) -> str | None:
    """sha256 of ``uri/manifest.json`` (ties results to the exact prepared data), or None if absent."""
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri, **storage_kw):
        return None
    return hashlib.sha256(storage.read_bytes(manifest_uri, **storage_kw)).hexdigest()


def fold_split(part: str, fold: int, folds: int) -> str:
    """The split name of one side of a cross-validation fold: ``fold_split("val", 2, 5) == "val@fold2of5"``."""
    name = f"{part}@fold{fold}of{folds}"
    parse_split(name)
    return name


def parse_split(split: str) -> tuple[str, int | None, int | None]:
    """``"val"`` -> ("val", None, None); ``"val@fold2of5"`` -> ("val", 2, 5).

    Raises:
        ValueError: not a split name (one of :data:`SPLITS`, or ``train|val@fold<k>of<K>`` with
            2 <= K and 0 <= k < K).
    """
    if split in SPLITS:
        return split, None, None
    match = _FOLD_SPLIT.match(str(split))
    if match is None:
        raise ValueError(f"split={split!r} is not one of {SPLITS} nor a cross-validation fold such as "
                         f"'val@fold0of5' (fold k of K, drawn from train+val)")
    part, fold, folds = match[1], int(match[2]), int(match[3])
    if folds < 2 or fold >= folds:
        raise ValueError(f"split={split!r}: need 2 <= K and 0 <= k < K in 'fold<k>of<K>'")
    return part, fold, folds


def assign_folds(rows: Iterable[tuple[str, str]], folds: int) -> dict[str, int]:
    """Deal the duplicate groups of ``rows`` ((group, class) per image) into ``folds`` folds; ``{group: fold}``.

    Stratified by class and balanced by images: a group's class is its most common one (BUSI has 8
    mixed groups); class by class, groups go largest first (ties in the order of the groups'
    sha256) to the fold holding the fewest images of that class so far (ties: fewest images in all,
    then the lowest fold). Deterministic: a function of the rows only, not of their order.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for group, cls in rows:
        counts[group][cls] += 1
    by_class: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for group, c in counts.items():
        by_class[max(sorted(c), key=c.__getitem__)].append((sum(c.values()), group))
    out: dict[str, int] = {}
    total = [0] * folds
    for cls in sorted(by_class):
        per_fold = [0] * folds
        for size, group in sorted(by_class[cls], key=lambda t: (-t[0], hashlib.sha256(t[1].encode()).hexdigest())):
            fold = min(range(folds), key=lambda f: (per_fold[f], total[f], f))
            out[group] = fold
            per_fold[fold] += size
            total[fold] += size
    return out


def split_shards(uri: str, split: str, **storage_kw) -> tuple[list[str], frozenset[str] | None]:
    """The shard URIs that hold ``split`` (sorted), and the groups whose rows belong to it (None = all rows).

    Raises:
        ValueError: ``split`` is not a split name (:func:`parse_split`).
        unet.storage.StorageNotFoundError: a prepared folder the split needs holds no shards.
    """
    part, fold, folds = parse_split(split)
    if fold is None:
        return _folder_shards(uri, part, storage_kw), None
    shards = [s for source in FOLD_SOURCES for s in _folder_shards(uri, source, storage_kw)]
    assignment = assign_folds(_column_rows(shards, ("group", "class"), storage_kw), folds)
    return shards, frozenset(g for g, f in assignment.items() if (f == fold) == (part == "val"))


def split_ids(uri: str, split: str, **storage_kw) -> list[str]:
    """The image ids of ``split`` (:func:`split_shards`), in shard order; reads only the id and group columns."""
    shards, groups = split_shards(uri, split, **storage_kw)
    return [i for i, g in _column_rows(shards, ("id", "group"), storage_kw) if groups is None or g in groups]


def _column_rows(shards: list[str], columns: tuple[str, ...], storage_kw: dict) -> list[tuple]:
    """Every row of ``shards`` as a tuple of ``columns`` (small columns only: ids, groups, classes)."""
    rows: list[tuple] = []
    for shard in shards:
        fs, path = storage.get_filesystem(shard, **storage_kw)
        with storage.errors(shard, "read shard", **storage_kw), fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=list(columns))
        rows += zip(*(table.column(c).to_pylist() for c in columns), strict=True)
    return rows


def _folder_shards(uri: str, split: str, storage_kw: dict) -> list[str]:
    root = storage.join(uri, split)
    hint = f"expected {root}/part-*.parquet written by `python -m jobs.prepare --out {uri}`"
    try:
        shards = sorted(storage.iter_files(root, suffixes=(".parquet",), **storage_kw))
    except storage.BucketNotFoundError:
        raise  # already says which bucket is missing and what to check
    except FileNotFoundError as e:
        raise storage.StorageNotFoundError(f"no split '{split}' in prepared data {uri}: {hint}") from e
    if not shards:
        raise storage.StorageNotFoundError(f"no split '{split}' in prepared data {uri}: {root} holds no .parquet "
                                           f"shards; {hint}")
    return shards
