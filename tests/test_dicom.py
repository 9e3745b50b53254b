"""DICOM inputs for jobs.infer (issue 15, point 3): photometric interpretations, cine clips, compressed
transfer syntaxes, extensionless files, tar members, limits, and the identifying columns.

Every DICOM file here is made by pydicom from random pixels (no patient data). The fast tests call
the planning and read/decode functions the job runs; the slow one runs the job on a local Ray.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (MPEG4HP41, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, UltrasoundImageStorage,
                         UltrasoundMultiFrameImageStorage, generate_uid)

from unet import inference as inf
from unet import storage
from unet.artifact import save_artifact
from unet.dicom import DicomError, read_dicom
from unet.inference.plan import DoneIndex, PlanWriter, input_root, iter_listed, plan_inputs
from unet.inference.read import read_and_decode
from unet.models import build_model

INPUT_SIZE = (16, 16)  # frames of this size reach the model unresized: x is the decoded frame


def dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", *, syntax=None, **attrs) -> bytes:
    """A DICOM Part 10 file of ``pixels`` ((frames,) rows, columns(, 3)); ``syntax`` compresses it."""
    frames = pixels.ndim == (4 if photometric in ("RGB", "YBR_FULL") else 3)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if frames else UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.StudyInstanceUID = "PAT-0001", generate_uid()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.set_pixel_data(pixels, photometric, pixels.dtype.itemsize * 8)
    if syntax is not None:
        ds.compress(syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pixels(*shape: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def plan_and_read(root: Path | str, done: DoneIndex | None = None, *, work: Path | None = None,
                  **cfg) -> pd.DataFrame:
    """Plan the folder (or ``s3://`` prefix, with a local ``work`` folder) as the job does, then run
    the read/decode step over the plan: its rows (end markers left out), with ``x`` the frame at the
    model's input size."""
    work = work or Path(root).parent
    fs, path = storage.get_filesystem(str(root))
    root_uri = str(root) if storage.is_s3(str(root)) else path
    config = inf.InferenceConfig(model="unused", input=str(root), output=str(work / "out"), **cfg)
    plan = PlanWriter(storage.get_filesystem(str(work))[0], str(work / "plan"), str(work / "plan"))
    plan_inputs(config, fs, path, root_uri, False, done, plan)
    rows = []
    for table in (pq.read_table(f) for f in plan.files):
        for batch in read_and_decode(table, fs=fs, root=path, root_uri=root_uri, input_size=INPUT_SIZE,
                                     image_column="image", id_column=None, max_pixels=config.max_pixels,
                                     max_bytes=config.max_bytes, dicom_columns=config.dicom_columns):
            for i in range(len(batch["_seq"])):
                if batch["_seq"][i] >= 0:
                    rows.append({k: batch[k][i] for k in batch if k not in ("_chunk", "_n")})
    return pd.DataFrame(rows).set_index("image_id") if rows else pd.DataFrame()


# =============================================================================================
# Pixels: the same grey rule as every other input
# =============================================================================================

def test_monochrome1_is_monochrome2_inverted():
    grey = pixels(16, 16)
    (mono2,), _ = read_dicom(dicom(grey, "MONOCHROME2"))
    (mono1,), _ = read_dicom(dicom(grey, "MONOCHROME1"))
    np.testing.assert_array_equal(mono2, grey)
    np.testing.assert_array_equal(mono1, 255 - grey)


def test_rgb_gives_the_grey_of_the_png_of_the_same_pixels():
    rgb = pixels(16, 20, 3)
    (grey,), _ = read_dicom(dicom(rgb, "RGB"))
    np.testing.assert_array_equal(grey, inf.decode_image(png(rgb)))
    assert len(np.unique(grey)) > 50  # really luma of the colours, not one channel or a constant


def test_ybr_full_is_turned_into_rgb_first():
    rgb = pixels(16, 20, 3, seed=1)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    (grey,), _ = read_dicom(dicom(ybr, "YBR_FULL"))
    np.testing.assert_array_equal(grey, inf.decode_image(png(convert_color_space(ybr, "YBR_FULL", "RGB"))))
    assert np.abs(grey.astype(int) - inf.decode_image(png(rgb))).max() <= 2  # the round trip's rounding


def test_ybr_full_422_is_upsampled_then_turned_into_rgb():
    # Native YBR_FULL_422 stores each pair of pixels as Y1 Y2 Cb Cr (the pair shares its chroma).
    rng = np.random.default_rng(8)
    y, cb, cr = rng.integers(0, 256, (16, 20), np.uint8), rng.integers(0, 256, (16, 10), np.uint8), \
        rng.integers(0, 256, (16, 10), np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 16, 20, 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.stack([y[:, 0::2], y[:, 1::2], cb, cr], axis=-1).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    (grey,), _ = read_dicom(buf.getvalue())
    full = np.stack([y, cb.repeat(2, axis=1), cr.repeat(2, axis=1)], axis=-1)
    np.testing.assert_array_equal(grey, inf.decode_image(png(convert_color_space(full, "YBR_FULL", "RGB"))))


def test_sixteen_bit_scales_as_a_sixteen_bit_png():
    deep = pixels(16, 16, dtype=np.uint16)
    (grey,), _ = read_dicom(dicom(deep))
    np.testing.assert_array_equal(grey, inf.decode_image(png(deep)))
    np.testing.assert_array_equal(grey, np.round(deep / 257).astype(np.uint8))


def test_a_single_frame_dicom_in_a_parquet_cell_decodes_and_a_clip_there_is_refused():
    grey = pixels(16, 16)
    np.testing.assert_array_equal(inf.decode_image(dicom(grey)), grey)
    with pytest.raises(inf.DecodeError, match="multi-frame DICOM"):
        inf.decode_image(dicom(pixels(2, 16, 16)))


# =============================================================================================
# Transfer syntaxes
# =============================================================================================

@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_syntaxes_with_a_decoder_give_the_same_pixels(syntax):
    grey = pixels(32, 40, seed=2)  # openjpeg refuses images much smaller than this
    data = dicom(grey, syntax=syntax)
    assert syntax.encode() in data  # really stored compressed
    (frame,), _ = read_dicom(data)
    np.testing.assert_array_equal(frame, grey)


def h264_dicom() -> bytes:
    """A DICOM file declaring MPEG-4 AVC/H.264 (as ultrasound cine clips often are); the stream is junk."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundMultiFrameImageStorage, generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 16, 16, 2, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01junk" * 4])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_syntax_without_a_decoder_is_an_error_naming_it():
    name = r"MPEG-4 AVC/H\.264 High Profile / Level 4\.1 \(1\.2\.840\.10008\.1\.2\.4\.102\)"
    with pytest.raises(DicomError, match=f"no decoder for DICOM transfer syntax {name}"):
        read_dicom(h264_dicom())


def test_the_declared_size_is_checked_before_decoding():
    data = dicom(pixels(3, 16, 16))
    with pytest.raises(DicomError, match=r"16x16 x 3 frame\(s\) = 768 pixels, over the limit of 700 .*--max-pixels"):
        read_dicom(data, max_pixels=700)
    # A header declaring far more than the data holds: refused by the header, never decoded.
    lying = data.replace(b"(\x00\x08\x00IS\x02\x003 ", b"(\x00\x08\x00IS\x02\x009 ")  # NumberOfFrames 3 -> 9
    assert lying != data
    with pytest.raises(DicomError, match="2304 pixels, over the limit of 1000"):
        read_dicom(lying, max_pixels=1000)


# =============================================================================================
# Files, folders and tars: one row per frame, ids, errors
# =============================================================================================

def dicom_folder(root: Path) -> dict[str, np.ndarray]:
    """DICOM files of every kind the job finds, beside a PNG; returns the expected frame per row id."""
    root.mkdir(parents=True)
    clip, still, deep = pixels(3, 16, 16, seed=3), pixels(16, 16, seed=4), pixels(16, 16, seed=5)
    (root / "clip.dcm").write_bytes(dicom(clip))
    (root / "exam").mkdir()
    (root / "exam" / "IM000001").write_bytes(dicom(still, "MONOCHROME1"))  # no extension: found by its marker
    (root / "exam" / "1.2.840.99.7").write_bytes(dicom(deep))  # named by a UID
    (root / "exam" / "README").write_bytes(b"not an image, not an input\n" * 10)
    (root / "exam" / "notes.txt").write_bytes(b"x" * 200)
    (root / "h264.dcm").write_bytes(h264_dicom())
    (root / "empty.dcm").write_bytes(b"")
    (root / "truncated.dcm").write_bytes(dicom(clip)[:-300])
    (root / "plain.png").write_bytes(png(still))
    return {"clip.dcm#frame=1": clip[0], "clip.dcm#frame=2": clip[1], "clip.dcm#frame=3": clip[2],
            "exam/IM000001": 255 - still, "exam/1.2.840.99.7": deep, "plain.png": still}


DICOM_ERRORS = {"h264.dcm": "no decoder for DICOM transfer syntax MPEG-4 AVC/H.264", "empty.dcm": "not a DICOM file",
                "truncated.dcm": "cannot decode DICOM pixel data (Explicit VR Little Endian"}


def test_a_folder_gives_a_row_per_frame_with_framed_ids_and_error_rows(tmp_path):
    expected = dicom_folder(tmp_path / "in")
    rows = plan_and_read(tmp_path / "in", chunk_size=2)
    assert sorted(rows.index) == sorted([*expected, *DICOM_ERRORS])
    for image_id, frame in expected.items():
        assert rows.loc[image_id, "error"] == "", (image_id, rows.loc[image_id, "error"])
        np.testing.assert_array_equal(rows.loc[image_id, "x"], frame, err_msg=image_id)
    for image_id, message in DICOM_ERRORS.items():
        assert message in rows.loc[image_id, "error"], rows.loc[image_id, "error"]
    assert rows.loc["clip.dcm#frame=2", "source_uri"] == f"{tmp_path / 'in'}/clip.dcm#frame=2"


def test_an_s3_prefix_gives_the_same_rows_as_the_folder(tmp_path, s3_env):
    expected = dicom_folder(tmp_path / "in")
    for path in (tmp_path / "in").rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{s3_env}/scans/{path.relative_to(tmp_path / 'in').as_posix()}", path.read_bytes())
    rows = plan_and_read(f"{s3_env}/scans", work=tmp_path)
    assert sorted(rows.index) == sorted([*expected, *DICOM_ERRORS])
    for image_id, frame in expected.items():
        np.testing.assert_array_equal(rows.loc[image_id, "x"], frame, err_msg=image_id)
    assert rows.loc["exam/IM000001", "source_uri"] == f"{s3_env}/scans/exam/IM000001"


def test_a_dicom_file_is_one_unit_for_incremental_runs(tmp_path):
    dicom_folder(tmp_path / "in")
    done = DoneIndex(str(tmp_path))
    done.add(["clip.dcm", "exam/IM000001", "plain.png"])  # keys of units already in the output
    rows = plan_and_read(tmp_path / "in", done=done)
    done.close()
    assert sorted(rows.index) == sorted(["exam/1.2.840.99.7", *DICOM_ERRORS])


def test_a_file_over_max_bytes_is_an_error_row_and_a_single_dicom_file_is_an_input(tmp_path):
    dicom_folder(tmp_path / "in")
    rows = plan_and_read(tmp_path / "in", max_bytes=700)  # the clip is larger, the 16x16 stills smaller
    assert "over the limit of 700 (max_bytes / --max-bytes)" in rows.loc["clip.dcm", "error"]
    fs, path = storage.get_filesystem(str(tmp_path / "in" / "exam" / "IM000001"))
    root, _, single = input_root(str(tmp_path / "in" / "exam" / "IM000001"), fs, path)
    assert single and list(iter_listed(path, fs, root, True)) == [("IM000001", "dicom")]
    with pytest.raises(ValueError, match="unsupported type"):
        list(iter_listed(str(tmp_path / "in" / "exam" / "README"), fs, root, True))


def test_tar_members_dicom_by_suffix_or_marker(tmp_path):
    clip, still = pixels(2, 16, 16, seed=6), pixels(16, 16, seed=7)
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "shard.tar", "w") as tar:
        for name, data in [("a/clip.dcm", dicom(clip)), ("a/IM0002", dicom(still)), ("a/IM0003", b"no marker" * 20),
                           ("a/meta.json", b"{}"), ("a/bad.dcm", h264_dicom())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = plan_and_read(tmp_path / "in")
    assert list(rows.index) == ["shard.tar/a/clip.dcm#frame=1", "shard.tar/a/clip.dcm#frame=2",
                                "shard.tar/a/IM0002", "shard.tar/a/bad.dcm"]
    assert list(rows["_seq"]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(rows.loc["shard.tar/a/clip.dcm#frame=2", "x"], clip[1])
    np.testing.assert_array_equal(rows.loc["shard.tar/a/IM0002", "x"], still)
    assert "MPEG-4" in rows.loc["shard.tar/a/bad.dcm", "error"]


def test_identifying_attributes_are_read_only_when_asked(tmp_path):
    dicom_folder(tmp_path / "in")
    plain = plan_and_read(tmp_path / "in")
    assert "PatientID" not in plain.columns
    asked = plan_and_read(tmp_path / "in", dicom_columns=("PatientID", "SOPInstanceUID"))
    assert asked.loc["clip.dcm#frame=3", "PatientID"] == "PAT-0001"
    assert asked.loc["clip.dcm#frame=1", "SOPInstanceUID"] == asked.loc["clip.dcm#frame=3", "SOPInstanceUID"] != ""
    assert asked.loc["plain.png", "PatientID"] == "" and asked.loc["empty.dcm", "PatientID"] == ""
    with pytest.raises(ValueError, match="dicom_columns must be distinct names of PatientID"):
        inf.InferenceConfig(model="m", input="i", output="o", dicom_columns=("PatientName",))


# =============================================================================================
# The job, end to end
# =============================================================================================

@pytest.mark.slow
def test_the_job_writes_a_row_per_frame_and_identifiers_only_when_asked(ray_local, tmp_path, capsys):
    from jobs.infer import main

    expected = dicom_folder(tmp_path / "in")
    torch.manual_seed(0)
    model = save_artifact(build_model("unet", channels=(4, 8)).eval(), tmp_path / "model", architecture="unet",
                          model_kwargs={"channels": [4, 8]}, input_size=INPUT_SIZE,
                          normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)
    common = ["--model", model, "--input", str(tmp_path / "in"), "--chunk-size", "4", "--batch-size", "4"]

    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    plain = pd.read_parquet(tmp_path / "plain").set_index("image_id")
    assert sorted(plain.index) == sorted([*expected, *DICOM_ERRORS])
    assert not {"PatientID", "StudyInstanceUID", "SOPInstanceUID"} & set(plain.columns)
    assert set(plain.loc[list(expected), "status"]) == {"ok"}
    assert (plain.loc[list(expected), "height"] == 16).all()
    assert set(plain.loc[list(DICOM_ERRORS), "status"]) == {"error"}

    assert main([*common, "--output", str(tmp_path / "ids"), "--dicom-columns", "PatientID", "StudyInstanceUID",
                 "SOPInstanceUID"]) == 0
    ids = pd.read_parquet(tmp_path / "ids").set_index("image_id")
    assert (ids.loc[["clip.dcm#frame=1", "clip.dcm#frame=3", "exam/IM000001"], "PatientID"] == "PAT-0001").all()
    assert ids.loc["clip.dcm#frame=2", "StudyInstanceUID"].startswith("1.2.")
    assert ids.loc[["plain.png", "empty.dcm"], "SOPInstanceUID"].isna().all()
    pd.testing.assert_series_equal(ids["mask_png"].sort_index(), plain["mask_png"].sort_index())

    # Incremental: every file (the clip's three frames included) is already in the output.
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "plain"), "--incremental"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["units_planned"], summary["units_skipped"]) == (0, 7)
    assert sorted(pd.read_parquet(tmp_path / "plain")["image_id"]) == sorted(plain.index)
