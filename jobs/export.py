"""Export a model artifact for serving outside this project: an ONNX graph with its settings inside.

    python -m jobs.export --model busi --format onnx --out runs/busi.onnx
    python -m jobs.export --model runs/demo/model --format onnx --out runs/demo/model.onnx
    python -m jobs.export --model s3://bucket/models/busi-unet --out s3://bucket/models/busi-unet.onnx

``--model`` is a pretrained name, an artifact directory or URI (as for ``jobs.infer``); ``--out``
a local path or ``s3://`` URI. The graph takes normalised images ``input`` (batch, 1, H, W) with
dynamic batch and H, W any multiple of the network's stride, and gives ``logits`` (and
``class_logits`` for a model with an image-level head); BatchNorm is folded into the
convolutions; normalisation, input size, stride, padding rule, threshold, post-processing and
model_id are in the ONNX metadata (``unet.*`` keys). Details: ``unet/export.py``.

Before writing, the graph is run with ONNX Runtime and compared with PyTorch on a random batch at
the model's input size and at an odd size (padded as the model pads); the largest logit difference
is in the summary. Prints one JSON line. Bad use (unknown model, ``--out`` a folder) exits with
code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from unet.cli import add_s3_arguments, apply_s3_arguments, run_main

FORMATS = ("onnx",)


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.export", allow_abbrev=False,
        description="Export a model artifact as an ONNX graph (settings in its metadata).")
    p.add_argument("--model", required=True,
                   help="model artifact: pretrained name (e.g. busi), local directory or s3:// URI")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", required=True, help="file to write, local path or s3:// URI (e.g. model.onnx)")
    add_s3_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    apply_s3_arguments(args)

    from unet.export import export_artifact

    summary = export_artifact(args.model, args.out)
    print(json.dumps(summary), flush=True)
    return 0


def cli() -> int:
    """Entry of the ``unet-export`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
