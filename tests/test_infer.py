"""Bulk inference (unet.inference, jobs.infer): decoding, exactly-once output, incremental runs.

The slow tests run the real pipeline on a local 2-CPU Ray and on the S3 test server, over a
small corpus that mixes valid-but-awkward images, broken inputs, a tar shard and a Parquet table.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unet import inference as inf
from unet import storage
from unet.artifact import load_artifact, save_artifact
from unet.evaluation import predict_masks, predict_probabilities
from unet.faults import DRILL_ENV, drill
from unet.inference.model import postprocess
from unet.inference.output import PIPELINE_SCHEMA, PartAssembler
from unet.inference.plan import Chunk, DoneIndex, PlanWriter, plan_inputs, subtract_ranges
from unet.inference.read import read_and_decode
from unet.models import build_model
from unet.phantoms import generate
from unet.postprocess import final_mask
from unet.runtime import UsageError
from unet.transforms import normalize, preprocess, quantize_probability, resize_probability

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = (32, 32)


# =============================================================================================
# Corpus: every kind of input, with what the output must say about it
# =============================================================================================

def png(array: np.ndarray | Image.Image, fmt: str = "PNG", **save) -> bytes:
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def gray(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels with almost no data (decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """Stored 20 high x 40 wide with EXIF orientation 6 (rotate 90 deg): shown 40 high x 20 wide."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return png(gray(20, 40, 3), "JPEG", exif=exif.tobytes())


def awkward_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Valid images in awkward encodings: name -> (bytes, expected (height, width))."""
    g = gray(24, 30, 1)
    rgb = np.stack([g, g[::-1], 255 - g], -1)
    alpha = Image.fromarray(gray(24, 30, 2))
    return {
        "gray.png": (png(g), (24, 30)),
        "rgb.jpg": (png(rgb, "JPEG"), (24, 30)),
        "rgba.png": (png(Image.merge("RGBA", [*Image.fromarray(rgb).split(), alpha])), (24, 30)),
        "la.png": (png(Image.merge("LA", [Image.fromarray(g), alpha])), (24, 30)),
        "palette.png": (png(Image.fromarray(rgb).quantize(16)), (24, 30)),
        "sixteen.png": (png(g.astype(np.uint16) * 257), (24, 30)),
        "sixteen.tif": (png(g.astype(np.uint16) * 257, "TIFF"), (24, 30)),
        "float.tif": (png(g.astype(np.float32) / 255, "TIFF"), (24, 30)),
        "cmyk.jpg": (png(Image.fromarray(rgb).convert("CMYK"), "JPEG"), (24, 30)),
        "exif_rotated.jpg": (exif_rotated_jpeg(), (40, 20)),
        "one_pixel.png": (png(gray(1, 1)), (1, 1)),
        "wide.bmp": (png(gray(3, 500)), (3, 500)),
        "tall.png": (png(gray(500, 3)), (500, 3)),
        "UPPER.PNG": (png(g), (24, 30)),
    }


def broken_images() -> dict[str, tuple[bytes, str]]:
    """Broken inputs: name -> (bytes, substring the error message must contain)."""
    good = png(gray(24, 30))
    return {
        "zero.png": (b"", "empty file"),
        "text.png": (b"this is not an image at all", "not a readable image"),
        "truncated.png": (good[: len(good) // 2], "cannot decode"),
        "bomb.png": (header_bomb(), "decompression bomb"),
    }


def phantom_images(n: int = 6) -> dict[str, np.ndarray]:
    return {f"phantom_{i}.png": p.image for i, p in enumerate(generate(n, seed=1, size=(40, 48)))}


def make_tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> None:
    """members: (name, data or None, tar type)."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "a.png"
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def build_corpus(root: Path) -> dict[str, dict]:
    """Write the mixed corpus under ``root``; return image_id -> expectation."""
    expected: dict[str, dict] = {}
    for name, (data, size) in awkward_images().items():
        (root / "awkward").mkdir(parents=True, exist_ok=True)
        (root / "awkward" / name).write_bytes(data)
        expected[f"awkward/{name}"] = {"status": "ok", "size": size}
    for name, (data, message) in broken_images().items():
        (root / "broken").mkdir(parents=True, exist_ok=True)
        (root / "broken" / name).write_bytes(data)
        expected[f"broken/{name}"] = {"status": "error", "message": message}
    for name, image in phantom_images().items():
        (root / "phantoms" / "deeper").mkdir(parents=True, exist_ok=True)
        (root / "phantoms" / "deeper" / name).write_bytes(png(image))
        expected[f"phantoms/deeper/{name}"] = {"status": "ok", "size": image.shape}
    (root / "notes.txt").write_text("not an input: other suffixes are ignored")

    (root / "shards").mkdir()
    a, b = png(gray(16, 20, 5)), png(gray(18, 14, 6), "JPEG")
    make_tar(root / "shards" / "shard-000.tar", [
        ("a.png", a, tarfile.REGTYPE), ("a.json", b"{}", tarfile.REGTYPE), ("b.jpg", b, tarfile.REGTYPE),
        ("dir", None, tarfile.DIRTYPE), ("../escape.png", a, tarfile.REGTYPE), ("/abs.png", a, tarfile.REGTYPE),
        ("link.png", None, tarfile.SYMTYPE), ("garbage.png", b"\x00garbage", tarfile.REGTYPE),
        ("a.png", a, tarfile.REGTYPE),
    ])
    tar_expect = {"a.png": ("ok", (16, 20)), "b.jpg": ("ok", (18, 14)), "../escape.png": ("error", "'..'"),
                  "/abs.png": ("error", "absolute"), "link.png": ("error", "symbolic link"),
                  "garbage.png": ("error", "not a readable image")}
    for name, (status, what) in tar_expect.items():
        expected[f"shards/shard-000.tar/{name}"] = ({"status": "ok", "size": what} if status == "ok"
                                                    else {"status": "error", "message": what})
    # The duplicate a.png gets the same image_id; it is counted by `duplicates` below.
    (root / "shards" / "broken.tar").write_bytes(b"definitely not a tar archive" * 30)
    expected["shards/broken.tar"] = {"status": "error", "message": "unreadable tar archive"}
    make_tar(root / "shards" / "empty.tar", [("readme.txt", b"no images here", tarfile.REGTYPE)])

    (root / "tables").mkdir()
    images = [png(gray(10 + i, 12, 10 + i)) for i in range(5)] + [None, b"GIF89a nope"]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "note": [str(i) for i in range(7)]}),
                   root / "tables" / "t.parquet", row_group_size=3)
    for i in range(5):
        expected[f"tables/t.parquet#{i}"] = {"status": "ok", "size": (10 + i, 12)}
    expected["tables/t.parquet#5"] = {"status": "error", "message": "is null"}
    expected["tables/t.parquet#6"] = {"status": "error", "message": "not a readable image"}
    return expected


