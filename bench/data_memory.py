"""Memory stays bounded while Ray Data streams shards much larger than the object store.

Writes ~500 MB of prepared shards (incompressible noise PNGs, generated quickly by repeating a few
encoded images), starts Ray with a 100 MB object store, and streams the train split through the
full pipeline (decode, resize, augment, normalise, local shuffle buffer, torch collate) while a
background thread samples the object store usage (plasma), spilled bytes, and the total memory of
the driver and all Ray processes (sum of PSS, so shared pages count once).

Bounded means: peak plasma use stays within the object store (no growth with dataset size),
nothing needs to be spilled to disk, and the process memory is flat rather than growing with the
bytes read.

Run (about 1-2 minutes on 2 CPUs)::

    .venv/bin/python bench/data_memory.py                       # defaults: 2000 rows, ~530 MB
    .venv/bin/python bench/data_memory.py --rows 400 --object-store-mb 80   # quicker

Writes bench/results/data_memory.json and prints a summary.

Result on the 2-CPU dev machine (heavily shared, so slow): 2000 rows = 506 MiB of shards through
a 100 MiB object store -> peak plasma 81-88 MiB, 0 MiB spilled (two runs), total PSS of all Ray
processes 1.65-1.77 GB in the first quarter of the stream and 1.58-1.59 GB in the last (flat: it is
the Ray worker processes' baseline, not data), 24-34 rows/s with augmentation. Lessons, now the defaults here:

* read units and blocks must be small against the store: with Ray's default 128 MiB Parquet read
  units, a 152 MiB split was spilled almost entirely (151 MiB); ``max_block_mib=8`` avoids it;
* the consumer's local shuffle buffer pins its rows outside Ray Data's budget: a 256-row buffer
  (with 16 MiB blocks) spilled 289 of 506 MiB; a 64-row buffer spills nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import work_dir  # noqa: E402
from bench.memory import MiB, tree_memory  # noqa: E402
from unet.data import AugmentConfig, collate_torch, read_split  # noqa: E402


def write_big_shards(root: Path, rows: int, shard_rows: int, side: int, seed: int = 0) -> int:
    """Write ``rows`` rows of ``side``x``side`` noise PNGs to root/train; return total bytes."""
    rng = np.random.default_rng(seed)
    # Noise does not compress, so each PNG is ~side*side bytes; 8 distinct ones repeated are
    # enough to exercise memory (content is irrelevant) and keep generation to seconds.
    images = [cv2.imencode(".png", rng.integers(0, 256, (side, side), dtype=np.uint8))[1].tobytes()
              for _ in range(8)]
    yy, xx = np.mgrid[:side, :side]
    masks = [cv2.imencode(".png", (((yy - side / 2 - 9 * k) ** 2 + (xx - side / 3) ** 2
                                    < (side / 6) ** 2) * 255).astype(np.uint8))[1].tobytes()
             for k in range(8)]
    (root / "train").mkdir(parents=True, exist_ok=True)
    total = 0
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        table = pa.table({
            "id": [f"bench-{start + i:06d}" for i in range(n)],
            "class": ["benign"] * n,
            "image_png": [images[(start + i) % 8] for i in range(n)],
            "mask_png": [masks[(start + i) % 8] for i in range(n)],
            "height": pa.array([side] * n, pa.int32()), "width": pa.array([side] * n, pa.int32()),
            "group": [f"g{start + i}" for i in range(n)], "source": ["bench"] * n,
        })
        path = root / "train" / f"part-{s:05d}.parquet"
        # No dictionary encoding: it would store the 8 repeated PNGs once and make the files
        # (and Ray's size estimates) tiny although every row decodes to its own full copy.
        pq.write_table(table, path, compression="none", use_dictionary=False, row_group_size=25)
        total += path.stat().st_size
    return total


class Sampler(threading.Thread):
    """Samples plasma usage, spilled bytes and total PSS of this process tree until stopped."""

    def __init__(self, gcs_address: str, interval: float = 0.5):
        super().__init__(daemon=True)
        self.gcs_address, self.interval = gcs_address, interval
        self.samples: list[dict] = []
        self.rows = 0  # rows consumed so far, updated by the main loop
        self._stop_event = threading.Event()

    def run(self) -> None:
        from ray._private.internal_api import memory_summary

        start = time.monotonic()
        while not self._stop_event.is_set():
            summary = memory_summary(address=self.gcs_address, stats_only=True)
            plasma = re.search(r"Plasma memory usage (\d+) MiB", summary)
            spilled = re.search(r"Spilled (\d+) MiB", summary)
            self.samples.append({
                "t": round(time.monotonic() - start, 2), "rows": self.rows,
                "plasma_mib": int(plasma.group(1)) if plasma else 0,
                "spilled_mib": int(spilled.group(1)) if spilled else 0,
                "pss_mib": round(tree_memory(os.getpid()).pss / MiB, 1),
            })
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _max_between(samples: list[dict], key: str, low: float, high: float) -> float | None:
    values = [s[key] for s in samples if low <= s["rows"] <= high]
    return max(values) if values else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows in the train split")
    parser.add_argument("--png-side", type=int, default=512, help="side of the stored PNGs")
    parser.add_argument("--shard-rows", type=int, default=100, help="rows per shard")
    parser.add_argument("--object-store-mb", type=int, default=100, help="Ray object store size")
    parser.add_argument("--size", type=int, default=128, help="training size (square)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=64,
                        help="local shuffle buffer rows (held by the consumer, outside Ray Data's "
                             "budget: keep rows x row bytes well below the object store)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--max-block-mib", type=float, default=8,
                        help="read block size cap (must be well below the object store size)")
    parser.add_argument("--out", help="result JSON (default bench/results/data_memory.json)",
                        default=str(Path(__file__).resolve().parent / "results" / "data_memory.json"))
    args = parser.parse_args(argv)

    import ray

    with work_dir(None, "unet-bench-data-") as workdir:
        t0 = time.monotonic()
        dataset_bytes = write_big_shards(workdir, args.rows, args.shard_rows, args.png_side)
        print(f"wrote {dataset_bytes / MiB:.0f} MiB of shards in {time.monotonic() - t0:.1f}s")

        ray.init(address="local", num_cpus=args.num_cpus,
                 object_store_memory=args.object_store_mb * MiB, include_dashboard=False,
                 log_to_driver=False)
        sampler = Sampler(ray.get_runtime_context().gcs_address)
        sampler.start()
        ds = read_split(str(workdir), "train", size=(args.size, args.size), augment=AugmentConfig(),
                        seed=0, max_block_mib=args.max_block_mib)
        t0 = time.monotonic()
        rows = 0
        for batch in ds.iter_torch_batches(batch_size=args.batch_size, collate_fn=collate_torch,
                                           local_shuffle_buffer_size=args.shuffle_buffer):
            rows += len(batch["id"])
            sampler.rows = rows
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # one more sample after the stream drains
        sampler.stop()
        ray.shutdown()

    samples = sampler.samples
    result = {
        "rows": rows, "expected_rows": args.rows,
        "dataset_mib": round(dataset_bytes / MiB, 1),
        "object_store_mib": args.object_store_mb,
        "peak_plasma_mib": max(s["plasma_mib"] for s in samples),
        "peak_spilled_mib": max(s["spilled_mib"] for s in samples),
        "peak_pss_mib": max(s["pss_mib"] for s in samples),
        # Bounded = flat in the amount streamed: compare the first and the last quarter of rows.
        "pss_mib_max_until_25pct_rows": _max_between(samples, "pss_mib", 0, 0.25 * rows),
        "pss_mib_max_after_75pct_rows": _max_between(samples, "pss_mib", 0.75 * rows, rows),
        "plasma_mib_max_until_25pct_rows": _max_between(samples, "plasma_mib", 0, 0.25 * rows),
        "plasma_mib_max_after_75pct_rows": _max_between(samples, "plasma_mib", 0.75 * rows, rows),
        "seconds": round(elapsed, 1), "rows_per_s": round(rows / elapsed, 1),
        "config": vars(args), "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "config")}, indent=1))
    if rows != args.rows:
        raise SystemExit(f"streamed {rows} rows, expected {args.rows}")
    return result


if __name__ == "__main__":
    main()
