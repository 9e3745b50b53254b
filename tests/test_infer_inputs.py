"""Hostile and awkward inference inputs (issue 12, points 1-6): bombs in other formats, names that
are not UTF-8, symbolic links, broken Parquet files, flaky reads, incremental runs with other
settings.

The fast tests call the listing, planning and read/decode functions the job runs; the slow ones
run the whole job on a local 2-CPU Ray.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import urllib.parse
import zlib
from pathlib import Path

import fsspec.implementations.local
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unet import inference as inf
from unet import storage
from unet.artifact import load_artifact, save_artifact
from unet.inference.plan import PlanWriter, escape_name, input_root, plan_inputs
from unet.inference.read import READ_ATTEMPTS, read_and_decode
from unet.models import build_model
from unet.runtime import UsageError

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = (16, 16)


def png(h: int = 12, w: int = 10, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ico_bomb(side: int = 8000) -> bytes:
    """An .ico (about 62 KB) whose one entry is a side x side grey PNG of zeros (64 MB decoded)."""
    compress = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(compress.compress(row) for _ in range(side)) + compress.flush()
    inner = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
             + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    # ICONDIR (reserved, type 1 = icon, 1 entry), then ICONDIRENTRY (0 = 256 px, ..., size, offset 22).
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 22) + inner


def tiff_huge_declared(width: int = 100_000, height: int = 100_000) -> bytes:
    """A little-endian grey TIFF declaring width x height pixels, with 16 bytes of strip data."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 16


def surrogate(raw: bytes) -> str:
    """A name as Python's os and tarfile modules hold bytes that are not UTF-8."""
    return raw.decode("utf-8", "surrogateescape")


def plan_and_read(root: Path, *, fs: pafs.FileSystem | None = None, **cfg) -> pd.DataFrame:
    """Plan the folder as the job does, then run the read/decode step over the plan: its rows."""
    local_fs, path = storage.get_filesystem(str(root))
    config = inf.InferenceConfig(model="unused", input=str(root), output=str(root.parent / "out"), **cfg)
    plan = PlanWriter(local_fs, str(root.parent / "plan"), str(root.parent / "plan"))
    plan_inputs(config, local_fs, path, path, False, None, plan)
    rows = []
    for table in (pq.read_table(f) for f in plan.files):
        for batch in read_and_decode(table, fs=fs or local_fs, root=path, root_uri=path, input_size=INPUT_SIZE,
                                     image_column=config.image_column, id_column=None,
                                     max_pixels=config.max_pixels, max_bytes=config.max_bytes):
            rows += [{"image_id": i, "seq": int(s), "error": e, "height": int(h)}
                     for i, s, e, h in zip(batch["image_id"], batch["_seq"], batch["error"], batch["height"])]
    return pd.DataFrame([r for r in rows if r["seq"] >= 0]).set_index("image_id")


# =============================================================================================
# 1. Decompression bombs through other formats
# =============================================================================================

@pytest.mark.parametrize("name, data", [
    ("ico", ico_bomb(64)),
    ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100000 100000\n"),
    ("gif", (lambda buf: (Image.new("L", (4, 4)).save(buf, "GIF"), buf.getvalue())[1])(io.BytesIO())),
])
def test_formats_the_job_does_not_document_are_not_opened(name, data):
    with pytest.raises(inf.DecodeError, match=r"not a readable image \(PNG, JPEG, BMP or TIFF expected"):
        inf.decode_image(data)


