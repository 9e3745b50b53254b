"""Prepare segmentation data: BUSI, your own labelled folder or phantoms -> Parquet shards + manifest.

    python -m jobs.prepare --source busi --input ../shared/data/busi --out runs/busi_prepared
    python -m jobs.prepare --source folder --images data/images --masks data/masks --class-from folder --out OUT
    python -m jobs.prepare --source folder --images data/scans --mask-pattern '{stem}_mask.png' \
        --classes data/classes.csv --default-class benign --out OUT
    python -m jobs.prepare --source busi --input ../shared/data/busi --out s3://my-bucket/busi-prepared
    python -m jobs.prepare --source phantoms --num 200 --seed 0 --size 256 --out runs/demo/prepared
    python -m jobs.prepare --source busi --input DIR --out OUT --ratios 0.8,0.1,0.1 --seed 1 --strict

Writes ``OUT/{train,val,test}/part-NNNNN.parquet`` (columns id, class, image_png, mask_png,
height, width, group, source) and ``OUT/manifest.json`` (schema version, counts per split and
class, duplicate-group statistics, this command and its config, sha256 of every shard, skipped
files with reasons). Near-duplicate images (perceptual-hash groups) always share a split.
Re-running with the same arguments rewrites byte-identical shards and deletes shards a previous
run left over; nothing else in OUT is touched. The logic lives in :mod:`unet.prepare` (and
:mod:`unet.folder_source` for ``--source folder``, whose class rule is in ``--help``).

S3: endpoint, credentials and region come from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and AWS_REGION, a profile (``--profile``) or a credentials
file (``--credentials-file``); keys are never flags, so they never reach ``ps``, Ray's job metadata
or manifest.json. Under ``ray job submit`` every path must be a shared URI (``s3://``), and the
entrypoint needs ``--entrypoint-num-cpus`` (the work runs in the driver; see docs/operations.md).
Bad source files are skipped with a warning line each and listed in the manifest; ``--strict``
turns them into an error (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Sequence

from unet.cli import add_s3_arguments, apply_s3_arguments, run_main, usage_errors


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 256 or 256x320), got {text!r}") from e
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"expected N or HxW with sides >= 16, got {text!r}")
    return parts[0], parts[1]


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected three numbers TRAIN,VAL,TEST, got {text!r}") from e
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers TRAIN,VAL,TEST with a "
                                         f"positive sum (e.g. 0.7,0.15,0.15), got {text!r}")
    return parts  # type: ignore[return-value]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults only where there is one, keep the epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


_EPILOG = """\
examples:
  python -m jobs.prepare --source busi --input ../shared/data/busi --out runs/busi_prepared
  python -m jobs.prepare --source folder --images data/images --masks data/masks --class-from folder \\
      --out runs/mine_prepared        # data/images/benign/a.jpg + data/masks/benign/a.png, ...
  python -m jobs.prepare --source folder --images data/scans --mask-pattern '{stem}_mask.png' \\
      --classes data/classes.csv --out runs/mine_prepared     # scans/a.tif + scans/a_mask.png
  python -m jobs.prepare --source busi --input ../shared/data/busi --out s3://my-bucket/busi-prepared
  python -m jobs.prepare --source phantoms --num 200 --seed 0 --size 256 --out runs/demo/prepared

output (OUT = --out):
  OUT/{train,val,test}/part-NNNNN.parquet  columns: id, class, image_png (8-bit grey PNG),
                                           mask_png (PNG 0/255), height, width, group, source
  OUT/manifest.json                        schema_version, counts per split and class, duplicate
                                           groups, command, config, shards with sha256, skipped files
  Reruns with the same arguments write identical bytes and delete leftover part files.

