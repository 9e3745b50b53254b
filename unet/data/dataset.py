"""Read prepared shards (``URI/{split}/part-*.parquet``) as model-ready batches.

Two ways in, one transform:

* :func:`read_split` — a lazy, streaming ``ray.data.Dataset`` (for Ray Train and batch jobs);
* :func:`iter_batches` — a plain Python iterator over the same shards with pyarrow, no Ray (for
  debugging, notebooks and benchmarks).

Both run :class:`BatchTransform`: decode the PNGs, resize to the training size (image
area/linear, mask nearest), augment (train split), normalise. Each yields dicts of NumPy arrays
(with ``normalize=False``, image and mask stay uint8 for augmenting and normalising later on the
training device: ``augment_on="gpu"``, :mod:`unet.data.gpu_augment`)::

    {"image": float32 (B, 1, H, W)  normalised with (mean, std),
     "mask":  float32 (B, 1, H, W)  in {0, 1},
     "id":    object (B,) str,   "class": object (B,) str}

Augmentation randomness is a function of ``(seed, epoch, sample id)`` only, so the same sample
gets the same augmentation through either path and in any batch or worker, and a new one each
epoch.

Using it from Ray Train (the trainer owns these calls)::

    train_ds = read_split(uri, "train", size=(128, 128), augment=AugmentConfig(), seed=cfg.seed)
    val_ds = read_split(uri, "val", size=(128, 128))
    trainer = TorchTrainer(loop, datasets={"train": train_ds, "val": val_ds}, ...)
    # in the loop, every epoch:
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_torch_batches(batch_size=16, local_shuffle_buffer_size=256,
                                          collate_fn=collate_torch, drop_last=True):
        image, mask = batch["image"].to(device), batch["mask"].to(device)

Per-epoch shuffling without materialising anything: the train split is read with
``FileShuffleConfig(seed, reseed_after_execution=True)`` — a different shard order every epoch —
and ``local_shuffle_buffer_size`` in ``iter_torch_batches`` mixes rows across nearby shards
(each row is ~2 x H x W x 4 bytes, 128 KiB at 128 px). The buffer lives in the consuming process
and pins its rows in the object store outside Ray Data's memory budget, so keep
``buffer rows x row bytes`` well below the object store (256 rows = 32 MiB at 128 px: fine with
Ray's default store of 30% of RAM; use ~64 with a 100 MiB store — see bench/data_memory.py).
``Dataset.random_shuffle``/``randomize_block_order`` are avoided on purpose: both are barriers
that pull the whole split into the object store before the first batch.

With ``epoch=None`` (the default for :func:`read_split`) the epoch used for augmentation is Ray
Data's execution counter for this Dataset, which advances by one each time the Dataset is
iterated — i.e. once per training epoch — so one Dataset handed to a Trainer yields fresh but
reproducible augmentations every epoch (checked through ``streaming_split``, as Ray Train uses
it: pass k equals ``iter_batches(..., epoch=k)``). Any other execution of the same Dataset
object (``count()``, ``take()``) also advances the counter; pass ``epoch=`` to pin it.

Resources: the read and the transform each ask for ``num_cpus`` (default 0.5) per task. On a
small machine where Ray Train workers hold whole CPUs, requests of 1 CPU would leave Ray Data
unable to schedule anything and training would stall; fractional requests let both share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.collate_fn import NumpyBatchCollateFn

from unet import storage
from unet.codec import decode_png
from unet.data.augment import AugmentConfig, Augmenter, sample_seed
from unet.shards import SPLITS, split_shards
from unet.transforms import DEFAULT_MEAN, DEFAULT_STD, normalize, resize_image, resize_mask

READ_COLUMNS = ["id", "class", "image_png", "mask_png"]
DEFAULT_SIZE = (128, 128)


def check_oversample(oversample: Mapping[str, int] | None) -> dict[str, int]:
    """``{class: copies}`` validated: class names are strings, copies whole numbers >= 1."""
    if not isinstance(oversample or {}, Mapping):
        raise ValueError(f"oversample={oversample!r} must be a mapping of class to copies, e.g. {{normal: 3}}")
    out = {}
    for cls, copies in dict(oversample or {}).items():
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"oversample[{cls!r}]={copies!r} must be a whole number >= 1 (copies per epoch)")
        out[str(cls)] = copies
    return out


class BatchTransform:
    """Decode + resize + (augment) + normalise a batch of shard rows.

    Args:
        size: training size (height, width). Default (128, 128).
        augment: an :class:`AugmentConfig` to augment, ``None`` for none. Default None.
        seed: base seed for augmentation. Default 0.
        epoch: epoch mixed into each sample's seed; ``None`` = ``epoch_offset`` + Ray Data's
            execution counter (inside Ray) or ``epoch_offset`` (outside). Default None.
        epoch_offset: added to the execution counter when ``epoch`` is None — a run resumed at
            epoch k passes k so it does not replay epoch 0's augmentations. Default 0.
        mean, std: intensity normalisation (stored in the model artifact). Defaults 0.5, 0.25.
        oversample: ``{class: n}`` — each row of that class comes out ``n`` times, every copy
            augmented with its own seed (copy ``k > 0`` has id ``"<id>#k"``); e.g. ``{"normal": 3}``
            shows the model more lesion-free images. Default None (each row once).
        normalize: ``False`` leaves the pixels as they are: ``image`` and ``mask`` come out uint8
            (image 0-255, mask 0/1) for a consumer that augments and normalises later on its own
            device (:class:`unet.data.gpu_augment.GpuAugmenter`; 4x less to store and copy).
            Default True.

    Call it with a dict of NumPy arrays holding the shard columns ``id``, ``class``, ``image_png``
    and ``mask_png`` (``ray.data`` numpy batches, or :func:`table_to_batch`) and it returns the
    batch dict described in the module docstring. Rows are never dropped: a row that cannot be
    decoded raises ``ValueError`` naming its id.

    Example::

        t = BatchTransform(size=(128, 128), augment=AugmentConfig(), seed=0, epoch=3)
        batch = t(table_to_batch(pq.read_table("train/part-00000.parquet")))
    """

    def __init__(self, size: tuple[int, int] = DEFAULT_SIZE, augment: AugmentConfig | None = None,
                 seed: int = 0, epoch: int | None = None, mean: float = DEFAULT_MEAN,
                 std: float = DEFAULT_STD, epoch_offset: int = 0, oversample: Mapping[str, int] | None = None,
                 normalize: bool = True):
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size={size!r} must be (height, width) with positive integers")
        if std <= 0:
            raise ValueError(f"std={std} must be positive")
        self.size = (int(size[0]), int(size[1]))
        self.augment = augment
        self.seed = int(seed)
        self.epoch = epoch
        self.epoch_offset = int(epoch_offset)
        self.mean, self.std = float(mean), float(std)
        self.oversample = check_oversample(oversample)
        self.normalize = bool(normalize)
        self._augmenter: Augmenter | None = None

    def __getstate__(self) -> dict:
        # The albumentations pipeline is rebuilt lazily in each worker process.
        return {**self.__dict__, "_augmenter": None}

    def _current_epoch(self) -> int:
        if self.epoch is not None:
            return int(self.epoch)
        return self.epoch_offset + _ray_execution_index()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in READ_COLUMNS if c not in batch]
        if missing:
            raise ValueError(f"batch lacks shard column(s) {missing}; got {sorted(batch)}")
        ids = [str(i) for i in batch["id"]]
        classes = [str(c) for c in batch["class"]]
        copies = [self.oversample.get(c, 1) for c in classes]
        n = sum(copies)
        h, w = self.size
        dtype = np.float32 if self.normalize else np.uint8
        images = np.empty((n, 1, h, w), dtype=dtype)
        masks = np.empty((n, 1, h, w), dtype=dtype)
        out_ids: list[str] = []
        if self.augment is not None and self._augmenter is None:
            self._augmenter = Augmenter(self.augment, self.size)
        epoch = self._current_epoch() if self.augment is not None else 0
        for k, sample_id in enumerate(ids):
            image = decode_png(batch["image_png"][k], sample=sample_id, column="image_png")
            mask = decode_png(batch["mask_png"][k], sample=sample_id, column="mask_png")
            if image.shape != mask.shape:
                raise ValueError(f"sample {sample_id!r}: image is {image.shape} but mask is "
                                 f"{mask.shape}; they must match")
            image = resize_image(image, self.size)
            mask = (resize_mask(mask, self.size) > 0).astype(np.uint8)
            for copy in range(copies[k]):
                view_id = f"{sample_id}#{copy}" if copy else sample_id
                view_image, view_mask = image, mask
                if self._augmenter is not None:
                    view_image, view_mask = self._augmenter(image, mask, sample_seed(self.seed, epoch, view_id))
                images[len(out_ids), 0] = normalize(view_image, self.mean, self.std) if self.normalize else view_image
                masks[len(out_ids), 0] = view_mask
                out_ids.append(view_id)
        out_classes = [c for c, m in zip(classes, copies) for _ in range(m)]
        return {"image": images, "mask": masks, "id": np.array(out_ids, dtype=object),
                "class": np.array(out_classes, dtype=object)}


def _ray_execution_index() -> int:
    """How many times the Dataset being executed has been executed before (0 outside Ray Data).

    Ray Data counts executions per Dataset in ``DataContext._execution_idx`` and ships the context
    to every task; its own ``FileShuffleConfig(reseed_after_execution=True)`` uses the same counter.
    It is private API, hence the defensive lookup: if it disappears in a future Ray, augmentation
    stays valid but repeats per epoch (pass ``epoch=`` explicitly then).
    """
    try:
        from ray.data import DataContext
    except ImportError:
        return 0
    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


def read_split(uri: str, split: str, *, size: tuple[int, int] = DEFAULT_SIZE,
               augment: AugmentConfig | bool | None = None, seed: int = 0,
               epoch: int | None = None, epoch_offset: int = 0, shuffle: bool | None = None,
               batch_size: int = 32,
               num_cpus: float = 0.5, concurrency: int | None = None,
               max_block_mib: float | None = None, oversample: Mapping[str, int] | None = None,
               mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD, normalize: bool = True,
               endpoint: str | None = None, access_key: str | None = None,
               secret_key: str | None = None, region: str | None = None):
    """One split of a prepared URI as a lazy, streaming ``ray.data.Dataset`` of model batches.

    Args:
        uri: prepared root (local path or ``s3://bucket/prefix``).
        split: "train", "val", "test", or one side of a cross-validation fold over train+val
            (``"train@fold2of5"``, ``"val@fold2of5"``: :func:`unet.shards.split_shards`).
        size: training size (height, width). Default (128, 128).
        augment: ``AugmentConfig``; ``True`` = defaults; ``None``/``False`` = no augmentation.
            Default None — pass it for the train split only.
        seed: seed for augmentation and shard order. Default 0.
        epoch: pin the augmentation epoch; None = advance with every pass over the Dataset.
        epoch_offset: first epoch number when ``epoch`` is None (set it when resuming). Default 0.
        shuffle: shuffle shard order per pass; None = only when augmenting. Default None.
        batch_size: rows per transform call (bounds a task's memory; not the training batch).
        num_cpus: CPUs requested per read and per transform task. Default 0.5.
        concurrency: max parallel transform tasks; None = Ray's default.
        max_block_mib: largest block (and Parquet read unit) Ray Data may build while reading
            (set, it selects Ray Data's V2 Parquet reader, which can split a shard),
            in MiB; None = Ray's default (128 MiB). Lower it (e.g. 16) when the object store is
            small (< ~1 GiB): reads that outgrow the store's free space are spilled to disk.
        oversample: ``{class: n}``: rows of that class n times per pass, each copy augmented
            differently (see :class:`BatchTransform`). Default None.
        mean, std: normalisation. Defaults 0.5, 0.25.
        normalize: False = uint8 image/mask columns, to augment and normalise on the training device
            (``augment_on="gpu"``, :mod:`unet.data.gpu_augment`). Default True.
        endpoint, access_key, secret_key, region: S3 settings (default: AWS_* environment).

    The S3 settings travel inside the pyarrow file system object, so Ray workers do not need the
    AWS_* variables themselves.
    """
    import ray.data

    if augment is True:
        augment = AugmentConfig()
    augment = augment or None
    if shuffle is None:
        shuffle = augment is not None
    storage_kw = dict(endpoint=endpoint, access_key=access_key, secret_key=secret_key,
                      region=region)
    shards, groups = split_shards(uri, split, **storage_kw)
    fs, _ = storage.get_filesystem(uri, **storage_kw)
    paths = [storage.get_filesystem(s, **storage_kw)[1] for s in shards]
    file_shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle else None
    with storage.errors(storage.join(uri, split), "read shards of", **storage_kw), \
            _parquet_read_plan(max_block_mib):
        ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=file_shuffle, num_cpus=num_cpus)
    if groups is not None:  # a cross-validation fold: its groups' rows of train+val
        ds = ds.select_columns([*READ_COLUMNS, "group"]).map_batches(
            KeepGroups(groups), batch_format="pyarrow", num_cpus=num_cpus)
    # Projection is pushed down into the Parquet read: height/width/source are never loaded.
    ds = ds.select_columns(READ_COLUMNS)
    transform = BatchTransform(size=size, augment=augment, seed=seed, epoch=epoch, mean=mean, std=std,
                               epoch_offset=epoch_offset, oversample=oversample, normalize=normalize)
    ds = ds.map_batches(transform, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                        concurrency=concurrency)
    if max_block_mib is not None:
        # The Dataset carries its own copy of the DataContext; this changes only this pipeline.
        ds.context.target_max_block_size = int(max_block_mib * 1024 * 1024)
    return ds


@contextlib.contextmanager
def _parquet_read_plan(max_block_mib: float | None) -> Iterator[None]:
    """Settings Ray Data reads when ``read_parquet`` is called (planning), restored afterwards.

    Without ``max_block_mib``: the V1 Parquet datasource. Training re-executes the read every
    epoch; with Ray 2.60's default V2 (a ListFiles task, then ReadFiles) the first batch of an
    epoch came 2-4 s after the epoch started, with V1 (read tasks planned from the shard
    footers) 0.4 s (179 phantom rows, 2 CPUs): a wait every rank pays every epoch.

    With ``max_block_mib``: V2, whose read tasks take Parquet row groups up to
    ``RAY_DATA_PARQUET_BIN_PACKING_BYTES`` (128 MiB by default), set here to the block size. A
    read task runs to the end of its bin even when downstream is backpressured, so with a small
    object store a 128 MiB bin is spilled to disk; V1 reads a whole shard per task (506 MiB of
    shards through a 100 MiB object store: V1 spilled 325 MiB, V2 with 8 MiB bins 0;
    ``bench/data_memory.py``). Settings already in the environment win.
    """
    import ray.data

    bins = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
    ctx = ray.data.DataContext.get_current()
    saved_v2, set_bins = ctx.use_datasource_v2, max_block_mib is not None and bins not in os.environ
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ctx.use_datasource_v2 = max_block_mib is not None
    if set_bins:
        os.environ[bins] = str(int(max_block_mib * 1024 * 1024))
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved_v2
        if set_bins:
            del os.environ[bins]


def table_to_batch(table) -> dict[str, np.ndarray]:
    """A pyarrow Table/RecordBatch of shard rows -> the dict of NumPy arrays BatchTransform takes."""
    return {name: np.array(table.column(name).to_pylist(), dtype=object) for name in READ_COLUMNS}


def iter_batches(uri: str, split: str, *, size: tuple[int, int] = DEFAULT_SIZE,
                 batch_size: int = 16, augment: AugmentConfig | bool | None = None, seed: int = 0,
                 epoch: int = 0, shuffle: bool = False, drop_last: bool = False,
                 mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD,
                 oversample: Mapping[str, int] | None = None, normalize: bool = True,
                 **storage_kw: Any) -> Iterator[dict[str, np.ndarray]]:
    """The same batches as :func:`read_split`, without Ray: read shards one at a time with pyarrow.

    Memory holds one shard row group plus one output batch. ``shuffle`` permutes shard order and
    rows within each shard with ``(seed, epoch)``. With the same ``seed``/``epoch``/``augment``,
    every sample is identical to the Ray path's (only the order can differ). ``normalize=False``:
    uint8 pixels, as :func:`read_split`'s.

    Example::

        for batch in iter_batches("/data/prepared", "val", size=(128, 128), batch_size=8):
            print(batch["image"].shape, batch["id"][:3])
    """
    if augment is True:
        augment = AugmentConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    transform = BatchTransform(size=size, augment=augment or None, seed=seed, epoch=epoch,
                               mean=mean, std=std, oversample=oversample, normalize=normalize)
    shards, groups = split_shards(uri, split, **storage_kw)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF])
    if shuffle:
        shards = [shards[i] for i in rng.permutation(len(shards))]
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    for shard in shards:
        for batch in _read_shard(shard, batch_size, storage_kw, groups):
            if shuffle:
                order = rng.permutation(len(batch["id"]))
                batch = {k: v[order] for k, v in batch.items()}
            try:
                out = transform(batch)
            except ValueError as e:
                raise ValueError(f"{shard}: {e}") from e
            pending.append(out)
            pending_rows += len(out["id"])
            while pending_rows >= batch_size:
                merged = _concat(pending)
                yield {k: v[:batch_size] for k, v in merged.items()}
                pending_rows -= batch_size
                pending = [{k: v[batch_size:] for k, v in merged.items()}] if pending_rows else []
    if pending_rows and not drop_last:
        yield _concat(pending)


class KeepGroups:
    """A ``map_batches`` step (pyarrow batches) keeping the rows whose ``group`` is one of ``groups``."""

    def __init__(self, groups: frozenset[str]):
        self.groups = pa.array(sorted(groups), pa.string())

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.filter(pc.is_in(table.column("group"), value_set=self.groups))


def _read_shard(shard: str, batch_size: int, storage_kw: dict,
                groups: frozenset[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Shard rows as BatchTransform input, ``batch_size`` rows at a time (one file open at once);
    with ``groups``, only those groups' rows."""
    fs, path = storage.get_filesystem(shard, **storage_kw)
    with storage.errors(shard, "read shard", **storage_kw), fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        missing = [c for c in READ_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{shard}: shard lacks column(s) {missing}; is it a prepared shard?")
        keep = None if groups is None else KeepGroups(groups)
        columns = READ_COLUMNS if keep is None else [*READ_COLUMNS, "group"]
        for record_batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            rows = record_batch if keep is None else keep(pa.Table.from_batches([record_batch]))
            if rows.num_rows:
                yield table_to_batch(rows)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class TorchCollate(NumpyBatchCollateFn):
    """``collate_fn`` for ``iter_torch_batches``: image/mask as CPU torch tensors, id/class as lists.

    Ray's default collate turns every column into a tensor and fails on the string columns; this
    keeps them as Python lists so evaluation can report per-image results. Because the output is
    not all tensors, Ray does not move it to the device: call ``.to(device)`` on image/mask.
    (When ids are not needed, ``ds.select_columns(["image", "mask"])`` + the default collate also
    works and moves tensors to the device itself.) uint8 pixels (``normalize=False``) stay uint8.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        return {"image": torch.from_numpy(_pixels(batch["image"])), "mask": torch.from_numpy(_pixels(batch["mask"])),
                "id": [str(i) for i in batch["id"]], "class": [str(c) for c in batch["class"]]}


def _pixels(array: np.ndarray) -> np.ndarray:
    # uint8 stays uint8 (decoded-only batches: a quarter of the bytes to the device); the rest float32.
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array, dtype=np.float32)


collate_torch = TorchCollate()
