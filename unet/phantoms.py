"""Synthetic breast-ultrasound phantoms with exact lesion masks (the project's default data).

Each phantom is rendered the way a B-mode image forms, in four steps:

1. a *reflectivity* map of layered breast tissue (skin line, subcutaneous fat with lobules and
   Cooper's ligaments, fibroglandular layer with laterally stretched strands and interspersed fat
   islands, retromammary fat, pectoral muscle with oblique striations), the layer boundaries
   undulating differently in every image;
2. a lesion cut into that map: benign = oval, wider than tall, smooth and circumscribed, nearly
   anechoic, with posterior acoustic enhancement; malignant = irregular, spiculated, taller than
   wide, hypoechoic, with an echogenic rim and posterior acoustic shadowing; normal = no lesion;
3. fully developed *speckle*: the magnitude of a spatially correlated complex Gaussian field
   (Rayleigh distributed, grains wider than tall) multiplying the reflectivity, its contrast
   reduced as a scanner's compounding does;
4. depth attenuation (exponential, only partly compensated by time-gain), broad gain patches
   and sometimes a dark band where the probe lifts off at one edge, log compression into a
   ~40 dB display range, 8-bit quantisation.

The lesion is deliberately clearly hypoechoic (several times darker than the tissue around it), so
a small UNet can learn it in minutes on a CPU, while speckle, fat lobules and shadows keep it from
being a thresholding exercise. The per-image variety (layer depths, fat islands, gain patches)
also keeps distinct phantoms apart under a perceptual hash, so near-duplicate detection
(:mod:`unet.prepare`) finds only the duplicates planted on purpose.

Everything is deterministic: :func:`make_phantom` draws from ``numpy.random.default_rng(seed)``
only, and :func:`generate` derives each image's seed from ``(seed, index)`` with
``numpy.random.SeedSequence``, so image *i* does not depend on how many images come before it.
Cost: about 10 ms of one CPU core per 256 x 256 image (numpy + OpenCV, vectorised).

Example::

    from unet.phantoms import make_phantom, generate, write_busi_layout
    image, mask = make_phantom(7, "malignant", size=(128, 128))   # uint8 (128,128), mask in {0,255}
    for p in generate(10, seed=0):                                # Phantom(id, kind, image, mask, seed)
        ...
    root = write_busi_layout("/tmp/fake_busi", 40, seed=0, duplicates=3)
    # -> /tmp/fake_busi/Dataset_BUSI_with_GT/{benign,malignant,normal}/"benign (1).png", ...
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from unet.shards import CLASSES

KINDS = CLASSES  # a phantom's kind is its class

# BUSI's class mix (437 benign, 210 malignant, 133 normal of 780 images).
CLASS_MIX = {"benign": 0.56, "malignant": 0.27, "normal": 0.17}

__all__ = ["KINDS", "CLASS_MIX", "Phantom", "make_phantom", "phantom_seed", "generate",
           "write_busi_layout"]


@dataclass(frozen=True)
class Phantom:
    """One generated image: ``id`` is BUSI-style (``"benign (3)"``), ``seed`` feeds :func:`make_phantom`."""

    id: str
    kind: str
    image: np.ndarray  # (H, W) uint8 grey
    mask: np.ndarray  # (H, W) uint8 in {0, 255}
    seed: int


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise low-passed with an anisotropic Gaussian (float32).

    Wide filters run on a coarser grid (per axis) and are upsampled: the field is smooth anyway,
    and this keeps a phantom at a few milliseconds instead of tens.
    """
    fy, fx = max(1, int(sigma_y / 3)), max(1, int(sigma_x / 3))
    py, px = (2 if fy > 1 else 0), (2 if fx > 1 else 0)  # margin: the upsampled crop has no edge ramp
    gh, gw = -(-h // fy) + py, -(-w // fx) + px
    noise = rng.standard_normal((gh, gw), dtype=np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sigma_x / fx, 0.3), sigmaY=max(sigma_y / fy, 0.3),
                             borderType=cv2.BORDER_REFLECT)
    if fy > 1 or fx > 1:
        field = cv2.resize(field, (gw * fx, gh * fy), interpolation=cv2.INTER_CUBIC)
        field = field[py * fy // 2:py * fy // 2 + h, px * fx // 2:px * fx // 2 + w]
    return field / (field.std() + 1e-6)


def _boundary(rng: np.random.Generator, xn: np.ndarray, depth: float, amplitude: float) -> np.ndarray:
    """A gently undulating layer boundary: normalised depth as a function of normalised x, shape (1, W)."""
    y = np.full_like(xn, depth)
    for _ in range(2):
        freq = rng.uniform(0.5, 2.5)
        y += amplitude * rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * freq * xn + rng.uniform(0, 2 * np.pi))
    return y + rng.uniform(-0.1, 0.1) * (xn - 0.5)  # slight tilt, as when the probe is not level


