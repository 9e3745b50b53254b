"""Turn a BUSI folder, your own labelled folder or phantoms into leakage-safe Parquet shards + a manifest.

This is the first step of the pipeline (source -> shards -> Ray Data -> model); training and
evaluation read only what it writes. ``jobs/prepare.py`` is the command line around
:func:`prepare`.

Steps:

1. **Read** the source into records (id, class, source, grey image and 0/255 mask as PNG bytes):
   :func:`unet.sources.read_busi` (BUSI's folder layout; split masks OR-merged; every file read
   as displayed, EXIF orientation applied, through the pixel rules of :mod:`unet.codec` that
   inference uses too), :func:`unet.folder_source.read_folder` (your own images and masks
   matched by stem; class from folder, CSV or the mask) or :func:`unet.sources.read_phantoms`.
   Files that cannot be used are
   *skipped with a reason* and listed in the manifest, or with ``strict=True`` the run fails
   listing them all.
2. **Group near-duplicates** (:func:`group_duplicates`): 64-bit perceptual hash (DCT pHash,
   ``imagehash.phash``) of every grey image; two images whose hashes differ in at most
   ``hash_threshold`` bits (default :data:`DEFAULT_HASH_THRESHOLD` = 10) are linked, and linked
   images form groups transitively (union-find). On the 623 shared BUSI images every pair at
   distance <= 10 inspected by eye is the same lesion (same scan, re-cropped or re-measured);
   at 12 the first pairs of different patients appear and at 14 they dominate. Threshold 10
   gives 475 groups, 115 of them with 2-7 images (263 images), 8 spanning two classes.
3. **Split** (:func:`assign_splits`): whole groups go to train/val/test, stratified by the
   group's majority class, in a seeded random order, each to the split furthest below its
   target. Near-duplicates therefore never straddle two splits.
4. **Write** (:func:`write_dataset`) ``URI/{split}/part-00000.parquet``... (schema
   :data:`unet.shards.SHARD_SCHEMA`) and ``URI/manifest.json`` through :mod:`unet.storage`
   (local path or ``s3://``). Same inputs and arguments give byte-identical shards; part files left over from a
   previous run with more shards are deleted, and the manifest is written last (it is removed
   first, so a half-finished run is never mistaken for a finished one).

Example::

    from unet.prepare import PrepareConfig, prepare
    manifest = prepare(PrepareConfig(source="phantoms", num=40, seed=0, size=(128, 128), out="/tmp/p"))
    manifest["counts"]["train"]   # {"benign": .., "malignant": .., "normal": .., "total": ..}
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import cv2
import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from unet import storage
from unet.folder_source import CLASS_SOURCES, DEFAULT_CLASSES, mask_regex, read_folder
from unet.shards import CLASSES, MANIFEST, SCHEMA_VERSION, SHARD_SCHEMA, SPLITS
from unet.sources import HASH_SIZE, Record, read_busi, read_phantoms

log = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.7, 0.15, 0.15)
DEFAULT_SHARD_SIZE = 64
DEFAULT_HASH_THRESHOLD = 10  # max Hamming distance (bits) between near-duplicates, see module doc
_STATS_COLUMNS = ["id", "class", "height", "width", "group", "source"]  # not the PNG blobs
_PART_RE = re.compile(r"^part-\d{5}\.parquet$")
SOURCES = ("busi", "folder", "phantoms")
_FOLDER_FIELDS = ("images", "masks", "mask_pattern", "class_from", "classes", "default_class")

__all__ = ["DEFAULT_RATIOS", "DEFAULT_SHARD_SIZE", "DEFAULT_HASH_THRESHOLD", "SourceDataError",
           "PrepareConfig", "group_duplicates", "assign_splits", "write_dataset", "prepare"]


class SourceDataError(ValueError):
    """The source cannot be used: no usable images, or bad files while ``strict`` is on."""


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that determines the output (recorded in the manifest; credentials are not here).

    Args:
        source: ``"busi"`` (needs ``input``), ``"folder"`` (needs ``images`` and a class rule:
            ``class_from``, ``classes`` or ``default_class``) or ``"phantoms"`` (needs ``num``).
        out: output URI, a local directory or ``s3://bucket/prefix``.
        input: BUSI folder: the one holding ``Dataset_BUSI_with_GT/`` or that folder itself.
        num, size: number and (height, width) of phantoms.
        seed: phantom generation and split order.
        ratios: train/val/test fractions (normalised to sum 1; zero allowed, e.g. no test split).
        shard_size: rows per Parquet file.
        hash_threshold: max pHash Hamming distance (0-64) for two images to be near-duplicates.
        strict: fail on any bad source file instead of skipping it.
        max_side: shrink source images (and masks) whose longer side is over this many pixels
            (area interpolation; masks nearest); None keeps the original size. Duplicate groups
            and splits are computed on the full-size images, so they match an unshrunk run.
        images, masks: (folder) the images folder and the masks folder (None: ``images`` itself);
            sub-folders are read recursively and masks mirror the images' sub-folders.
        mask_pattern: (folder) an image's mask file name from its stem, e.g. ``"{stem}_mask.png"``;
            ``"{stem}"`` (default) is the same name with any image suffix.
        class_from: (folder) ``"folder"``: the class is the image's parent folder name.
        classes: (folder) CSV file with columns ``image,class`` (image path relative to ``images``).
        default_class: (folder) ``"benign"`` or ``"malignant"`` for images with a lesion that no
            class source names; an image with an empty mask and no given class is ``"normal"``.
    """

    source: str
    out: str
    input: str | None = None
    num: int = 0
    seed: int = 0
    size: tuple[int, int] = (256, 256)
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    shard_size: int = DEFAULT_SHARD_SIZE
    hash_threshold: int = DEFAULT_HASH_THRESHOLD
    strict: bool = False
    max_side: int | None = None
    images: str | None = None
    masks: str | None = None
    mask_pattern: str = "{stem}"
    class_from: str | None = None
    classes: str | None = None
    default_class: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "busi" and not self.input:
            raise ValueError("source 'busi' needs input: the folder holding Dataset_BUSI_with_GT/")
        if self.source == "folder":
            self._check_folder()
        if self.source == "phantoms" and self.num < 1:
            raise ValueError(f"source 'phantoms' needs num >= 1, got {self.num}")
        if len(self.size) != 2 or min(self.size) < 16:
            raise ValueError(f"size must be (height, width) with both >= 16, got {self.size!r}")
        if len(self.ratios) != 3 or any(not math.isfinite(r) or r < 0 for r in self.ratios) \
                or sum(self.ratios) <= 0:
            raise ValueError(f"ratios must be three non-negative numbers (train, val, test) with a "
                             f"positive sum, got {self.ratios!r}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be >= 16 pixels, got {self.max_side}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 0 <= self.hash_threshold <= HASH_SIZE * HASH_SIZE:
            raise ValueError(f"hash_threshold must be in [0, {HASH_SIZE * HASH_SIZE}], got {self.hash_threshold}")
        if not str(self.out):
            raise ValueError("out must be a local directory or an s3:// URI")

    def _check_folder(self) -> None:
        if not self.images:
            raise ValueError("source 'folder' needs images: the folder of images (masks: their folder)")
        mask_regex(self.mask_pattern)
        if self.class_from not in (None, *CLASS_SOURCES):
            raise ValueError(f"class_from must be one of {', '.join(CLASS_SOURCES)} or None, got {self.class_from!r}")
        if self.class_from and self.classes:
            raise ValueError("give one class source: class_from='folder' or a classes CSV, not both")
        if self.default_class not in (None, *DEFAULT_CLASSES):
            raise ValueError(f"default_class must be one of {', '.join(DEFAULT_CLASSES)} (a lesion is never "
                             f"'normal'), got {self.default_class!r}")
        if not (self.class_from or self.classes or self.default_class):
            raise ValueError("source 'folder' needs a class rule for images with a lesion: class_from='folder', "
                             "a classes CSV (image,class) or default_class ('benign' or 'malignant'); "
                             f"classes are {', '.join(CLASSES)} and are never guessed from the mask")

    @property
    def split_ratios(self) -> tuple[float, float, float]:
        total = float(sum(self.ratios))
        return tuple(r / total for r in self.ratios)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"], d["ratios"] = list(self.size), list(self.ratios)
        # Drop what the source ignores: keeps the record honest (and older manifests unchanged).
        if self.source != "phantoms":
            del d["num"], d["size"]
        if self.source == "folder":
            del d["input"]
        else:
            for name in _FOLDER_FIELDS:
                del d[name]
        return d


# --------------------------------------------------------------------------------------------
# Duplicate groups and splits
# --------------------------------------------------------------------------------------------

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def group_duplicates(hashes: Sequence[int], threshold: int = DEFAULT_HASH_THRESHOLD) -> list[int]:
    """Group items whose hashes are within `threshold` bits, transitively (union-find).

    Returns, per item, the index of its group's representative: the group's smallest index (so
    with items sorted by id, the representative is the group's first id).
    """
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    values = np.array([int(h) for h in hashes], dtype=np.uint64)
    block = 512  # compare 512 hashes against all at a time: O(n^2) work, O(512 n) memory
    for start in range(0, n, block):
        xor = values[start:start + block, None] ^ values[None, :]
        distance = _POPCOUNT[xor.view(np.uint8)].reshape(xor.shape + (8,)).sum(axis=2)
        for i, j in zip(*np.nonzero(distance <= threshold)):
            a, b = find(int(i) + start), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(n)]


