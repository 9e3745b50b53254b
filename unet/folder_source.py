"""Your own labelled data: a folder of images and their masks -> :class:`~unet.sources.Record` per image.

The ``folder`` source of :func:`unet.prepare.prepare` (``jobs.prepare --source folder``), for
layouts other than BUSI's. Rules:

* **Images**: every file under ``images`` (recursively; hidden files ignored) ending in one of
  :data:`IMAGE_SUFFIXES` (any case), the formats inference accepts. The id is the path relative to
  ``images`` without the suffix (``benign/case 7``), so sub-folders stay apart.
* **Masks**: ``mask_pattern`` names an image's mask from its stem: ``"{stem}"`` (default: the same
  name), ``"{stem}_mask.png"``, ``"{stem}_seg"`` ... A pattern without an image suffix accepts any
  of them. The mask sits in the image's relative folder under ``masks`` (default: ``images``
  itself, where the pattern must add text to the stem so masks can be told from images).
* **Pixels**: :mod:`unet.codec`, the rules inference uses (EXIF orientation, one grey rule);
  any non-zero mask pixel is lesion, so 0/255, 0/1, label and colour masks all work. JPEG masks
  are refused: lossy compression leaves faint non-zero pixels that would count as lesion.
* **Class** (one of :data:`unet.shards.CLASSES`, never a new one): from the image's parent folder
  name (``class_from="folder"``, any case) or a CSV with columns ``image,class`` (``image``: the
  path relative to ``images``, with or without suffix). An image neither source names is
  ``normal`` when its mask is empty, else ``default_class`` (``benign`` or ``malignant``, chosen
  by the user); without one it is skipped, since a lesion's class cannot be seen in its mask.

Anything unusable is skipped with a reason and a warning line, as for BUSI (image without mask,
mask without image, ambiguous or duplicate stems, size mismatch, empty or unreadable file, unknown
class, CSV rows naming no image). Skipped paths are relative to the folder holding both ``images``
and ``masks``.

Example::

    from unet.folder_source import read_folder
    records, skipped = read_folder("data/images", "data/masks", mask_pattern="{stem}_mask.png",
                                   class_from="folder")
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from unet.shards import CLASSES
from unet.sources import Record, Skipped, make_record, natural_key, read_image, read_mask

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # = unet.inference.IMAGE_SUFFIXES
LOSSY_SUFFIXES = (".jpg", ".jpeg")
CLASS_SOURCES = ("folder",)
DEFAULT_CLASSES = ("benign", "malignant")  # allowed for default_class: a lesion is never "normal"
_ANY_SUFFIX = "<" + "|".join(s[1:] for s in IMAGE_SUFFIXES) + ">"

__all__ = ["CLASS_SOURCES", "DEFAULT_CLASSES", "IMAGE_SUFFIXES", "mask_regex", "read_class_table",
           "read_folder"]


def _split_suffix(pattern: str) -> tuple[str, str]:
    """``"{stem}_mask.PNG"`` -> (``"{stem}_mask"``, ``".png"``); no image suffix -> (pattern, "")."""
    for suffix in IMAGE_SUFFIXES:
        if pattern.lower().endswith(suffix):
            return pattern[:-len(suffix)], suffix
    return pattern, ""


def mask_regex(pattern: str) -> re.Pattern:
    """The regex a mask's file name (suffix lower-cased) must match; group ``stem`` is its image's stem.

    Raises ValueError unless `pattern` is a file name holding ``{stem}`` exactly once.
    """
    if pattern.count("{stem}") != 1 or "/" in pattern or "\\" in pattern \
            or "{" in pattern.replace("{stem}", "") or "}" in pattern.replace("{stem}", ""):
        raise ValueError(f"mask_pattern must be a file name holding {{stem}} once, e.g. '{{stem}}_mask.png' "
                         f"or '{{stem}}' (any image suffix), got {pattern!r}")
    base, suffix = _split_suffix(pattern)
    head, tail = base.split("{stem}")
    ending = re.escape(suffix) if suffix else "(?:" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")"
    return re.compile(re.escape(head) + r"(?P<stem>.+)" + re.escape(tail) + ending + r"\Z")


def read_class_table(path: str | Path) -> dict[str, tuple[str, int]]:
    """A CSV with header columns ``image,class`` (any case, any order, more columns ignored) ->
    ``{image: (class as written, line)}``; ``image`` is normalised to a ``/``-separated relative path.

    Raises ValueError for a file that is not UTF-8 CSV, a missing column, an empty ``image`` cell,
    or one image given two classes.
    """
    try:
        return _class_table(path)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"class table {path} is not a UTF-8 CSV file: {e}") from e


def _class_table(path: str | Path) -> dict[str, tuple[str, int]]:
    table: dict[str, tuple[str, int]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        if "image" not in columns or "class" not in columns:
            raise ValueError(f"class table {path} needs a header with columns image,class; got {reader.fieldnames}")
        for row in reader:
            image = (row[columns["image"]] or "").strip().replace("\\", "/").removeprefix("./")
            cls = (row[columns["class"]] or "").strip()
            if not image:
                raise ValueError(f"class table {path} line {reader.line_num}: empty image cell")
            if image in table and table[image][0].lower() != cls.lower():
                raise ValueError(f"class table {path} line {reader.line_num}: {image!r} has class {cls!r} but line "
                                 f"{table[image][1]} gave {table[image][0]!r}")
            table.setdefault(image, (cls, reader.line_num))
    return table


def _files(root: Path, exclude: Path | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (exclude is None or here / d != exclude)]
        found += [here / name for name in filenames if not name.startswith(".")]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def _key(rel: PurePosixPath, stem: str) -> str:
    return (rel.parent / stem).as_posix()


def read_folder(images: str | Path, masks: str | Path | None = None, *, mask_pattern: str = "{stem}",
                class_from: str | None = None, classes: str | Path | None = None,
                default_class: str | None = None, max_side: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[list[Record], list[Skipped]]:
    """Read images and masks (rules in the module docstring) into records sorted by id, plus the
    list of skipped files; images (and masks) with a side over ``max_side`` are shrunk to it.

    Raises ValueError / FileNotFoundError for bad arguments (missing folder, bad pattern, a pattern
    that cannot tell masks from images in one folder, a bad class table); never for a bad file.
    """
    images_root = Path(images)
    masks_root = Path(masks) if masks is not None else images_root
    for name, folder in (("images", images_root), ("masks", masks_root)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} folder {folder} is not a directory")
    if class_from not in (None, *CLASS_SOURCES):
        raise ValueError(f"class_from must be one of {CLASS_SOURCES} or None, got {class_from!r}")
    if default_class not in (None, *DEFAULT_CLASSES):
        raise ValueError(f"default_class must be one of {DEFAULT_CLASSES} or None, got {default_class!r}")
    regex = mask_regex(mask_pattern)
    same = masks_root.resolve() == images_root.resolve()
    if same and _split_suffix(mask_pattern)[0] == "{stem}":
        raise ValueError(f"masks and images share the folder {images_root}, so mask_pattern {mask_pattern!r} cannot "
                         f"tell them apart; give one that adds to the stem, e.g. '{{stem}}_mask.png'")
    base = Path(os.path.commonpath([images_root.resolve(), masks_root.resolve()]))
    table = read_class_table(classes) if classes is not None else None
    table_name = Path(classes).name if classes is not None else ""
    used_rows: set[str] = set()
    skipped: list[Skipped] = []

    def shown(path: Path) -> str:
        return path.resolve().relative_to(base).as_posix()

    in_images = "the images folder" if same else f"{shown(images_root)}/"

    def skip(path: str, reason: str) -> None:
        log.warning("skipped %s: %s", path, reason)
        skipped.append(Skipped(path, reason))

    def given_class(rel: PurePosixPath) -> tuple[str | None, str | None]:
        """(class, None), (None, None) when no source names one, or (None, reason to skip)."""
        if class_from == "folder":
            folder = rel.parent.name
            if not folder:
                return None, None
            if folder.lower() in CLASSES:
                return folder.lower(), None
            return None, f"unknown class {folder!r} from its folder; expected one of {', '.join(CLASSES)}"
        if table is not None:
            for key in (rel.as_posix(), _key(rel, rel.stem)):
                if key in table:
                    used_rows.add(key)
                    cls, line = table[key]
                    if cls.lower() in CLASSES:
                        return cls.lower(), None
                    return None, (f"unknown class {cls!r} in {table_name} line {line}; "
                                  f"expected one of {', '.join(CLASSES)}")
        return None, None

    # Inventory: images and masks per key (relative folder + stem), without reading any pixels.
    nested = masks_root.resolve() if not same and masks_root.resolve().is_relative_to(images_root.resolve()) else None
    table_file = Path(classes).resolve() if classes is not None else None
    found_images: dict[str, list[Path]] = defaultdict(list)
    found_masks: dict[str, list[Path]] = defaultdict(list)
    scans = [(images_root, nested, True)] + ([] if same else [(masks_root, None, False)])
    for root, exclude, holds_images in scans:
        for path in _files(root.resolve(), exclude):
            rel = PurePosixPath(path.relative_to(root.resolve()).as_posix())
            if path == table_file:
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skip(shown(path), f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
                continue
            match = regex.match(rel.stem + rel.suffix.lower())
            if holds_images and not (same and match):
                found_images[_key(rel, rel.stem)].append(path)
            elif match:
                found_masks[_key(rel, match["stem"])].append(path)
            else:
                skip(shown(path), f"not a mask: the name does not match the mask pattern {mask_pattern!r}")

    todo: list[tuple[str, PurePosixPath, Path, Path]] = []  # (id, image path relative to images, image, mask)
    for key in sorted(found_images, key=natural_key):
        paths = found_images[key]
        rels = [PurePosixPath(p.relative_to(images_root.resolve()).as_posix()) for p in paths]
        verdicts = [given_class(r) for r in rels]  # each call also marks its CSV row as used
        rel, bad_class = rels[0], verdicts[0][1]
        if len(paths) > 1:
            for path in paths:
                others = ", ".join(p.name for p in paths if p != path)
                skip(shown(path), f"duplicate stem: {others} would get the same id {key!r}; rename one")
        elif bad_class:
            skip(shown(paths[0]), bad_class)
        elif not found_masks.get(key):
            base_name, suffix = _split_suffix(mask_pattern)
            name = base_name.replace("{stem}", rel.stem) + (suffix or "." + _ANY_SUFFIX)
            expected = masks_root.resolve() / rel.parent / name
            skip(shown(paths[0]), f"image without mask (no {shown(expected)})")
        elif len(found_masks[key]) > 1:
            skip(shown(paths[0]), "ambiguous masks: " + ", ".join(shown(p) for p in found_masks[key]) + " all match")
        elif found_masks[key][0].suffix.lower() in LOSSY_SUFFIXES:
            skip(shown(paths[0]), f"mask {shown(found_masks[key][0])} is a JPEG: lossy compression leaves faint "
                                  f"non-zero pixels that would count as lesion; save masks as PNG, BMP or TIFF")
        else:
            todo.append((key, rel, paths[0], found_masks[key][0]))
    for key in sorted(set(found_masks) - set(found_images), key=natural_key):
        for path in found_masks[key]:
            skip(shown(path), f"mask without image (no image {key}.* in {in_images})")
    if table is not None:
        for image, (_, line) in sorted(table.items(), key=lambda kv: kv[1][1]):
            if image not in used_rows:
                skip(f"{table_name} line {line}", f"names {image!r}, which is no image in {in_images} "
                                                  f"(give the path relative to it)")

    records: list[Record] = []
    for done, (id_, rel, image_path, mask_path) in enumerate(todo, 1):
        try:
            for path in (image_path, mask_path):
                if path.stat().st_size == 0:
                    raise ValueError(f"empty file {shown(path)} (0 bytes)")
            image, mask = read_image(image_path), read_mask(mask_path)
            if mask.shape != image.shape:
                raise ValueError(f"mask {shown(mask_path)} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                                 f"{image.shape[1]}x{image.shape[0]}")
            cls = given_class(rel)[0] or ("normal" if not mask.any() else default_class)
            if cls is None:
                where = (f"add it to {table_name}" if table is not None else
                         "put it in a benign/ or malignant/ folder" if class_from else "give a class source")
                raise ValueError(f"no class for an image whose mask shows a lesion: {where}, or give a default "
                                 f"class (--default-class {'|'.join(DEFAULT_CLASSES)})")
        except ValueError as e:
            skip(shown(image_path), str(e).replace(str(base) + "/", ""))
        else:
            records.append(make_record(id_, cls, f"folder:{rel.as_posix()}", image, mask, max_side))
        if progress:
            progress(done, len(todo))
    records.sort(key=lambda r: natural_key(r.id))
    return records, skipped
