"""The :class:`~unet.data.augment.AugmentConfig` set, batched on the training device (kornia).

Why: on a GPU node the CPU augmentation (albumentations, one pair at a time in Ray Data) is what
the model waits for — an H200 run trained at ~205 images/s with its worker waiting for augmented
batches 67% of the time on 15 CPUs. With ``augment_on="gpu"`` Ray Data only decodes and resizes
(uint8, materialised once) and :class:`GpuAugmenter` augments each batch where the model runs.
Library: **kornia** (Apache-2.0): ``AugmentationSequential(data_keys=["input", "mask"])`` applies
one draw of parameters to image and mask, bilinear for the image and nearest for the mask. The CPU
path stays on albumentations: kornia's elastic warp on CPU is far slower than OpenCV's.

The steps, their order and their distributions follow :func:`unet.data.augment.build_augmentation`:

* flips: ``RandomHorizontalFlip``/``RandomVerticalFlip`` with ``hflip_p``/``vflip_p``;
* affine: ``RandomAffine`` — rotation U(±``rotate_deg``), one isotropic scale U(``scale``), shifts
  U(±``translate``) x width/height, zero fill; the mask is resampled nearest (kornia's default for
  mask keys);
* elastic: ``RandomElasticTransform`` with the same Gaussian ``sigma`` in pixels and a kernel of
  ``8 sigma + 1`` (what OpenCV picks for albumentations). albumentations draws the field from N(0, 1)
  divided by its maximum over both (H, W) components, blurs it and multiplies by ``alpha`` pixels;
  kornia draws U(-1, 1) and multiplies by ``alpha`` in grid units (half the image side). The
  kornia ``alpha`` here is ``alpha_px * (2 / side) * sqrt(3) / M``, with ``M`` the median of the
  maximum of ``2 H W`` |N(0, 1)| draws, so both fields have the same standard deviation;
* gamma: ``RandomGamma`` with ``gamma_limit / 100``;
* brightness/contrast: ``x * (1 + c) + b`` with ``c ~ U(±contrast)``, ``b ~ U(±brightness)`` in
  units of the full range, one ``p`` for both, then clipped — what albumentations 2.0.8's
  ``RandomBrightnessContrast`` computes (``multiply_add``), not kornia's separate steps;
* speckle: a per-pixel multiplier U(``speckle``), clipped (albumentations' ``MultiplicativeNoise``).

Deviations that remain (``tests/test_gpu_augment.py`` checks the batch statistics against the
albumentations path): the elastic field's blur pads with zeros where OpenCV replicates the edge,
so displacements fade within ~``sigma`` of the border; the image stays float between steps, where
albumentations rounds to uint8 after each one (and truncates in its gamma table); randomness is
drawn per *batch* from ``(seed, epoch, rank, step)`` (:func:`batch_seed`), not per sample, so a
sample's augmentation also depends on its place in the batch, and CPU and CUDA draw different
numbers for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch
from kornia import augmentation as K
from kornia.augmentation import IntensityAugmentationBase2D
from kornia.constants import DataKey, Resample

from unet.data.augment import AugmentConfig

__all__ = ["BrightnessContrast", "DeviceTransform", "GpuAugmenter", "Speckle", "batch_seed",
           "build_gpu_augmentation", "elastic_parameters", "normalize_batch"]


class BrightnessContrast(IntensityAugmentationBase2D):
    """``clip(x * (1 + c) + b)`` on [0, 1] images, ``c ~ U(±contrast)``, ``b ~ U(±brightness)``: the
    formula albumentations' ``RandomBrightnessContrast`` applies (kornia splits it in two steps with
    their own probabilities)."""

    def __init__(self, brightness: float, contrast: float, p: float):
        super().__init__(p=p)
        self.brightness, self.contrast = float(brightness), float(contrast)

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        u = torch.rand(batch_shape[0], 2, device=self.device, dtype=self.dtype) * 2 - 1
        return {"contrast": 1 + u[:, 0] * self.contrast, "brightness": u[:, 1] * self.brightness}

    def apply_transform(self, input, params, flags, transform=None):
        shape = (-1,) + (1,) * (input.ndim - 1)
        gain = params["contrast"].to(input).view(shape)
        offset = params["brightness"].to(input).view(shape)
        return (input * gain + offset).clamp(0.0, 1.0)


class Speckle(IntensityAugmentationBase2D):
    """Multiplicative speckle: every pixel times its own U(low, high) factor, clipped to [0, 1]
    (albumentations' ``MultiplicativeNoise(elementwise=True)``; kornia's noises are additive)."""

    def __init__(self, multiplier: Sequence[float], p: float):
        super().__init__(p=p)
        self.low, self.high = float(multiplier[0]), float(multiplier[1])

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        u = torch.rand(batch_shape, device=self.device, dtype=self.dtype)
        return {"multiplier": self.low + u * (self.high - self.low)}

    def apply_transform(self, input, params, flags, transform=None):
        return (input * params["multiplier"].to(input)).clamp(0.0, 1.0)


def elastic_parameters(config: AugmentConfig, size: tuple[int, int]) -> dict:
    """kornia ``RandomElasticTransform`` arguments equivalent to albumentations' field (module docstring)."""
    h, w = size
    side = float(min(size))
    alpha_px = config.elastic_alpha * side * side / 128.0
    sigma_px = config.elastic_sigma * side
    kernel = int(round(8 * sigma_px + 1)) | 1
    n = 2 * h * w
    typical_max = NormalDist().inv_cdf((1 + 0.5 ** (1 / n)) / 2)  # median of max |N(0,1)| over n draws
    std_ratio = math.sqrt(3) / typical_max  # std of N/max over std of U(-1, 1)
    return dict(kernel_size=(kernel, kernel), sigma=(sigma_px, sigma_px),
                alpha=(alpha_px * std_ratio * 2 / w, alpha_px * std_ratio * 2 / h))


