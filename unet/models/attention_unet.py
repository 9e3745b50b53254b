"""Attention U-Net: U-Net whose skip connections pass through additive attention gates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import DEFAULT_CHANNELS
from .unet import UNet

__all__ = ["AttentionGate", "AttentionUNet"]


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018, Fig. 2): skip features × sigmoid coefficients.

    ``q = psi(ReLU(theta_x(x) + phi_g(g)))``, ``alpha = sigmoid(q)`` resampled bilinearly to the
    skip's grid, output ``x * alpha``. ``theta_x`` is a 2×2 stride-2 conv, so the skip ``x`` is
    compared with the gating signal ``g`` (the coarser decoder features) on g's grid, as in the paper.

    Args:
        skip_channels: channels of the skip features ``x``.
        gating_channels: channels of the gating signal ``g`` (one level coarser than ``x``).
        inter_channels: channels of the joint space; default ``max(1, skip_channels // 2)``.
    """

    def __init__(self, skip_channels: int, gating_channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        inter = inter_channels or max(1, skip_channels // 2)
        self.theta_x = nn.Conv2d(skip_channels, inter, kernel_size=2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(gating_channels, inter, kernel_size=1, bias=True)
        self.psi = nn.Conv2d(inter, 1, kernel_size=1, bias=True)
        # Detached copy of the last coefficients (B, 1, h, w), for inspection only.
        self.last_coefficients: torch.Tensor | None = None

    def coefficients(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        """Attention coefficients in (0, 1), shape ``(B, 1, *skip.shape[-2:])``."""
        q = self.psi(F.relu(self.theta_x(skip) + self.phi_g(gating)))
        return F.interpolate(torch.sigmoid(q), size=skip.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        alpha = self.coefficients(skip, gating)
        self.last_coefficients = alpha.detach()
        return skip * alpha


class AttentionUNet(UNet):
    """Attention U-Net: a :class:`UNet` with an additive attention gate on every skip connection.

    Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018,
    https://arxiv.org/abs/1804.03999. Before a skip is concatenated into the decoder, it is
    multiplied by per-pixel coefficients in (0, 1) computed from the skip and the coarser
    decoder features (:class:`AttentionGate`), suppressing irrelevant regions. After a forward
    pass, :meth:`attention_maps` returns the coefficients (on the padded grid).

    Args:
        in_channels: input channels. Default 1.
        out_channels: logit channels. Default 1.
        channels: filters per level, shallowest first. Default ``(16, 32, 64, 128, 256)``.
        dropout: dropout inside every conv block, in [0, 1). Default 0.07.
        norm: ``"batch"``, ``"instance"`` or ``"none"``. Default ``"batch"``.
        pad_mode: ``"replicate"`` or ``"zeros"`` padding up to a multiple of ``2 ** depth``.
            Default ``"replicate"``.
        encoder, encoder_weights, image_classes: as for :class:`UNet` (gates on the encoder's skips).

    Example:
        >>> import torch
        >>> from unet.models import AttentionUNet
        >>> model = AttentionUNet(channels=(8, 16, 32)).eval()
        >>> model(torch.rand(2, 1, 37, 53)).shape
        torch.Size([2, 1, 37, 53])
        >>> [tuple(a.shape) for a in model.attention_maps()]
        [(2, 1, 40, 56), (2, 1, 20, 28)]
    """

    architecture = "attention_unet"

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
        super().__init__(in_channels, out_channels, channels, dropout, norm, pad_mode, encoder, encoder_weights,
                         image_classes)

    def _make_gate(self, skip_channels: int, gating_channels: int) -> nn.Module:
        return AttentionGate(skip_channels, gating_channels)

    def gates(self) -> list[AttentionGate]:
        """The attention gates, shallowest skip first."""
        return [up.gate for up in reversed(self.decoder) if isinstance(up.gate, AttentionGate)]

    def attention_maps(self) -> list[torch.Tensor | None]:
        """Coefficients of the last forward pass, shallowest skip first (None before any pass)."""
        return [gate.last_coefficients for gate in self.gates()]