def _tissue(rng: np.random.Generator, h: int, w: int, *, full_resolution: bool = False) -> np.ndarray:
    """Reflectivity map (float32, roughly 0..1.5) of layered breast tissue, depth along rows.

    Rendered at half resolution and upsampled: reflectivity varies slowly compared with the
    speckle that is laid over it at full resolution, and this halves a phantom's cost.
    """
    if not full_resolution and min(h, w) >= 64:
        small = _tissue(rng, -(-h // 2), -(-w // 2), full_resolution=True)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    yn = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    xn = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    scale = min(h, w)

    skin = _boundary(rng, xn, rng.uniform(0.03, 0.06), 0.005)
    fat_end = _boundary(rng, xn, rng.uniform(0.1, 0.3), 0.06)
    gland_end_depth = rng.uniform(0.6, 0.8)
    gland_end = _boundary(rng, xn, gland_end_depth, 0.06)
    muscle = _boundary(rng, xn, gland_end_depth + rng.uniform(0.06, 0.16), 0.03)

    # Fat: dark lobules separated by brighter septa (Cooper's ligaments).
    lobules = _smooth_noise(rng, h, w, 0.025 * scale, 0.05 * scale)
    lobular = 1.0 + 0.3 * np.tanh(2.0 * lobules)
    fat = rng.uniform(0.2, 0.3) * lobular + 0.25 * np.exp(-(lobules / 0.15) ** 2)
    # Fibroglandular layer: bright, with laterally stretched fibrous strands.
    strands = _smooth_noise(rng, h, w, 0.006 * scale, 0.06 * scale)
    blobs = _smooth_noise(rng, h, w, 0.04 * scale, 0.04 * scale)
    gland = rng.uniform(0.6, 0.9) * np.clip(1.0 + 0.25 * strands + 0.15 * blobs, 0.3, None)
    # Fat lobules interspersed in the gland: large, soft-edged darker islands (each image its own).
    islands = _smooth_noise(rng, h, w, 0.07 * scale, 0.1 * scale)
    fat_share = np.clip((islands - rng.uniform(0.3, 1.2)) * 2.0, 0.0, 1.0)
    gland = gland + (0.3 * lobular - gland) * fat_share
    # Pectoral muscle: oblique, slightly wavy striations.
    slope = rng.uniform(-0.15, 0.15)
    stria = np.sin(2 * np.pi * (yn + slope * xn) * rng.uniform(14, 24) + 1.5 * lobules)
    muscle_echo = 0.4 + 0.18 * stria + 0.05 * blobs

    # Blend layers over a short ramp (~1.5 % of the depth) rather than cutting them with a step.
    def ramp(boundary: np.ndarray) -> np.ndarray:
        return np.clip((yn - boundary) / 0.015 + 0.5, 0.0, 1.0)

    echo = 0.2 + (fat - 0.2) * ramp(skin)
    echo += (gland - echo) * ramp(fat_end)
    echo += (0.25 * lobular - echo) * ramp(gland_end)  # retromammary fat
    echo += (muscle_echo - echo) * ramp(muscle)

    # Bright specular interfaces: the skin line and the fasciae between layers.
    for boundary, strength, width in ((skin, 1.2, 0.006), (fat_end, 0.3, 0.008),
                                      (gland_end, 0.3, 0.008), (muscle, 0.5, 0.006)):
        echo += strength * np.exp(-(((yn - boundary) / width) ** 2))
    return np.clip(echo, 0.02, None).astype(np.float32)


def _lesion_mask(rng: np.random.Generator, h: int, w: int, kind: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Boolean lesion mask, an oval (benign) or a spiculated, taller-than-wide shape (malignant),
    and its bounding box (y0, y1, x0, x1).

    The margin is a radius r(theta) in the lesion's own (tilted, elliptical) frame: a few low
    harmonics for a benign lobulated oval; more and stronger harmonics plus narrow spikes
    (spiculae) for a malignant mass.
    """
    scale = min(h, w)
    if kind == "benign":
        rx = rng.uniform(0.08, 0.17) * scale
        ry = rx * rng.uniform(0.5, 0.8)  # wider than tall ("parallel" orientation)
        tilt = np.deg2rad(rng.uniform(-15, 15))
        harmonics = [(k, rng.uniform(0.0, 0.04), rng.uniform(0, 2 * np.pi)) for k in (2, 3)]
        spikes = []
    else:
        rx = rng.uniform(0.06, 0.12) * scale
        ry = rx * rng.uniform(1.15, 1.6)  # taller than wide ("non-parallel")
        tilt = np.deg2rad(rng.uniform(-10, 10))
        harmonics = [(k, rng.uniform(0.04, 0.12), rng.uniform(0, 2 * np.pi)) for k in range(3, 8)]
        n_spikes = int(rng.integers(6, 14))
        spikes = list(zip(rng.uniform(0, 2 * np.pi, n_spikes), rng.uniform(0.2, 0.55, n_spikes),
                          rng.uniform(0.06, 0.14, n_spikes)))
    # r(theta) tabulated on a fine angular grid; pixels look it up instead of re-evaluating it.
    table_theta = np.linspace(-np.pi, np.pi, 1025, dtype=np.float32)
    table = np.ones_like(table_theta)
    for k, amp, phase in harmonics:
        table += amp * np.cos(k * table_theta + phase)
    for angle, amp, width in spikes:
        gap = (table_theta - angle + np.pi) % (2 * np.pi) - np.pi  # wrapped angular distance
        table += amp * np.exp(-((gap / width) ** 2))

    cy = rng.uniform(0.30, 0.55) * h
    cx = rng.uniform(0.25, 0.75) * w
    # Keep the whole lesion inside the image: a truncated mask would make "taller than wide" a lie.
    half = float(table.max()) * max(rx, ry)
    cy = float(np.clip(cy, half + 2, h - half - 2)) if h > 2 * half + 4 else h / 2
    cx = float(np.clip(cx, half + 2, w - half - 2)) if w > 2 * half + 4 else w / 2

    y0, y1 = max(int(cy - half) - 1, 0), min(int(cy + half) + 2, h)
    x0, x1 = max(int(cx - half) - 1, 0), min(int(cx + half) + 2, w)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    c, s = math.cos(tilt), math.sin(tilt)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    index = ((np.arctan2(v, u) + np.pi) * (1024 / (2 * np.pi))).astype(np.int32)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = u * u + v * v <= table[index] ** 2
    return mask, (y0, y1, x0, x1)


def _insert_lesion(rng: np.random.Generator, echo: np.ndarray, mask: np.ndarray,
                   box: tuple[int, int, int, int], kind: str) -> np.ndarray:
    """Replace the tissue inside `mask` with lesion echo and add the posterior acoustic feature.

    Works on the lesion's columns from just above it to the bottom of the image: nothing the
    lesion changes lies outside that window.
    """
    h, w = echo.shape
    scale = min(h, w)
    margin = int(math.ceil(0.07 * scale)) + 2  # > 3 sigma of the widest blur below
    y0, x0, x1 = max(box[0] - margin, 0), max(box[2] - margin, 0), min(box[3] + margin, w)
    win = (slice(y0, h), slice(x0, x1))
    region, lesion = echo[win].copy(), mask[win].astype(np.float32)
    rh, rw = region.shape

    # Soft edge (about one pixel) so the boundary is not a staircase, while the mask stays exact.
    soft = cv2.GaussianBlur(lesion, (0, 0), sigmaX=0.6 + 0.004 * scale)
    inner = _smooth_noise(rng, rh, rw, 0.02 * scale, 0.02 * scale)
    if kind == "benign":
        level = rng.uniform(0.04, 0.12)  # cyst / fibroadenoma: (nearly) anechoic
        lesion_echo = level * (1.0 + 0.25 * inner)
        posterior = rng.uniform(1.25, 1.6)  # enhancement behind fluid
    else:
        level = rng.uniform(0.06, 0.13)  # solid, markedly hypoechoic, heterogeneous
        lesion_echo = level * (1.0 + 0.35 * inner)
        posterior = rng.uniform(0.3, 0.5)  # shadowing behind a dense, attenuating mass
        # Echogenic halo: a thin bright rim just outside the margin.
        ring = cv2.GaussianBlur(lesion, (0, 0), sigmaX=0.02 * scale) - soft
        region *= 1.0 + 0.6 * np.clip(ring, 0, None)
    region = region * (1.0 - soft) + np.clip(lesion_echo, 0.01, None) * soft

    # Everything deeper than the lesion, in the columns it covers, gets the posterior factor.
    behind = (np.maximum.accumulate(lesion, axis=0) - lesion).clip(0, 1)
    behind = cv2.GaussianBlur(behind, (0, 0), sigmaX=0.015 * scale, sigmaY=0.5)
    out = echo.copy()
    out[win] = region * (1.0 + (posterior - 1.0) * behind)
    return out


def _speckle_db(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fully developed speckle in dB, zero mean: 20 log10 |z| of a complex Gaussian field z
    low-passed to the grain size (so |z| is Rayleigh distributed, grains wider than tall)."""
    scale = min(h, w) / 256.0
    sig_x, sig_y = max(1.6 * scale, 0.4), max(0.8 * scale, 0.4)  # lateral resolution is worse than axial
    re = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), sigmaX=sig_x, sigmaY=sig_y)
    im = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), sigmaX=sig_x, sigmaY=sig_y)
    db = 10.0 * np.log10(re * re + im * im + 1e-12)
    return db - db.mean()


