"""Copy prepared train/val shards with images downsized, to carry BUSI to a machine with a small
transfer limit (how `busi-unet-256` was trained on a lent GPU machine).

    python scripts/downsize_prepared.py runs/busi_prepared .gpu/busi_small 288

Images are resized with area interpolation so the long side is at most MAX_SIDE, masks with
nearest neighbour; ids, classes, groups and the splits stay as prepared. The test split is left
out: evaluate on the full-size prepared data (`jobs.evaluate --data runs/busi_prepared`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def downsize(png: bytes, max_side: int, interpolation: int) -> tuple[bytes, int, int]:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (round(w * scale), round(h * scale))
    image = cv2.resize(image, size, interpolation=interpolation)
    return cv2.imencode(".png", image)[1].tobytes(), size[1], size[0]


def main(src: Path, dst: Path, max_side: int) -> None:
    manifest = json.loads((src / "manifest.json").read_text())
    shards = []
    for shard in manifest["shards"]:
        if shard["split"] == "test":
            continue
        schema = pq.read_schema(src / shard["path"])
        rows = pq.read_table(src / shard["path"]).to_pylist()
        for row in rows:
            row["image_png"], row["height"], row["width"] = downsize(row["image_png"], max_side, cv2.INTER_AREA)
            row["mask_png"], _, _ = downsize(row["mask_png"], max_side, cv2.INTER_NEAREST)
        out = dst / shard["path"]
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
        shards.append({**shard, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()})
    manifest["shards"] = shards
    manifest["note"] = f"train/val of {src} downsized to long side <= {max_side}; test left out"
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 288)
