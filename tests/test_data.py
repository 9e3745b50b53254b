"""unet.data: shard reading (Ray Data and plain), batch format, augmentation alignment."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unet import storage
from unet.data import (
    AugmentConfig,
    Augmenter,
    BatchTransform,
    collate_torch,
    iter_batches,
    read_split,
    sample_seed,
    table_to_batch,
)

SIZE = (48, 48)


# --- helpers -----------------------------------------------------------------------------------

def planted_pair(index: int, shape=(40, 56)) -> tuple[np.ndarray, np.ndarray]:
    """Image = 255 exactly where mask = 255, 0 elsewhere; an asymmetric shape (ellipse + L) that
    moves with ``index``, so flips and rotations are visible."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = 0.35 * h + index % 3, 0.6 * w - index % 4
    ellipse = ((yy - cy) / (0.18 * h)) ** 2 + ((xx - cx) / (0.12 * w)) ** 2 < 1
    ell = ((yy > 0.65 * h) & (yy < 0.85 * h) & (xx > 0.1 * w) & (xx < 0.2 * w)) | \
          ((yy > 0.78 * h) & (yy < 0.85 * h) & (xx > 0.1 * w) & (xx < 0.4 * w))
    mask = ((ellipse | ell) * 255).astype(np.uint8)
    return mask.copy(), mask


