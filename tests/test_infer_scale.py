"""Bulk inference without a funnel through the driver (unet.inference: fragments and part tasks).

The rows are written as fragment files by the pipeline's last step and each part is assembled by
a task from its fragments; the driver receives only the fragments' summaries. Tested here: that
retried fragments and retried part tasks still give each row once, and, on a real multi-node Ray
(``ray.cluster_utils.Cluster``), that what the driver receives per image does not grow with the
masks or the archive.
"""

from __future__ import annotations

import datetime
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unet import inference as inf
from unet.inference.output import (ASSIGNMENT_SCHEMA, PIPELINE_SCHEMA, PartAssembler, assemble_part,
                                   fragment_assignments, part_name, write_fragments)
from unet.inference.plan import Chunk
from unet.phantoms import generate

REPO = Path(__file__).resolve().parents[1]


def pipeline_rows(chunk: str, seqs: list[int], n: int = -1) -> pa.Table:
    """Post-processed rows as the pipeline's last step gets them; the mask bytes name the row."""
    rows = [{"_chunk": chunk, "_seq": s, "_n": n if s < 0 else -1, "image_id": f"{chunk}/{s}",
             "source_uri": f"file:///{chunk}/{s}", "status": "error" if s < 0 else "ok",
             "mask_png": f"mask {chunk}/{s}".encode(), "model_id": "m",
             "processed_at": datetime.datetime.now(datetime.timezone.utc)} for s in seqs]
    return pa.Table.from_pylist(rows, schema=PIPELINE_SCHEMA)


def test_retried_fragments_and_part_tasks_give_every_row_once(tmp_path):
    fs, frag, out = pafs.LocalFileSystem(), str(tmp_path / "frag"), str(tmp_path / "out")
    chunks = {"img": Chunk("img", "image", 5, None), "tar": Chunk("tar", "tar", None, "x.tar")}

    def fragments(table: pa.Table) -> pa.Table:
        return write_fragments(table, fs=fs, directory=frag, uri=frag, prefix="run-frag-")

    first = fragments(pa.concat_tables([pipeline_rows("img", [2, 0, 1]), pipeline_rows("tar", [0])]))
    # Positions 1 and 2 again, in a block of another make-up (a retried task upstream), then the
    # very same block twice (a retried task): it rewrites its own fragment rather than adding one.
    again = fragments(pipeline_rows("img", [1, 2, 3]))
    assert fragments(pipeline_rows("img", [3, 1, 2])).equals(again)
    last = fragments(pa.concat_tables([pipeline_rows("img", [4]), pipeline_rows("tar", [1, -1], n=2)]))
    assert len(list((tmp_path / "frag").glob("run-frag-img-*.parquet"))) == 3
    assert last.column("_n").to_pylist() == [-1, 2] and first.column("_seqs").to_pylist() == [[0, 1, 2], [0]]

    complete = {}
    assembler = PartAssembler(chunks, lambda chunk, table: complete.setdefault(chunk.key, table),
                              empty=ASSIGNMENT_SCHEMA)
    for summaries in (first, again, again, last):
        assembler.add(fragment_assignments(summaries))
    assert sorted(complete) == ["img", "tar"] and assembler.incomplete() == []
    assert assembler.duplicates == 2 + 3

    part = dict(fs=fs, fragments=frag, fragments_uri=frag, prefix="run-frag-", out_path=out, out_uri=out,
                model_id="m")
    for key, assigned in complete.items():
        assert assemble_part(chunks[key], assigned.select(["_seq", "fragment"]), **part) == (chunks[key].expected, 0)
    table = pq.read_table(Path(out) / part_name("img"))
    assert table.column("image_id").to_pylist() == [f"img/{s}" for s in range(5)]
    assert table.column("mask_png").to_pylist() == [f"mask img/{s}".encode() for s in range(5)]
    assert pq.read_table(Path(out) / part_name("tar")).column("image_id").to_pylist() == ["tar/0", "tar/1"]
    assert not list((tmp_path / "frag").glob("run-frag-tar-*"))

    # A part task retried after it wrote its part and deleted its fragments keeps that part.
    written = (Path(out) / part_name("img")).read_bytes()
    assert assemble_part(chunks["img"], complete["img"].select(["_seq", "fragment"]), **part) == (5, 0)
    assert (Path(out) / part_name("img")).read_bytes() == written


# =============================================================================================
# A multi-node Ray: the driver's bytes per image
# =============================================================================================

@pytest.fixture(scope="module")
def two_node_cluster():
    """A head with 0 CPUs (the driver's node does no work) and two 1-CPU worker nodes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_driver_bytes_per_image_do_not_grow_with_masks_or_archive(two_node_cluster, tmp_path):
    from unet.artifact import save_artifact
    from unet.models import build_model

    import torch

    torch.manual_seed(0)
    model = build_model("unet", channels=(4, 8)).eval()
    with torch.no_grad():
        model.head.weight.mul_(40.0)
    model_dir = save_artifact(model, tmp_path / "model", architecture="unet", model_kwargs={"channels": [4, 8]},
                              input_size=(32, 32), normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)

    def run(name: str, count: int, size: tuple[int, int], **kw) -> tuple[float, float]:
        root = tmp_path / name
        root.mkdir()
        for i, p in enumerate(generate(count, seed=1, size=size)):
            (root / f"img_{i:03d}.png").write_bytes(png(p.image))
        out = tmp_path / f"{name}-out"
        summary = inf.run_inference(inf.InferenceConfig(
            model=str(model_dir), input=str(root), output=str(out), chunk_size=4, batch_size=4,
            cpus_per_worker=0.5, **kw))
        table = pq.read_table(out)
        assert table.num_rows == count == summary.rows_ok and summary.parts_written == -(-count // 4)
        assert not (out / "_tmp").exists()
        row_bytes = sum(len(v or b"") for c in ("mask_png", "probability_png") for v in table.column(c).to_pylist())
        return summary.driver_bytes / count, row_bytes / count

    small, small_rows = run("small", 8, (32, 32))
    # 4x the images, 64x the pixels, and probability maps on top of the masks.
    large, large_rows = run("large", 32, (256, 256), save_probabilities=True)
    assert large_rows > 20 * small_rows
    assert 0 < large <= 1.5 * small, (small, large)
    assert large * 50 < large_rows, (large, large_rows)
