"""jobs.prepare / unet.prepare: sources, duplicate-aware splits, shards, manifest, idempotence."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.prepare import build_parser, main
from unet import storage
from unet.phantoms import make_phantom, write_busi_layout
from unet.codec import to_binary_mask, to_grey8
from unet.prepare import PrepareConfig, SourceDataError, assign_splits, group_duplicates, prepare
from unet.shards import SHARD_SCHEMA, SPLITS
from unet.folder_source import read_folder
from unet.sources import read_busi

SIZE = (64, 64)
SHARED_BUSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "busi"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def read_rows(out: str, **storage_kw) -> dict[str, list[dict]]:
    """All rows per split, read back through unet.storage exactly as a consumer would."""
    rows = {}
    for split in SPLITS:
        fs, path = storage.get_filesystem(storage.join(out, split), **storage_kw)
        table = pq.read_table(path, filesystem=fs)
        assert table.schema.remove_metadata().equals(SHARD_SCHEMA.remove_metadata())
        rows[split] = table.to_pylist()
    return rows


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.mode == "L", "shards hold 8-bit grey PNGs"
    return np.asarray(image)


def local_files(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def busi_like(tmp_path_factory):
    """Phantoms in BUSI's layout: 30 images + 4 planted near-duplicates + split masks, and three
    broken cases (missing mask, mask of the wrong size, corrupt PNG) on images that are not
    involved in any duplicate."""
    base = tmp_path_factory.mktemp("busi_like")
    root = write_busi_layout(base, 30, seed=0, size=SIZE, duplicates=4, multi_mask_fraction=0.2)
    truth = json.loads((base / "phantoms.json").read_text())["files"]
    involved = {f["image"] for f in truth if f["duplicate_of"]} | {f["duplicate_of"] for f in truth}
    plain = [f for f in truth if f["image"] not in involved and len(f["masks"]) == 1]
    by_kind = {kind: [f for f in plain if f["kind"] == kind] for kind in ("benign", "malignant", "normal")}
    broken = {
        "missing": by_kind["normal"][0]["image"],
        "mismatch": by_kind["benign"][-1]["image"],
        "corrupt": by_kind["malignant"][-1]["image"],
    }
    (root / broken["missing"].replace(".png", "_mask.png")).unlink()
    Image.new("1", (SIZE[1] + 3, SIZE[0])).save(root / broken["mismatch"].replace(".png", "_mask.png"))
    (root / broken["corrupt"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    # A split lesion whose main mask is gone: the remaining _mask_1.png alone is half a lesion.
    halves = [f for f in truth if len(f["masks"]) == 2 and f["image"] not in involved]
    broken["partial"] = halves[-1]["image"]
    (root / halves[-1]["masks"][0]).unlink()
    # Not images of their own: a mask without its image, and a stray file.
    Image.new("1", (SIZE[1], SIZE[0])).save(root / "benign" / "benign (999)_mask.png")
    (root / "normal" / "notes.txt").write_text("scan log")
    return {"base": base, "root": root, "truth": truth, "broken": broken}


@pytest.fixture(scope="module")
def prepared(busi_like, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    manifest = prepare(PrepareConfig(source="busi", input=str(busi_like["base"]), out=str(out), shard_size=8),
                       command="test")
    return {"out": out, "manifest": manifest, "rows": read_rows(str(out))}


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------

def test_group_duplicates_is_transitive():
    # 0-1 and 1-2 are within 1 bit, 0-2 are 2 bits apart: one group by transitivity; 3 is far.
    roots = group_duplicates([0b000, 0b001, 0b011, (1 << 64) - 1], threshold=1)
    assert roots == [0, 0, 0, 3]
    assert group_duplicates([0b000, 0b011], threshold=1) == [0, 1]


def test_assign_splits_keeps_groups_together_and_follows_ratios():
    rng = np.random.default_rng(0)
    classes = list(rng.choice(["benign", "malignant", "normal"], size=300, p=[0.56, 0.27, 0.17]))
    groups = [i - (i % 3) if i < 60 else i for i in range(300)]  # 20 groups of three, then singles
    splits = assign_splits(classes, groups, (0.7, 0.15, 0.15), seed=1)
    assert splits == assign_splits(classes, groups, (0.7, 0.15, 0.15), seed=1)  # deterministic
    assert splits != assign_splits(classes, groups, (0.7, 0.15, 0.15), seed=2)
    by_group = defaultdict(set)
    for g, s in zip(groups, splits):
        by_group[g].add(s)
    assert all(len(s) == 1 for s in by_group.values())
    for cls in ("benign", "malignant", "normal"):
        in_cls = [s for c, s in zip(classes, splits) if c == cls]
        assert abs(in_cls.count("train") / len(in_cls) - 0.7) < 0.05
        assert abs(in_cls.count("val") / len(in_cls) - 0.15) < 0.05
    no_test = assign_splits(classes, groups, (0.8, 0.2, 0.0), seed=1)
    assert "test" not in no_test and no_test.count("val") > 0


def test_pixel_conversions():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    assert to_grey8(Image.fromarray(rgb)).dtype == np.uint8
    assert to_grey8(Image.fromarray(rgb)).shape == (4, 5)
    grey16 = Image.fromarray(np.full((4, 5), 65535, np.uint16))
    assert (to_grey8(grey16) == 255).all()
    assert (to_grey8(Image.fromarray(np.full((4, 5), 257 * 10, np.uint16))) == 10).all()
    rgba = Image.fromarray(np.dstack([rgb, np.zeros((4, 5), np.uint8)]), mode="RGBA")
    assert to_grey8(rgba).shape == (4, 5)

    mask_rgb = np.zeros((4, 5, 3), np.uint8)
    mask_rgb[1, 2, 2] = 1  # any non-zero colour channel is lesion
    assert to_binary_mask(Image.fromarray(mask_rgb)).sum() == 1
    mask_rgba = np.dstack([np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 255, np.uint8)])
    assert not to_binary_mask(Image.fromarray(mask_rgba, mode="RGBA")).any()  # alpha is not lesion
    one_bit = Image.fromarray(np.eye(4, 5, dtype=bool))
    assert to_binary_mask(one_bit).sum() == 4


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ratios"):
        PrepareConfig(source="phantoms", num=4, out="x", ratios=(0.5, -0.1, 0.6))
    with pytest.raises(ValueError, match="input"):
        PrepareConfig(source="busi", out="x")
    with pytest.raises(ValueError, match="hash_threshold"):
        PrepareConfig(source="phantoms", num=4, out="x", hash_threshold=65)


# --------------------------------------------------------------------------------------------
# BUSI layout end to end
# --------------------------------------------------------------------------------------------

def test_counts_add_up(busi_like, prepared):
    manifest, rows = prepared["manifest"], prepared["rows"]
    usable = len(busi_like["truth"]) - len(busi_like["broken"])  # every broken image is left out
    counts = manifest["counts"]
    assert counts["total"]["total"] == usable
    assert sum(counts[s]["total"] for s in SPLITS) == usable
    for split in SPLITS:
        assert len(rows[split]) == counts[split]["total"]
        for cls in ("benign", "malignant", "normal"):
            assert sum(r["class"] == cls for r in rows[split]) == counts[split][cls]
    ids = [r["id"] for split in SPLITS for r in rows[split]]
    assert len(ids) == len(set(ids)) == usable
    assert all(counts[s]["total"] > 0 for s in SPLITS)


def test_no_group_spans_two_splits_and_planted_duplicates_share_a_group(busi_like, prepared):
    rows = prepared["rows"]
    split_of_group, group_of = defaultdict(set), {}
    for split in SPLITS:
        for r in rows[split]:
            split_of_group[r["group"]].add(split)
            group_of[r["source"].removeprefix("busi:")] = r["group"]
    assert all(len(s) == 1 for s in split_of_group.values()), "a duplicate group straddles two splits"
    duplicates = [f for f in busi_like["truth"] if f["duplicate_of"]]
    assert duplicates
    for f in duplicates:
        assert group_of[f["image"]] == group_of[f["duplicate_of"]], f
    groups = prepared["manifest"]["groups"]
    # Only the planted copies are grouped: the phantoms themselves are all distinct.
    assert groups["total"] == len(group_of) - len(duplicates)
    assert groups["spanning_splits"] == 0
    assert groups["hash_threshold"] == 10


def test_shards_hold_grey_pngs_and_merged_masks(busi_like, prepared):
    by_source = {r["source"].removeprefix("busi:"): r for split in SPLITS for r in prepared["rows"][split]}
    for entry in busi_like["truth"]:
        row = by_source.get(entry["image"])
        if row is None:
            continue  # one of the broken cases
        image, mask = decode(row["image_png"]), decode(row["mask_png"])
        assert image.shape == mask.shape == (row["height"], row["width"])
        assert set(np.unique(mask)) <= {0, 255}
        expected = np.asarray(Image.open(busi_like["root"] / entry["image"]).convert("L"))
        np.testing.assert_array_equal(image, expected)
        if len(entry["masks"]) == 2:  # the split lesion comes back whole (OR of both files)
            _, full = make_phantom(entry["seed"], entry["kind"], SIZE)
            np.testing.assert_array_equal(mask, full)
        if entry["kind"] == "normal":
            assert not mask.any()
    assert any(len(f["masks"]) == 2 and f["image"] in by_source for f in busi_like["truth"])


def test_max_side_shrinks_images_and_masks_but_keeps_the_splits(busi_like, prepared, tmp_path):
    out = tmp_path / "small"
    prepare(PrepareConfig(source="busi", input=str(busi_like["base"]), out=str(out), shard_size=8, max_side=40),
            command="test")
    small = read_rows(str(out))
    for split in SPLITS:
        full = {r["id"]: r for r in prepared["rows"][split]}
        assert sorted(r["id"] for r in small[split]) == sorted(full)  # same images in the same splits
        for row in small[split]:
            image, mask = decode(row["image_png"]), decode(row["mask_png"])
            assert image.shape == mask.shape == (row["height"], row["width"]) and max(image.shape) == 40
            assert set(np.unique(mask)) <= {0, 255}
            assert mask.any() == decode(full[row["id"]]["mask_png"]).any()
    with pytest.raises(ValueError, match="max_side must be >= 16"):
        PrepareConfig(source="busi", input="x", out="y", max_side=8)

def test_broken_files_are_listed_not_dropped_silently(busi_like, prepared):
    skipped = {s["path"]: s["reason"] for s in prepared["manifest"]["skipped"]}
    broken = busi_like["broken"]
    assert "missing mask" in skipped[broken["missing"]]
    assert "mask" in skipped[broken["mismatch"]] and "67x64" in skipped[broken["mismatch"]]
    assert "unreadable" in skipped[broken["corrupt"]]
    assert "found only" in skipped[broken["partial"]] and "_mask_1.png" in skipped[broken["partial"]]
    assert "mask without image" in skipped["benign/benign (999)_mask.png"]
    assert "not a .png" in skipped["normal/notes.txt"]
    assert len(skipped) == 6
    with pytest.raises(SourceDataError) as error:
        prepare(PrepareConfig(source="busi", input=str(busi_like["root"]), out=str(busi_like["base"] / "strict"),
                              strict=True))
    for path in [*broken.values(), "benign/benign (999)_mask.png", "normal/notes.txt"]:
        assert path in str(error.value)
    assert not (busi_like["base"] / "strict" / "manifest.json").exists()


def test_each_skipped_file_gets_a_warning_line(busi_like, caplog):
    caplog.set_level(logging.WARNING, logger="unet.prepare")
    _, skipped = read_busi(busi_like["base"])
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len(skipped) == 6
    for s in skipped:
        assert f"skipped {s.path}: {s.reason}" in warned


def test_manifest_checksums_and_layout(prepared):
    out, manifest = prepared["out"], prepared["manifest"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["schema_version"] == 1 and on_disk["command"] == "test"
    assert on_disk["config"]["shard_size"] == 8
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert pq.read_metadata(io.BytesIO(data)).num_rows == shard["rows"] <= 8
    parts = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert parts == sorted(s["path"] for s in manifest["shards"])


def test_rerun_is_byte_identical_and_removes_stale_shards(busi_like, prepared, tmp_path):
    out = tmp_path / "out"
    config = dict(source="busi", input=str(busi_like["base"]), out=str(out), shard_size=8)
    prepare(PrepareConfig(**config), command="test")
    first = local_files(out)
    # Same bytes as the module's run into another folder, and again on a rerun in place.
    assert {k: v for k, v in first.items() if k != "manifest.json"} == \
        {k: v for k, v in local_files(prepared["out"]).items() if k != "manifest.json"}
    prepare(PrepareConfig(**config), command="test")
    assert local_files(out) == first

    prepare(PrepareConfig(**(config | {"shard_size": 3})), command="test")  # more, smaller shards
    n_parts = len([k for k in first if k.endswith(".parquet")])
    assert len([k for k in local_files(out) if k.endswith(".parquet")]) > n_parts
    (out / "train" / "notes.txt").write_text("mine")  # not ours: must survive
    prepare(PrepareConfig(**config), command="test")
    again = local_files(out)
    assert again.pop("train/notes.txt")
    assert again == first, "stale part files from the 3-row run must be gone"


def test_phantom_source(tmp_path):
    out = tmp_path / "phantoms"
    manifest = prepare(PrepareConfig(source="phantoms", num=20, seed=3, size=(48, 64), out=str(out)))
    rows = read_rows(str(out))
    assert manifest["counts"]["total"]["total"] == 20
    assert all(manifest["counts"]["total"][c] > 0 for c in ("benign", "malignant", "normal"))
    assert manifest["skipped"] == []
    all_rows = [r for s in SPLITS for r in rows[s]]
    assert {(r["height"], r["width"]) for r in all_rows} == {(48, 64)}
    assert all(r["source"].startswith("phantoms:seed=3,index=") for r in all_rows)
    assert manifest["config"]["size"] == [48, 64]
    first = local_files(out)
    prepare(PrepareConfig(source="phantoms", num=20, seed=3, size=(48, 64), out=str(out)))
    assert local_files(out) == first


# --------------------------------------------------------------------------------------------
# Your own folder (--source folder)
# --------------------------------------------------------------------------------------------

# Image formats inference accepts, and how each is written (lossless ones must decode exactly).
_FORMATS = [(".png", "RGB"), (".jpg", "L"), (".bmp", "L"), (".tif", "I;16"), (".PNG", "L"), (".tiff", "L")]
# Mask conventions: 0/255, 0/1, label values, colour, palette, 1-bit, TIFF (non-zero = lesion).
_MASKS = ["0/255", "0/1", "labels", "rgb", "palette", "1bit", "tif"]


def _write_image(path: Path, grey: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        Image.fromarray(np.dstack([grey] * 3)).save(path)
    elif mode == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(grey).save(path, **({"quality": 95} if path.suffix.lower() == ".jpg" else {}))


def _write_mask(path: Path, lesion: np.ndarray, convention: str) -> Path:
    """Write `lesion` (bool) by `convention`; returns the path written (suffix may change)."""
    path = path.with_suffix(".tif" if convention == "tif" else ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    u8 = lesion.astype(np.uint8)
    if convention in ("0/255", "tif"):
        Image.fromarray(u8 * 255).save(path)
    elif convention == "0/1":
        Image.fromarray(u8).save(path)
    elif convention == "labels":  # two lesion labels, 1 and 2
        labels = u8.copy()
        labels[:, labels.shape[1] // 2:] *= 2
        Image.fromarray(labels).save(path)
    elif convention == "rgb":  # green lesion only: any non-zero channel counts
        Image.fromarray(np.dstack([np.zeros_like(u8), u8 * 128, np.zeros_like(u8)])).save(path)
    elif convention == "palette":
        img = Image.fromarray(u8, mode="L").convert("P")
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.save(path)
    else:
        Image.fromarray(lesion).save(path)  # mode "1"
    return path


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    """Layout A: images/{benign,malignant,normal}/NAME.ext + masks/<same folders>/NAME.ext, every
    format and mask convention, two planted near-duplicates, and one of every broken case."""
    base = tmp_path_factory.mktemp("own")
    images, masks = base / "images", base / "masks"
    expected = {}  # id -> (class, grey or None when lossy, lesion)
    k = 0
    for cls, n in (("benign", 8), ("malignant", 8), ("normal", 6)):
        for i in range(n):
            suffix, mode = _FORMATS[k % len(_FORMATS)]
            grey, mask = make_phantom(1000 + k, cls, SIZE)
            _write_image(images / cls / f"{cls[0]}{i}{suffix}", grey, mode)
            _write_mask(masks / cls / f"{cls[0]}{i}.png", mask > 0, _MASKS[k % len(_MASKS)])
            expected[f"{cls}/{cls[0]}{i}"] = (cls, None if suffix == ".jpg" else grey, mask > 0)
            k += 1
    # Near-duplicates planted as copies: an exact copy, and a JPEG re-encode under another name.
    (images / "benign" / "b0 copy.png").write_bytes((images / "benign" / "b0.png").read_bytes())
    (masks / "benign" / "b0 copy.png").write_bytes((masks / "benign" / "b0.png").read_bytes())
    grey, mask = make_phantom(1000 + 9, "malignant", SIZE)  # m1
    _write_image(images / "malignant" / "m1 again.jpg", grey, "L")
    _write_mask(masks / "malignant" / "m1 again.png", mask > 0, "0/255")
    pairs = [("benign/b0 copy", "benign/b0"), ("malignant/m1 again", "malignant/m1")]
    for copy, original in pairs:
        expected[copy] = expected[original][:1] + (None, expected[original][2])

    # Broken cases (paths as the manifest shows them: relative to the folder holding both).
    grey, mask = make_phantom(77, "benign", SIZE)
    _write_image(images / "benign" / "lonely.png", grey, "L")                      # no mask
    _write_mask(masks / "benign" / "orphan.png", mask > 0, "0/255")                # no image
    _write_image(images / "malignant" / "wide.png", grey, "L")                     # size mismatch
    Image.new("L", (SIZE[1] + 3, SIZE[0])).save(masks / "malignant" / "wide.png")
    (images / "benign" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    _write_mask(masks / "benign" / "corrupt.png", mask > 0, "0/255")
    (images / "benign" / "blank.png").write_bytes(b"")                            # empty file
    _write_mask(masks / "benign" / "blank.png", mask > 0, "0/255")
    _write_image(images / "cyst" / "c0.png", grey, "L")                            # unknown class
    _write_mask(masks / "cyst" / "c0.png", mask > 0, "0/255")
    _write_image(images / "normal" / "twin.png", grey, "L")                        # duplicate stem
    _write_image(images / "normal" / "twin.bmp", grey, "L")
    _write_mask(masks / "normal" / "twin.png", mask > 0, "0/255")
    _write_image(images / "benign" / "jm.png", grey, "L")                          # JPEG mask
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(masks / "benign" / "jm.jpg")
    (images / "README.txt").write_text("scanner export")                          # not an image
    grey, mask = make_phantom(78, "malignant", SIZE)                               # no class folder
    _write_image(images / "top.png", grey, "L")
    _write_mask(masks / "top.png", mask > 0, "0/255")
    broken = {
        "images/benign/lonely.png": "image without mask (no masks/benign/lonely.<png|jpg|jpeg|bmp|tif|tiff>)",
        "masks/benign/orphan.png": "mask without image",
        "images/malignant/wide.png": "is 67x64 (WxH) but the image is 64x64",
        "images/benign/corrupt.png": "unreadable image file",
        "images/benign/blank.png": "empty file images/benign/blank.png (0 bytes)",
        "images/cyst/c0.png": "unknown class 'cyst' from its folder",
        "images/normal/twin.png": "duplicate stem: twin.bmp would get the same id 'normal/twin'",
        "images/normal/twin.bmp": "duplicate stem: twin.png",
        "images/benign/jm.png": "mask masks/benign/jm.jpg is a JPEG",
        "images/README.txt": "not an image file",
        "images/top.png": "no class for an image whose mask shows a lesion: put it in a benign/ or malignant/",
    }
    return {"base": base, "images": images, "masks": masks, "expected": expected, "pairs": pairs,
            "broken": broken}


def _folder_config(own_folder, out, **kw) -> PrepareConfig:
    return PrepareConfig(source="folder", images=str(own_folder["images"]), masks=str(own_folder["masks"]),
                         class_from="folder", out=str(out), shard_size=8, **kw)


def test_folder_source_rows_classes_pixels_and_splits(own_folder, tmp_path):
    manifest = prepare(_folder_config(own_folder, tmp_path / "out"), command="test")
    rows = read_rows(str(tmp_path / "out"))
    by_id = {r["id"]: (split, r) for split in SPLITS for r in rows[split]}
    expected = own_folder["expected"]
    assert sorted(by_id) == sorted(expected)
    for id_, (cls, grey, lesion) in expected.items():
        split, row = by_id[id_]
        assert row["class"] == cls and row["source"].startswith("folder:" + id_ + ".")
        image, mask = decode(row["image_png"]), decode(row["mask_png"])
        if grey is not None:  # every lossless format decodes to the exact grey pixels
            np.testing.assert_array_equal(image, grey)
        np.testing.assert_array_equal(mask, np.where(lesion, 255, 0))  # every mask convention
        assert (cls == "normal") == (not lesion.any())
    counts = manifest["counts"]["total"]
    assert counts == {"benign": 9, "malignant": 9, "normal": 6, "total": 24}
    # Near-duplicate copies share the original's group, hence its split; no group spans two splits.
    for copy, original in own_folder["pairs"]:
        assert by_id[copy][1]["group"] == by_id[original][1]["group"] == original
        assert by_id[copy][0] == by_id[original][0]
    assert manifest["groups"]["with_duplicates"] == 2 and manifest["groups"]["spanning_splits"] == 0
    assert manifest["source"] == "folder"
    assert manifest["config"]["images"] == str(own_folder["images"]) and "input" not in manifest["config"]
    assert manifest["config"]["class_from"] == "folder" and manifest["config"]["mask_pattern"] == "{stem}"
    # Every broken file is listed with its reason (and only those).
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(own_folder["broken"])
    for path, reason in own_folder["broken"].items():
        assert reason in skipped[path], (path, skipped[path])


def test_folder_source_strict_warnings_and_max_side(own_folder, tmp_path, caplog):
    with pytest.raises(SourceDataError) as error:
        prepare(_folder_config(own_folder, tmp_path / "strict", strict=True))
    assert f"{len(own_folder['broken'])} bad file(s)" in str(error.value)
    assert not (tmp_path / "strict" / "manifest.json").exists()
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for path in own_folder["broken"]:
        assert f"skipped {path}: " in warned

    manifest = prepare(_folder_config(own_folder, tmp_path / "small", max_side=40, default_class="malignant"))
    rows = [r for split in SPLITS for r in read_rows(str(tmp_path / "small"))[split]]
    assert {(r["height"], r["width"]) for r in rows} == {(40, 40)}
    assert {r["id"]: r["class"] for r in rows}["top"] == "malignant"  # --default-class for the root image
    assert "images/top.png" not in {s["path"] for s in manifest["skipped"]}


def test_folder_source_one_folder_csv_classes_and_default_rule(tmp_path):
    """Layout B: masks beside the images ({stem}_mask.png), a sub-folder, classes from a CSV."""
    scans = tmp_path / "scans"
    lesions = {}
    for i, (name, kind, convention) in enumerate([
            ("s0.tif", "benign", "labels"), ("s1.bmp", "malignant", "0/1"), ("site2/s9.png", "benign", "rgb"),
            ("s2.png", "benign", "0/255"), ("s3.jpeg", "normal", "0/255"), ("s4.png", "malignant", "0/255"),
            ("s5.png", "benign", "0/255")]):
        grey, mask = make_phantom(500 + i, kind, SIZE)
        _write_image(scans / name, grey, "L")
        stem = name.rsplit(".", 1)[0]
        _write_mask(scans / f"{stem}_mask.png", mask > 0, convention)
        lesions[stem] = mask > 0
    _write_mask(scans / "s5_mask.tif", lesions["s5"], "tif")  # a second mask for s5: ambiguous
    table = tmp_path / "classes.csv"
    table.write_text("\ufeffImage,Class,reader\ns0.tif,benign,A\ns1,Malignant,B\nsite2/s9.png,benign,A\n"
                     "s2.png,cyst,A\nghost.png,benign,B\n", encoding="utf-8")
    records, skipped = read_folder(scans, mask_pattern="{stem}_mask", classes=table)  # any suffix
    assert {r.id: r.cls for r in records} == {"s0": "benign", "s1": "malignant", "site2/s9": "benign",
                                              "s3": "normal"}  # s3: not in the CSV, empty mask
    np.testing.assert_array_equal(decode(next(r for r in records if r.id == "s0").mask_png),
                                  np.where(lesions["s0"], 255, 0))
    reasons = {s.path: s.reason for s in skipped}
    assert "unknown class 'cyst' in classes.csv line 5" in reasons["s2.png"]
    assert "no class for an image whose mask shows a lesion: add it to classes.csv" in reasons["s4.png"]
    assert reasons["s5.png"] == "ambiguous masks: s5_mask.png, s5_mask.tif all match"
    assert "names 'ghost.png', which is no image in the images folder" in reasons["classes.csv line 6"]
    assert len(skipped) == 4
    records, _ = read_folder(scans, mask_pattern="{stem}_mask", classes=table, default_class="malignant")
    assert {r.id: r.cls for r in records}["s4"] == "malignant"
    with pytest.raises(ValueError, match="cannot tell them apart"):
        read_folder(scans, classes=table)  # default pattern {stem}: every file would be a mask too
    (tmp_path / "bad.csv").write_text("file,label\ns0.tif,benign\n")
    with pytest.raises(ValueError, match="bad.csv needs a header with columns image,class"):
        read_folder(scans, mask_pattern="{stem}_mask", classes=tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="s0_mask.png is not a UTF-8 CSV"):
        read_folder(scans, mask_pattern="{stem}_mask", classes=scans / "s0_mask.png")


def test_folder_config_rejects_bad_values():
    from unet.inference.plan import IMAGE_SUFFIXES

    from unet.folder_source import IMAGE_SUFFIXES as FOLDER_SUFFIXES
    assert FOLDER_SUFFIXES == IMAGE_SUFFIXES  # prepare reads what inference reads
    ok = dict(source="folder", out="x", images="i")
    with pytest.raises(ValueError, match="class rule"):
        PrepareConfig(**ok)
    with pytest.raises(ValueError, match="one class source"):
        PrepareConfig(**ok, class_from="folder", classes="c.csv")
    with pytest.raises(ValueError, match="never 'normal'"):
        PrepareConfig(**ok, default_class="normal")
    with pytest.raises(ValueError, match=r"\{stem\} once"):
        PrepareConfig(**ok, default_class="benign", mask_pattern="mask_of_{name}.png")
    with pytest.raises(ValueError, match="needs images"):
        PrepareConfig(source="folder", out="x", default_class="benign")
    assert "images" not in PrepareConfig(source="phantoms", num=4, out="x").to_dict()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def test_cli_runs_and_records_command(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--source", "phantoms", "--num", "8", "--size", "32", "--out", str(out), "--ratios", "2,1,1",
            "--shard-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("python -m jobs.prepare --source phantoms")
    assert manifest["config"]["ratios"] == [2.0, 1.0, 1.0]
    assert manifest["counts"]["total"]["total"] == 8
    assert "train" in printed.out and "duplicate groups" in printed.out


def test_cli_help_documents_every_option():
    text = build_parser().format_help()
    for flag in ("--source", "--input", "--num", "--size", "--seed", "--strict", "--out", "--ratios",
                 "--shard-size", "--hash-threshold", "--endpoint-url", "--profile", "--credentials-file",
                 "--region", "--images", "--masks", "--mask-pattern", "--class-from", "--classes",
                 "--default-class", "class rule"):
        assert flag in text


def test_cli_bad_use_exits_2(tmp_path, capsys):
    from unet.cli import run_main

    with pytest.raises(SystemExit) as exit_:
        main(["--source", "busi", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert run_main(main, ["--source", "busi", "--input", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_folder_source(own_folder, tmp_path, capsys, caplog):
    from unet.cli import run_main

    out = tmp_path / "cli_folder"
    argv = ["--source", "folder", "--images", str(own_folder["images"]), "--masks", str(own_folder["masks"]),
            "--class-from", "folder", "--default-class", "benign", "--out", str(out), "--seed", "1"]
    assert run_main(main, argv) == 0
    printed = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("python -m jobs.prepare --source folder --images ")
    assert manifest["config"]["default_class"] == "benign"
    assert manifest["config"]["masks"] == str(own_folder["masks"])
    assert manifest["counts"]["total"] == {"benign": 10, "malignant": 9, "normal": 6, "total": 25}  # + top.png
    assert f"skipped {len(own_folder['broken']) - 1} file(s)" in printed.out
    assert any("skipped images/benign/lonely.png: image without mask" in r.getMessage() for r in caplog.records)

    with pytest.raises(SystemExit) as exit_:  # bad use: no --images
        run_main(main, ["--source", "folder", "--class-from", "folder", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "--source folder needs --images DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--source", "phantoms", "--images", "x", "--out", str(tmp_path / "y")])
    assert "--images only apply to --source folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Object storage and the real BUSI data
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_s3_output_round_trip(s3_env):
    out = f"{s3_env}/prepared"
    config = PrepareConfig(source="phantoms", num=12, seed=0, size=(32, 32), out=out, shard_size=4)
    manifest = prepare(config)
    rows = read_rows(out)
    assert sum(len(rows[s]) for s in SPLITS) == 12
    on_store = json.loads(storage.read_bytes(storage.join(out, "manifest.json")))
    assert on_store["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        assert hashlib.sha256(storage.read_bytes(storage.join(out, shard["path"]))).hexdigest() == shard["sha256"]
    files = sorted(storage.iter_files(out))
    prepare(config)
    assert sorted(storage.iter_files(out)) == files
    prepare(dataclasses.replace(config, shard_size=64))
    parts = [u for u in storage.iter_files(out, suffixes=(".parquet",))]
    assert len(parts) == 3, parts  # one shard per split: the 4-row shards were removed
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in storage.read_bytes(storage.join(out, "manifest.json")).decode()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_BUSI / "Dataset_BUSI_with_GT").is_dir(), reason="shared BUSI data not present")
def test_real_busi_counts_and_leak_free_splits(tmp_path):
    out = tmp_path / "busi"
    manifest = prepare(PrepareConfig(source="busi", input=str(SHARED_BUSI), out=str(out)))
    counts = manifest["counts"]
    assert counts["total"] == {"benign": 350, "malignant": 169, "normal": 104, "total": 623}
    assert sum(counts[s]["total"] for s in SPLITS) == 623
    assert manifest["skipped"] == []
    rows = read_rows(str(out))
    split_of_group = defaultdict(set)
    for split in SPLITS:
        for r in rows[split]:
            split_of_group[r["group"]].add(split)
    assert all(len(s) == 1 for s in split_of_group.values())
    assert len(split_of_group) == manifest["groups"]["total"]
    # The known near-duplicates of this subset (see unet/prepare.py) are grouped, not lumped.
    assert 100 <= manifest["groups"]["with_duplicates"] <= 130
    assert manifest["groups"]["largest"] <= 10
    # Stratified: each split holds roughly its share of every class.
    for cls in ("benign", "malignant", "normal"):
        assert abs(counts["train"][cls] / counts["total"][cls] - 0.7) < 0.05
