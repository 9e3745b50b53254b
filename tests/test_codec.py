"""unet.codec: one set of pixel rules for prepared training data and for inference inputs.

Every Pillow mode a scanner or an export tool may write goes through ``jobs.prepare``'s BUSI path
(:func:`unet.prepare.prepare` -> shards) and through inference's :func:`decode_image`; the pixels
must be identical, and EXIF-rotated images (and their masks) must come out as displayed.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unet import evaluation, phantoms, prepare, shards
from unet.codec import decode_png, encode_mask_png, encode_png, to_binary_mask
from unet.data import dataset
from unet.inference.decode import decode_image
from unet.prepare import PrepareConfig
from unet.sources import read_image, read_mask

H, W = 12, 20  # not square, so a 90-degree EXIF rotation changes the shape
ORIENTATION = 0x0112


def _grey(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W), dtype=np.uint8)


def _rgb(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _cases() -> dict[str, tuple[bytes, np.ndarray | None, bytes]]:
    """name -> (image file bytes, expected grey pixels or None (lossy), mask file bytes)."""
    grey, rgb = _grey(), _rgb()
    i16 = np.random.default_rng(2).integers(0, 65536, (H, W)).astype(np.uint16)
    i32 = np.random.default_rng(3).integers(-1000, 300_000, (H, W)).astype(np.int32)  # not 16-bit: stretched
    f32 = np.random.default_rng(4).random((H, W), dtype=np.float32)  # [0, 1]: x 255
    lesion = np.zeros((H, W), np.uint8)
    lesion[3:7, 2:9] = 255  # off-centre, so any rotation or flip moves it
    mask = _save(Image.fromarray(lesion), "PNG")
    # Stored un-rotated with orientation 6 (display = 90 degrees clockwise), mask tagged alike.
    rotated_mask = _save(Image.fromarray(np.ascontiguousarray(np.rot90(lesion, k=1))), "PNG", exif=_exif(6))
    palette = Image.fromarray(rgb).quantize(32)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    lo, hi = float(i32.min()), float(i32.max())
    return {
        "1": (_save(Image.fromarray(grey > 127), "PNG"), np.where(grey > 127, 255, 0), mask),
        "L": (_save(Image.fromarray(grey), "PNG"), grey, mask),
        "P": (_save(palette, "PNG"), np.asarray(palette.convert("RGB").convert("L")), mask),
        "RGB": (_save(Image.fromarray(rgb), "PNG"), np.asarray(Image.fromarray(rgb).convert("L")), mask),
        "RGBA": (_save(Image.fromarray(np.dstack([rgb, grey])), "PNG"),
                 np.asarray(Image.fromarray(rgb).convert("L")), mask),  # alpha ignored
        "LA": (_save(Image.fromarray(np.dstack([grey, 255 - grey]), mode="LA"), "PNG"), grey, mask),
        "I;16": (_save(Image.fromarray(i16), "PNG"), np.round(i16 / 257.0), mask),
        "I": (_save(Image.fromarray(i32), "TIFF"), np.round((i32 - lo) * (255.0 / (hi - lo))), mask),
        "F": (_save(Image.fromarray(f32), "TIFF"), np.round(f32.astype(np.float64) * 255.0), mask),
        "CMYK": (_save(cmyk, "TIFF"), np.asarray(cmyk.convert("L")), mask),
        "exif-png": (_save(Image.fromarray(np.ascontiguousarray(np.rot90(grey, k=1))), "PNG", exif=_exif(6)),
                     grey, rotated_mask),
        "exif-jpeg": (_save(Image.fromarray(np.ascontiguousarray(np.rot90(grey, k=1))), "JPEG", quality=95,
                            exif=_exif(6)), None, rotated_mask),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Every case as a BUSI image (+ mask) -> jobs.prepare's path -> shard rows by file name.

    Non-PNG contents (TIFF, JPEG) are stored under BUSI's ``.png`` names: Pillow reads a file by
    its content, as it would a mislabelled BUSI file, so they take exactly the path PNGs take.
    """
    base = tmp_path_factory.mktemp("modes")
    folder = base / "Dataset_BUSI_with_GT" / "benign"
    folder.mkdir(parents=True)
    for cls in shards.CLASSES[1:]:
        (folder.parent / cls).mkdir()
    for k, (image, _, mask) in enumerate(CASES.values()):
        (folder / f"benign ({k})_mask.png").write_bytes(mask)
        (folder / f"benign ({k}).png").write_bytes(image)
    out = base / "out"
    manifest = prepare.prepare(PrepareConfig(source="busi", input=str(base), out=str(out), ratios=(1, 0, 0),
                                             strict=True))
    assert manifest["counts"]["train"]["total"] == len(CASES)
    rows = pq.read_table(out / "train").to_pylist()
    return folder, {r["source"].removeprefix("busi:benign/"): r for r in rows}


