"""Choose a model's post-processing on the validation split and write it into a model artifact.

    python -m jobs.calibrate --model busi-unet --data runs/busi_prepared --out runs/busi-unet-cal
    python -m jobs.calibrate --model runs/busi-unet/model --data runs/busi_prepared --max-false-lesion-rate 0.2
    python -m jobs.evaluate --model runs/busi-unet-cal --data runs/busi_prepared --split test --out runs/eval/cal
    python -m jobs.calibrate --model runs/busi-cv/model --data runs/busi_prepared --split oof --out runs/busi-cv/calibrated

Runs the model over ``--split`` (default val) without and with flip TTA, then searches mask
threshold × image-level gate × minimum component area × largest component × TTA for the highest
mean per-image Dice whose false-lesion rate on normal images is at most
``--max-false-lesion-rate`` (details: ``unet/calibration.py``). Prints the best candidates and the
chosen one, and writes the artifact with ``config["postprocess"]`` set and
``config["provenance"]["calibration"]`` recording split, data manifest sha256, cap, chosen row and
grid; the weights (and so the model id) are unchanged. Every later ``jobs.evaluate`` and
``jobs.infer`` with that artifact uses the stored post-processing.

``--out`` defaults to the model's own directory or URI (rewritten in place); it is required for the
shipped models in ``unet/weights``, which are never changed. ``--split test`` is refused: the test
split is looked at once per shipped model and never used to choose settings. The last line printed
is the written artifact's location. Bad use exits with code 2 and one line on stderr.

``--split oof`` (for the ensemble ``jobs.train --folds K`` writes): each member runs over the fold it
was validated on, never trained on, so the search sees every image of train+val once, out of fold.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence

from unet.cli import run_main, usage_errors
from unet.runtime import UsageError, configure_output

_COLUMNS = {"dice": "Dice", "lesion_dice": "lesion Dice", "false_lesion_rate": "false-lesion rate",
            "false_lesions": "false lesions", "missed_lesion_rate": "missed", "threshold": "threshold",
            "gate_threshold": "gate", "min_area": "min area", "largest_component": "largest", "tta": "tta"}


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.calibrate", allow_abbrev=False,
        description="Choose threshold, gate, min area, largest component and TTA on a validation split "
                    "under a false-lesion cap; write them into a model artifact.",
    )
    p.add_argument("--model", required=True,
                   help="model artifact: pretrained name (e.g. busi-unet), local directory or s3:// URI")
    p.add_argument("--data", required=True, help="prepared data URI (output of jobs.prepare)")
    p.add_argument("--split", default="val",
                   help="split to calibrate on: val (default), a fold such as val@fold2of5, or oof for a "
                        "cross-validation ensemble (jobs.train --folds K): each member on its own held-out "
                        "fold; test is refused")
    p.add_argument("--max-false-lesion-rate", type=float, default=0.10,
                   help="highest share of normal images allowed a predicted lesion (default: 0.10)")
    p.add_argument("--out", default=None,
                   help="where to write the calibrated artifact (default: in place; required for shipped models)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--device", default="auto", help="'auto' = GPU if available (default), 'cpu', 'cuda', ...")
    p.add_argument("--top", type=int, default=10, help="candidates printed, best first (default: 10)")
    p.add_argument("--verbose", action="store_true", help="debug lines too (or set UNET_VERBOSE=1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_output("calibrate", args.verbose)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--top", args.top, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}; got {value}")
    if not 0.0 <= args.max_false_lesion_rate <= 1.0:
        raise UsageError(f"--max-false-lesion-rate must be in [0, 1], e.g. 0.10; got {args.max_false_lesion_rate}")

    # Heavy imports after argument parsing so that --help and usage errors are instant.
    import pandas as pd

    from jobs.evaluate import resolve_device
    from unet.artifact import load_artifact
    from unet.calibration import calibrate, check_split, output_location, write_calibrated

    def log(line: str) -> None:
        print(f"[calibrate {time.strftime('%H:%M:%S')}] {line}", flush=True)

    with usage_errors():  # a bad split, --out, --device or model name is bad use
        check_split(args.split)  # before any work
        dest = output_location(args.model, args.out)
        device = resolve_device(args.device)
        loaded = load_artifact(args.model, device=device)
    log(f"model {loaded.model_id} on {device}; calibrating on {args.data} split {args.split}, "
        f"false-lesion rate <= {args.max_false_lesion_rate}")
    start = time.perf_counter()
    result = calibrate(loaded, args.data, args.split, max_false_lesion_rate=args.max_false_lesion_rate,
                       batch_size=args.batch_size, device=device, log=log)
    log(f"calibrated in {time.perf_counter() - start:.1f} s")

    table = result.table
    feasible = table[table["feasible"]].head(args.top).rename(columns=_COLUMNS)[list(_COLUMNS.values())]
    feasible.index = range(1, len(feasible) + 1)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(f"best {len(feasible)} of {int(table['feasible'].sum())} settings within the cap "
              f"({len(table)} searched; gate NaN = no gate):\n{feasible.to_string()}", flush=True)
    for label, row in (("baseline (the artifact's post-processing)", result.baseline), ("chosen", result.chosen)):
        log(f"{label}: Dice {row['dice']:.4f}, lesion Dice {row['lesion_dice']:.4f}, false lesions "
            f"{row['false_lesions']}/{result.images['normal']} ({row['false_lesion_rate']:.3f}), missed "
            f"{row['missed_lesion_rate']:.3f}; threshold {row['threshold']}, gate {row['gate_threshold']}, "
            f"min area {row['min_area']}, largest component {row['largest_component']}, tta {row['tta']}")
    for part, row in result.by_split.items():
        log(f"chosen, on the out-of-fold predictions of the {part} split's images only: Dice {row['dice']:.4f}, "
            f"lesion Dice {row['lesion_dice']:.4f}, false lesions {row['false_lesions']}, missed "
            f"{row['missed_lesion_rate']:.3f}")
    written = write_calibrated(loaded, result, dest, command=shlex.join(["python", "-m", "jobs.calibrate", *argv]))
    log(f"wrote {written} (model id {loaded.model_id}, weights unchanged)")
    print(written, flush=True)  # last line: the artifact, for scripts to pick up
    return 0


def cli() -> int:
    """Entry of the ``unet-calibrate`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    sys.exit(run_main(main))
