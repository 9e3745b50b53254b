"""jobs.render: an inference output (Parquet parts in the real schema, written here without Ray)
back into mask PNGs, overlays and an index.html; local and on the S3 test server."""

from __future__ import annotations

import csv
import hashlib
import os
from datetime import datetime, timezone

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.render import main
from unet import storage
from unet.cli import run_main
from unet.codec import encode_mask_png
from unet.inference.output import OUTPUT_SCHEMA, part_bytes, part_name
from unet.inference.plan import Chunk
from unet.render import OUTLINE_BGR
from unet.safe_names import file_name


def _mask(h: int, w: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        m[y0:y1, x0:x1] = 255
    return m


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (h, w), dtype=np.uint8)


def _row(image_id: str, mask: np.ndarray | None = None, *, error: str | None = None, source: str | None = None,
         lesion: float | None = None, malignant: float | None = None) -> dict:
    ok = error is None
    pixels = int((mask > 0).sum()) if ok else None
    return {
        "image_id": image_id, "source_uri": source or f"/in/{image_id}", "status": "ok" if ok else "error",
        "error": error, "height": mask.shape[0] if ok else None, "width": mask.shape[1] if ok else None,
        "mask_png": encode_mask_png(mask) if ok else None, "tumour_pixels": pixels,
        "tumour_fraction": pixels / mask.size if ok else None, "bbox": None,
        "confidence": 0.75 if ok else None, "lesion_probability": lesion, "malignant_probability": malignant,
        "model_id": "test-unet-000000000000", "processed_at": datetime(2024, 1, 1, tzinfo=timezone.utc),
    }


def _write_output(root: str, parts: list[list[dict]]) -> list[str]:
    """Parts as jobs.infer writes them (exact schema, footer), plus the bookkeeping it leaves:
    a run record and a plan file in ``_``-folders, which must not be read as parts."""
    names = []
    for i, rows in enumerate(parts):
        key = hashlib.sha1(str(i).encode()).hexdigest()
        key = f"{i:x}" + key[1:]  # listing order = the order given
        chunk = Chunk(key=key, kind="image", expected=len(rows), unit_key=None)
        data, _, _ = part_bytes(chunk, pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), "test-unet-000000000000")
        storage.write_bytes(storage.join(root, part_name(key)), data)
        names.append(part_name(key))
    storage.write_bytes(storage.join(root, "_runs", "run-1.json"), b"{}")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"chunk": ["x"], "rel": ["y"]}), sink)
    storage.write_bytes(storage.join(root, "_tmp", "plan-1", "plan-00000.parquet"), sink.getvalue().to_pybytes())
    return names


# (image_id, mask box or None for an error row, image size (h, w)); order = row order.
A = ("benign/a.png", (3, 4, 20, 15), (20, 30))
PART1 = [
    A,
    ("benign/b.jpg", None, (16, 16)),  # ok, empty mask
    ("broken.png", "error", None),
    ("../../etc/x.png", (0, 0, 4, 4), (8, 8)),
    ("/abs/y.png", (1, 1, 3, 3), (8, 8)),
    ("c.png", (0, 0, 2, 2), (10, 12)),
    ("c.jpg", (0, 0, 5, 5), (10, 12)),  # same file name as c.png after the extension swap
]
PART2 = [
    ("shards/s.tar/m1.png", (0, 0, 3, 3), (9, 9)),  # from a tar: no overlay
    ("normal/missing.png", (0, 0, 1, 1), (6, 6)),  # image not under --images
    ("scan.parquet#3", (2, 2, 4, 4), (7, 7)),  # from a Parquet table without id column
]
EXPECTED_MASK = {
    "benign/a.png": "masks/benign/a.png", "benign/b.jpg": "masks/benign/b.png",
    "../../etc/x.png": "masks/__/__/etc/x.png", "/abs/y.png": "masks/abs/y.png",
    "c.png": "masks/c.png", "c.jpg": "masks/c~2.png", "shards/s.tar/m1.png": "masks/shards/s.tar/m1.png",
    "normal/missing.png": "masks/normal/missing.png", "scan.parquet#3": "masks/scan.parquet#3.png",
}


