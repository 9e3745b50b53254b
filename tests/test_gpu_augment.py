"""Batched augmentation on the training device (unet.data.gpu_augment, kornia), on the CPU.

Masks stay binary and on the image's geometry; each step follows its ``p``; a batch's draw is a
function of (seed, epoch, rank, step) and leaves the global RNG alone; the augmented batches have
the statistics of the albumentations path for the same config (the elastic field's strength
included); the decode-only split plus the device transform reproduce the CPU path's model inputs
when nothing is augmented; and a real training run with ``augment_on="gpu"`` forced on CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from unet.data import AugmentConfig, Augmenter, BatchTransform, sample_seed, table_to_batch
from unet.data.gpu_augment import DeviceTransform, GpuAugmenter, batch_seed
from unet.phantoms import generate
from unet.transforms import resize_image, resize_mask

SIZE = (64, 64)
STEPS = ("hflip_p", "vflip_p", "affine_p", "elastic_p", "gamma_p", "brightness_contrast_p", "speckle_p")
NONE = AugmentConfig(**dict.fromkeys(STEPS, 0.0))


@pytest.fixture(scope="module")
def phantoms() -> tuple[np.ndarray, np.ndarray]:
    """96 phantoms at 64 px: (N, H, W) uint8 images and (N, H, W) uint8 {0, 1} masks."""
    items = list(generate(96, seed=1, size=(96, 96)))
    images = np.stack([resize_image(p.image, SIZE) for p in items])
    masks = np.stack([(resize_mask(p.mask, SIZE) > 0).astype(np.uint8) for p in items])
    assert masks.any(axis=(1, 2)).sum() > 60  # mostly lesion images: the mask checks below mean something
    return images, masks


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array[:, None]))


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_masks_stay_binary_and_follow_the_image_geometry(phantoms):
    _, masks = phantoms
    mask = _t(masks)
    image = mask.to(torch.uint8) * 255  # the image *is* the mask: its warped copy must match the warped mask
    out_image, out_mask = GpuAugmenter(AugmentConfig(vflip_p=0.5).geometric_only().always(), SIZE)(image, mask, seed=7)
    assert out_image.dtype == torch.float32 and out_mask.dtype == torch.float32
    assert set(torch.unique(out_mask).tolist()) <= {0.0, 1.0}
    assert 0.0 <= out_image.min() and out_image.max() <= 255.0
    moved = (out_mask != mask.float()).flatten(1).any(1)
    assert moved[mask.flatten(1).any(1).bool()].all()  # every lesion moved ...
    agree = ((out_image > 127.5).float() == out_mask).float().mean().item()
    assert agree > 0.995, agree  # ... and its mask with it (bilinear vs nearest differ only on edge pixels)
    # per image: the lesion area is kept up to the scale range (0.85..1.15 in each direction)
    area_in, area_out = mask.float().sum((1, 2, 3)), out_mask.sum((1, 2, 3))
    lesion = area_in > 20
    ratio = area_out[lesion] / area_in[lesion]
    assert ((ratio > 0.6) & (ratio < 1.5)).float().mean() > 0.9


@pytest.mark.parametrize("step", STEPS)
def test_each_step_follows_its_probability(step):
    x = torch.rand(200, 1, 24, 24) * 200 + 20
    m = (torch.rand(200, 1, 24, 24) > 0.5).to(torch.uint8)
    unchanged, _ = GpuAugmenter(NONE, (24, 24))(x, m, seed=0)
    torch.testing.assert_close(unchanged, x, rtol=0, atol=1e-4)  # every p = 0: nothing happens (but /255, *255)
    for p, low, high in ((1.0, 1.0, 1.0), (0.5, 0.35, 0.65)):
        y, _ = GpuAugmenter(dataclasses.replace(NONE, **{step: p}), (24, 24))(x, m, seed=1)
        changed = ((y - x).abs().flatten(1).amax(1) > 1e-3).float().mean().item()
        assert low <= changed <= high, (step, p, changed)
    if step == "hflip_p":
        y, n = GpuAugmenter(dataclasses.replace(NONE, hflip_p=1.0), (24, 24))(x, m, seed=1)
        torch.testing.assert_close(y, x.flip(-1), rtol=0, atol=1e-4)
        assert torch.equal(n, m.flip(-1).float())


def test_draws_are_a_function_of_seed_epoch_rank_step_and_leave_the_global_rng(phantoms):
    images, masks = phantoms
    x, m = _t(images[:16]), _t(masks[:16])
    t = DeviceTransform(AugmentConfig(), SIZE, mean=0.5, std=0.25, seed=3, rank=0)
    torch.manual_seed(123)
    a = t(x, m, epoch=2, step=5)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the augmenter forked the RNG and left it as it was
    b = t(x, m, epoch=2, step=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (t(x, m, epoch=3, step=5), t(x, m, epoch=2, step=6),
                  DeviceTransform(AugmentConfig(), SIZE, mean=0.5, std=0.25, seed=3, rank=1)(x, m, epoch=2, step=5)):
        assert not torch.equal(a[0], other[0])
    assert len({batch_seed(0, e, r, s) for e in range(3) for r in range(2) for s in range(3)}) == 18


def _compare(config: AugmentConfig, images: np.ndarray, masks: np.ndarray, reps: int = 2) -> dict[str, tuple]:
    """The same statistics of albumentations' (per sample) and kornia's (per batch) augmented copies."""
    cpu = Augmenter(config, SIZE)
    pairs = [cpu(i, m, seed=sample_seed(0, r, str(k))) for r in range(reps) for k, (i, m) in enumerate(zip(images, masks))]
    cpu_i = np.stack([p[0] for p in pairs]).astype(np.float32)
    cpu_m = np.stack([p[1] for p in pairs]).astype(np.float32)
    gpu = GpuAugmenter(config, SIZE)
    outs = [gpu(_t(images), _t(masks), seed=r) for r in range(reps)]
    gpu_i = torch.cat([o[0] for o in outs])[:, 0].numpy()
    gpu_m = torch.cat([o[1] for o in outs])[:, 0].numpy()
    base_i = np.tile(images, (reps, 1, 1)).astype(np.float32)
    base_m = np.tile(masks, (reps, 1, 1)).astype(np.float32)
    return {
        "mean": (cpu_i.mean(), gpu_i.mean()),
        "std": (cpu_i.std(), gpu_i.std()),
        "moved": (np.abs(cpu_i - base_i).mean(), np.abs(gpu_i - base_i).mean()),  # how far pixels change
        "foreground": (cpu_m.mean() - base_m.mean(), gpu_m.mean() - base_m.mean()),
        "mask_changed": (np.abs(cpu_m - base_m).mean(), np.abs(gpu_m - base_m).mean()),
    }


def test_statistics_match_the_albumentations_path(phantoms):
    images, masks = phantoms
    s = _compare(AugmentConfig().always(), images, masks)
    assert abs(s["mean"][0] - s["mean"][1]) < 5.0, s             # 0-255 units (uint8 rounding: ~2)
    assert 0.9 < s["std"][1] / s["std"][0] < 1.1, s
    assert 0.85 < s["moved"][1] / s["moved"][0] < 1.2, s
    assert abs(s["foreground"][0] - s["foreground"][1]) < 0.003, s  # lesions ~3% of the pixels
    assert 0.8 < s["mask_changed"][1] / s["mask_changed"][0] < 1.25, s


def test_elastic_field_has_the_albumentations_strength(phantoms):
    """The alpha mapping (uniform kornia noise vs albumentations' max-normalised Gaussian) holds:
    left at kornia's raw scale the warp would be ~2.5x stronger."""
    images, masks = phantoms
    s = _compare(dataclasses.replace(NONE, elastic_p=1.0), images, masks)
    assert 0.75 < s["moved"][1] / s["moved"][0] < 1.25, s
    assert 0.75 < s["mask_changed"][1] / s["mask_changed"][0] < 1.33, s


def test_decode_only_batches_plus_device_transform_equal_the_cpu_path(phantoms):
    """Nothing augmented: normalising on the device gives the model inputs Ray Data's transform gives."""
    import pyarrow as pa

    from unet.codec import encode_png

    images, masks = phantoms
    rows = pa.table({"id": [f"p{k}" for k in range(8)], "class": ["benign"] * 8,
                     "image_png": [encode_png(i) for i in images[:8]],
                     "mask_png": [encode_png(m * 255) for m in masks[:8]]})
    batch = table_to_batch(rows)
    norm = dict(mean=0.4, std=0.3)
    cpu = BatchTransform(size=(48, 48), **norm)(batch)
    raw = BatchTransform(size=(48, 48), normalize=False, **norm)(batch)
    assert raw["image"].dtype == np.uint8 and raw["mask"].dtype == np.uint8
    x, y = DeviceTransform(None, (48, 48), **norm)(torch.from_numpy(raw["image"]), torch.from_numpy(raw["mask"]),
                                                   epoch=0, step=0)
    np.testing.assert_allclose(x.numpy(), cpu["image"], rtol=0, atol=1e-6)
    assert np.array_equal(y.numpy(), cpu["mask"])


@pytest.mark.slow
def test_training_with_device_augmentation_on_cpu(ray_local, tmp_path):
    """jobs.train's path with ``augment_on="gpu"`` forced on a CPU worker: the decoded split is
    materialised and reshuffled, batches are augmented in the loop, every epoch differently."""
    from unet.prepare import PrepareConfig, prepare
    from unet.training import TrainConfig, fit

    data = str(tmp_path / "prepared")
    prepare(PrepareConfig(source="phantoms", out=data, num=24, seed=3, size=(32, 32), ratios=(0.5, 0.5, 0.0),
                          shard_size=4), command="tests/test_gpu_augment.py")
    cfg = TrainConfig.from_dict(dict(data=data, storage=str(tmp_path / "runs"), name="gpu-aug", model="unet",
                                     model_kwargs={"channels": [4, 8, 16]}, image_size=32, epochs=2, batch_size=4,
                                     workers=1, keep=1, augment_on="gpu"), source="test")
    assert cfg.augment_on_device and not cfg.use_gpu
    outcome = fit(cfg, command="pytest gpu-aug")
    assert [r["epoch"] for r in outcome.history] == [1, 2]
    for record in outcome.history:
        assert np.isfinite(record["train_loss"]) and record["train_images"] == 12 and record["val_images"] == 12
    # epoch 2 trains on new draws (and a new order), not a replay of epoch 1
    digests = [r["train_samples_sha256"] for r in outcome.history]
    assert digests[0] != digests[1]