def assign_splits(classes: Sequence[str], groups: Sequence[int], ratios: Sequence[float],
                  seed: int = 0) -> list[str]:
    """Split name per item; all items of a group get the same split.

    Groups are stratified by their majority class (ties: first in :data:`CLASSES`). Within a
    class, groups are taken in a seeded random order and each goes to the split furthest below
    its target count (ratio x images of that class), so a split misses its target by less than
    one group; splits with ratio 0 get nothing. Deterministic for given inputs and seed.
    """
    if len(classes) != len(groups):
        raise ValueError(f"classes ({len(classes)}) and groups ({len(groups)}) differ in length")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    strata: dict[str, list[int]] = defaultdict(list)
    for root in sorted(members):
        counts = Counter(classes[i] for i in members[root])
        order = list(CLASSES) + sorted(set(counts) - set(CLASSES))
        strata[max(order, key=lambda c: counts.get(c, 0))].append(root)

    open_splits = [k for k, r in enumerate(ratios) if r > 0]
    rng = np.random.default_rng(seed)
    result = [""] * len(classes)
    for cls in sorted(strata, key=lambda c: (c not in CLASSES, CLASSES.index(c) if c in CLASSES else 0, c)):
        # Seeded random order, not largest-first: largest-first would put every multi-image group
        # into train and leave val/test with only images that have no near-duplicate.
        roots = [strata[cls][k] for k in rng.permutation(len(strata[cls]))]
        total = sum(len(members[r]) for r in roots)
        have = [0] * len(ratios)
        for root in roots:
            split = max(open_splits, key=lambda k: ratios[k] * total - have[k])
            have[split] += len(members[root])
            for i in members[root]:
                result[i] = SPLITS[split]
    return result


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _shard_bytes(rows: Sequence[Record], groups: Sequence[str]) -> bytes:
    table = pa.Table.from_pydict({
        "id": [r.id for r in rows],
        "class": [r.cls for r in rows],
        "image_png": [r.image_png for r in rows],
        "mask_png": [r.mask_png for r in rows],
        "height": [r.height for r in rows],
        "width": [r.width for r in rows],
        "group": list(groups),
        "source": [r.source for r in rows],
    }, schema=SHARD_SCHEMA)
    sink = io.BytesIO()
    # No timestamps go into a Parquet file, so identical rows give identical bytes.
    pq.write_table(table, sink, compression="zstd", use_dictionary=["class", "group"],
                   write_statistics=_STATS_COLUMNS, row_group_size=max(len(rows), 1))
    return sink.getvalue()


