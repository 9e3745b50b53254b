"""Bulk inference: segment every image of an archive with a model artifact, masks to Parquet.

    python -m jobs.infer --model runs/demo/model --input runs/images --output runs/masks
    python -m jobs.infer --model busi-unet --input s3://bucket/scans/ --output s3://bucket/masks/ \\
        --workers 4 --gpus-per-worker 1 --batch-size 64
    python -m jobs.infer --model busi-unet --input s3://bucket/shards/ --output s3://bucket/masks/ --incremental
    python -m jobs.infer --model busi-unet --input table.parquet --image-column png --id-column case_id \\
        --output runs/masks
    ray job submit --runtime-env deploy/runtime_env.yaml -- python -m jobs.infer --model busi-unet \\
        --input s3://bucket/scans/ --output s3://bucket/masks/

``--input`` is a folder/prefix (walked recursively; image files .png .jpg .jpeg .bmp .tif .tiff,
DICOM files (.dcm, or no extension and the DICM marker; a row per frame), tar shards and Parquet
tables may be mixed) or a single image, tar or Parquet file. The output is
``part-<sha1>.parquet`` files with one row per input (schema in ``unet.inference`` and the
README); broken inputs become ``status = "error"`` rows and the job goes on. Rerunning the same
command overwrites its parts; ``--incremental`` only processes inputs that are not in the output
yet (scheduled runs over a growing archive, or finishing an interrupted run). One run writes an
output at a time (``<output>/_lease.json``): another run on the same output stops with one line
naming the holder, or waits for it with ``--wait-for-lease``.

Post-processing is the model artifact's (threshold, flip TTA, image-head gate, minimum region area,
largest component: ``config.json``, chosen on validation); ``--threshold``, ``--tta/--no-tta``,
``--gate-threshold`` (0 = no gate), ``--min-area`` and ``--largest-component/--no-largest-component``
override it, and ``<output>/_runs/run-*.json`` records what was used.
``--backend onnxruntime`` runs the model actors on ONNX Runtime (the artifact exported once, as
``jobs.export`` does); ``--save-probabilities`` adds each probability map (``probability_png``).

Ray: joins ``--address`` or ``$RAY_ADDRESS`` (as under ``ray job submit``), else starts a local
Ray with ``--num-cpus`` (default: all CPUs). S3 endpoint and credentials come from the AWS_*
environment variables, or ``--endpoint`` / ``--region`` / ``--profile`` / ``--credentials-file``
which set them for this process (keys are never flags). Under ``ray job submit`` or on a multi-node
Ray, ``--input``/``--output`` must be shared URIs (``s3://``), else it stops at once with one line.
Prints a progress line every ~10 s and a JSON summary last;
Ray's own output stays in its log files (path printed once) unless ``--verbose`` or
``UNET_VERBOSE=1``. Bad input (unknown model, missing input, Parquet without the image column)
exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from unet.cli import add_s3_arguments, apply_s3_arguments, run_main, usage_errors
from unet.runtime import configure_output, init_ray, require_shared_paths

_MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    from unet.dicom import DICOM_COLUMNS
    from unet.inference import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

    p = argparse.ArgumentParser(
        prog="python -m jobs.infer", allow_abbrev=False,
        description="Segment every image under --input with a model artifact; write masks as Parquet.")
    p.add_argument("--model", required=True,
                   help="model artifact: pretrained name (e.g. busi-unet), local directory or s3:// URI")
    p.add_argument("--input", required=True,
                   help="folder/prefix of images, tar shards and/or Parquet tables, or one such file "
                        "(local path or s3://)")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix for part-*.parquet")
    p.add_argument("--image-column", default="image",
                   help="Parquet inputs: column with encoded image bytes (default: image)")
    p.add_argument("--id-column", default=None,
                   help="Parquet inputs: column to use as image_id (default: '<file>#<row>')")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files whose relative path matches, e.g. '*_mask*.png' (repeatable)")
    p.add_argument("--chunk-size", type=int, default=1000,
                   help="images (or Parquet rows) per output part; a tar is always one part (default: 1000)")
    p.add_argument("--incremental", action="store_true",
                   help="skip inputs already in --output (growing archives; finishing an interrupted run); refused "
                        "when the output was made from another input root, model or mask settings")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --incremental: redo the parts that hold error rows")
    p.add_argument("--workers", type=int, default=1, help="model actors (default: 1)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per model actor (default: 0)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="what runs the model: torch, or onnxruntime on the graph exported from the artifact "
                        "(CPU; CUDA with onnxruntime-gpu) (default: torch)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write each probability map as an 8-bit PNG (probability_png column; off: size)")
    p.add_argument("--dicom-columns", nargs="+", default=[], metavar="ATTRIBUTE", choices=DICOM_COLUMNS,
                   help=f"DICOM inputs: also write these identifying attributes as columns "
                        f"({', '.join(DICOM_COLUMNS)}); left out by default (privacy); null for other inputs")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs per model actor (default: 1); workers x this + 1 must fit the cluster, the 1 "
                        "for reading, decoding and post-processing")
    # Post-processing: the artifact's (config.json "threshold" and "postprocess", chosen on
    # validation) unless a flag overrides it; the run record in <output>/_runs/ shows what was used.
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the one stored in the model artifact)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the horizontally flipped prediction (default: the artifact's)")
    p.add_argument("--gate-threshold", type=float, default=None, metavar="P",
                   help="empty the mask when the image head's p(lesion) = 1 - p(normal) is below P; 0 = no "
                        "gate (default: the artifact's; needs a model with an image head)")
    p.add_argument("--min-area", type=float, default=None, metavar="FRACTION",
                   help="remove mask regions smaller than this fraction of the image (default: the artifact's)")
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest connected region of each mask (default: the artifact's)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"larger images become error rows (decompression bombs; default: {DEFAULT_MAX_PIXELS})")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"larger files / tar members / Parquet image cells become error rows (default: "
                        f"{DEFAULT_MAX_BYTES // _MIB} MiB)")
    p.add_argument("--check-resources", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse a request the cluster cannot hold (switch off on autoscaling clusters)")
    p.add_argument("--node-types", metavar="FILE", default=None,
                   help="cluster YAML (e.g. cluster.yaml) with the node types an autoscaling cluster can add; "
                        "requests are checked against them (default: found from the cluster)")
    p.add_argument("--wait-for-lease", action="store_true",
                   help="when another run is writing --output, wait for it instead of refusing")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray this job starts (default: all)")
    add_s3_arguments(p)
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output (Ray Data progress, worker logs, warnings); or set UNET_VERBOSE=1")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    apply_s3_arguments(args)

    from unet.inference import InferenceConfig, run_inference

    with usage_errors():  # a bad setting is bad use
        config = InferenceConfig(
            model=args.model, input=args.input, output=args.output, image_column=args.image_column,
            id_column=args.id_column, chunk_size=args.chunk_size, workers=args.workers,
            batch_size=args.batch_size, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, threshold=args.threshold, tta=args.tta,
            gate_threshold=args.gate_threshold, min_area=args.min_area,
            largest_component=args.largest_component, incremental=args.incremental,
            retry_errors=args.retry_errors, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
            exclude=tuple(args.exclude), check_resources=args.check_resources, node_types=args.node_types,
            wait_for_lease=args.wait_for_lease, backend=args.backend,
            save_probabilities=args.save_probabilities, dicom_columns=tuple(args.dicom_columns))
    verbose = configure_output("infer", args.verbose)
    require_shared_paths({"--input": args.input, "--output": args.output}, args.address)
    init_ray(args.address, args.num_cpus)
    if verbose:
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = True
    summary = run_inference(config)
    print(json.dumps(summary.to_dict()), flush=True)
    return 0


def cli() -> int:
    """Entry of the ``unet-infer`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
