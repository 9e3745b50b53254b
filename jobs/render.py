"""Turn an inference output back into files: mask PNGs, overlays on the images, an index.html.

    python -m jobs.render --masks runs/masks --to runs/masks-view
    python -m jobs.render --masks runs/masks --to runs/masks-view --images runs/images
    python -m jobs.render --masks s3://bucket/masks/ --to masks-view --images s3://bucket/scans/ --limit 200

``--masks`` is the ``--output`` of ``jobs.infer`` (folder, ``s3://`` prefix or one part file); its
parts are streamed, batch by batch, and ``_``-folders (bookkeeping) skipped. ``--to`` is a local
folder, created if missing. It receives ``masks/<image_id with its image extension replaced by
.png>`` for every ok row (``benign/benign (3).png`` -> ``masks/benign/benign (3).png``; ids that are
absolute, hold ``..``, backslashes or control characters are made safe, and two rows that would
share a file get ``~2``, ``~3``...: ``files.csv`` maps every id to its files and says why one was
renamed), ``overlays/<same name>`` with ``--images`` (the ``--input`` inference read: an image
folder, ``s3://`` prefix or single image; rows from tar shards or Parquet tables get no overlay),
``index.html`` (contact sheet of the first 100 rows, or of the first N with ``--limit N``; error
rows in a table) with its ``thumbs/``, and ``files.csv``. ``--limit N`` reads only the first N rows.
Details: the docstring of ``unet/render.py``.

Quiet: prints one line at the end (rows, masks, overlays, errors listed, where index.html is). S3
settings come from the AWS_* environment variables, or ``--endpoint`` / ``--region`` /
``--profile`` / ``--credentials-file`` (keys are never flags). Bad use (no such output, no parts in it, ``--to`` is a file,
``--images`` missing) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from unet.cli import add_s3_arguments, apply_s3_arguments, run_main


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (also used by tests and docs to check example command lines)."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.render", allow_abbrev=False,
        description="Write the masks of an inference output as PNG files, with overlays and an index.html.")
    p.add_argument("--masks", required=True,
                   help="inference output: the --output of jobs.infer (folder, s3:// prefix or one part file)")
    p.add_argument("--to", required=True, help="local folder to write into (created if missing)")
    p.add_argument("--images", default=None,
                   help="the --input inference read (image folder, s3:// prefix or single image): also "
                        "write overlays (tar/Parquet inputs are not supported)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="read only the first N rows; the contact sheet shows them all "
                        "(default: every row, sheet of the first 100)")
    add_s3_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    apply_s3_arguments(args)

    from unet.render import render

    summary = render(args.masks, args.to, images=args.images, limit=args.limit)
    print(summary.line(), flush=True)
    return 0


def cli() -> int:
    """Entry of the ``unet-render`` console script: ``main`` under ``run_main``, exactly as ``python -m``."""
    return run_main(main)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