def build_gpu_augmentation(config: AugmentConfig, size: tuple[int, int]) -> K.AugmentationSequential | None:
    """The kornia pipeline for (N, 1, H, W) float images in [0, 1] and masks; None when every ``p`` is 0.

    Steps with ``p == 0`` are left out (kornia would still compute and discard them).
    """
    steps = [
        (config.hflip_p, lambda p: K.RandomHorizontalFlip(p=p)),
        (config.vflip_p, lambda p: K.RandomVerticalFlip(p=p)),
        (config.affine_p, lambda p: K.RandomAffine(
            degrees=config.rotate_deg, translate=(config.translate, config.translate), scale=config.scale,
            resample="bilinear", padding_mode="zeros", align_corners=False, p=p)),
        (config.elastic_p, lambda p: K.RandomElasticTransform(
            **elastic_parameters(config, size), align_corners=False, padding_mode="zeros", p=p)),
        (config.gamma_p, lambda p: K.RandomGamma(
            gamma=(config.gamma_limit[0] / 100.0, config.gamma_limit[1] / 100.0), p=p)),
        (config.brightness_contrast_p, lambda p: BrightnessContrast(config.brightness, config.contrast, p)),
        (config.speckle_p, lambda p: Speckle(config.speckle, p)),
    ]
    modules = [make(p) for p, make in steps if p > 0]
    if not modules:
        return None
    return K.AugmentationSequential(
        *modules, data_keys=["input", "mask"],
        # Nearest for masks (labels stay labels) on the same pixel grid convention as the image.
        extra_args={DataKey.MASK: {"resample": Resample.NEAREST, "align_corners": False}})


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, rank, step): the draw of one batch's augmentation."""
    entropy = [int(v) & 0xFFFFFFFF for v in (seed, epoch, rank, step)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class GpuAugmenter:
    """Applies one :class:`AugmentConfig` to batches of (image, mask) on their own device, seeded per call.

    Args:
        config: the augmentations (the same settings as the CPU :class:`~unet.data.augment.Augmenter`).
        size: (height, width) of the batches (sets the elastic field's scale).

    Call it with ``image`` (N, 1, H, W) uint8 or float in [0, 255], ``mask`` (N, 1, H, W) in {0, 1}
    (any dtype) and an integer ``seed``; it returns the image as float32 in [0, 255] and the mask as
    float32 in exactly {0, 1}, on the input's device. The global torch RNG is left as it was.

    Example::

        aug = GpuAugmenter(AugmentConfig(), (256, 256))
        image, mask = aug(batch_u8.cuda(), mask_u8.cuda(), seed=batch_seed(0, epoch, rank, step))
        x = normalize_batch(image, mean=0.5, std=0.25)
    """

    def __init__(self, config: AugmentConfig, size: tuple[int, int]):
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size={size!r} must be (height, width) with positive integers")
        self.config = config
        self.size = (int(size[0]), int(size[1]))
        self._sequential = build_gpu_augmentation(config, self.size)
        self._rng_device: torch.device | None = None

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 4 or image.shape[1] != 1 or mask.shape != image.shape:
            raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} must both be (N, 1, H, W)")
        if tuple(image.shape[-2:]) != self.size:
            raise ValueError(f"batch is {tuple(image.shape[-2:])} but this GpuAugmenter was built for {self.size}")
        x = image.float() / 255.0
        m = mask.float()
        if self._sequential is not None:
            device = x.device
            if self._rng_device != device:
                # Draw the parameters (elastic fields: N x 2 x H x W numbers) where the batch is,
                # instead of on the CPU and copying them over.
                for module in self._sequential.children():
                    module.set_rng_device_and_dtype(device, torch.float32)
                self._rng_device = device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                       device_type=device.type):
                torch.manual_seed(int(seed))
                x, m = self._sequential(x, m)
        return x * 255.0, (m > 0.5).to(torch.float32)


def normalize_batch(image: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """[0, 255] images (uint8 or float) -> float32 ``(x / 255 - mean) / std``, like ``unet.transforms.normalize``."""
    return (image.to(torch.float32) / 255.0 - mean) / std


class DeviceTransform:
    """Decoded uint8 batches -> model inputs on the training device: augment (optional), normalise.

    What the train loop applies with ``augment_on="gpu"`` to the batches of a split read with
    ``normalize=False``, after moving them to the device. The draw of batch ``step`` of ``epoch`` on
    ``rank`` is :func:`batch_seed` ``(seed, epoch, rank, step)``: a new one every epoch, the same
    one when a run is repeated or resumed (given the same batches).

    Args:
        augment: an :class:`AugmentConfig`, or None to only normalise.
        size: (height, width) of the batches.
        mean, std: the model's input normalisation (as ``unet.transforms.normalize``).
        seed, rank: the run's seed and this worker's rank.

    Example::

        to_model = DeviceTransform(AugmentConfig(), (256, 256), mean=0.5, std=0.25, seed=0, rank=rank)
        x, y = to_model(batch["image"].cuda(), batch["mask"].cuda(), epoch=3, step=k)
    """

    def __init__(self, augment: AugmentConfig | None, size: tuple[int, int], *, mean: float, std: float,
                 seed: int = 0, rank: int = 0):
        if std <= 0:
            raise ValueError(f"std={std} must be positive")
        self.augmenter = GpuAugmenter(augment, size) if augment is not None else None
        self.mean, self.std = float(mean), float(std)
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, epoch: int, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augmenter is not None:
            image, mask = self.augmenter(image, mask, batch_seed(self.seed, epoch, self.rank, step))
        return normalize_batch(image, self.mean, self.std), mask.to(torch.float32)