def _build(spec):
    rows, masks, images = [], {}, {}
    for n, (image_id, box, size) in enumerate(spec):
        if box == "error":
            rows.append(_row(image_id, error="not a readable image (PNG, JPEG, BMP or TIFF expected)"))
            continue
        mask = _mask(*size, box)
        source = None
        if "s.tar/" in image_id:
            source = "/in/shards/s.tar#m1.png"
        elif "#" in image_id:
            source = "/in/scan.parquet#row=3"
        rows.append(_row(image_id, mask, source=source, lesion=0.9 if n == 0 else None,
                         malignant=0.25 if n == 0 else None))
        masks[image_id] = mask
        images[image_id] = _image(*size, n)
    return rows, masks, images


@pytest.fixture
def output(tmp_path):
    """A local inference output of two parts and the image folder it was made from."""
    rows1, masks1, images1 = _build(PART1)
    rows2, masks2, images2 = _build(PART2)
    out = str(tmp_path / "masks")
    _write_output(out, [rows1, rows2])
    scans = tmp_path / "scans"
    images = {**images1, **images2}
    for image_id, image in images.items():
        if image_id.startswith(("/", "..")) or "missing" in image_id or "#" in image_id or ".tar/" in image_id:
            continue
        path = scans / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        ext = ".jpg" if image_id.endswith(".jpg") else ".png"
        path.write_bytes(cv2.imencode(ext, image)[1].tobytes())
    return {"out": out, "scans": str(scans), "masks": {**masks1, **masks2}, "rows": rows1 + rows2}


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _run(capsys, argv) -> tuple[int, str, str]:
    code = run_main(main, argv, prog="jobs.render")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _csv(to) -> dict[str, dict]:
    with open(os.path.join(to, "files.csv"), newline="", encoding="utf-8") as f:
        return {r["image_id"]: r for r in csv.DictReader(f)}


def test_masks_overlays_index_and_mapping(output, tmp_path, capsys):
    before = _files(tmp_path)
    to = tmp_path / "view"
    code, out, err = _run(capsys, ["--masks", output["out"], "--to", str(to), "--images", output["scans"]])
    assert code == 0, err
    assert out.count("\n") == 1 and out.startswith("rendered 10 rows: 9 masks, 4 overlays, 1 errors listed")
    assert "2 rows from tar/Parquet inputs without overlay" in out and "3 overlays not drawn" in out
    assert str(to / "index.html") in out and err == ""

    # Every ok row's mask at its original size, the stored pixels, under the naming rule.
    written = _files(to)
    for image_id, rel in EXPECTED_MASK.items():
        assert rel in written, (image_id, sorted(written))
        got = cv2.imread(str(to / rel), cv2.IMREAD_UNCHANGED)
        assert got.dtype == np.uint8 and got.ndim == 2
        np.testing.assert_array_equal(got, output["masks"][image_id])
    assert not any("broken" in f for f in written)  # error rows are never drawn

    # Nothing outside --to: the escaping ids landed inside, as recorded in files.csv.
    assert _files(tmp_path) - before == {os.path.join("view", f) for f in written}
    assert not (tmp_path / "etc").exists() and not os.path.exists("/abs/y.png")
    mapping = _csv(to)
    assert mapping["../../etc/x.png"]["mask"] == "masks/__/__/etc/x.png"
    assert "'..' component replaced" in mapping["../../etc/x.png"]["note"]
    assert "absolute path made relative" in mapping["/abs/y.png"]["note"]
    assert mapping["c.png"]["note"] == "" and "already has this file name" in mapping["c.jpg"]["note"]
    assert mapping["broken.png"]["status"] == "error" and "not a readable image" in mapping["broken.png"]["note"]
    assert len(mapping) == 10

    # Overlays: the decoded image in grey, the mask's outline in colour.
    assert {f for f in written if f.startswith("overlays/")} == {
        "overlays/benign/a.png", "overlays/benign/b.png", "overlays/c.png", "overlays/c~2.png"}
    overlay = cv2.imread(str(to / "overlays/benign/a.png"), cv2.IMREAD_COLOR)
    image = cv2.imread(os.path.join(output["scans"], "benign/a.png"), cv2.IMREAD_GRAYSCALE)
    assert overlay.shape == (20, 30, 3)
    assert tuple(overlay[4, 3]) == OUTLINE_BGR  # the box's corner is on the outline
    assert tuple(overlay[10, 10]) == (image[10, 10],) * 3  # inside, away from the outline: grey
    assert tuple(overlay[0, 29]) == (image[0, 29],) * 3
    empty = cv2.imread(str(to / "overlays/benign/b.png"), cv2.IMREAD_COLOR)
    assert (empty[..., 0] == empty[..., 2]).all()  # empty mask: no outline at all
    assert "no overlay: tar/Parquet" in mapping["shards/s.tar/m1.png"]["note"]
    assert "no overlay" in mapping["normal/missing.png"]["note"]

    page = (to / "index.html").read_text()
    for image_id in EXPECTED_MASK:
        assert image_id.replace("&", "&amp;") in page
    assert page.count("<figure>") == 9 and page.count('src="thumbs/') == 9
    errors = page[page.index("Error rows"):]
    assert "broken.png" in errors and "not a readable image" in errors
    assert "p(lesion) 0.900, p(malignant) 0.250" in page
    assert "scan.parquet%233.png" in page  # links are URL-quoted
    assert "Renamed ids (3)" in page and "Overlays not drawn (3)" in page