@pytest.mark.parametrize("name", list(CASES))
def test_prepare_and_inference_see_identical_pixels(prepared, name):
    folder, rows = prepared
    k = list(CASES).index(name)
    data, expected, _ = CASES[name]
    row = rows[f"benign ({k}).png"]
    shard_image = decode_png(row["image_png"], sample=row["id"], column="image_png")
    inferred = decode_image(data)
    assert inferred.dtype == np.uint8 and inferred.shape == (H, W)  # EXIF: shown as displayed
    assert np.array_equal(shard_image, inferred)
    assert np.array_equal(read_image(folder / f"benign ({k}).png"), inferred)
    if expected is not None:  # the rule itself, not only agreement of two callers
        assert np.array_equal(inferred, expected.astype(np.uint8))
    else:  # lossy JPEG: close to the displayed original
        assert np.abs(inferred.astype(int) - _grey()).mean() < 4
    # The mask is oriented like its image: the lesion sits where it was drawn on the displayed image.
    shard_mask = decode_png(row["mask_png"], sample=row["id"], column="mask_png")
    drawn = np.zeros((H, W), bool)
    drawn[3:7, 2:9] = True
    assert np.array_equal(shard_mask, np.where(drawn, 255, 0))


def test_exif_orientation_applies_to_masks_read_alone(tmp_path):
    stored = np.zeros((W, H), np.uint8)
    stored[0, 0] = 255
    path = tmp_path / "m.png"
    path.write_bytes(_save(Image.fromarray(stored), "PNG", exif=_exif(6)))
    mask = read_mask(path)
    assert mask.shape == (H, W) and mask[0, W - 1] and mask.sum() == 1  # top-left -> top-right


def test_palette_mask_reads_colours_not_indices():
    img = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    img.putpalette([255, 255, 255, 0, 0, 0])  # index 0 = white (lesion), index 1 = black
    assert to_binary_mask(img).tolist() == [[True, False]]


def test_png_cells_round_trip_and_fail_naming_sample_and_column():
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    assert np.array_equal(decode_png(encode_mask_png(mask), sample="a", column="mask_png"), mask * 255)
    assert np.array_equal(decode_png(encode_mask_png(mask.astype(np.uint8) * 255), sample="a", column="m"),
                          mask * 255)
    grey = _grey()
    assert np.array_equal(decode_png(encode_png(grey), sample="a", column="image_png"), grey)
    colour = cv2.imencode(".png", np.dstack([grey] * 3))[1].tobytes()
    assert np.array_equal(decode_png(colour, sample="a", column="image_png"), grey)  # tolerated
    with pytest.raises(ValueError, match=r"shard-7: sample 'x-1': column 'image_png' holds no decodable PNG"):
        decode_png(b"not a png", sample="x-1", column="image_png", where="shard-7")
    with pytest.raises(ValueError, match=r"sample 'x-1': column 'mask_png' is empty"):
        decode_png(None, sample="x-1", column="mask_png")
    sixteen = cv2.imencode(".png", grey.astype(np.uint16) * 257)[1].tobytes()
    with pytest.raises(ValueError, match="uint16 PNG; prepared shards hold 8-bit"):
        decode_png(sixteen, sample="x-1", column="image_png")


def test_one_prepared_data_contract(tmp_path):
    """The class list, splits and manifest name have one owner (unet.shards), not copies."""
    assert phantoms.KINDS is shards.CLASSES and evaluation.CLASSES is shards.CLASSES
    assert dataset.SPLITS is shards.SPLITS
    assert shards.manifest_sha256(str(tmp_path)) is None
    (tmp_path / shards.MANIFEST).write_text('{"schema_version": 1}\n')
    assert shards.read_manifest(str(tmp_path)) == {"schema_version": 1}
    assert len(shards.manifest_sha256(str(tmp_path))) == 64
    Path(tmp_path / shards.MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        shards.read_manifest(str(tmp_path))
