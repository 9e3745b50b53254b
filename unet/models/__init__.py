"""The UNet family for binary segmentation: one argument vocabulary, a registry, any input size.

All models are fully convolutional and return logits ``(B, out_channels, H, W)`` for input
``(B, in_channels, H, W)`` of any H, W (padded to a multiple of ``2 ** depth`` and cropped back).

Example:
    >>> import torch
    >>> from unet.models import build_model, count_parameters
    >>> model = build_model("attention_unet", channels=(8, 16, 32)).eval()
    >>> model(torch.rand(1, 1, 64, 64)).shape
    torch.Size([1, 1, 64, 64])
"""

from __future__ import annotations

import inspect
from collections import ChainMap

import torch

from .attention_unet import AttentionGate, AttentionUNet
from .base import DEFAULT_CHANNELS, SegmentationModel, count_parameters, fuse_conv_bn
from .ensemble import Ensemble
from .unet import UNet
from .unet_plus_plus import UNetPlusPlus

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_CHANNELS",
    "Ensemble",
    "MODELS",
    "AttentionGate",
    "AttentionUNet",
    "SegmentationModel",
    "UNet",
    "UNetPlusPlus",
    "build_model",
    "count_parameters",
    "fuse_conv_bn",
]

# The architectures jobs.train trains; ARCHITECTURES adds what an artifact may also hold.
MODELS: dict[str, type[SegmentationModel]] = {
    cls.architecture: cls for cls in (UNet, AttentionUNet, UNetPlusPlus)
}
# (a live view: an architecture registered in MODELS is in it too).
ARCHITECTURES: ChainMap[str, type[torch.nn.Module]] = ChainMap(MODELS, {Ensemble.architecture: Ensemble})


def build_model(name: str, **kwargs) -> SegmentationModel:
    """Build a model by registry name (``"unet"``, ``"attention_unet"``, ``"unet_plus_plus"``, or
    ``"ensemble"`` of trained members, see :class:`Ensemble`).

    Raises:
        KeyError: unknown name; the message lists the valid names.
        TypeError: an argument the architecture does not take; the message lists those it does.
        ValueError: a bad argument value; the message names the argument and the fix.
    """
    try:
        cls = ARCHITECTURES[name]
    except (KeyError, TypeError) as e:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(sorted(ARCHITECTURES))}") from e
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"build_model({name!r}) got unexpected argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(params)}"
        )
    return cls(**kwargs)
