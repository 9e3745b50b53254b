"""Sources of prepared data: a BUSI folder or generated phantoms -> :class:`Record` per image.

The first stage of :func:`unet.prepare.prepare` (a folder of your own labelled images is read by
:func:`unet.folder_source.read_folder`, with the same pixel rules and :class:`Skipped` reasons).
BUSI (:func:`read_busi`): ``Dataset_BUSI_with_GT/{benign,malignant,normal}/NAME.png`` with
``NAME_mask.png`` and possibly ``NAME_mask_1.png``, ``NAME_mask_2.png``... which are OR-merged.
Every file is read as a viewer shows it (EXIF orientation applied) and converted by the pixel
rules of :mod:`unet.codec`, the same ones inference applies: images (RGB, RGBA, grey, palette,
16-bit, ...) become 8-bit grey; masks become 0/255 (any non-zero colour channel counts as
lesion). Files that cannot be used are *skipped with a reason* (missing mask, mask size differs
from the image, unreadable file, mask without image, ...), never silently dropped.

Example::

    from unet.sources import read_busi
    records, skipped = read_busi("../shared/data/busi")
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from unet import codec
from unet.shards import CLASSES

log = logging.getLogger(__name__)

HASH_SIZE = 8  # pHash of 8x8 DCT coefficients = 64 bits
BUSI_FOLDER = "Dataset_BUSI_with_GT"
_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$")
# Everything Pillow raises for a file that is not a decodable image.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)

__all__ = ["BUSI_FOLDER", "HASH_SIZE", "Record", "Skipped", "find_busi_root", "make_record", "natural_key",
           "perceptual_hash", "read_busi", "read_image", "read_mask", "read_phantoms"]


@dataclass(frozen=True)
class Record:
    """One image ready for a shard (PNG-encoded) with its perceptual hash."""

    id: str
    cls: str
    source: str
    height: int
    width: int
    image_png: bytes
    mask_png: bytes
    phash: int


@dataclass(frozen=True)
class Skipped:
    """A source file that was not used, and why (``path`` relative to the dataset folder)."""

    path: str
    reason: str


def natural_key(text: str) -> list:
    """Sort key that orders ``"benign (2)"`` before ``"benign (10)"``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read(path: Path, pixels: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open, fully decode and convert one file, or raise ValueError naming it."""
    try:
        with Image.open(path) as img:
            return pixels(img)  # decodes now: a truncated file fails here, not later
    except _DECODE_ERRORS as e:
        raise ValueError(f"unreadable image file {path}: {type(e).__name__}: {e}") from e


def read_image(path: str | Path) -> np.ndarray:
    """A source image file -> (H, W) uint8 grey (:func:`unet.codec.image_pixels`)."""
    return _read(Path(path), codec.image_pixels)


def read_mask(path: str | Path) -> np.ndarray:
    """A source mask file -> (H, W) bool (:func:`unet.codec.mask_pixels`)."""
    return _read(Path(path), codec.mask_pixels)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash (``imagehash.phash``) of a (H, W) uint8 grey image, as an int."""
    bits = imagehash.phash(Image.fromarray(image), hash_size=HASH_SIZE).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def make_record(id_: str, cls: str, source: str, image: np.ndarray, mask: np.ndarray,
                max_side: int | None = None) -> Record:
    """Grey image + bool mask -> :class:`Record` (PNG cells, pHash); shrunk to `max_side` if over."""
    # The hash comes from the full-size image, so a downsized copy splits exactly as the original.
    phash = perceptual_hash(image)
    if max_side is not None and max(image.shape) > max_side:
        from unet.transforms import resize_image, resize_mask

        scale = max_side / max(image.shape)
        size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        image, mask = resize_image(image, size), resize_mask(mask.astype(np.uint8), size) > 0
    return Record(id=id_, cls=cls, source=source, height=int(image.shape[0]), width=int(image.shape[1]),
                  image_png=codec.encode_png(image), mask_png=codec.encode_mask_png(mask), phash=phash)


def find_busi_root(input_dir: str | Path) -> Path:
    """The ``Dataset_BUSI_with_GT`` folder: ``input_dir/Dataset_BUSI_with_GT`` or `input_dir` itself
    when it directly holds class folders."""
    base = Path(input_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"BUSI input {base} is not a directory")
    if (base / BUSI_FOLDER).is_dir():
        return base / BUSI_FOLDER
    if any((base / cls).is_dir() for cls in CLASSES):
        return base
    raise FileNotFoundError(f"BUSI input {base} holds neither {BUSI_FOLDER}/ nor any of the class folders "
                            f"{', '.join(c + '/' for c in CLASSES)}; expected BUSI's layout "
                            f"{BUSI_FOLDER}/{{benign,malignant,normal}}/NAME.png + NAME_mask.png")


def read_busi(input_dir: str | Path, progress: Callable[[int, int], None] | None = None,
              max_side: int | None = None) -> tuple[list[Record], list[Skipped]]:
    """Read a BUSI-layout folder into records (sorted by id) and the list of skipped files;
    images (and masks) with a side over ``max_side`` are shrunk to it, aspect kept.

    Never raises for a bad file: each becomes a :class:`Skipped` entry (and a log warning).
    """
    root = find_busi_root(input_dir)
    skipped: list[Skipped] = []
    todo: list[tuple[str, str, Path, list[Path]]] = []  # (id, class, image, masks)
    seen: dict[str, str] = {}

    def skip(path: str, reason: str) -> None:
        log.warning("skipped %s: %s", path, reason)
        skipped.append(Skipped(path, reason))

    for cls in CLASSES:
        folder = root / cls
        if not folder.is_dir():
            skip(f"{cls}/", "class folder missing")
            continue
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
            rel = f"{cls}/{path.name}"
            if not path.is_file() or path.suffix.lower() != ".png":
                skip(rel, "not a .png file")
                continue
            match = _MASK_RE.match(path.stem)
            if match:
                masks[match["stem"]].append((int(match["index"] or 0), path))
            else:
                images[path.stem] = path
        for stem in sorted(set(masks) - set(images), key=natural_key):
            for _, path in sorted(masks[stem]):
                skip(f"{cls}/{path.name}", f"mask without image (no {stem}.png)")
        for stem in sorted(images, key=natural_key):
            rel = f"{cls}/{images[stem].name}"
            if stem in seen:
                skip(rel, f"duplicate id {stem!r}: also in {seen[stem]}/")
            elif not any(index == 0 for index, _ in masks.get(stem, [])):
                # BUSI always has NAME_mask.png; extra masks alone would be a partial lesion.
                others = ", ".join(p.name for _, p in sorted(masks.get(stem, [])))
                skip(rel, f"missing mask (expected {stem}_mask.png" + (f"; found only {others})" if others else ")"))
            else:
                seen[stem] = cls
                todo.append((stem, cls, images[stem], [p for _, p in sorted(masks[stem])]))

    records: list[Record] = []
    for done, (stem, cls, image_path, mask_paths) in enumerate(todo, 1):
        rel = f"{cls}/{image_path.name}"
        try:
            image = read_image(image_path)
            lesion = np.zeros(image.shape, dtype=bool)
            for mask_path in mask_paths:
                mask = read_mask(mask_path)
                if mask.shape != image.shape:
                    raise ValueError(f"mask {mask_path.name} is {mask.shape[1]}x{mask.shape[0]} (WxH) but "
                                     f"the image is {image.shape[1]}x{image.shape[0]}")
                lesion |= mask
        except ValueError as e:
            skip(rel, str(e).replace(str(root) + "/", ""))
        else:
            records.append(make_record(stem, cls, f"busi:{rel}", image, lesion, max_side))
        if progress:
            progress(done, len(todo))
    records.sort(key=lambda r: natural_key(r.id))
    return records, skipped


def read_phantoms(num: int, seed: int = 0, size: tuple[int, int] = (256, 256),
                  progress: Callable[[int, int], None] | None = None) -> list[Record]:
    """Generate `num` phantoms (:func:`unet.phantoms.generate`) as records sorted by id."""
    from unet.phantoms import generate

    records = []
    for index, p in enumerate(generate(num, seed=seed, size=size)):
        records.append(make_record(p.id, p.kind, f"phantoms:seed={seed},index={index}", p.image, p.mask))
        if progress:
            progress(index + 1, num)
    records.sort(key=lambda r: natural_key(r.id))
    return records
