"""The classic U-Net encoder/decoder."""

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
    ) -> None:
        super().__init__(in_channels, out_channels, channels, dropout, norm, pad_mode)
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
        self.initialize()

    def _make_gate(self, skip_channels: int, gating_channels: int) -> nn.Module:
        """The module applied to each skip connection; a plain U-Net passes skips through."""
        return OpenGate()

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()  # the bottleneck is the decoder's input, not a skip
        for up in self.decoder:
            x = up(x, [skips.pop()])
        return self.head(x)