def test_limit_bounds_files_and_sheet(output, tmp_path, capsys):
    to = tmp_path / "view"
    code, out, _ = _run(capsys, ["--masks", output["out"], "--to", str(to), "--limit", "3"])
    assert code == 0 and out.startswith("rendered 3 rows (--limit reached): 2 masks, 1 errors listed")
    assert {f for f in _files(to) if f.startswith("masks/")} == {"masks/benign/a.png", "masks/benign/b.png"}
    assert not any(f.startswith("overlays/") for f in _files(to))
    page = (to / "index.html").read_text()
    assert page.count("<figure>") == 2 and "broken.png" in page and "c.jpg" not in page
    assert list(_csv(to)) == ["benign/a.png", "benign/b.jpg", "broken.png"]


def test_parts_are_streamed_and_the_limit_stops_reading(output, tmp_path, capsys):
    """A damaged part after the first is never opened when the limit falls inside the first:
    the parts are read lazily, one at a time, not loaded up front."""
    storage.write_bytes(os.path.join(output["out"], "part-" + "f" * 40 + ".parquet"), b"not parquet")
    to = tmp_path / "view"
    code, out, err = _run(capsys, ["--masks", output["out"], "--to", str(to), "--limit", "7"])
    assert code == 0, err
    code, _, err = _run(capsys, ["--masks", output["out"], "--to", str(to)])
    assert code == 2 and err.count("\n") == 1 and "part-ffff" in err and "not a readable Parquet file" in err


