"""Evaluate a model artifact on a prepared split and write metrics + an HTML report.

    python -m jobs.evaluate --model runs/demo/model --data runs/demo/prepared --split test --out runs/demo/eval
    python -m jobs.evaluate --model busi-unet --data s3://bucket/busi-prepared --out s3://bucket/eval/busi-unet
    python -m jobs.evaluate --model runs/busi-cal --data runs/busi_prepared --out runs/eval/no-gate --gate-threshold 0

The model's post-processing (threshold, image-level gate, min area, largest component, TTA; as
``jobs.calibrate`` stored it in the artifact) is used unless a flag overrides it; metrics.json
records the values used.

Writes into ``--out`` (local directory or ``s3://`` prefix): ``metrics.json`` (summaries overall and
per class with 95 % bootstrap CIs, false-lesion rate on normal images, model id, data URI, manifest
sha256, post-processing; lesion Dice; for models with an image head the gate's AUROC, sensitivity
and specificity and the malignant AUROC), ``per_image.csv`` / ``per_image.parquet`` (Dice, IoU,
precision, recall, HD95, p(lesion), p(malignant) per image; the Parquet file also holds each
predicted mask), and ``report.html`` with its figures (overlays,
best/worst cases, training curves). Prints the report's path last.

Single process: scoring a test split of a few hundred images needs no cluster. On a Ray cluster the
work runs in the driver, so submit it with entrypoint resources (Ray then runs the driver on a worker;
without them it refuses to run on a head that advertises no CPUs):
``ray job submit --runtime-env deploy/runtime_env.yaml --entrypoint-num-cpus 3 --entrypoint-num-gpus 1 --
python -m jobs.evaluate ...`` with ``s3://`` URIs for ``--data`` and ``--out``.
Bad input (unknown model, wrong URI, incompatible artifact) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence

from unet.cli import run_main, usage_errors
from unet.runtime import UsageError, configure_output, require_driver_cpus, require_shared_paths


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate", allow_abbrev=False,
        description="Score a model on a prepared split: per-image metrics, bootstrap CIs, HTML report.",
    )
    p.add_argument("--model", required=True,
                   help="model artifact: pretrained name (e.g. busi-unet), local directory or s3:// URI")
    p.add_argument("--data", required=True, help="prepared data URI (output of jobs.prepare)")
    p.add_argument("--split", default="test",
                   help="split to score: train, val, test (default), or a cross-validation fold such as val@fold2of5")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs; 0 = none (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the overlay sample (default: 0)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the one stored in the model artifact)")
    p.add_argument("--gate-threshold", type=float, default=None,
                   help="empty the mask of images whose p(lesion) from the image head is below this; "
                        "0 = no gate (default: the artifact's)")
    p.add_argument("--min-area", type=float, default=None,
                   help="remove components smaller than this fraction of the image, e.g. 0.002 "
                        "(default: the artifact's)")
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest component (default: the artifact's)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the horizontal flip (default: the artifact's)")
    p.add_argument("--device", default="auto", help="'auto' = GPU if available (default), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--grid", type=int, default=12, help="images in the overlay grid, class-stratified (default: 12)")
    p.add_argument("--cases", type=int, default=4, help="best and worst cases shown (default: 4)")
    p.add_argument("--no-report", action="store_true", help="write metrics and per-image tables only")
    p.add_argument("--verbose", action="store_true", help="debug lines too (or set UNET_VERBOSE=1)")
    return p


def resolve_device(name: str) -> str:
    """``--device`` value -> a torch device string ('auto' = CUDA when available)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _num(stat: dict | None, digits: int = 4) -> str:
    """``mean [ci_low, ci_high]`` (the interval only when there is one); n/a when undefined."""
    def f(v):
        return "n/a" if v is None or v != v else f"{v:.{digits}f}"
    if stat is None or stat.get("mean") is None or stat["mean"] != stat["mean"]:
        return "n/a"
    ci = stat.get("ci_low")
    return f(stat["mean"]) + ("" if ci is None or ci != ci else f" [{f(ci)}, {f(stat['ci_high'])}]")


def summary_lines(m: dict) -> list[str]:
    """The printed summary: overall Dice, the two failure modes, and the image head if any."""
    overall, flr, missed = m["overall"], m["false_lesion_rate"], m["missed_lesion_rate"]
    pp = m["postprocess"]
    lines = [
        f"post-processing: threshold {pp['threshold']}, gate {pp['gate_threshold']}, min area {pp['min_area']}, "
        f"largest component {pp['largest_component']}, tta {pp['tta']}",
        f"{overall['images']} images: Dice {_num(overall['dice'])}, IoU {_num(overall['iou'])}",
        f"lesion Dice ({m['lesion_dice']['images']} benign/malignant images) {_num(m['lesion_dice'])}; "
        f"false-lesion rate {flr['count']}/{flr['images']} {_num(flr, 3)}; "
        f"missed lesions {missed['count']}/{missed['images']}",
    ]
    gate = m.get("gate")
    if gate is None:
        lines.append("image head: none (no gate metrics)")
    else:
        sens, spec = gate["sensitivity"], gate["specificity"]
        lines.append(f"image head: lesion-vs-normal AUROC {_num(gate['auroc'], 3)}; gate {gate['threshold']}: "
                     f"sensitivity {sens['count']}/{sens['images']} {_num(sens, 3)}, "
                     f"specificity {spec['count']}/{spec['images']} {_num(spec, 3)}; "
                     f"malignant-vs-benign AUROC {_num(m.get('malignant_auroc'), 3)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_output("evaluate", args.verbose)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--bootstrap", args.bootstrap, 0),
                             ("--grid", args.grid, 0), ("--cases", args.cases, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}; got {value}")
    require_shared_paths({"--data": args.data, "--out": args.out})
    require_driver_cpus("jobs.evaluate")

    # Heavy imports after argument parsing so that --help and usage errors are instant.
    from unet.artifact import load_artifact
    from unet.evaluation import evaluate, write_outputs
    from unet.shards import parse_split

    def log(line: str) -> None:
        print(f"[evaluate {time.strftime('%H:%M:%S')}] {line}", flush=True)

    with usage_errors():  # an unknown split, model name or --device is bad use
        parse_split(args.split)
        device = resolve_device(args.device)
        loaded = load_artifact(args.model, device=device)
    log(f"model {loaded.model_id} ({loaded.settings.architecture}) on {device}; "
        f"scoring {args.data} split {args.split}")
    result = evaluate(loaded, args.data, args.split, batch_size=args.batch_size, n_bootstrap=args.bootstrap,
                      seed=args.seed, threshold=args.threshold, gate_threshold=args.gate_threshold,
                      min_area=args.min_area, largest_component=args.largest_component, tta=args.tta,
                      device=device, model_ref=args.model,
                      command=shlex.join(["python", "-m", "jobs.evaluate", *argv]), log=log)
    for line in summary_lines(result.metrics):
        log(line)
    paths = write_outputs(result, args.out, grid=args.grid, extremes=args.cases, seed=args.seed,
                          report=not args.no_report)
    log(f"metrics: {paths['metrics']}")
    log(f"per-image: {paths['per_image_csv']}")
    # Last line: the report (or the metrics when no report was asked for), for scripts to pick up.
    print(paths.get("report", paths["metrics"]), flush=True)
    return 0


def cli() -> int:
    """Entry of the ``unet-evaluate`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    sys.exit(run_main(main))
