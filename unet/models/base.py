"""What every architecture shares: the argument vocabulary and its checks, padding, initialisation.

Each architecture subclasses :class:`SegmentationModel`, builds its layers in ``__init__`` and
implements :meth:`SegmentationModel.forward_padded`; ``forward`` (here, once) pads the input to a
multiple of ``2 ** depth`` so every pooling divides evenly, and crops the logits back, so any
input size works (e.g. BUSI's 471×562). :meth:`SegmentationModel.predict` (here, once) is what
every user of a trained model calls: the full-resolution logits, whatever the architecture.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_CHANNELS", "NORMS", "PAD_MODES", "Predicts", "SegmentationModel", "count_parameters", "fuse_conv_bn"]

# The seed model's filters: 16 -> 256 over 5 levels, i.e. 4 poolings.
DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)
NORMS = ("batch", "instance", "none")
# Names follow nn.Conv2d's padding_mode vocabulary; value = mode for F.pad.
PAD_MODES = {"replicate": "replicate", "zeros": "constant"}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) in ``model``; only those with ``requires_grad`` if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm2d folded into the Conv2d before it.

    Same outputs in eval mode (up to float rounding), one pass over each feature map fewer per
    block: about 8% more images/s on CPU for the default UNet. Only for inference; the copy is in
    eval mode and its batch statistics are fixed.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for seq in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return fused


def _positive_int(name: str, value, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, e.g. {name}={example}; got {value!r}")
    return int(value)


def _check_channels(channels) -> tuple[int, ...]:
    hint = "one positive int per level, at least 2 levels, e.g. channels=(16, 32, 64, 128, 256)"
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise ValueError(f"channels must be a sequence of {hint}; got {channels!r}")
    if len(channels) < 2:
        raise ValueError(f"channels needs at least 2 levels (one pooling); {hint}; got {tuple(channels)!r}")
    if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in channels):
        raise ValueError(f"channels must hold {hint}; got {tuple(channels)!r}")
    return tuple(int(c) for c in channels)


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"dropout must be a float in [0, 1) (0 disables it), e.g. dropout=0.07; got {dropout!r}"
        )
    return float(dropout)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}")
    return value


class Predicts:
    """``predict``/``predict_all``/``predict_proba`` for a module whose ``forward`` returns mask
    logits (a list of heads for deep supervision) or the pair ``(mask logits, class logits)``:
    shared by :class:`SegmentationModel` and :class:`unet.models.ensemble.Ensemble`."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The final logits ``(B, out_channels, H, W)`` for ``x``, computed without grad.

        ``forward`` may return a list of heads (UNet++ deep supervision in training mode, ordered
        shallowest first, every one at input resolution); the model's final output is the last
        one, and this is the one place that knows it. The model's mode is left as it is (call
        ``eval()`` for inference: dropout off, BatchNorm running statistics).
        """
        return self.predict_all(x)[0]

    @torch.no_grad()
    def predict_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(final mask logits, image class logits or None)`` for ``x``, without grad."""
        out = self(x)
        masks, classes = out if isinstance(out, tuple) else (out, None)
        return (masks[-1] if isinstance(masks, list) else masks), classes

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(foreground probabilities (B, out_channels, H, W), image class probabilities (B, K) or
        None)`` in float32; with ``tta`` each is the mean over ``x`` and its horizontal flip (the
        probe is at the top, so only left-right flips are realistic)."""
        logits, classes = self.predict_all(x)
        prob = torch.sigmoid(logits.float())
        class_prob = None if classes is None else torch.softmax(classes.float(), dim=1)
        if tta:
            flipped_logits, flipped_classes = self.predict_all(x.flip(-1))
            prob = (prob + torch.sigmoid(flipped_logits.float()).flip(-1)) / 2
            if class_prob is not None:
                class_prob = (class_prob + torch.softmax(flipped_classes.float(), dim=1)) / 2
        return prob, class_prob


class SegmentationModel(Predicts, nn.Module):
    """Base class of the UNet family: checks the shared arguments, pads/crops in ``forward``.

    Subclasses set ``architecture`` (their registry name), build their layers after calling
    ``super().__init__``, call :meth:`initialize` last, and implement :meth:`forward_padded`,
    which only ever sees inputs whose height and width are multiples of ``2 ** depth``.

    Args:
        in_channels: input image channels. Default 1 (grey ultrasound).
        out_channels: output logit channels. Default 1 (lesion vs background).
        channels: filters per level, shallowest first; ``len(channels) - 1`` poolings.
            Default ``(16, 32, 64, 128, 256)``.
        dropout: dropout probability inside every conv block, in [0, 1). Default 0.07.
        norm: ``"batch"``, ``"instance"`` or ``"none"``. Default ``"batch"``.
        pad_mode: how inputs are padded to a multiple of ``2 ** depth``: ``"replicate"``
            (edge pixels, default; no artificial black border) or ``"zeros"``.
        image_classes: size of an image-level classification head on the deepest features
            (e.g. 3 for normal/benign/malignant; 0 = none, default). With a head, ``forward``
            returns ``(mask_logits, class_logits)``; :meth:`predict` still returns the masks only.
    """

    architecture: str = ""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        dropout: float = 0.07,
        norm: str = "batch",
        pad_mode: str = "replicate",
        image_classes: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels, "1")
        self.out_channels = _positive_int("out_channels", out_channels, "1")
        self.channels = _check_channels(channels)
        self.dropout = _check_dropout(dropout)
        self.norm = _check_choice("norm", norm, NORMS)
        self.pad_mode = _check_choice("pad_mode", pad_mode, PAD_MODES)
        self.depth = len(self.channels) - 1
        if isinstance(image_classes, bool) or not isinstance(image_classes, numbers.Integral) \
                or image_classes < 0 or image_classes == 1:
            raise ValueError(f"image_classes must be 0 (no image head) or >= 2, e.g. image_classes=3; "
                             f"got {image_classes!r}")
        self.image_classes = int(image_classes)

    def _make_image_head(self, channels: int) -> nn.Module | None:
        """The image-level head on ``channels`` deepest features, or None without ``image_classes``:
        global average pooling, dropout, one linear layer (smp's classification head)."""
        if not self.image_classes:
            return None
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                             nn.Linear(channels, self.image_classes))

    @property
    def input_normalization(self) -> dict[str, float]:
        """``{"mean", "std"}`` its inputs are normalised with (``unet.transforms.normalize``): the
        project's default, or what a pretrained encoder's weights expect."""
        from unet.transforms import DEFAULT_MEAN, DEFAULT_STD

        return {"mean": DEFAULT_MEAN, "std": DEFAULT_STD}

    def model_kwargs(self) -> dict:
        """The keyword arguments that rebuild this model with ``build_model`` (JSON-ready)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "dropout": self.dropout,
            "norm": self.norm,
            "pad_mode": self.pad_mode,
            **({"image_classes": self.image_classes} if self.image_classes else {}),
        }

    def initialize(self) -> None:
        """He (Kaiming) initialisation for the ReLU convolutions, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        """Logits ``(B, out_channels, H, W)`` for input ``(B, in_channels, H, W)`` of any H, W
        (a list of them for deep supervision in training); with an image head, the pair
        ``(mask logits, class logits (B, image_classes))``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.in_channels}, H, W) "
                f"(in_channels={self.in_channels}); got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        # Split the padding evenly so the image stays centred in the padded grid.
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            x = F.pad(x, (left, pad_w - left, top, pad_h - top), mode=PAD_MODES[self.pad_mode])
        out = self.forward_padded(x)
        masks, classes = out if isinstance(out, tuple) else (out, None)
        if isinstance(masks, list):
            masks = [o[..., top : top + height, left : left + width] for o in masks]
        else:
            masks = masks[..., top : top + height, left : left + width]
        return masks if classes is None else (masks, classes)

    def forward_padded(self, x: torch.Tensor):
        """Logits for ``x`` whose height and width are multiples of ``2 ** depth`` (and the image
        head's logits, as a pair, when the model has one)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_padded")
