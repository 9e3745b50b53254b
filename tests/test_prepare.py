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

from jobs.prepare import build_parser, main, redacted_command
from unet import storage
from unet.phantoms import make_phantom, write_busi_layout
from unet.codec import to_binary_mask, to_grey8
from unet.prepare import PrepareConfig, SourceDataError, assign_splits, group_duplicates, prepare
from unet.shards import SHARD_SCHEMA, SPLITS
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
# Command line
# --------------------------------------------------------------------------------------------

def test_cli_runs_records_command_and_hides_secrets(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--source", "phantoms", "--num", "8", "--size", "32", "--out", str(out), "--ratios", "2,1,1",
            "--shard-size", "2", "--access-key", "AKIAEXAMPLE", "--secret-key=s3cr3t"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    text = (out / "manifest.json").read_text()
    for secret in ("AKIAEXAMPLE", "s3cr3t"):
        assert secret not in text and secret not in printed.out and secret not in printed.err
    manifest = json.loads(text)
    assert manifest["command"].startswith("python -m jobs.prepare --source phantoms")
    assert "--secret-key=***" in manifest["command"]
    assert manifest["config"]["ratios"] == [2.0, 1.0, 1.0]
    assert manifest["counts"]["total"]["total"] == 8
    assert "train" in printed.out and "duplicate groups" in printed.out
    assert redacted_command(["--secret-key", "x", "--out", "y"]) == \
        "python -m jobs.prepare --secret-key '***' --out y"


def test_cli_help_documents_every_option():
    text = build_parser().format_help()
    for flag in ("--source", "--input", "--num", "--size", "--seed", "--strict", "--out", "--ratios",
                 "--shard-size", "--hash-threshold", "--endpoint-url", "--access-key", "--secret-key",
                 "--region"):
        assert flag in text


def test_cli_bad_use_exits_2(tmp_path, capsys):
    from unet.cli import run_main

    with pytest.raises(SystemExit) as exit_:
        main(["--source", "busi", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert run_main(main, ["--source", "busi", "--input", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


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