def test_symlink_in_the_target_is_not_followed(output, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    to = tmp_path / "view"
    (to / "masks").mkdir(parents=True)
    (to / "masks" / "benign").symlink_to(outside, target_is_directory=True)
    code, _, err = _run(capsys, ["--masks", output["out"], "--to", str(to)])
    assert code == 2 and err.count("\n") == 1 and "not a folder" in err
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("image_id, name, changed", [
    ("benign/benign (3).png", "benign/benign (3).png", False),
    ("x.TIFF", "x.png", False),
    ("t.parquet#3", "t.parquet#3.png", False),
    ("case_001", "case_001.png", False),
    ("../../etc/x.png", "__/__/etc/x.png", True),
    ("/etc/passwd", "etc/passwd.png", True),
    ("C:/Windows/x.bmp", "C_/Windows/x.png", True),
    ("a\\..\\b.png", "a_.._b.png", True),
    ("a\x00b.png", "a_b.png", True),
    ("a//./b.png", "a/_/b.png", True),
    ("", "_.png", True),
    ("..", "__.png", True),
    ("a.png/b.png", "a.png_/b.png", True),  # a folder never takes a mask's name
])
def test_naming_rule(image_id, name, changed):
    got, notes = file_name(image_id)
    assert got == name and bool(notes) == changed
    assert not os.path.isabs(got) and ".." not in got.split("/") and "\\" not in got and "\x00" not in got


def test_long_ids_are_shortened_but_stay_distinct():
    a, _ = file_name("d/" + "x" * 300 + "1.png")
    b, _ = file_name("d/" + "x" * 300 + "2.png")
    assert a != b and all(len(p.encode()) <= 255 for p in a.split("/")) and a.endswith(".png")


@pytest.mark.parametrize("case", ["missing", "no_parts", "to_is_file", "bad_limit", "images_missing"])
def test_bad_use_is_one_line_and_exit_2(case, output, tmp_path, capsys):
    masks, to, extra = output["out"], tmp_path / "view", []
    if case == "missing":
        masks = str(tmp_path / "nope")
    elif case == "no_parts":
        masks = str(tmp_path / "empty")
        os.makedirs(os.path.join(masks, "_runs"))
    elif case == "to_is_file":
        to.write_text("x")
    elif case == "bad_limit":
        extra = ["--limit", "0"]
    else:
        extra = ["--images", str(tmp_path / "no-scans")]
    code, out, err = _run(capsys, ["--masks", masks, "--to", str(to), *extra])
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("jobs.render: error: ")
    expected = {"missing": "does not exist", "no_parts": "no Parquet parts", "to_is_file": "is a file",
                "bad_limit": "--limit", "images_missing": "does not exist"}[case]
    assert expected in err
    if case != "to_is_file":
        assert not to.exists()  # checked before anything is written


def test_s3_output_and_images(s3_env, tmp_path, capsys):
    rows, masks, images = _build([A, ("benign/b.jpg", (1, 1, 6, 6), (16, 16)), ("broken.png", "error", None)])
    out, scans = s3_env + "/masks", s3_env + "/scans"
    _write_output(out, [rows])
    for image_id, image in images.items():
        storage.write_bytes(storage.join(scans, image_id), cv2.imencode(".png", image)[1].tobytes())
    to = tmp_path / "view"
    code, stdout, err = _run(capsys, ["--masks", out + "/", "--to", str(to), "--images", scans])
    assert code == 0, err
    assert stdout.startswith("rendered 3 rows: 2 masks, 2 overlays, 1 errors listed")
    for image_id, rel in (("benign/a.png", "benign/a.png"), ("benign/b.jpg", "benign/b.png")):
        np.testing.assert_array_equal(cv2.imread(str(to / "masks" / rel), cv2.IMREAD_UNCHANGED), masks[image_id])
        overlay = cv2.imread(str(to / "overlays" / rel), cv2.IMREAD_COLOR)
        assert overlay.shape[:2] == masks[image_id].shape and (overlay == OUTLINE_BGR).all(axis=2).any()
    assert "broken.png" in (to / "index.html").read_text()
    code, _, err = _run(capsys, ["--masks", s3_env + "/no-such-output", "--to", str(tmp_path / "v2")])
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


def test_single_part_file_and_single_image_input(tmp_path, capsys):
    """jobs.infer on one image file gives image_id = its file name; both sides may be single files."""
    mask, image = _mask(12, 14, (2, 2, 9, 9)), _image(12, 14, 7)
    (name,) = _write_output(str(tmp_path / "masks"), [[_row("scan.png", mask)]])
    cv2.imwrite(str(tmp_path / "scan.png"), image)
    to = tmp_path / "view"
    code, out, err = _run(capsys, ["--masks", str(tmp_path / "masks" / name), "--to", str(to),
                                   "--images", str(tmp_path / "scan.png")])
    assert code == 0 and out.startswith("rendered 1 rows: 1 masks, 1 overlays, 0 errors listed"), err
    overlay = cv2.imread(str(to / "overlays" / "scan.png"), cv2.IMREAD_COLOR)
    assert tuple(overlay[2, 2]) == OUTLINE_BGR and tuple(overlay[11, 13]) == (image[11, 13],) * 3