def png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def write_shards(root: str, split: str, n_shards: int = 3, rows_per_shard: int = 4) -> list[str]:
    """Write tiny shards in the contract schema through unet.storage (local or S3); return ids."""
    ids = []
    for s in range(n_shards):
        rows = []
        for r in range(rows_per_shard):
            index = s * rows_per_shard + r
            image, mask = planted_pair(index)
            sample_id = f"{split}-{index:03d}"
            ids.append(sample_id)
            rows.append({"id": sample_id, "class": ("benign", "malignant", "normal")[index % 3],
                         "image_png": png(image), "mask_png": png(mask),
                         "height": image.shape[0], "width": image.shape[1],
                         "group": f"g{index}", "source": "test"})
        schema = pa.schema([("id", pa.string()), ("class", pa.string()), ("image_png", pa.binary()),
                            ("mask_png", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
                            ("group", pa.string()), ("source", pa.string())])
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        storage.write_bytes(storage.join(root, split, f"part-{s:05d}.parquet"), buf.getvalue())
    return ids


def by_id(batches) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for b in batches:
        for k, sample_id in enumerate(b["id"]):
            out[str(sample_id)] = (np.asarray(b["image"][k]), np.asarray(b["mask"][k]))
    return out


def alignment_errors(image_u8: np.ndarray, mask01: np.ndarray) -> int:
    """Pixels where (image > 127) disagrees with the mask *outside* a 1-pixel band around the mask
    edge (inside the band, linear vs nearest interpolation may legitimately differ)."""
    kernel = np.ones((3, 3), np.uint8)
    band = cv2.dilate(mask01, kernel) != cv2.erode(mask01, kernel)
    return int(np.sum(((image_u8 > 127) != (mask01 > 0)) & ~band))


@pytest.fixture(scope="module")
def local_prepared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prepared"))
    ids = {split: write_shards(root, split) for split in ("train", "val")}
    return root, ids


# --- transform and augmentation (no Ray) ------------------------------------------------------

def test_batch_transform_shapes_dtypes_and_normalisation(local_prepared):
    root, ids = local_prepared
    table = pq.read_table(f"{root}/val/part-00000.parquet")
    out = BatchTransform(size=SIZE)(table_to_batch(table))
    assert out["image"].shape == (4, 1, *SIZE) and out["image"].dtype == np.float32
    assert out["mask"].shape == (4, 1, *SIZE) and out["mask"].dtype == np.float32
    assert set(np.unique(out["mask"])) == {0.0, 1.0}
    assert list(out["id"]) == ids["val"][:4]
    assert list(out["class"]) == ["benign", "malignant", "normal", "benign"]
    # (0/255 - 0.5) / 0.25 = -2 on background, (1 - 0.5) / 0.25 = 2 in the lesion, away from edges
    assert out["image"].min() == pytest.approx(-2.0) and out["image"].max() == pytest.approx(2.0)
    image_u8 = ((out["image"][0, 0] * 0.25 + 0.5) * 255).round().astype(np.uint8)
    assert alignment_errors(image_u8, out["mask"][0, 0].astype(np.uint8)) == 0


GEOMETRIC = {
    "hflip": AugmentConfig(hflip_p=1, affine_p=0, elastic_p=0),
    "vflip": AugmentConfig(hflip_p=0, vflip_p=1, affine_p=0, elastic_p=0),
    "rotate": AugmentConfig(hflip_p=0, affine_p=1, rotate_deg=30, scale=(1, 1), translate=0, elastic_p=0),
    "scale": AugmentConfig(hflip_p=0, affine_p=1, rotate_deg=0, scale=(0.7, 1.3), translate=0, elastic_p=0),
    "shift": AugmentConfig(hflip_p=0, affine_p=1, rotate_deg=0, scale=(1, 1), translate=0.15, elastic_p=0),
    "elastic": AugmentConfig(hflip_p=0, affine_p=0, elastic_p=1, elastic_alpha=3.0),
    "all": AugmentConfig(vflip_p=0.5).always(),
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_augmentation_keeps_mask_aligned(name):
    config = GEOMETRIC[name].geometric_only()
    augmenter = Augmenter(config, SIZE)
    moved = 0
    for index in range(8):
        image, mask = planted_pair(index, SIZE)
        mask01 = (mask > 0).astype(np.uint8)
        image2, mask2 = augmenter(image, mask01, seed=sample_seed(0, 0, f"id-{index}"))
        assert mask2.dtype == np.uint8 and set(np.unique(mask2)) <= {0, 1}
        assert alignment_errors(image2, mask2) == 0, f"{name}: mask and image disagree (seed {index})"
        moved += int(not np.array_equal(mask2, mask01))
    assert moved >= 6, f"{name} left the mask unchanged in {8 - moved}/8 samples: not exercised"


def test_alignment_check_detects_misalignment():
    # Guard against a vacuous check: a 2-pixel shift of the mask alone must be caught.
    image, mask = planted_pair(0, SIZE)
    shifted = np.roll((mask > 0).astype(np.uint8), 2, axis=1)
    assert alignment_errors(image, shifted) > 0


def test_intensity_augmentation_does_not_touch_mask():
    augmenter = Augmenter(AugmentConfig().intensity_only().always(), SIZE)
    rng = np.random.default_rng(0)
    for index in range(5):
        _, mask = planted_pair(index, SIZE)
        image = rng.integers(30, 220, SIZE, dtype=np.uint8)
        mask01 = (mask > 0).astype(np.uint8)
        image2, mask2 = augmenter(image, mask01, seed=index)
        assert np.array_equal(mask2, mask01)
        assert not np.array_equal(image2, image)


def test_augmentation_is_a_function_of_seed_epoch_and_id(local_prepared):
    root, _ = local_prepared
    batch = table_to_batch(pq.read_table(f"{root}/train/part-00000.parquet"))
    config = AugmentConfig().always()
    a = BatchTransform(SIZE, augment=config, seed=3, epoch=1)(batch)
    b = BatchTransform(SIZE, augment=config, seed=3, epoch=1)(batch)
    reversed_batch = {k: v[::-1] for k, v in batch.items()}
    c = BatchTransform(SIZE, augment=config, seed=3, epoch=1)(reversed_batch)
    d = BatchTransform(SIZE, augment=config, seed=3, epoch=2)(batch)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["image"], c["image"][::-1])  # independent of batch position
    assert not np.array_equal(a["image"], d["image"])  # a new epoch gives new augmentations
    # Outside Ray the execution counter is 0, so epoch=None means epoch_offset (used on resume).
    e = BatchTransform(SIZE, augment=config, seed=3, epoch=None, epoch_offset=2)(batch)
    np.testing.assert_array_equal(d["image"], e["image"])


def test_oversample_repeats_a_class_with_its_own_augmentation_per_copy(local_prepared):
    root, _ = local_prepared
    batch = table_to_batch(pq.read_table(f"{root}/train/part-00000.parquet"))
    config = AugmentConfig().always()
    plain = BatchTransform(SIZE, augment=config, seed=3, epoch=1)(batch)
    out = BatchTransform(SIZE, augment=config, seed=3, epoch=1, oversample={"normal": 3})(batch)
    normal = [str(i) for i, c in zip(batch["id"], batch["class"]) if c == "normal"]
    assert normal, "the shard should hold a normal row"
    assert list(out["id"]) == [v for i in plain["id"] for v in ([i, f"{i}#1", f"{i}#2"] if i in normal else [i])]
    assert list(out["class"]).count("normal") == 3 * len(normal) and len(out["image"]) == len(out["mask"])
    view = {str(i): (out["image"][k], out["mask"][k]) for k, i in enumerate(out["id"])}
    first = normal[0]
    np.testing.assert_array_equal(view[first][0], plain["image"][list(plain["id"]).index(first)])
    assert not np.array_equal(view[first][0], view[f"{first}#1"][0])
    assert not np.array_equal(view[f"{first}#1"][0], view[f"{first}#2"][0])
    for bad in ({"normal": 0}, {"normal": 1.5}, {"normal": True}):
        with pytest.raises(ValueError, match="must be a whole number >= 1"):
            BatchTransform(SIZE, oversample=bad)


def test_plain_iterator_batches_and_shuffle(local_prepared):
    root, ids = local_prepared
    batches = list(iter_batches(root, "train", size=SIZE, batch_size=5))
    assert [len(b["id"]) for b in batches] == [5, 5, 2]  # rebatched across shards
    assert [i for b in batches for i in b["id"]] == ids["train"]
    shuffled = [i for b in iter_batches(root, "train", size=SIZE, batch_size=5, shuffle=True, seed=1)
                for i in b["id"]]
    assert sorted(shuffled) == ids["train"] and shuffled != ids["train"]


def test_missing_split_and_corrupt_png_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="jobs.prepare"):
        next(iter_batches(str(tmp_path), "test"))
    batch = {"id": np.array(["bad-1"], dtype=object), "class": np.array(["benign"], dtype=object),
             "image_png": np.array([b"not a png"], dtype=object),
             "mask_png": np.array([png(np.zeros((4, 4), np.uint8))], dtype=object)}
    with pytest.raises(ValueError, match="bad-1.*image_png"):
        BatchTransform(SIZE)(batch)
    with pytest.raises(ValueError, match="split="):
        iter_batches(str(tmp_path), "training").__next__()


