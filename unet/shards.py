"""The prepared-data contract: what ``jobs.prepare`` writes and every later step reads.

``URI/{split}/part-NNNNN.parquet`` files with the columns of :data:`SHARD_SCHEMA` (one row per
image, PNG cells encoded by :mod:`unet.codec`), and ``URI/manifest.json`` (:data:`MANIFEST`:
schema version, counts per split and class, duplicate groups, the command and config, sha256 of
every shard). Writers: :mod:`unet.prepare`. Readers: :mod:`unet.data`, :mod:`unet.evaluation`,
:mod:`unet.train`.

Example::

    from unet.shards import CLASSES, read_manifest
    manifest = read_manifest("runs/phantoms_prepared")
    manifest["counts"]["train"]   # {"benign": .., "malignant": .., "normal": .., "total": ..}
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from unet import storage

__all__ = ["CLASSES", "MANIFEST", "SCHEMA_VERSION", "SHARD_SCHEMA", "SPLITS", "manifest_sha256",
           "read_manifest"]

SCHEMA_VERSION = 1
CLASSES = ("benign", "malignant", "normal")
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"

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
