"""Combine trained models into one ensemble artifact that averages their probabilities.

    python -m jobs.ensemble --models runs/a/model runs/b/model --out runs/ens/model
    python -m jobs.calibrate --model runs/ens/model --data runs/busi_prepared --out runs/ens/calibrated

Each ``--models`` entry is a pretrained name, a local artifact directory or an s3:// URI. The
ensemble (``unet.models.ensemble``) averages the members' foreground probabilities and image-class
probabilities (over the members with an image head); members trained at another input size or
normalisation see the input resized and re-normalised to their own. The
artifact holds every member's weights and, in its provenance, each member's model id and
provenance; its post-processing starts plain (threshold 0.5, no gate): choose it on val with
``jobs.calibrate``. Inference costs the sum of the members'. The last line printed is the
written artifact's location. Bad use exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from unet.cli import run_main
from unet.runtime import UsageError, configure_output


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    p = argparse.ArgumentParser(prog="python -m jobs.ensemble", allow_abbrev=False,
                                description="Combine trained models into one artifact that averages their "
                                            "probabilities.")
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="two or more artifacts: pretrained names, local directories or s3:// URIs")
    p.add_argument("--out", required=True, help="directory or s3:// URI to write the ensemble artifact to")
    p.add_argument("--name", default="ensemble", help="prefix of the ensemble's model id (default: ensemble)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="the ensemble's input size (default: the largest member's)")
    p.add_argument("--weights-dtype", default="float32", choices=("float32", "float16"),
                   help="how the weights are stored (float16 halves the file; default: float32)")
    p.add_argument("--verbose", action="store_true", help="debug lines too (or set UNET_VERBOSE=1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_output("ensemble", args.verbose)
    if len(args.models) < 2:
        raise UsageError(f"--models needs at least 2 artifacts; got {len(args.models)}")

    from unet.artifact import save_ensemble

    try:
        written, loaded, model = save_ensemble(args.models, args.out, name=args.name, input_size=args.input_size,
                                        weights_dtype=args.weights_dtype,
                                        provenance={"command": shlex.join(["python", "-m", "jobs.ensemble", *argv])})
    except ValueError as e:  # an artifact that is not one, or members that cannot be combined
        raise UsageError(str(e)) from e
    height, width = model.input_size
    print(f"[ensemble] {len(model.members)} members, from {', '.join(m.model_id for m in loaded)}; input size "
          f"{height}x{width}", flush=True)
    print(written, flush=True)  # last line: the artifact, for scripts to pick up
    return 0


def cli() -> int:
    """Entry of the ``unet-ensemble`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    sys.exit(run_main(main))