def test_huge_declared_tiff_is_refused_before_decoding():
    with pytest.raises(inf.DecodeError, match="10000000000 pixels, over the limit of 50000000"):
        inf.decode_image(tiff_huge_declared())


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak RSS the Linux way")
def test_ico_bomb_and_huge_tiff_become_error_rows_and_the_read_worker_stays_small(tmp_path):
    """The read/decode step in a fresh process (as a Ray worker runs it): its peak RSS (reset
    after ordinary images) grows by little over the bombs.
    Decoding the ICO's PNG alone would add 64 MB."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a_small.png").write_bytes(png())
    (root / "b_bomb.png").write_bytes(ico_bomb())  # an .ico under an image name
    (root / "c_huge.tif").write_bytes(tiff_huge_declared())
    assert len((root / "b_bomb.png").read_bytes()) < 100_000
    script = textwrap.dedent(f"""
        import json, re
        import pyarrow as pa
        from unet import storage
        from unet.inference.read import read_and_decode
        fs, root = storage.get_filesystem({str(root)!r})
        def run(names):
            plan = pa.table({{"chunk": ["c"] * len(names), "seq": list(range(len(names))), "kind": ["image"] * len(names),
                             "rel": names, "row_start": [0] * len(names), "row_end": [0] * len(names)}})
            out = []
            for b in read_and_decode(plan, fs=fs, root=root, root_uri=root, input_size=(16, 16), image_column="image",
                                     id_column=None, max_pixels=50_000_000, max_bytes=1 << 28):
                out += list(zip(b["image_id"].tolist(), b["error"].tolist()))
            return out
        # The process's peak RSS (VmHWM, MiB), restarted from the current size after the warm-up.
        # Not getrusage's ru_maxrss: it also keeps the peak of threads that ended, and cannot be reset.
        peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
        warm = run(["a_small.png"] * 4)
        open("/proc/self/clear_refs", "w").write("5")
        before = peak()
        rows = run(["b_bomb.png", "c_huge.tif"])
        print(json.dumps({{"rows": warm[:1] + rows, "growth_mib": peak() - before}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = dict(result["rows"])
    assert errors["a_small.png"] == ""
    assert "not a readable image" in errors["b_bomb.png"]
    assert "over the limit of 50000000" in errors["c_huge.tif"]
    assert result["growth_mib"] < 24, result


def test_pillow_limit_is_the_job_limit_while_decoding_and_restored_after(monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    seen = []
    check = Image._decompression_bomb_check
    monkeypatch.setattr(Image, "_decompression_bomb_check",
                        lambda size, **kw: (seen.append(Image.MAX_IMAGE_PIXELS), check(size, **kw)))
    inf.decode_image(png(), max_pixels=1000)
    # Pillow raises above 2 x MAX_IMAGE_PIXELS: its hard limit is max_pixels.
    assert seen and all(2 * v == 1000 for v in seen)
    assert Image.MAX_IMAGE_PIXELS == before


# =============================================================================================
# 2. Names that are not UTF-8; 3. symbolic links; 4. broken Parquet inputs
# =============================================================================================

def hostile_folder(root: Path) -> None:
    """Non-UTF-8 names (a file, a tar and a member in it), symlinks (a loop, a link to /, a link to
    a sibling folder, a link to a file), and broken Parquet files; each a row or not an input."""
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(png(seed=1))
    (root / "sub" / "deep.png").write_bytes(png(seed=2))
    with open(os.path.join(os.fsencode(root), b"caf\xe9 100%.png"), "wb") as f:
        f.write(png(seed=3))
    with tarfile.open(os.path.join(os.fsencode(root), b"sh\xffrd.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in ((surrogate(b"m\xe9mber.png"), png(seed=4)), ("plain.png", png(seed=5))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.symlink(".", root / "sub" / "loop")
    os.symlink("/", root / "host")
    os.symlink("sub", root / "sub_again")
    os.symlink("ok.png", root / "ok_link.png")
    (root / "zero.parquet").write_bytes(b"")
    (root / "corrupt.parquet").write_bytes(b"PAR1 then nothing that a reader could use" * 3)
    pq.write_table(pa.table({"image": pa.array([png(seed=6), png(400, 400, seed=7)], pa.binary())}),
                   root / "table.parquet")


HOSTILE_IDS = {  # image_id -> error substring ("" = ok)
    "ok.png": "", "sub/deep.png": "", "caf%E9 100%25.png": "", "ok_link.png": "",
    "sh%FFrd.tar/m%E9mber.png": "", "sh%FFrd.tar/plain.png": "",
    "zero.parquet": "unreadable Parquet file (no rows read): ArrowInvalid: Parquet file size is 0 bytes",
    "corrupt.parquet": "unreadable Parquet file (no rows read)",
    "table.parquet#0": "", "table.parquet#1": "image cell is",
}


def test_escaped_ids_give_the_name_bytes_back():
    for raw in (b"caf\xe9 100%.png", b"\xff\xfe/x.png", "plain é 50%.png".encode()):
        image_id = escape_name(surrogate(raw))
        image_id.encode("utf-8")  # storable in Parquet and SQLite
        assert urllib.parse.unquote_to_bytes(image_id) == raw or image_id == raw.decode()


def test_hostile_folder_gives_one_row_per_input(tmp_path):
    hostile_folder(tmp_path / "in")
    rows = plan_and_read(tmp_path / "in", max_bytes=1000)  # the 400 x 400 cell is over 1000 bytes
    assert sorted(rows.index) == sorted(HOSTILE_IDS)
    for image_id, message in HOSTILE_IDS.items():
        assert (message in rows.loc[image_id, "error"]) if message else rows.loc[image_id, "error"] == "", image_id
    assert rows.loc["caf%E9 100%25.png", "height"] == 12
    assert urllib.parse.unquote_to_bytes("caf%E9 100%25.png") == b"caf\xe9 100%.png"


def test_an_input_path_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"scan\xff.png")
    with open(path, "wb") as f:
        f.write(png())
    uri = os.fsdecode(path)
    with pytest.raises(UsageError, match=r"--input b'.*scan\\xff.png' is not a UTF-8 path; pass a folder above it"):
        input_root(uri, *storage.get_filesystem(uri))


def test_links_to_folders_are_not_followed(tmp_path, caplog):
    root = tmp_path / "in"
    hostile_folder(root)
    caplog.set_level("INFO", logger="unet.storage")
    # At most 100: without the fix, the link to / walks the host and the loop never ends.
    listed = [p[len(str(root)) + 1:] for p in itertools.islice(storage.iter_files(str(root)), 100)]
    assert len(listed) == len(set(listed)) == 8
    assert "ok_link.png" in listed and not any(p.startswith(("host/", "sub_again/", "sub/loop/")) for p in listed)
    assert "did not follow 3 link(s) to folders" in caplog.text


# =============================================================================================
# 5. Transient read errors in tar and Parquet inputs
# =============================================================================================

class FlakyLocal(fsspec.implementations.local.LocalFileSystem):
    """Local files whose reads fail the way a store's connection does: the n-th read call of
    every opened file raises ``ConnectionResetError`` (``fail_at``), or every read does
    (``always``); ``errors`` counts the failures injected."""

    def __init__(self, fail_at: int | None = 3, always: bool = False, error=ConnectionResetError):
        super().__init__(skip_instance_cache=True)
        self.fail_at, self.always, self.error, self.errors, self.opened = fail_at, always, error, 0, 0

    def _open(self, path, mode="rb", **kw):
        f = super()._open(path, mode, **kw)
        self.opened += 1
        flaky, reads = self, itertools.count(1)
        read = f.read

        def failing_read(*args):
            if flaky.always or next(reads) == flaky.fail_at:
                flaky.errors += 1
                raise flaky.error("injected: Connection reset by peer")
            return read(*args)

        f.read = failing_read
        return f


def flaky_fs(**kw) -> tuple[pafs.FileSystem, FlakyLocal]:
    handler = FlakyLocal(**kw)
    return pafs.PyFileSystem(pafs.FSSpecHandler(handler)), handler


def flaky_inputs(root: Path) -> None:
    root.mkdir()
    with tarfile.open(root / "shard.tar", "w") as tar:
        for i in range(40):  # ~ 40 x 1.5 KB: several buffer refills would each be a request on S3
            data = png(30, 30, seed=i)
            info = tarfile.TarInfo(f"m{i:02d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": pa.array([png(seed=i) for i in range(40)], pa.binary())}),
                   root / "t.parquet", row_group_size=8)


def test_transient_errors_in_tar_and_parquet_reads_are_retried(tmp_path, monkeypatch):
    monkeypatch.setattr("unet.storage.RETRY_DELAY_S", 0.01)
    monkeypatch.setattr("unet.inference.read.TAR_BUFFER_BYTES", 8192)  # many reads per tar
    flaky_inputs(tmp_path / "in")
    fs, flaky = flaky_fs(fail_at=3)
    rows = plan_and_read(tmp_path / "in", fs=fs, chunk_size=100)
    assert flaky.errors >= 2  # at least one in the tar and one in the Parquet file
    assert len(rows) == 80 and (rows["error"] == "").all(), rows[rows["error"] != ""].head()


def test_reads_that_keep_failing_become_error_rows_after_the_retries(tmp_path, monkeypatch):
    monkeypatch.setattr("unet.storage.RETRY_DELAY_S", 0.01)
    flaky_inputs(tmp_path / "in")
    (tmp_path / "in" / "a.png").write_bytes(png())
    fs, flaky = flaky_fs(always=True)
    rows = plan_and_read(tmp_path / "in", fs=fs, chunk_size=100)
    assert rows.loc["shard.tar", "error"].startswith("unreadable tar archive at the start: ConnectionResetError")
    assert rows.loc["a.png", "error"].startswith("ConnectionResetError: injected")
    assert rows.loc["t.parquet#0", "error"].startswith("unreadable Parquet data at row 0")
    assert flaky.errors == 3 * READ_ATTEMPTS  # each of the 3 inputs tried READ_ATTEMPTS times


def test_permanent_errors_are_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr("unet.storage.RETRY_DELAY_S", 0.01)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png())
    fs, flaky = flaky_fs(always=True, error=PermissionError)
    rows = plan_and_read(tmp_path / "in", fs=fs)
    assert rows.loc["a.png", "error"].startswith("PermissionError") and flaky.errors == 1


# =============================================================================================
# The job on a local Ray: hostile inputs end to end, and 6. incremental runs with other settings
# =============================================================================================

def tiny_model(dest: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = build_model("unet", channels=(4, 8)).eval()
    return save_artifact(model, dest, architecture="unet", model_kwargs={"channels": [4, 8]}, input_size=INPUT_SIZE,
                         normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)


@pytest.fixture(scope="module")
def hostile_run(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    hostile_folder(base / "in")
    (base / "in" / "bomb.png").write_bytes(ico_bomb())
    model = tiny_model(base / "model", seed=0)
    out = base / "out"
    summary = inf.run_inference(inf.InferenceConfig(model=model, input=str(base / "in"), output=str(out),
                                                    chunk_size=4, batch_size=4, max_bytes=100_000))
    return base, model, out, summary


@pytest.mark.slow
def test_the_job_writes_one_row_per_hostile_input_and_goes_on(hostile_run):
    base, _, out, summary = hostile_run
    df = pd.read_parquet(out).set_index("image_id")
    want = {**HOSTILE_IDS, "bomb.png": "not a readable image"}
    assert sorted(df.index) == sorted(want)
    for image_id, message in want.items():
        status, error = df.loc[image_id, ["status", "error"]]
        if message:
            assert status == "error" and message in error, (image_id, error)
        else:
            assert status == "ok" and pd.isna(error), (image_id, error)
    assert summary.rows_ok + summary.rows_error == len(want)


@pytest.mark.slow
def test_incremental_against_an_output_made_with_other_settings_refuses(hostile_run, tmp_path, capsys):
    from jobs.infer import main
    from unet.cli import run_main

    base, model, out, _ = hostile_run
    args = dict(model=model, input=str(base / "in"), output=str(out), chunk_size=4, batch_size=4, max_bytes=100_000,
                incremental=True)
    same = inf.run_inference(inf.InferenceConfig(**args))  # same settings: nothing to do
    assert same.units_planned == 0 and same.parts_written == 0
    # Another input root with the same relative names would silently match every file.
    other_root = tmp_path / "copy"
    shutil.copytree(base / "in" / "sub", other_root, symlinks=True)
    other_model = tiny_model(tmp_path / "model2", seed=1)
    for change, message in [
        ({"input": str(other_root)}, f"input {base / 'in'}, this run {other_root}"),
        ({"model": other_model}, f"model {load_artifact(model).model_id}, this run {load_artifact(other_model).model_id}"),
        ({"threshold": 0.4}, "threshold 0.5, this run 0.4"),
        ({"tta": True}, "tta false, this run true"),
        ({"min_area": 0.01}, "min_area 0.0, this run 0.01"),
        ({"largest_component": True}, "largest_component false, this run true"),
        ({"save_probabilities": True}, "save_probabilities false, this run true"),
        ({"dicom_columns": ("PatientID",)}, 'dicom_columns [], this run ["PatientID"]'),
    ]:
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(UsageError, match=r"--incremental: .* already holds masks made with other settings") as e:
            inf.run_inference(inf.InferenceConfig(**{**args, **change}))
        assert message in str(e.value), (change, str(e.value))
        assert sorted(p.name for p in out.iterdir()) == before  # refused before touching anything
    # The command line: one line, exit code 2.
    code = run_main(main, ["--model", model, "--input", str(base / "in"), "--output", str(out), "--incremental",
                           "--threshold", "0.3", "--max-bytes", "100000", "--chunk-size", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "threshold 0.5, this run 0.3" in err
