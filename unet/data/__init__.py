"""Prepared shards -> model batches: Ray Data reader, plain iterator and augmentation.

See :mod:`unet.data.dataset` for the batch format and how the trainer should iterate, and
:mod:`unet.data.augment` for the augmentations (albumentations) and why;
:mod:`unet.data.gpu_augment` applies the same set to whole batches on the training device (kornia;
import it from there, so CPU data workers never load kornia).
"""

from unet.data.augment import AugmentConfig, Augmenter, build_augmentation, sample_seed
from unet.data.dataset import (
    DEFAULT_SIZE,
    READ_COLUMNS,
    SPLITS,
    BatchTransform,
    TorchCollate,
    collate_torch,
    iter_batches,
    read_split,
    table_to_batch,
)

__all__ = [
    "AugmentConfig", "Augmenter", "BatchTransform", "DEFAULT_SIZE", "READ_COLUMNS", "SPLITS",
    "TorchCollate", "build_augmentation", "collate_torch", "iter_batches", "read_split",
    "sample_seed", "table_to_batch",
]
