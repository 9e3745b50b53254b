"""Synthetic phantoms: deterministic, class properties a model can learn, BUSI's on-disk layout."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pytest
from PIL import Image

from unet.phantoms import CLASS_MIX, KINDS, generate, make_phantom, write_busi_layout

SIZE = (64, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_make_phantom_is_deterministic_per_seed(kind):
    image, mask = make_phantom(5, kind, SIZE)
    again_image, again_mask = make_phantom(5, kind, SIZE)
    other_image, _ = make_phantom(6, kind, SIZE)
    assert image.shape == mask.shape == SIZE
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(mask, again_mask)
    assert not np.array_equal(image, other_image)


def test_non_square_sizes_and_bad_arguments():
    image, mask = make_phantom(1, "malignant", (48, 80))
    assert image.shape == mask.shape == (48, 80)
    with pytest.raises(ValueError, match="kind"):
        make_phantom(1, "cyst", SIZE)
    with pytest.raises(ValueError, match="size"):
        make_phantom(1, "benign", (8, 64))


def test_generate_is_deterministic_and_each_image_independent_of_count():
    first = list(generate(6, seed=3, size=SIZE))
    longer = list(generate(9, seed=3, size=SIZE))
    other = list(generate(6, seed=4, size=SIZE))
    for a, b in zip(first, longer):
        assert (a.id, a.kind, a.seed) == (b.id, b.kind, b.seed)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other))
    assert len({p.id for p in longer}) == len(longer)
    assert all(p.id.startswith(f"{p.kind} (") for p in longer)


def test_class_mix_follows_busi():
    kinds = Counter(p.kind for p in generate(100, seed=0, size=(16, 16)))
    for kind, share in CLASS_MIX.items():
        assert abs(kinds[kind] / 100 - share) <= 0.03, kinds
    # Even a handful of images covers every class (so tiny test sets exercise all three).
    assert {p.kind for p in generate(6, seed=0, size=(16, 16))} == set(KINDS)


def _lesion_stats(kind: str, seeds=range(20)):
    shapes, contrasts = [], []
    for seed in seeds:
        image, mask = make_phantom(seed, kind, SIZE)
        lesion = mask > 0
        assert lesion.any(), f"{kind} phantom {seed} has an empty mask"
        # A lesion must lie wholly inside the image, else its shape measurements are truncated.
        assert not (lesion[0].any() or lesion[-1].any() or lesion[:, 0].any() or lesion[:, -1].any())
        ys, xs = np.nonzero(lesion)
        shapes.append((np.ptp(ys) + 1) / (np.ptp(xs) + 1))
        ring = (cv2.dilate(mask, np.ones((7, 7), np.uint8)) > 0) & ~lesion
        contrasts.append(image[ring].mean() - image[lesion].mean())
    return np.array(shapes), np.array(contrasts)


def test_normal_phantoms_have_empty_masks():
    for seed in range(5):
        _, mask = make_phantom(seed, "normal", SIZE)
        assert not mask.any()


def test_lesions_are_hypoechoic_and_shaped_by_class():
    benign_shape, benign_contrast = _lesion_stats("benign")
    malignant_shape, malignant_contrast = _lesion_stats("malignant")
    # Benign: wider than tall ("parallel"); malignant: taller than wide on average.
    assert benign_shape.max() < 1.0
    assert malignant_shape.mean() > 1.15
    # Every lesion is clearly darker than the tissue right around it (grey levels of 255).
    assert benign_contrast.min() > 25 and malignant_contrast.min() > 25
    # Malignant margins are irregular: the mask fills clearly less of its convex hull.
    solidity = []
    for seed in range(10):
        _, mask = make_phantom(seed, "malignant", (128, 128))
        contour = max(cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0], key=cv2.contourArea)
        solidity.append(cv2.contourArea(contour) / cv2.contourArea(cv2.convexHull(contour)))
    assert np.mean(solidity) < 0.9


def test_speckle_texture_is_present():
    image, _ = make_phantom(0, "normal", (128, 128))
    detail = image.astype(np.float32) - cv2.GaussianBlur(image.astype(np.float32), (0, 0), 3)
    assert detail.std() > 8  # grainy like ultrasound, not a smooth cartoon


def test_write_busi_layout_matches_busi(tmp_path):
    root = write_busi_layout(tmp_path, 12, seed=1, size=SIZE, duplicates=2, multi_mask_fraction=0.2)
    assert root == tmp_path / "Dataset_BUSI_with_GT"
    truth = json.loads((tmp_path / "phantoms.json").read_text())
    files = truth["files"]
    assert len(files) == 14

    images = sorted(p for p in root.glob("*/*.png") if "_mask" not in p.name)
    assert len(images) == 14
    assert {p.parent.name for p in images} == set(KINDS)
    assert (root / "benign" / "benign (1).png").is_file()  # spaces and parentheses, as in BUSI
    for entry in files:
        image = Image.open(root / entry["image"])
        assert image.mode == "RGB"
        masks = [np.asarray(Image.open(root / m).convert("L")) > 0 for m in entry["masks"]]
        assert all(m.shape == (image.height, image.width) for m in masks)
        if entry["kind"] == "normal":
            assert not any(m.any() for m in masks)

    split = [f for f in files if len(f["masks"]) == 2]
    assert split, "some lesion masks must be split into _mask.png + _mask_1.png"
    for entry in split:
        assert entry["masks"][1].endswith("_mask_1.png")
        first, second = (np.asarray(Image.open(root / m).convert("L")) > 0 for m in entry["masks"])
        _, full = make_phantom(entry["seed"], entry["kind"], SIZE)
        assert first.any() and second.any() and not (first & second).any()
        np.testing.assert_array_equal(first | second, full > 0)  # only the OR is the lesion

    duplicates = [f for f in files if f["duplicate_of"]]
    assert len(duplicates) == 2
    for entry in duplicates:
        original = np.asarray(Image.open(root / entry["duplicate_of"]).convert("L")).astype(int)
        copy = np.asarray(Image.open(root / entry["image"]).convert("L")).astype(int)
        assert abs(copy.shape[0] - original.shape[0]) <= 2 and abs(copy.shape[1] - original.shape[1]) <= 2
        assert entry["image"] != entry["duplicate_of"]
        # Close copy: same picture up to a crop of a pixel or two and a small brightness shift.
        h, w = min(copy.shape[0], original.shape[0]), min(copy.shape[1], original.shape[1])
        assert np.median(np.abs(copy[:h, :w] - original[:h, :w])) < 40

    # Same arguments, same files.
    again = write_busi_layout(tmp_path / "again", 12, seed=1, size=SIZE, duplicates=2, multi_mask_fraction=0.2)
    for entry in files:
        assert (root / entry["image"]).read_bytes() == (again / entry["image"]).read_bytes()