def make_phantom(seed: int, kind: str, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom.

    Args:
        seed: any non-negative int; the same (seed, kind, size) always gives the same arrays.
        kind: ``"benign"``, ``"malignant"`` or ``"normal"`` (normal has an all-zero mask).
        size: (height, width) in pixels, at least 16 x 16.

    Returns:
        ``(image, mask)``: ``image`` (H, W) uint8 grey, ``mask`` (H, W) uint8 with values in {0, 255}.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    h, w = (int(size[0]), int(size[1]))
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least (16, 16), got {tuple(size)!r}")
    rng = np.random.default_rng(seed)

    echo = _tissue(rng, h, w)
    mask = np.zeros((h, w), dtype=bool)
    if kind != "normal":
        mask, box = _lesion_mask(rng, h, w, kind)
        echo = _insert_lesion(rng, echo, mask, box, kind)

    yn = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    attenuation = np.exp(-rng.uniform(0.6, 1.4) * yn)  # what time-gain compensation leaves over
    # Speckle multiplies the reflectivity (adds in dB); scaled by < 1 as a scanner's compounding
    # and smoothing leave a displayed image less grainy than raw Rayleigh statistics.
    speckle_db = _speckle_db(rng, h, w) * rng.uniform(0.55, 0.7)
    # Uneven probe contact and gain leave broad brighter and darker patches.
    patches_db = _smooth_noise(rng, h, w, 0.2 * min(h, w), 0.2 * min(h, w)) * rng.uniform(2.0, 4.0)
    if rng.random() < 0.5:  # the probe lifting off the skin at one edge: a dark band there
        xn = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
        edge = xn if rng.random() < 0.5 else 1.0 - xn
        patches_db = patches_db - rng.uniform(6.0, 15.0) * np.clip(1.0 - edge / rng.uniform(0.05, 0.2), 0, 1)
    db = 20.0 * np.log10(echo * attenuation + 1e-3) + speckle_db + patches_db
    # Log compression into a display range of ~40 dB below a per-image top level (scanner gain).
    top, span = rng.uniform(9.0, 14.0), rng.uniform(36.0, 42.0)
    grey = (db - (top - span)) * (255.0 / span)
    image = np.clip(grey, 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


# --------------------------------------------------------------------------------------------
# Collections
# --------------------------------------------------------------------------------------------

def phantom_seed(seed: int, index: int) -> int:
    """The :func:`make_phantom` seed of image `index` in a collection seeded with `seed`."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0])


def _kind_of(seed: int, index: int) -> str:
    """Class of image `index`: a golden-ratio sequence, so every prefix follows CLASS_MIX closely."""
    offset = (int(seed) * 0.7548776662466927) % 1.0
    u = (offset + index * 0.6180339887498949) % 1.0
    if u < CLASS_MIX["benign"]:
        return "benign"
    return "malignant" if u < CLASS_MIX["benign"] + CLASS_MIX["malignant"] else "normal"


def generate(num: int, seed: int = 0, size: tuple[int, int] = (256, 256)) -> Iterator[Phantom]:
    """Yield `num` phantoms, class mix ~ BUSI (56 % benign, 27 % malignant, 17 % normal).

    Ids are BUSI-style and numbered per class from 1 (``"benign (1)"``, ``"normal (1)"``, ...).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    per_kind = dict.fromkeys(KINDS, 0)
    for index in range(num):
        kind = _kind_of(seed, index)
        per_kind[kind] += 1
        image_seed = phantom_seed(seed, index)
        image, mask = make_phantom(image_seed, kind, size)
        yield Phantom(id=f"{kind} ({per_kind[kind]})", kind=kind, image=image, mask=mask, seed=image_seed)


def _split_mask(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut a lesion mask in two by a random line through its centroid (both parts non-empty)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    angle = rng.uniform(0, np.pi)
    side = (np.arange(mask.shape[0])[:, None] - cy) * np.cos(angle) - \
           (np.arange(mask.shape[1])[None, :] - cx) * np.sin(angle)
    first = (mask > 0) & (side >= 0)
    second = (mask > 0) & (side < 0)
    if not first.any() or not second.any():  # degenerate tiny mask: split by rows instead
        first = (mask > 0) & (np.arange(mask.shape[0])[:, None] <= cy)
        second = (mask > 0) & ~first
    return first, second


def _perturb(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A near-duplicate: crop 0-2 px off each edge, shift brightness, add faint noise."""
    h, w = image.shape
    most = 2 if min(h, w) >= 256 else 1  # stay a *near* duplicate on small test images
    top, bottom, left, right = (int(v) for v in rng.integers(0, most + 1, size=4))
    image = image[top:h - bottom, left:w - right]
    mask = mask[top:h - bottom, left:w - right]
    shifted = image.astype(np.float32) + rng.uniform(-6, 6) + rng.normal(0, 2.0, image.shape)
    return np.clip(shifted, 0, 255).astype(np.uint8), mask


def _save_rgb(path: Path, grey: np.ndarray) -> None:
    Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB").save(path)


def _save_mask(path: Path, mask: np.ndarray, mode: str) -> None:
    """Save a 0/255 mask in one of the encodings BUSI itself uses ("1", "RGB" or "RGBA")."""
    on = mask > 0
    if mode == "1":
        Image.fromarray(on).save(path)  # a bool array becomes a 1-bit PNG
        return
    rgb = np.repeat((on.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
    if mode == "RGBA":
        rgb = np.concatenate([rgb, np.full(on.shape + (1,), 255, np.uint8)], axis=2)
    Image.fromarray(rgb, mode=mode).save(path)


def write_busi_layout(out_dir: str | Path, num: int, seed: int = 0, size: tuple[int, int] = (256, 256),
                      *, duplicates: int = 0, multi_mask_fraction: float = 0.05,
                      cross_class_fraction: float = 0.25) -> Path:
    """Write `num` phantoms (plus `duplicates` near-duplicates) in BUSI's exact on-disk layout.

    Layout: ``out_dir/Dataset_BUSI_with_GT/{benign,malignant,normal}/"{kind} (i).png"`` (RGB) with
    ``"{kind} (i)_mask.png"``; masks are encoded as BUSI encodes them (1-bit for lesions, RGB zeros
    for normal images). A fraction `multi_mask_fraction` of lesion images (always including the
    first one) get their lesion cut in two: ``_mask.png`` holds one part and ``_mask_1.png`` (RGBA)
    the other, so only the OR of both is the full lesion.

    `duplicates` extra images are near-duplicates of earlier lesion images (1-2 px crop, brightness
    shift, faint noise; the mask cropped alike), numbered after the originals; a fraction
    `cross_class_fraction` of them are filed under the other lesion class, as happens in BUSI.

    A ground-truth record, ``out_dir/phantoms.json`` (outside the dataset folder), lists every file
    with its phantom seed, whether its mask was split, and which file a duplicate copies.

    Returns:
        The ``Dataset_BUSI_with_GT`` folder.
    """
    if duplicates < 0:
        raise ValueError(f"duplicates must be >= 0, got {duplicates}")
    if not 0.0 <= multi_mask_fraction <= 1.0:
        raise ValueError(f"multi_mask_fraction must be in [0, 1], got {multi_mask_fraction}")
    root = Path(out_dir) / "Dataset_BUSI_with_GT"
    for kind in KINDS:
        (root / kind).mkdir(parents=True, exist_ok=True)

    records: list[dict] = []
    lesions: list[tuple[dict, np.ndarray, np.ndarray]] = []
    n_lesion = 0
    for p in generate(num, seed, size):
        rel = f"{p.kind}/{p.id}"
        record = {"image": f"{rel}.png", "kind": p.kind, "seed": p.seed, "masks": [f"{rel}_mask.png"],
                  "duplicate_of": None}
        if p.kind == "normal":
            _save_mask(root / f"{rel}_mask.png", p.mask, "RGB")
        else:
            # Lesion number m is split when floor(m * f) steps: the first one, then every 1/f-th.
            split = multi_mask_fraction > 0 and (
                math.floor(n_lesion * multi_mask_fraction) != math.floor((n_lesion - 1) * multi_mask_fraction))
            n_lesion += 1
            if split:
                first, second = _split_mask(np.random.default_rng([p.seed, 1]), p.mask)
                _save_mask(root / f"{rel}_mask.png", first, "1")
                _save_mask(root / f"{rel}_mask_1.png", second, "RGBA")
                record["masks"].append(f"{rel}_mask_1.png")
            else:
                _save_mask(root / f"{rel}_mask.png", p.mask, "1")
            lesions.append((record, p.image, p.mask))
        _save_rgb(root / f"{rel}.png", p.image)
        records.append(record)

    if duplicates and not lesions:
        raise ValueError(f"duplicates={duplicates} needs at least one lesion image, but num={num} gave none")
    counts = {kind: sum(r["kind"] == kind for r in records) for kind in KINDS}
    rng = np.random.default_rng([int(seed), 2])
    for _ in range(duplicates):
        original, image, mask = lesions[int(rng.integers(len(lesions)))]
        kind = original["kind"]
        if rng.random() < cross_class_fraction:
            kind = "malignant" if kind == "benign" else "benign"
        counts[kind] += 1
        rel = f"{kind}/{kind} ({counts[kind]})"
        dup_image, dup_mask = _perturb(rng, image, mask)
        _save_rgb(root / f"{rel}.png", dup_image)
        _save_mask(root / f"{rel}_mask.png", dup_mask, "1")
        records.append({"image": f"{rel}.png", "kind": kind, "seed": original["seed"],
                        "masks": [f"{rel}_mask.png"], "duplicate_of": original["image"]})

    (Path(out_dir) / "phantoms.json").write_text(json.dumps(
        {"num": num, "seed": seed, "size": list(size), "duplicates": duplicates, "files": records}, indent=1))
    return root
