"""The U-Net: its classic encoder, or a pretrained one (``encoder=...``), and its decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import DEFAULT_CHANNELS, SegmentationModel
from .blocks import ConvBlock, Down, OpenGate, Up

__all__ = ["UNet"]


class UNet(SegmentationModel):
    """U-Net: conv encoder, transposed-conv decoder, skip features concatenated at every level.

    Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015, https://arxiv.org/abs/1505.04597. Each level is two 3×3
    conv + norm + ReLU; 2×2 max-pool down, 2×2 transposed conv up; padded convs, so the output
    has the input's size. The defaults are the seed model (16→256 filters, 4 poolings,
    dropout 0.07), about 1.9 M parameters.

    Args:
        in_channels: input channels. Default 1.
        out_channels: logit channels. Default 1.
        channels: filters per level, shallowest first. Default ``(16, 32, 64, 128, 256)``.
        dropout: dropout inside every conv block, in [0, 1). Default 0.07.
        norm: ``"batch"``, ``"instance"`` or ``"none"``. Default ``"batch"``.
        pad_mode: ``"replicate"`` or ``"zeros"`` padding up to a multiple of ``2 ** depth``.
            Default ``"replicate"``.
        encoder: a pretrained encoder from :data:`unet.models.encoders.ENCODERS` (e.g.
            ``"efficientnet_lite0"``) in place of the classic one; ``channels`` then gives the
            decoder's filters at output strides 1, 2, 4, 8, 16 (one per encoder stage), and
            inputs are padded to a multiple of 32. Default None (the classic encoder).
        encoder_weights: ``"imagenet"`` or None (random init) for ``encoder``. Default None. A
            trained artifact holds all weights, so loading one never needs the ImageNet file.
        image_classes: image-level head on the deepest features (0 = none). Default 0.

    Example:
        >>> import torch
        >>> from unet.models import UNet
        >>> model = UNet(channels=(8, 16, 32)).eval()
        >>> model(torch.rand(2, 1, 37, 53)).shape
        torch.Size([2, 1, 37, 53])
    """

    architecture = "unet"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        dropout: float = 0.07,
        norm: str = "batch",
        pad_mode: str = "replicate",
        encoder: str | None = None,
        encoder_weights: str | None = None,
        image_classes: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, channels, dropout, norm, pad_mode, image_classes)
        self.encoder_name = encoder
        if encoder is not None:
            self._build_on_encoder(encoder, encoder_weights)
            return
        if encoder_weights is not None:
            raise ValueError(f"encoder_weights={encoder_weights!r} needs an encoder, e.g. "
                             "encoder='efficientnet_lite0'")
        c, norm, dropout = self.channels, self.norm, self.dropout
        # encoder[i] outputs level i (c[i] channels at 1/2**i resolution); the last is the bottleneck.
        self.encoder = nn.ModuleList(
            [ConvBlock(self.in_channels, c[0], norm, dropout)]
            + [Down(c[i - 1], c[i], norm, dropout) for i in range(1, len(c))]
        )
        # decoder[k] goes from level depth-k up to level depth-k-1: deepest first, as forward visits them.
        self.decoder = nn.ModuleList(
            [
                Up(c[i + 1], c[i], c[i], norm, dropout, gate=self._make_gate(c[i], c[i + 1]))
                for i in reversed(range(self.depth))
            ]
        )
        self.head = nn.Conv2d(c[0], self.out_channels, kernel_size=1)
        self.image_head = self._make_image_head(c[-1])
        self.initialize()

    def _build_on_encoder(self, name: str, weights: str | None) -> None:
        from .encoders import build_encoder

        encoder = build_encoder(name, self.in_channels, weights)
        e, c = tuple(encoder.out_channels), self.channels
        if len(c) != len(e):
            raise ValueError(f"with encoder={name!r}, channels gives the decoder's filters at output strides "
                             f"1 … {2 ** (len(e) - 1)}: {len(e)} values, e.g. channels=(16, 32, 64, 128, 256); "
                             f"got {c!r}")
        self.depth = len(e)  # the encoder's deepest stride is 2 ** len(e)
        # decoder[k]: from stride 2**(n-k) up to 2**(n-k-1), deepest first; the last step has no skip.
        n, ins = len(e), [e[-1], *c[:0:-1]]
        skips = [*e[-2::-1], 0]
        outs = [*c[-1:0:-1], c[0]]
        self.decoder = nn.ModuleList(
            [Up(ins[k], skips[k], outs[k], self.norm, self.dropout,
                gate=self._make_gate(skips[k], ins[k]) if skips[k] else None) for k in range(n)]
        )
        self.head = nn.Conv2d(c[0], self.out_channels, kernel_size=1)
        self.image_head = self._make_image_head(e[-1])
        self.initialize()  # the decoder and heads; the encoder keeps its own (pretrained) weights
        self.encoder = encoder

    @property
    def input_normalization(self) -> dict[str, float]:
        pretrained = getattr(self.encoder, "normalization", None) if self.encoder_name else None
        return dict(pretrained) if pretrained else super().input_normalization

    @property
    def encoder_provenance(self) -> dict | None:
        """What the encoder was initialised from (name, weights, their source), or None."""
        if self.encoder_name is None:
            return None
        return {"name": self.encoder_name, "weights_source": getattr(self.encoder, "weights_source", None),
                "normalization": getattr(self.encoder, "normalization", None)}

    def model_kwargs(self) -> dict:
        kwargs = super().model_kwargs()
        if self.encoder_name is not None:
            # The artifact's weights replace the ImageNet ones: rebuilding it needs no weights file.
            kwargs |= {"encoder": self.encoder_name, "encoder_weights": None}
        return kwargs

    def _make_gate(self, skip_channels: int, gating_channels: int) -> nn.Module:
        """The module applied to each skip connection; a plain U-Net passes skips through."""
        return OpenGate()

    def forward_padded(self, x: torch.Tensor):
        if self.encoder_name is None:
            skips = []
            for level in self.encoder:
                x = level(x)
                skips.append(x)
        else:
            skips = self.encoder(x)
        x = deepest = skips.pop()  # the bottleneck is the decoder's input, not a skip
        for up in self.decoder:
            x = up(x, [skips.pop()] if skips else [])
        masks = self.head(x)
        return masks if self.image_head is None else (masks, self.image_head(deepest))