DUPLICATE_IDS = {"shards/shard-000.tar/a.png": 2}  # the tar holds a.png twice: one ok, one error row


def expected_rows(expected: dict[str, dict]) -> int:
    return len(expected) + sum(n - 1 for n in DUPLICATE_IDS.values())


# =============================================================================================
# Fixtures
# =============================================================================================

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny UNet with a sharpened head, so masks are neither empty nor full and far from 0.5."""
    torch.manual_seed(0)
    model = build_model("unet", channels=(4, 8, 16)).eval()
    with torch.no_grad():
        model.head.weight.mul_(40.0)
    dest = tmp_path_factory.mktemp("model") / "tiny"
    return save_artifact(model, dest, architecture="unet", model_kwargs={"channels": [4, 8, 16]},
                         input_size=INPUT_SIZE, normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)


# The post-processing stored in the image-head model's artifact: a gate above every lesion
# probability of this untrained head (about 2/3), so by default every mask is emptied.
HEAD_POSTPROCESS = {"gate_threshold": 0.99, "min_area": 0.01, "largest_component": True, "tta": True}


def tiny_head_model() -> torch.nn.Module:
    """Seeded so that the phantoms' masks cover about half of each image, in several regions."""
    torch.manual_seed(3)
    model = build_model("unet", channels=(4, 8), image_classes=3).eval()
    with torch.no_grad():
        model.head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def head_model_dir(tmp_path_factory) -> str:
    """A tiny UNet with an image-level head (benign/malignant/normal) and calibrated post-processing."""
    dest = tmp_path_factory.mktemp("model") / "tiny-head"
    return save_artifact(tiny_head_model(), dest, architecture="unet",
                         model_kwargs={"channels": [4, 8], "image_classes": 3}, input_size=INPUT_SIZE,
                         normalization={"mean": 0.5, "std": 0.25}, threshold=0.5, postprocess=HEAD_POSTPROCESS)