# --- Ray Data --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    # address="local": always a fresh private cluster, even if someone ran `ray start` here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_split_matches_plain_iterator(ray_local, local_prepared):
    root, ids = local_prepared
    ray_rows = by_id(read_split(root, "val", size=SIZE).iter_batches(batch_size=5, batch_format="numpy"))
    plain_rows = by_id(iter_batches(root, "val", size=SIZE, batch_size=5))
    assert sorted(ray_rows) == sorted(plain_rows) == ids["val"]
    for sample_id, (image, mask) in plain_rows.items():
        np.testing.assert_array_equal(ray_rows[sample_id][0], image)
        np.testing.assert_array_equal(ray_rows[sample_id][1], mask)


@pytest.mark.slow
def test_parquet_reader_choice_is_scoped_to_the_read(ray_local, local_prepared, monkeypatch):
    """Ray Data's V1 Parquet reader by default (it starts every epoch's read in a fraction of
    V2's time, see bench/README.md); V2 with its row-group bins when max_block_mib bounds memory.
    Neither leaks into the caller's DataContext or environment, and the same rows come out."""
    import os

    from ray.data import DataContext

    from tests.helpers import logical_operators

    root, ids = local_prepared
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    before = DataContext.get_current().use_datasource_v2
    v1, v2 = read_split(root, "val", size=SIZE), read_split(root, "val", size=SIZE, max_block_mib=8)
    assert "ReadParquet" in logical_operators(v1) and "ListFiles" not in logical_operators(v1)
    assert "ListFiles" in logical_operators(v2)
    assert DataContext.get_current().use_datasource_v2 == before
    assert "RAY_DATA_PARQUET_BIN_PACKING_BYTES" not in os.environ
    rows = [by_id(ds.iter_batches(batch_size=5, batch_format="numpy")) for ds in (v1, v2)]
    assert sorted(rows[0]) == sorted(rows[1]) == ids["val"]


