"""Training-time augmentation for (grey ultrasound image, binary mask) pairs.

Library choice: **albumentations**. It is built for exactly this case — one call transforms an
image and its mask *together*, with the same random parameters, using linear interpolation for the
image and nearest-neighbour for the mask, so labels stay labels and stay aligned. It works on
plain NumPy uint8 arrays on the CPU (which is where Ray Data's map tasks run), is fast (OpenCV
underneath: ~5 ms per 128x128 pair with an elastic warp), is widely used in medical
segmentation, and can be re-seeded per sample (``Compose.set_random_seed``), which
lets us make every augmented sample a pure function of ``(seed, epoch, sample id)``.
Alternatives considered: kornia and MONAI transforms operate on torch tensors (GPU-friendly but
heavier inside CPU data workers and MONAI pulls a large dependency); torchvision v2 lacks an
elastic transform with a separate mask interpolation mode and speckle noise.

albumentations is frozen upstream (deprecated in July 2025; its successor, AlbumentationsX, is
AGPL-licensed), so the dependency is pinned below its next major (``albumentations>=2.0,<3``).
This is the CPU path (``augment_on="cpu"``); GPU training augments whole batches on the device
with kornia instead (:mod:`unet.data.gpu_augment`, the same config and ranges).

The default settings follow what suits B-mode ultrasound:

* horizontal flip (left/right is arbitrary in a breast scan); **no vertical flip by default** —
  the probe is always at the top and acoustic shadowing falls downwards, so an upside-down image
  is something the model never sees at test time (``vflip_p`` turns it on);
* small rotations, scaling and shifts (probe angle and depth setting vary);
* a mild elastic deformation (tissue compresses under the probe);
* gamma, brightness/contrast (gain and dynamic-range settings differ between machines);
* multiplicative speckle noise (the characteristic noise of coherent ultrasound imaging).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

# albumentations asks PyPI for a newer version on import; jobs run on machines without internet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation (``p`` = 0 switches one off).

    Args:
        hflip_p: probability of a left/right flip. Default 0.5.
        vflip_p: probability of an up/down flip. Default 0.0 (see module docstring).
        affine_p: probability of the rotation/scale/shift step. Default 0.7.
        rotate_deg: rotation range ±degrees. Default 15.
        scale: scale range. Default (0.85, 1.15).
        translate: shift range as a fraction of the image size. Default 0.05.
        elastic_p: probability of an elastic deformation. Default 0.3.
        elastic_alpha, elastic_sigma: strength and smoothness of the displacement field. ``sigma``
            is a fraction of the image side; ``alpha`` is scaled by ``side**2 / 128`` so the warp is
            the same fraction of the image at any training size (defaults: displacements of up to
            ~6 px, ~1.7 px on average, at 128 px).
        gamma_p, gamma_limit: probability and range (percent) of a gamma change.
        brightness_contrast_p, brightness, contrast: probability and ± limits.
        speckle_p, speckle: probability and multiplier range of per-pixel multiplicative noise.

    Example::

        cfg = AugmentConfig(vflip_p=0.5)           # also flip vertically
        geometric = AugmentConfig().geometric_only()
    """

    hflip_p: float = 0.5
    vflip_p: float = 0.0
    affine_p: float = 0.7
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.05
    elastic_p: float = 0.3
    elastic_alpha: float = 1.5
    elastic_sigma: float = 0.05
    gamma_p: float = 0.3
    gamma_limit: tuple[float, float] = (80.0, 120.0)
    brightness_contrast_p: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15
    speckle_p: float = 0.3
    speckle: tuple[float, float] = (0.85, 1.15)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name}={value} must be a probability in [0, 1]")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"AugmentConfig.scale={self.scale} must be (low, high) with 0 < low <= high")

    def geometric_only(self) -> AugmentConfig:
        """Same config with every intensity transform switched off."""
        return replace(self, gamma_p=0.0, brightness_contrast_p=0.0, speckle_p=0.0)

    def intensity_only(self) -> AugmentConfig:
        """Same config with every geometric transform switched off."""
        return replace(self, hflip_p=0.0, vflip_p=0.0, affine_p=0.0, elastic_p=0.0)

    def always(self) -> AugmentConfig:
        """Same config with every enabled transform (p > 0) applied with probability 1 (tests)."""
        return replace(self, **{k: 1.0 for k, v in asdict(self).items() if k.endswith("_p") and v > 0})


def build_augmentation(config: AugmentConfig, size: tuple[int, int]) -> A.Compose:
    """The albumentations pipeline for images of ``size`` = (height, width).

    Geometric steps come first so the intensity steps (which never touch the mask) see the final
    geometry; borders exposed by rotation/shift are filled with 0 (black, like the area outside the
    ultrasound fan) in the image and with background in the mask.
    """
    side = float(min(size))
    border = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
    return A.Compose([
        A.HorizontalFlip(p=config.hflip_p),
        A.VerticalFlip(p=config.vflip_p),
        A.Affine(rotate=(-config.rotate_deg, config.rotate_deg), scale=config.scale,
                 translate_percent=(-config.translate, config.translate),
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 p=config.affine_p, **border),
        A.ElasticTransform(alpha=config.elastic_alpha * side * side / 128.0,
                           sigma=config.elastic_sigma * side,
                           interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                           p=config.elastic_p, **border),
        A.RandomGamma(gamma_limit=config.gamma_limit, p=config.gamma_p),
        A.RandomBrightnessContrast(brightness_limit=config.brightness, contrast_limit=config.contrast,
                                   p=config.brightness_contrast_p),
        A.MultiplicativeNoise(multiplier=config.speckle, elementwise=True, p=config.speckle_p),
    ])


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """A 32-bit seed that depends only on (seed, epoch, sample id).

    Tying the randomness to the sample instead of the batch makes the augmented sample the same
    whatever the batching, worker or shard order — so the Ray pipeline and the plain iterator
    agree, and a run can be reproduced.
    """
    entropy = [seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, zlib.crc32(sample_id.encode("utf-8"))]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class Augmenter:
    """Applies one :class:`AugmentConfig` to (image, mask) pairs of a fixed size, seeded per sample.

    Example::

        aug = Augmenter(AugmentConfig(), (128, 128))
        image2, mask2 = aug(image_u8, mask01_u8, seed=sample_seed(0, epoch, "benign (1)"))
    """

    def __init__(self, config: AugmentConfig, size: tuple[int, int]):
        self.config = config
        self.size = tuple(size)
        self._compose = build_augmentation(config, self.size)

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) uint8 image and (H, W) uint8 {0, 1} mask -> the same, jointly augmented."""
        self._compose.set_random_seed(seed)
        out = self._compose(image=image, mask=mask)
        return out["image"], out["mask"]

    def __reduce__(self):
        # Ship the config, not the albumentations objects, to Ray workers; rebuild there.
        return (Augmenter, (self.config, self.size))