def write_dataset(out: str, records: Sequence[Record], splits: Sequence[str], group_ids: Sequence[str],
                  *, shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, manifest: dict,
                  **storage_kw) -> dict:
    """Write shards for every split and then ``manifest.json`` (completed with the shard list).

    Rows of a split are in a seeded random order, so each shard mixes classes (readers that
    stream shards shuffle better). An empty split still gets one empty shard, so every split
    has a readable schema. Returns the manifest as written.
    """
    manifest_uri = storage.join(out, MANIFEST)
    storage.makedirs(out, **storage_kw)
    # Remove the old manifest first: until the new one is written the folder is visibly unfinished.
    storage.delete(manifest_uri, missing_ok=True, **storage_kw)

    shards = []
    for split_index, split in enumerate(SPLITS):
        idx = [i for i, s in enumerate(splits) if s == split]
        order = np.random.default_rng([int(seed), split_index]).permutation(len(idx))
        idx = [idx[k] for k in order]
        n_shards = max(1, math.ceil(len(idx) / shard_size))
        written = set()
        for k in range(n_shards):
            part = idx[k * shard_size:(k + 1) * shard_size]
            data = _shard_bytes([records[i] for i in part], [group_ids[i] for i in part])
            name = f"part-{k:05d}.parquet"
            storage.write_bytes(storage.join(out, split, name), data, **storage_kw)
            written.add(name)
            shards.append({"path": f"{split}/{name}", "split": split, "rows": len(part),
                           "sha256": hashlib.sha256(data).hexdigest()})
        _remove_stale_parts(storage.join(out, split), written, storage_kw)

    manifest = dict(manifest, shards=shards)
    storage.write_bytes(manifest_uri, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode(),
                        **storage_kw)
    return manifest


