"""The whole path on synthetic phantoms, on one machine: data → training → bulk inference → report.

    python -m jobs.demo                  # (make demo) everything under runs/demo, a few minutes on 2 CPUs
    python -m jobs.demo --out /tmp/demo --fresh
    python -m jobs.demo --verbose        # also Ray's own output (otherwise in Ray's log files)

Steps, each the real job with its real command line (printed before it runs):
  1. ``jobs.prepare --source phantoms``: phantoms → duplicate-aware Parquet shards + manifest
  2. ``jobs.train``: 2 Ray Train workers (gloo) on a local Ray, checkpoints, best model exported
  3. ``jobs.infer``: the model over a separate archive of phantom PNGs → masks as Parquet
  4. ``jobs.evaluate``: test-split metrics (never-seen phantoms) and an HTML report
Re-running resumes: the finished training run is only re-exported, inference overwrites its parts.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2

from jobs import evaluate, infer, prepare, train
from unet.cli import run_main
from unet.phantoms import generate
from unet.runtime import configure_output

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="where everything goes (default: runs/demo)")
    p.add_argument("--num", type=int, default=400, help="phantoms to prepare for training/val/test (default: 400)")
    p.add_argument("--archive", type=int, default=200, help="phantom images in the inference archive (default: 200)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output in every step (or set UNET_VERBOSE=1)")
    return p


def write_archive(folder: Path, num: int) -> None:
    """Unlabelled phantom scans for bulk inference (seed 10_000: not in the training data)."""
    folder.mkdir(parents=True, exist_ok=True)
    for phantom in generate(num, seed=10_000, size=(256, 256)):
        cv2.imwrite(str(folder / f"{phantom.id}.png"), phantom.image)


def step(title: str, job, args: list[str]) -> None:
    print(f"\n=== {title}\n$ python -m {job.__name__} {shlex.join(args)}", flush=True)
    code = job.main(args)
    if code:
        raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    verbose = ["--verbose"] if configure_output("demo", args.verbose) else []
    out = Path(args.out).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    prepared, archive = out / "prepared", out / "archive"
    model, masks, report = out / "demo-unet" / "model", out / "masks", out / "eval"

    step("1/4 prepare phantom shards", prepare,
         ["--source", "phantoms", "--num", str(args.num), "--seed", "0", "--size", "128", "--out", str(prepared),
          *verbose])
    if not archive.exists():
        write_archive(archive, args.archive)
    step("2/4 train on Ray (2 workers)", train,
         ["--config", str(ROOT / "configs" / "phantoms.yaml"), "--data", str(prepared), "--storage", str(out),
          "--name", "demo-unet", "--epochs", str(args.epochs), "--workers", "2", *verbose])
    step("3/4 bulk inference to Parquet", infer,
         ["--model", str(model), "--input", str(archive), "--output", str(masks), "--workers", "1", *verbose])
    step("4/4 evaluate on the test split", evaluate,
         ["--model", str(model), "--data", str(prepared), "--split", "test", "--out", str(report), *verbose])
    print(f"\nDemo finished.\n  data:    {prepared}\n  model:   {model}\n  masks:   {masks}\n"
          f"  metrics: {report / 'metrics.json'}\n  report:  {report / 'report.html'}")
    return 0


def cli() -> int:
    """Entry of the ``unet-demo`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