@pytest.fixture(scope="module")
def head_corpus(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Phantom PNGs (image_id -> pixels) and one file that is not an image."""
    root = tmp_path_factory.mktemp("head-corpus")
    images = {f"{p.id}.png": p.image for p in generate(6, seed=4, size=(40, 48))}
    for name, image in images.items():
        (root / name).write_bytes(png(image))
    (root / "broken.png").write_bytes(b"not an image")
    return root, images


def read_output(uri: str, **kw) -> pd.DataFrame:
    # skip_instance_cache: s3fs caches listings per instance; a reread must see new parts.
    options = {**storage.fsspec_options(uri), "skip_instance_cache": True} if storage.is_s3(uri) else None
    return pd.read_parquet(uri, storage_options=options, **kw)


def part_files(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def run_record(out: Path) -> dict:
    (path,) = (out / "_runs").glob("run-*.json")
    return json.loads(path.read_text())


def direct_prediction(model_dir, image: np.ndarray, *, tta: bool) -> tuple[np.ndarray, float, float]:
    """(probability at the original size, p(lesion), p(malignant)) from the model itself."""
    loaded = load_artifact(model_dir)
    x = torch.from_numpy(preprocess(image, INPUT_SIZE, 0.5, 0.25)[None])
    with torch.inference_mode():
        prob, class_prob = loaded.model.predict_proba(x, tta=tta)
    benign, malignant, normal = class_prob[0].tolist()  # unet.shards.CLASSES order
    return resize_probability(quantize_probability(prob[0, 0].numpy()), image.shape), 1.0 - normal, malignant


def config(model_dir, input, output, **kw) -> inf.InferenceConfig:
    kw.setdefault("chunk_size", 4)
    kw.setdefault("batch_size", 4)
    return inf.InferenceConfig(model=str(model_dir), input=str(input), output=str(output), **kw)


@pytest.fixture(scope="module")
def corpus_run(ray_local, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = build_corpus(root)
    out = tmp_path_factory.mktemp("out") / "masks"
    summary = inf.run_inference(config(model_dir, root, out))
    return root, expected, out, summary, read_output(str(out))


# =============================================================================================
# Decoding (no Ray)
# =============================================================================================

@pytest.mark.parametrize("name", sorted(awkward_images()))
def test_awkward_images_decode_to_gray_at_their_shown_size(name):
    data, size = awkward_images()[name]
    image = inf.decode_image(data)
    assert image.dtype == np.uint8 and image.shape == size


def test_sixteen_bit_scales_to_the_same_pixels_as_eight_bit():
    g = gray(24, 30, 1)
    assert np.array_equal(inf.decode_image(png(g.astype(np.uint16) * 257)), g)
    assert np.array_equal(inf.decode_image(png(g.astype(np.uint16) * 257, "TIFF")), g)
    # A 16-bit image using only the low byte stays dark, as the scanner wrote it.
    assert inf.decode_image(png(g.astype(np.uint16))).max() <= 1


def test_exif_orientation_is_applied():
    stored = gray(20, 40, 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = inf.decode_image(png(stored, exif=exif.tobytes()))  # PNG keeps pixels exact
    assert np.array_equal(decoded, np.rot90(stored, k=-1))


@pytest.mark.parametrize("name", sorted(broken_images()))
def test_broken_inputs_raise_decode_error_with_a_clear_message(name):
    data, message = broken_images()[name]
    with pytest.raises(inf.DecodeError, match=message):
        inf.decode_image(data)


def test_pixel_limit_is_configurable_and_leaves_pil_global_alone():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(inf.DecodeError, match="over the limit of 100"):
        inf.decode_image(png(gray(11, 10)), max_pixels=100)
    assert inf.decode_image(png(gray(10, 10)), max_pixels=100).shape == (10, 10)
    assert Image.MAX_IMAGE_PIXELS == before


def test_tar_reader_turns_every_member_into_one_row_or_skips_side_files(tmp_path):
    expected = build_corpus(tmp_path)
    plan = pa.table({"chunk": ["c"], "seq": [0], "kind": ["tar"], "rel": ["shards/shard-000.tar"],
                     "row_start": [0], "row_end": [0]})
    fs, root = storage.get_filesystem(str(tmp_path))
    batches = list(read_and_decode(plan, fs=fs, root=root, root_uri=root, input_size=INPUT_SIZE,
                                       image_column="image", id_column=None, max_pixels=10**6,
                                       max_bytes=10**6))
    ids = [i for b in batches for i in b["image_id"]]
    seqs = [int(s) for b in batches for s in b["_seq"]]
    errors = dict(zip(ids, (e for b in batches for e in b["error"])))
    tar_ids = {k for k in expected if k.startswith("shards/shard-000.tar/")}
    assert set(ids[:-1]) == tar_ids and len(ids[:-1]) == len(tar_ids) + 1  # + the duplicate a.png
    assert seqs[-1] == -1 and int(batches[-1]["_n"][-1]) == len(ids) - 1  # end marker with the count
    assert "duplicate tar member" in errors["shards/shard-000.tar/a.png"]
    for image_id in tar_ids:
        if expected[image_id]["status"] == "error":
            assert expected[image_id]["message"] in errors[image_id]


def test_mask_statistics_bbox_is_half_open_and_confidence_follows_the_rule():
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True
    prob = np.where(mask, 0.9, 0.2).astype(np.float32)
    stats = inf.mask_statistics(mask, prob)
    assert stats["bbox"] == [2, 1, 5, 3] and stats["tumour_pixels"] == 6
    assert stats["tumour_fraction"] == pytest.approx(6 / 48) and stats["confidence"] == pytest.approx(0.9)
    empty = inf.mask_statistics(np.zeros((6, 8), bool), prob)
    assert empty["bbox"] is None and empty["confidence"] == pytest.approx(0.9)  # max prob when empty


def test_largest_component_keeps_only_the_biggest_region():
    prob = np.zeros((10, 10), np.float32)
    prob[0:2, 0:2] = 0.9
    prob[5:9, 5:9] = 0.9
    mask, _ = inf.postprocess_probability(prob, (10, 10), 0.5, largest_component=True)
    assert mask.sum() == 16 and mask[5:9, 5:9].all()


def test_postprocess_gates_on_lesion_probability_and_leaves_error_rows_null():
    prob = np.zeros((4, 8, 8), np.float32)
    prob[:, 2:6, 2:6] = 0.9
    batch = {"_chunk": np.array(["c"] * 4), "_seq": np.arange(4), "_n": np.full(4, -1),
             "image_id": np.array(["low", "high", "broken", "headless"]),
             "source_uri": np.array(["u"] * 4), "error": np.array(["", "", "not an image", ""]),
             "height": np.full(4, 8), "width": np.full(4, 8), "prob": prob,
             "lesion_probability": np.array([0.2, 0.9, np.nan, np.nan], np.float32),
             "malignant_probability": np.array([0.1, 0.6, np.nan, np.nan], np.float32)}
    rule = {"threshold": 0.5, "gate_threshold": 0.5, "min_area": 0.0, "largest_component": False}
    rows = {r["image_id"]: r for r in postprocess(batch, mask_rule=rule, model_id="m").to_pylist()}
    # Gated: an empty mask, but the image probabilities are still reported.
    assert rows["low"]["tumour_pixels"] == 0 and rows["low"]["bbox"] is None
    assert rows["low"]["lesion_probability"] == pytest.approx(0.2)
    assert rows["low"]["malignant_probability"] == pytest.approx(0.1)
    assert rows["high"]["tumour_pixels"] == 16 and rows["high"]["lesion_probability"] == pytest.approx(0.9)
    assert rows["broken"]["status"] == "error" and rows["broken"]["lesion_probability"] is None
    assert rows["broken"]["malignant_probability"] is None
    # No image head: nothing to gate on, so the mask stays; the probabilities are null, not NaN.
    assert rows["headless"]["tumour_pixels"] == 16 and rows["headless"]["lesion_probability"] is None
    assert rows["headless"]["malignant_probability"] is None


@pytest.mark.parametrize("tta", [False, True])
def test_predictor_adds_image_probabilities_from_the_head_and_nan_elsewhere(model_dir, tta):
    from unet.settings import ModelSettings

    settings = ModelSettings("unet", INPUT_SIZE, 0.5, 0.25, tta=tta)
    x = np.stack([gray(*INPUT_SIZE, seed=i) for i in range(3)])
    batch = {"x": x, "error": np.array(["", "broken", ""]), "_seq": np.array([0, 1, 2])}
    threads = torch.get_num_threads()  # the actor sets torch's thread count; keep this process's
    head = tiny_head_model()
    out = inf.Predictor(head, settings=settings, use_gpu=False, num_threads=threads)(dict(batch))
    inputs = torch.from_numpy(normalize(x[[0, 2]], 0.5, 0.25)[:, None])
    with torch.inference_mode():
        prob, class_prob = head.predict_proba(inputs, tta=tta)
    assert out["lesion_probability"].dtype == out["malignant_probability"].dtype == np.float32
    np.testing.assert_allclose(out["lesion_probability"][[0, 2]], 1 - class_prob[:, 2].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["malignant_probability"][[0, 2]], class_prob[:, 1].numpy(), atol=1e-5)
    # Probabilities leave the actor as uint8 round(p * 255) (a quarter of float32's bytes).
    assert out["prob"].dtype == np.uint8
    assert np.abs(out["prob"][[0, 2]].astype(int) - quantize_probability(prob[:, 0].numpy())).max() <= 1
    assert np.isnan(out["lesion_probability"][1]) and np.isnan(out["malignant_probability"][1])
    assert not out["prob"][1].any()

    headless = load_artifact(model_dir).model
    out = inf.Predictor(headless, settings=settings, use_gpu=False, num_threads=threads)(dict(batch))
    assert np.isnan(out["lesion_probability"]).all() and np.isnan(out["malignant_probability"]).all()


def test_postprocess_flags_default_to_the_artifact_and_override_it():
    from jobs.infer import build_parser

    base = ["--model", "m", "--input", "i", "--output", "o"]
    args = build_parser().parse_args(base)
    assert (args.threshold, args.tta, args.gate_threshold, args.min_area, args.largest_component) == (
        None, None, None, None, None)
    args = build_parser().parse_args(base + ["--no-tta", "--largest-component", "--gate-threshold", "0",
                                             "--min-area", "0.002", "--threshold", "0.4"])
    assert (args.threshold, args.tta, args.gate_threshold, args.min_area, args.largest_component) == (
        0.4, False, 0.0, 0.002, True)
    args = build_parser().parse_args(base + ["--tta", "--no-largest-component"])
    assert (args.tta, args.largest_component) == (True, False)


@pytest.mark.parametrize("bad, message", [
    ({"gate_threshold": 1.0}, "gate_threshold must be a probability in"),
    ({"gate_threshold": -0.1}, "gate_threshold must be a probability in"),
    ({"min_area": 1.5}, "min_area must be a fraction of the image"),
    ({"tta": "yes"}, "tta must be true or false"),
])
def test_bad_postprocess_overrides_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        inf.InferenceConfig(model="m", input="i", output="o", **bad)


def test_a_gate_on_a_model_without_an_image_head_is_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a model with an image-level head.*--gate-threshold 0"):
        inf.run_inference(config(model_dir, tmp_path, tmp_path / "out", gate_threshold=0.5))
    assert not (tmp_path / "out").exists()


def pipeline_rows(chunk: str, seqs: list[int], n: int = -1) -> pa.Table:
    rows = [{"_chunk": chunk, "_seq": s, "_n": n if s < 0 else -1, "image_id": f"{chunk}/{s}",
             "source_uri": f"file:///{chunk}/{s}", "status": "ok", "model_id": "m",
             "processed_at": datetime.datetime.now(datetime.timezone.utc)} for s in seqs]
    return pa.Table.from_pylist(rows, schema=PIPELINE_SCHEMA)


def test_part_assembler_writes_each_chunk_once_dropping_retried_duplicates():
    chunks = {"img": Chunk("img", "image", 3, None), "tar": Chunk("tar", "tar", None, "x.tar")}
    written = []
    assembler = PartAssembler(chunks, lambda chunk, table: written.append((chunk.key, table["_seq"].to_pylist())))
    assembler.add(pa.concat_tables([pipeline_rows("img", [1, 0]), pipeline_rows("tar", [0])]))
    assert written == [] and sorted(assembler.incomplete()) == ["img (2/3 rows)", "tar (1/? rows)"]
    assembler.add(pipeline_rows("img", [1, 2]))  # position 1 again: a retried task
    assembler.add(pipeline_rows("tar", [1, -1], n=2))  # the tar's end marker: 2 rows
    assembler.add(pipeline_rows("img", [2]))  # after the part was written: dropped
    assert written == [("img", [0, 1, 2]), ("tar", [0, 1])]
    assert assembler.duplicates == 2 and assembler.incomplete() == []


def test_incremental_plan_skips_done_units_even_when_the_chunk_size_changed(tmp_path):
    root = tmp_path / "in"
    (root / "masks").mkdir(parents=True)  # the output folder, inside the input: never an input
    for name in ("a.png", "b.png", "c.PNG"):
        (root / name).write_bytes(png(gray(4, 4)))
    pq.write_table(pa.table({"image": pa.array([png(gray(3, 3))] * 10, pa.binary())}), root / "t.parquet")
    pq.write_table(pa.table({"x": [1]}), root / "masks" / "part-0.parquet")
    fs, path = storage.get_filesystem(str(root))
    done = DoneIndex(str(tmp_path))
    done.add(["a.png", "t.parquet#rows=0-4"])  # an earlier run with chunk size 4 did rows 0-3
    cfg = inf.InferenceConfig(model="unused", input=str(root), output=str(root / "masks"), chunk_size=3,
                              incremental=True)
    plan = PlanWriter(fs, str(tmp_path / "plan"), str(tmp_path / "plan"))
    chunks, planned, skipped = plan_inputs(cfg, fs, path, path, False, done, plan)
    rows = pq.read_table(plan.files[0]).to_pylist()
    assert sorted((r["kind"], r["rel"], r["row_start"], r["row_end"]) for r in rows) == [
        ("image", "b.png", 0, 0), ("image", "c.PNG", 0, 0),
        ("parquet", "t.parquet", 4, 7), ("parquet", "t.parquet", 7, 10)]
    assert (planned, skipped) == (4, 2) and len(chunks) == 3


def test_subtract_finds_row_ranges_not_yet_done():
    assert subtract_ranges((0, 10), []) == [(0, 10)]
    assert subtract_ranges((0, 10), [(0, 4), (4, 8)]) == [(8, 10)]
    assert subtract_ranges((0, 10), [(2, 3), (5, 12)]) == [(0, 2), (3, 5)]
    assert subtract_ranges((0, 10), [(0, 10)]) == []


def test_decode_and_postprocess_tasks_do_not_import_torch():
    """Ray starts fresh worker processes for the read/decode and post-processing tasks; importing
    torch there costs seconds of CPU per process, taken from the model actors (measured: the
    pipeline at half speed when a module-level import slipped in)."""
    code = ("import sys, unet.inference.read, unet.inference.model, unet.inference.plan, "
            "unet.inference.output; print(sorted(m for m in ('torch', 'ray.train') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "jobs.infer", "--help"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--input", "--output", "--incremental", "--workers", "--gpus-per-worker",
                 "--image-column", "--id-column", "--chunk-size", "--tta", "--largest-component"):
        assert flag in out.stdout


def test_cli_bad_arguments_exit_2_with_one_line(capsys):
    from jobs.infer import main
    from unet.cli import run_main

    code = run_main(main, ["--model", "m", "--input", "i", "--output", "o", "--chunk-size", "0"])
    assert code == 2 and "chunk_size must be a positive integer" in capsys.readouterr().err


# =============================================================================================
# The pipeline on a local Ray
# =============================================================================================

@pytest.mark.slow
def test_every_input_is_accounted_exactly_once(corpus_run):
    _, expected, out, summary, df = corpus_run
    counts = df["image_id"].value_counts().to_dict()
    assert set(counts) == set(expected)
    assert {k: v for k, v in counts.items() if v > 1} == DUPLICATE_IDS
    assert len(df) == expected_rows(expected) == summary.rows_ok + summary.rows_error
    for image_id, want in expected.items():
        rows = df[df["image_id"] == image_id]
        if image_id in DUPLICATE_IDS:
            assert sorted(rows["status"]) == ["error", "ok"]
            continue
        row = rows.iloc[0]
        assert row["status"] == want["status"], (image_id, row["error"])
        if want["status"] == "error":
            assert want["message"] in row["error"], (image_id, row["error"])
            assert row["mask_png"] is None and np.isnan(row["tumour_pixels"])
        else:
            assert pd.isna(row["error"])
    # 4 images per part (the last one 2), one part per tar (the empty tar's part has no rows) and
    # per 4-row range of the Parquet table.
    n_files = sum(1 for k in expected if "/" in k and not k.startswith(("shards/", "tables/")))
    assert summary.parts_written == len(part_files(out)) == -(-n_files // 4) + 3 + 2
    assert not (out / "_tmp").exists()


@pytest.mark.slow
def test_masks_decode_at_the_original_size_with_consistent_statistics(corpus_run):
    _, expected, _, _, df = corpus_run
    ok = df[df["status"] == "ok"]
    assert len(ok) == sum(1 for v in expected.values() if v["status"] == "ok")
    for _, row in ok.iterrows():
        mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert mask.shape == (row["height"], row["width"]) == tuple(expected[row["image_id"]]["size"])
        assert row["tumour_pixels"] == (mask == 255).sum()
        assert row["tumour_fraction"] == pytest.approx(row["tumour_pixels"] / mask.size, rel=1e-6)
        if row["tumour_pixels"]:
            x0, y0, x1, y1 = row["bbox"]
            assert mask[y0:y1, x0:x1].sum() == mask.sum() and 0 <= row["confidence"] <= 1
    # The sharpened model gives real masks: neither all empty nor all full.
    assert 0 < ok["tumour_fraction"].mean() < 1


@pytest.mark.slow
def test_output_has_the_exact_schema_and_reads_in_pandas_duckdb_pyarrow(corpus_run):
    import duckdb

    _, expected, out, _, df = corpus_run
    for part in part_files(out):
        assert pq.read_schema(part).remove_metadata() == inf.OUTPUT_SCHEMA
    table = pads.dataset(str(out), format="parquet").to_table()
    assert table.schema.remove_metadata() == inf.OUTPUT_SCHEMA and table.num_rows == len(df)
    con = duckdb.connect()
    n, ok, first = con.execute(
        f"select count(*), count(*) filter (where status = 'ok'), min(processed_at) "
        f"from read_parquet('{out}/*.parquet')").fetchone()
    assert n == len(df) == expected_rows(expected) and ok == (df["status"] == "ok").sum()
    assert first.tzinfo is not None
    assert str(df["processed_at"].dtype) == "datetime64[us, UTC]"
    assert df["model_id"].nunique() == 1 and df["model_id"].iloc[0].startswith("unet-")


@pytest.mark.slow
def test_same_masks_as_calling_the_model_directly_and_as_evaluation(corpus_run, model_dir):
    _, _, _, _, df = corpus_run
    loaded = load_artifact(model_dir)
    images = phantom_images()
    # jobs.evaluate's (and jobs.calibrate's) masks are the job's, pixel for pixel.
    evaluated = predict_masks(predict_probabilities(loaded.model, list(images.values()), loaded.settings),
                              loaded.settings)
    for (name, image), from_evaluation in zip(images.items(), evaluated, strict=True):
        x = torch.from_numpy(preprocess(image, INPUT_SIZE, 0.5, 0.25)[None])
        with torch.inference_mode():
            prob = torch.sigmoid(loaded.model(x))[0, 0].numpy()
        want = resize_probability(quantize_probability(prob), image.shape) >= 0.5
        row = df[df["image_id"] == f"phantoms/deeper/{name}"].iloc[0]
        got = np.asarray(Image.open(io.BytesIO(row["mask_png"]))) == 255
        assert np.array_equal(got, want), name
        assert np.array_equal(got, from_evaluation), name


@pytest.mark.slow
def test_model_without_an_image_head_gives_null_image_probabilities(corpus_run):
    _, _, out, _, df = corpus_run
    assert df["lesion_probability"].isna().all() and df["malignant_probability"].isna().all()
    assert run_record(out)["postprocess"] == {"threshold": 0.5, "gate_threshold": None, "min_area": 0.0,
                                              "largest_component": False, "tta": False}


@pytest.mark.slow
def test_artifact_postprocess_is_the_default_and_its_gate_empties_every_mask(ray_local, head_model_dir,
                                                                             head_corpus, tmp_path):
    root, images = head_corpus
    out = tmp_path / "out"
    summary = inf.run_inference(config(head_model_dir, root, out))
    df = read_output(str(out)).set_index("image_id")
    assert summary.rows_ok == len(images) and summary.rows_error == 1
    assert run_record(out)["postprocess"] == {"threshold": 0.5, **HEAD_POSTPROCESS}
    assert df.loc["broken.png", "status"] == "error"
    assert df.loc["broken.png", ["lesion_probability", "malignant_probability"]].isna().all()
    for name, image in images.items():
        row = df.loc[name]
        prob, lesion, malignant = direct_prediction(head_model_dir, inf.decode_image((root / name).read_bytes()),
                                                    tta=True)
        assert 0 <= row["lesion_probability"] <= 1 and 0 <= row["malignant_probability"] <= 1
        assert row["lesion_probability"] == pytest.approx(lesion, abs=1e-4)
        assert row["malignant_probability"] == pytest.approx(malignant, abs=1e-4)
        # The premise: the gate is above every lesion probability, and it is the gate, not the
        # model, that empties the masks.
        assert lesion < HEAD_POSTPROCESS["gate_threshold"]
        assert final_mask(prob, threshold=0.5, min_area=0.01, largest_component=True).any()
        assert row["tumour_pixels"] == 0 and row["bbox"] is None
        assert not np.asarray(Image.open(io.BytesIO(row["mask_png"]))).any()


@pytest.mark.slow
def test_flags_override_the_artifact_postprocess_and_the_run_record_shows_it(ray_local, head_model_dir,
                                                                             head_corpus, tmp_path):
    from jobs.infer import main

    root, images = head_corpus
    out = tmp_path / "out"
    argv = ["--model", str(head_model_dir), "--input", str(root), "--output", str(out), "--chunk-size", "4",
            "--batch-size", "4", "--gate-threshold", "0", "--no-tta", "--threshold", "0.45"]
    assert main(argv) == 0
    record = run_record(out)
    # Overridden: gate (0 = off, recorded as no gate), tta, threshold; the rest is the artifact's.
    assert record["postprocess"] == {"threshold": 0.45, "gate_threshold": None, "min_area": 0.01,
                                     "largest_component": True, "tta": False}
    assert record["config"]["gate_threshold"] == 0.0 and record["config"]["largest_component"] is None
    df = read_output(str(out)).set_index("image_id")
    assert pd.isna(df.loc["broken.png", "lesion_probability"])
    for name in images:
        image = inf.decode_image((root / name).read_bytes())
        prob, lesion, malignant = direct_prediction(head_model_dir, image, tta=False)
        row = df.loc[name]
        assert row["lesion_probability"] == pytest.approx(lesion, abs=1e-4)
        assert row["malignant_probability"] == pytest.approx(malignant, abs=1e-4)
        want = final_mask(prob, threshold=0.45, min_area=0.01, largest_component=True)
        got = np.asarray(Image.open(io.BytesIO(row["mask_png"]))) == 255
        assert np.array_equal(got, want), name
    assert (df["tumour_pixels"] > 0).sum() == len(images)  # without the gate, real masks come back

    # An incremental run with other post-processing would mix masks made two ways: refused, naming
    # the setting (tests/test_infer_inputs.py covers the model, the input root and each setting).
    with pytest.raises(UsageError, match=r"other settings \(.*min_area 0.01, this run 0.02; .*part part-"):
        inf.run_inference(config(head_model_dir, root, out, incremental=True, min_area=0.02))


@pytest.mark.slow
def test_killed_actor_mid_run_still_gives_exactly_once_output(ray_local, model_dir, tmp_path, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    for i, p in enumerate(generate(20, seed=2, size=(24, 24))):
        (root / f"img_{i:02d}.png").write_bytes(png(p.image))
    make_tar(root / "shard.tar", [(f"m{i}.png", png(gray(12, 12, i)), tarfile.REGTYPE) for i in range(6)])
    marker = tmp_path / "crashed"
    # The model actor exits on its 3rd batch (after producing output for two); Ray restarts it and
    # retries the batch. Exactly one crash: the marker file remembers it happened.
    monkeypatch.setenv(DRILL_ENV, drill("infer", at=3, marker=marker))
    summary = inf.run_inference(config(model_dir, root, tmp_path / "out", batch_size=2, chunk_size=5))
    assert marker.exists()
    df = read_output(str(tmp_path / "out"))
    want = {f"img_{i:02d}.png" for i in range(20)} | {f"shard.tar/m{i}.png" for i in range(6)}
    assert sorted(df["image_id"]) == sorted(want)
    assert (df["status"] == "ok").all() and summary.rows_ok == 26 and summary.parts_written == 5


@pytest.mark.slow
def test_incremental_runs_process_only_new_inputs_and_complete_interrupted_ones(ray_local, model_dir, tmp_path):
    from jobs.infer import main

    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    images = list(generate(13, seed=3, size=(20, 24)))
    for p in images[:10]:
        (root / f"{p.id}.png").write_bytes(png(p.image))
    argv = ["--model", str(model_dir), "--input", str(root), "--output", str(out), "--chunk-size", "4",
            "--batch-size", "4"]
    assert main(argv) == 0
    first = {p.name: p.read_bytes() for p in part_files(out)}
    assert len(first) == 3

    # The archive grows (three images and a tar arrive) and an earlier run was interrupted
    # (simulated: one of its parts never got written). One incremental run processes exactly the
    # new inputs and the lost ones; the surviving parts are left untouched.
    for p in images[10:]:
        (root / "new" / f"{p.id}.png").parent.mkdir(exist_ok=True)
        (root / "new" / f"{p.id}.png").write_bytes(png(p.image))
    make_tar(root / "new" / "late.tar", [("x.png", png(gray(9, 9)), tarfile.REGTYPE)])
    victim = sorted(first)[0]
    lost = set(pq.read_table(out / victim, columns=["image_id"]).column(0).to_pylist())
    (out / victim).unlink()
    summary = inf.run_inference(config(model_dir, root, out, incremental=True))
    assert (summary.units_planned, summary.units_skipped) == (4 + len(lost), 10 - len(lost))
    assert {p.name: p.read_bytes() for p in part_files(out) if p.name in first} == {
        k: v for k, v in first.items() if k != victim}
    df = read_output(str(out))
    assert len(df) == 14 and df["image_id"].is_unique

    # A full rerun with another chunk size re-plans everything and first removes the parts of the
    # old layout, so every input is still there exactly once.
    summary = inf.run_inference(config(model_dir, root, out, chunk_size=5))
    df = read_output(str(out))
    assert len(df) == 14 and df["image_id"].is_unique
    assert summary.parts_deleted >= 1 and len(part_files(out)) == summary.parts_written == 3 + 1
    assert len(list((out / "_runs").glob("run-*.json"))) == 3


@pytest.mark.slow
def test_parquet_without_the_image_column_fails_fast_naming_the_file(ray_local, model_dir, tmp_path):
    pq.write_table(pa.table({"pixels": pa.array([b"x"], pa.binary())}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet has no column 'image'.*\['pixels'\]"):
        inf.run_inference(config(model_dir, tmp_path / "t.parquet", tmp_path / "out"))


@pytest.mark.slow
def test_workers_leaving_no_cpu_for_reading_are_refused_naming_the_step(ray_local, model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(gray(12, 12)))
    # 2 x 0.8 leaves 0.4 CPU, and reading/decoding and post-processing tasks ask for 0.5 each: the
    # run would wait forever, so it is refused before it starts.
    with pytest.raises(UsageError, match=r"2 x --cpus-per-worker 0.8 = 1.6 CPUs for the model, plus 0.5 for "
                                         r"reading and decoding, but the Ray cluster has 2 CPUs"):
        inf.run_inference(config(model_dir, tmp_path / "in", tmp_path / "out", workers=2, cpus_per_worker=0.8))
    assert not (tmp_path / "out").exists() or not part_files(tmp_path / "out")


@pytest.mark.slow
def test_fractional_workers_that_fill_the_cpus_still_finish(model_dir, tmp_path):
    """2 actors x 0.75 CPU + 0.5 for the other steps = exactly 2 CPUs, which the resource check
    allows: every step must then find its share beside the actors (once, with Ray Data's
    repartition asking for a whole CPU, such a run passed the check and waited forever). Its own
    2-CPU Ray in a subprocess, with a timeout, so a hang fails."""
    root = tmp_path / "in"
    root.mkdir()
    for i, p in enumerate(generate(12, seed=5, size=(24, 24))):
        (root / f"img_{i:02d}.png").write_bytes(png(p.image))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.infer", "--model", str(model_dir), "--input", str(root),
         "--output", str(tmp_path / "out"), "--workers", "2", "--cpus-per-worker", "0.75",
         "--num-cpus", "2", "--chunk-size", "4", "--batch-size", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = read_output(str(tmp_path / "out"))
    assert sorted(df["image_id"]) == [f"img_{i:02d}.png" for i in range(12)] and (df["status"] == "ok").all()


# =============================================================================================
# S3
# =============================================================================================

@pytest.mark.slow
def test_s3_input_and_output_exactly_once_and_incremental(ray_local, model_dir, s3_env, tmp_path):
    bucket = s3_env
    files: dict[str, bytes] = {}
    for name, (data, _) in list(awkward_images().items())[:5]:
        files[f"scans/a/{name}"] = data
    for name, (data, _) in broken_images().items():
        files[f"scans/b/{name}"] = data
    make_tar(tmp_path / "s.tar", [("m.png", png(gray(8, 8)), tarfile.REGTYPE), ("../x", b"", tarfile.REGTYPE)])
    files["scans/shards/s.tar"] = (tmp_path / "s.tar").read_bytes()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"png": pa.array([png(gray(6, 7)), png(gray(7, 6))], pa.binary()),
                             "case": ["case-1", "case-2"]}), sink)
    files["scans/table.parquet"] = sink.getvalue().to_pybytes()
    for key, data in files.items():
        storage.write_bytes(f"{bucket}/{key}", data)

    out = f"{bucket}/masks"
    cfg = dict(image_column="png", id_column="case")
    summary = inf.run_inference(config(model_dir, f"{bucket}/scans", out, **cfg))
    df = read_output(out)
    want = ({k[len("scans/"):] for k in files if not k.endswith((".tar", ".parquet"))}
            | {"shards/s.tar/m.png", "shards/s.tar/../x", "case-1", "case-2"})
    assert sorted(df["image_id"]) == sorted(want)
    assert (df["status"] == "error").sum() == len(broken_images()) + 1 == summary.rows_error
    assert df.set_index("image_id").loc["case-2", "source_uri"] == f"{bucket}/scans/table.parquet#row=1"
    assert df.set_index("image_id").loc["shards/s.tar/../x", "error"].startswith("unsafe tar member path")

    storage.write_bytes(f"{bucket}/scans/a/late.png", png(gray(5, 5)))
    summary = inf.run_inference(config(model_dir, f"{bucket}/scans", out, incremental=True, **cfg))
    assert summary.units_planned == 1 and summary.rows_ok == 1
    df = read_output(out)
    assert len(df) == len(want) + 1 and df["image_id"].is_unique
    runs = list(storage.iter_files(f"{out}/_runs"))
    assert len(runs) == 2 and os.environ["AWS_SECRET_ACCESS_KEY"] not in storage.read_bytes(runs[0]).decode()
    assert json.loads(storage.read_bytes(runs[0]))["summary"]["model_id"] == df["model_id"].iloc[0]


@pytest.mark.slow
def test_infer_then_render_round_trips_masks_to_files_that_stay_in_their_folder(ray_local, model_dir, tmp_path):
    """The user's path: masks of a folder and of a Parquet table (whose id column may hold anything)
    become PNG files of the images' own sizes, named after the ids, and nothing leaves the folder."""
    from jobs.render import main as render_main

    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    sizes = {"a.png": (20, 30), "sub/b.jpg": (33, 17)}
    for name, (h, w) in sizes.items():
        (folder / name).write_bytes(png(gray(h, w, len(name)), "JPEG" if name.endswith("jpg") else "PNG"))
    inf.run_inference(config(model_dir, folder, tmp_path / "masks"))
    assert render_main(["--masks", str(tmp_path / "masks"), "--to", str(tmp_path / "view"),
                        "--images", str(folder)]) == 0
    for name, size in {"a.png": sizes["a.png"], "sub/b.png": sizes["sub/b.jpg"]}.items():
        assert Image.open(tmp_path / "view" / "masks" / name).size == size[::-1], name
        assert (tmp_path / "view" / "overlays" / name).is_file()

    table = tmp_path / "table.parquet"
    ids = ["../../escape.png", "/abs/x.png", "ok.png"]
    pq.write_table(pa.table({"case": ids, "png": [png(gray(12, 14, i)) for i in range(3)]}), table)
    inf.run_inference(config(model_dir, table, tmp_path / "tmasks", image_column="png", id_column="case"))
    view = tmp_path / "view2"
    before = {p for p in tmp_path.rglob("*") if "view2" not in p.parts}
    assert render_main(["--masks", str(tmp_path / "tmasks"), "--to", str(view)]) == 0
    after = {p for p in tmp_path.rglob("*") if "view2" not in p.parts}
    assert after == before, "render wrote outside its folder"
    masks = sorted(str(p.relative_to(view / "masks")) for p in (view / "masks").rglob("*.png"))
    assert len(masks) == 3 and "ok.png" in masks and all(".." not in m for m in masks)
    assert all(Image.open(view / "masks" / m).size == (14, 12) for m in masks)


def test_probabilities_cross_as_rounded_uint8_and_resize_within_a_step():
    prob = np.array([[0.0, 0.5 / 255, 1.5 / 255, 0.5], [0.999, 1.0, 1.2, -0.1]], np.float32)
    assert quantize_probability(prob).tolist() == [[0, 0, 2, 128], [255, 255, 255, 0]]
    rng = np.random.default_rng(0)
    prob = rng.random((32, 32), dtype=np.float32)
    full = resize_probability(quantize_probability(prob), (50, 70))
    assert full.dtype == np.float32 and full.shape == (50, 70) and 0 <= full.min() and full.max() <= 1
    assert np.abs(full - resize_probability(prob, (50, 70))).max() <= 1.5 / 255
    same = resize_probability(quantize_probability(prob), (32, 32))  # same size: only the scaling
    np.testing.assert_array_equal(same, quantize_probability(prob) / np.float32(255))