def _remove_stale_parts(split_uri: str, keep: set[str], storage_kw: dict) -> None:
    """Delete ``part-NNNNN.parquet`` files a previous, larger run left behind (nothing else)."""
    fs, path = storage.get_filesystem(split_uri, **storage_kw)
    with storage.errors(split_uri, "list", **storage_kw):
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    for entry in entries:
        if entry.type == pafs.FileType.File and _PART_RE.match(entry.base_name) and entry.base_name not in keep:
            log.info("removing stale shard %s from an earlier run", storage.join(split_uri, entry.base_name))
            storage.delete(storage.join(split_uri, entry.base_name), **storage_kw)


def _counts(records: Sequence[Record], splits: Sequence[str]) -> dict:
    counts: dict = {}
    for split in (*SPLITS, "total"):
        c = Counter(r.cls for r, s in zip(records, splits) if split == "total" or s == split)
        counts[split] = {cls: c.get(cls, 0) for cls in CLASSES} | {"total": sum(c.values())}
    return counts


def _group_stats(records: Sequence[Record], roots: Sequence[int], splits: Sequence[str],
                 threshold: int) -> dict:
    members: dict[int, list[int]] = defaultdict(list)
    for i, root in enumerate(roots):
        members[root].append(i)
    multi = [m for m in members.values() if len(m) > 1]
    split_of_group = {root: splits[root] for root in members}
    return {
        "method": f"imagehash.phash (hash_size={HASH_SIZE}, 64 bits), union-find over pairs within threshold",
        "hash_threshold": threshold,
        "total": len(members),
        "with_duplicates": len(multi),
        "images_in_groups_with_duplicates": sum(len(m) for m in multi),
        "largest": max((len(m) for m in members.values()), default=0),
        "sizes": {str(k): v for k, v in sorted(Counter(len(m) for m in members.values()).items())},
        "mixed_class": sum(1 for m in multi if len({records[i].cls for i in m}) > 1),
        "per_split": {s: sum(1 for v in split_of_group.values() if v == s) for s in SPLITS},
        "spanning_splits": sum(1 for m in members.values() if len({splits[i] for i in m}) > 1),
    }


def _software() -> dict:
    import PIL

    import unet

    return {"unet": unet.__version__, "pyarrow": pa.__version__, "imagehash": imagehash.__version__,
            "pillow": PIL.__version__, "opencv": cv2.__version__, "numpy": np.__version__}


def prepare(config: PrepareConfig, *, command: str | None = None,
            progress: Callable[[str, int, int], None] | None = None, **storage_kw) -> dict:
    """Read the source, group near-duplicates, split, write shards and manifest; return the manifest.

    Args:
        config: what to prepare (recorded in the manifest).
        command: the command line to record (pass it with secrets already removed).
        progress: optional ``callback(stage, done, total)`` for a job's progress line.
        **storage_kw: ``endpoint``, ``access_key``, ``secret_key``, ``region`` for
            :func:`unet.storage.get_filesystem` (never recorded).

    Raises:
        SourceDataError: nothing usable was found, or ``config.strict`` and some file was bad.
    """
    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    if config.source == "busi":
        records, skipped = read_busi(config.input, progress=stage("read"), max_side=config.max_side)
        where = f"BUSI folder {config.input}"
    elif config.source == "folder":
        records, skipped = read_folder(config.images, config.masks, mask_pattern=config.mask_pattern,
                                       class_from=config.class_from, classes=config.classes,
                                       default_class=config.default_class, max_side=config.max_side,
                                       progress=stage("read"))
        where = f"image folder {config.images}"
    else:
        records, skipped = read_phantoms(config.num, config.seed, tuple(config.size), progress=stage("generate")), []
        where = f"{config.num} phantoms"
    if skipped and config.strict:
        listing = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:20])
        more = f" (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
        raise SourceDataError(f"{len(skipped)} bad file(s) in {where} and --strict is on: {listing}{more}")
    if not records:
        raise SourceDataError(f"no usable images in {where} ({len(skipped)} file(s) skipped)")

    roots = group_duplicates([r.phash for r in records], config.hash_threshold)
    splits = assign_splits([r.cls for r in records], roots, config.split_ratios, config.seed)
    group_ids = [records[root].id for root in roots]

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": config.source,
        "columns": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "counts": _counts(records, splits),
        "groups": _group_stats(records, roots, splits, config.hash_threshold),
        "command": command,
        "config": config.to_dict(),
        "software": _software(),
        "skipped": [asdict(s) for s in skipped],
    }
    return write_dataset(config.out, records, splits, group_ids, shard_size=config.shard_size,
                         seed=config.seed, manifest=manifest, **storage_kw)