folder source: images (.png .jpg .jpeg .bmp .tif .tiff, any case) under --images, recursively;
  id = path relative to --images without suffix. Each image's mask is the file named by
  --mask-pattern in the same relative folder under --masks; any non-zero mask pixel is lesion
  (0/255, 0/1, label values, colour); JPEG masks are refused (lossy: noise would be lesion).
  class rule (classes are benign, malignant, normal; no others):
    1. --class-from folder: the image's parent folder name (any case), or --classes FILE.csv
       (columns image,class; image = path relative to --images, with or without suffix);
       a name that is not a class skips the image;
    2. an image no source names is 'normal' if its mask is empty, else --default-class;
       without --default-class it is skipped (a lesion's class is never guessed).
  At least one of --class-from, --classes, --default-class is required. Skipped with a reason:
  image without mask, mask without image, ambiguous masks, duplicate stem (a.png + a.jpg), size
  mismatch, empty or unreadable file, unknown class, CSV rows naming no image.

exit codes: 0 done; 2 bad arguments, unusable input or output (one line on stderr), or bad
source files under --strict. Set UNET_DEBUG=1 for full tracebacks.
"""


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    from unet.prepare import DEFAULT_HASH_THRESHOLD, DEFAULT_SHARD_SIZE

    p = argparse.ArgumentParser(
        prog="python -m jobs.prepare", allow_abbrev=False,
        description="Write train/val/test Parquet shards and manifest.json from a BUSI folder, a "
                    "folder of your own labelled images, or generated phantoms. Near-duplicate images "
                    "(perceptual-hash groups) never straddle two splits; splits are stratified by class; "
                    "output is deterministic.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    src = p.add_argument_group("source")
    src.add_argument("--source", required=True, choices=("busi", "folder", "phantoms"),
                     help="'busi': read --input in BUSI's layout; 'folder': your images and masks (--images, "
                          "--masks, ...; see 'folder source' below); 'phantoms': generate --num images")
    src.add_argument("--input", metavar="DIR",
                     help="(busi) folder holding Dataset_BUSI_with_GT/, or that folder itself; classes "
                          "benign/malignant/normal, NAME.png + NAME_mask.png (+ NAME_mask_1.png ... OR-merged)")
    src.add_argument("--num", type=int, default=200, help="(phantoms) number of images")
    src.add_argument("--size", type=_size, default="256", metavar="N|HxW",
                     help="(phantoms) image size in pixels")
    src.add_argument("--seed", type=int, default=0,
                     help="seed of the split order (and of phantom generation)")
    src.add_argument("--max-side", type=int, default=None, metavar="PX",
                     help="(busi, folder) shrink images and masks whose longer side is over PX (splits are the "
                          "same as without it); e.g. 288 for training at 256 px from smaller shards")
    src.add_argument("--strict", action="store_true",
                     help="fail (exit 2) on any bad source file instead of skipping it with a warning "
                          "(missing mask, mask/image size mismatch, unreadable file, mask without image, ...)")

    folder = p.add_argument_group("folder source (--source folder)")
    folder.add_argument("--images", metavar="DIR", help="folder of images, read recursively")
    folder.add_argument("--masks", metavar="DIR",
                        help="folder of masks, mirroring the sub-folders of --images (default: --images itself, "
                             "where --mask-pattern must tell masks apart)")
    folder.add_argument("--mask-pattern", default="{stem}", metavar="PATTERN",
                        help="mask file name from the image's stem, e.g. '{stem}_mask.png'; without a suffix "
                             "any image suffix matches")
    folder.add_argument("--class-from", choices=("folder",),
                        help="class = the image's parent folder name (benign, malignant or normal)")
    folder.add_argument("--classes", metavar="FILE.csv", help="CSV with columns image,class")
    folder.add_argument("--default-class", choices=("benign", "malignant"),
                        help="class of images with a lesion that no class source names (empty mask: normal)")

    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="URI",
                     help="output: local directory or s3://bucket/prefix; gets {train,val,test}/part-*.parquet "
                          "and manifest.json")
    out.add_argument("--ratios", type=_ratios, default="0.7,0.15,0.15", metavar="TRAIN,VAL,TEST",
                     help="split fractions (normalised to sum 1; 0 leaves a split empty)")
    out.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="ROWS",
                     help="rows per Parquet shard")
    out.add_argument("--hash-threshold", type=int, default=DEFAULT_HASH_THRESHOLD, metavar="BITS",
                     help="max Hamming distance between 64-bit pHashes for two images to count as "
                          "near-duplicates (groups are transitive); 10 fits BUSI, see unet/prepare.py")

    add_s3_arguments(p)
    p.add_argument("--verbose", action="store_true",
                   help="debug lines too (or set UNET_VERBOSE=1); output is otherwise one progress line "
                        "every ~10 s and the summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source == "busi" and not args.input:
        parser.error("--source busi needs --input DIR")
    folder_flags = [flag for flag, value in (("--images", args.images), ("--masks", args.masks),
                                             ("--mask-pattern", args.mask_pattern != "{stem}"),
                                             ("--class-from", args.class_from), ("--classes", args.classes),
                                             ("--default-class", args.default_class)) if value]
    if args.source != "folder" and folder_flags:
        parser.error(f"{', '.join(folder_flags)} only apply to --source folder")
    if args.source == "folder" and not args.images:
        parser.error("--source folder needs --images DIR (and --masks DIR unless masks sit beside the images)")
    if args.source == "folder" and not (args.class_from or args.classes or args.default_class):
        parser.error("--source folder needs a class rule: --class-from folder, --classes FILE.csv or "
                     "--default-class benign|malignant (empty masks are 'normal'; see --help)")
    if args.class_from and args.classes:
        parser.error("give one class source: --class-from folder or --classes FILE.csv, not both")
    if args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.source == "phantoms" and args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")

    from unet.prepare import PrepareConfig, prepare

    from unet.runtime import ProgressLine, configure_output, require_driver_cpus, require_shared_paths

    configure_output("prepare", args.verbose)
    apply_s3_arguments(args)
    require_shared_paths({"--input": args.input, "--images": args.images, "--masks": args.masks,
                          "--classes": args.classes, "--out": args.out})
    require_driver_cpus("jobs.prepare")
    with usage_errors():  # a bad setting is bad use
        config = PrepareConfig(source=args.source, out=args.out, input=args.input, num=args.num, seed=args.seed,
                               size=args.size, ratios=args.ratios, shard_size=args.shard_size,
                               hash_threshold=args.hash_threshold, strict=args.strict, max_side=args.max_side,
                               images=args.images, masks=args.masks, mask_pattern=args.mask_pattern,
                               class_from=args.class_from, classes=args.classes, default_class=args.default_class)
    started = time.monotonic()
    progress_line = ProgressLine(logging.getLogger("unet.prepare").info)  # one line every ~10 s

    def progress(stage: str, done: int, total: int) -> None:
        text = f"{stage} {done}/{total}"
        if done == total:
            progress_line.done(text)
        else:
            progress_line.update(text)

    # Keys never come as flags (unet.cli.add_s3_arguments), so the command as typed is safe to record.
    manifest = prepare(config, command=shlex.join(["python", "-m", "jobs.prepare", *argv]), progress=progress)

    counts, groups = manifest["counts"], manifest["groups"]
    print(f"{'split':<6} {'benign':>7} {'malignant':>9} {'normal':>7} {'total':>6} {'groups':>7} {'shards':>6}")
    for split in ("train", "val", "test", "total"):
        c = counts[split]
        n_groups = groups["per_split"].get(split, groups["total"])
        n_shards = sum(1 for s in manifest["shards"] if split in (s["split"], "total"))
        print(f"{split:<6} {c['benign']:>7} {c['malignant']:>9} {c['normal']:>7} {c['total']:>6} "
              f"{n_groups:>7} {n_shards:>6}")
    print(f"duplicate groups (pHash distance <= {groups['hash_threshold']}): {groups['with_duplicates']} groups "
          f"hold {groups['images_in_groups_with_duplicates']} images (largest {groups['largest']}, "
          f"{groups['mixed_class']} span two classes); {groups['spanning_splits']} groups span two splits")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} file(s), listed in manifest.json")
    print(f"wrote {args.out} in {time.monotonic() - started:.1f}s")
    return 0


def cli() -> int:
    """Entry of the ``unet-prepare`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