@pytest.mark.slow
def test_ray_train_split_augments_per_epoch_reproducibly(ray_local, local_prepared):
    root, ids = local_prepared
    config = AugmentConfig().always()
    ds = read_split(root, "train", size=SIZE, augment=config, seed=7)
    epochs = []
    for epoch in range(2):  # one Dataset, iterated twice, as a Trainer does
        batches = list(ds.iter_torch_batches(batch_size=4, collate_fn=collate_torch,
                                             local_shuffle_buffer_size=8))
        for b in batches:
            assert b["image"].shape[1:] == (1, *SIZE) and str(b["image"].dtype) == "torch.float32"
            assert b["mask"].shape == b["image"].shape and set(b["mask"].unique().tolist()) <= {0.0, 1.0}
            assert isinstance(b["id"][0], str) and isinstance(b["class"][0], str)
        rows = by_id({k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in b.items()} for b in batches)
        assert sorted(rows) == ids["train"]
        # epoch k of the Ray pipeline == the plain iterator with epoch=k: reproducible
        plain = by_id(iter_batches(root, "train", size=SIZE, batch_size=12, augment=config, seed=7,
                                   epoch=epoch))
        for sample_id, (image, mask) in plain.items():
            np.testing.assert_array_equal(rows[sample_id][0], image)
            np.testing.assert_array_equal(rows[sample_id][1], mask)
        epochs.append(rows)
    assert any(not np.array_equal(epochs[0][i][0], epochs[1][i][0]) for i in ids["train"])


def test_ray_train_split_oversamples_like_the_plain_iterator(ray_local, local_prepared):
    root, ids = local_prepared
    kw = dict(size=SIZE, augment=AugmentConfig().always(), seed=7, oversample={"normal": 2})
    rows = by_id({k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in b.items()}
                 for b in read_split(root, "train", epoch=0, **kw).iter_torch_batches(batch_size=5, collate_fn=collate_torch))
    normal = [i for i in ids["train"] if int(i[-3:]) % 3 == 2]
    assert sorted(rows) == sorted(ids["train"] + [f"{i}#1" for i in normal])
    plain = by_id(iter_batches(root, "train", batch_size=12, epoch=0, **kw))
    assert sorted(plain) == sorted(rows)
    for sample_id, (image, mask) in plain.items():
        np.testing.assert_array_equal(rows[sample_id][0], image)


@pytest.mark.slow
def test_ray_reads_shards_from_s3(ray_local, s3_env):
    root = s3_env + "/prepared"
    ids = write_shards(root, "val", n_shards=2, rows_per_shard=3)
    rows = by_id(read_split(root, "val", size=SIZE).iter_batches(batch_size=4, batch_format="numpy"))
    plain = by_id(iter_batches(root, "val", size=SIZE, batch_size=4))
    assert sorted(rows) == sorted(plain) == ids
    for sample_id, (image, mask) in plain.items():
        np.testing.assert_array_equal(rows[sample_id][0], image)
        np.testing.assert_array_equal(rows[sample_id][1], mask)


def test_read_split_missing_bucket_is_clear(s3_env):
    with pytest.raises(storage.StorageNotFoundError, match="bucket 'no-such-bucket-9d2e'"):
        read_split("s3://no-such-bucket-9d2e/prepared", "train")
