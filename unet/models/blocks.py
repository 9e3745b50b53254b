"""Building blocks shared by the UNet family: conv block, down step, up step with concatenated skips."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvBlock", "Down", "OpenGate", "Up", "make_norm"]


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"batch"`` -> BatchNorm2d, ``"instance"`` -> affine InstanceNorm2d, ``"none"`` -> Identity."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of ['batch', 'instance', 'none']; got {norm!r}")


class ConvBlock(nn.Sequential):
    """Two 3×3 conv + norm + ReLU, with dropout between them (the seed's Keras layout)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float) -> None:
        # A norm layer's shift makes a conv bias redundant; keep the bias only without one.
        bias = norm == "none"
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
                norm1=make_norm(norm, out_channels),
                act1=nn.ReLU(inplace=True),
                drop=nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                conv2=nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
                norm2=make_norm(norm, out_channels),
                act2=nn.ReLU(inplace=True),
            )
        )


class Down(nn.Sequential):
    """2×2 max-pool, then a :class:`ConvBlock`: one encoder level deeper."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float) -> None:
        super().__init__(
            OrderedDict(pool=nn.MaxPool2d(2), block=ConvBlock(in_channels, out_channels, norm, dropout))
        )


class OpenGate(nn.Module):
    """A skip connection without a gate: returns the skip features unchanged."""

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        return skip


class Up(nn.Module):
    """2× transposed-conv up-sampling, concatenation with (gated) skip features, then a :class:`ConvBlock`.

    Args:
        in_channels: channels of the coarser input (also the gating signal of ``gate``).
        skip_channels: total channels of the skip features (UNet++ concatenates several); 0 for
            a step without skip (the last step of a decoder on a stride-2 encoder).
        out_channels: channels after up-sampling and of the output.
        gate: module ``gate(skip, gating) -> skip`` applied to the skip features;
            default :class:`OpenGate` (plain UNet).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        norm: str,
        dropout: float,
        gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.gate = gate if gate is not None else OpenGate()
        self.block = ConvBlock(out_channels + skip_channels, out_channels, norm, dropout)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        if not skips:
            return self.block(self.up(x))
        skip = skips[0] if len(skips) == 1 else torch.cat(list(skips), dim=1)
        skip = self.gate(skip, x)
        return self.block(torch.cat([self.up(x), skip], dim=1))
