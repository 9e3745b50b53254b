"""UNet++: U-Net with nested, dense skip pathways and optional deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import DEFAULT_CHANNELS, SegmentationModel
from .blocks import ConvBlock, Down, Up

__all__ = ["UNetPlusPlus"]


class UNetPlusPlus(SegmentationModel):
    """UNet++: nested dense skip pathways ``x_i_j`` between encoder and decoder, optional deep supervision.

    Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image Segmentation", DLMIA 2018,
    https://arxiv.org/abs/1807.10165. Node ``x_i_0`` is encoder level ``i``; node ``x_i_j`` (j ≥ 1)
    up-samples ``x_{i+1}_{j-1}`` (2×2 transposed conv) and concatenates it with all earlier nodes of
    its row, ``x_i_0 … x_i_{j-1}``, followed by a conv block. Nodes are named as in the paper's
    figure (and MONAI's ``BasicUNetPlusPlus``), generalised to ``len(channels) - 1`` levels.

    With ``deep_supervision=True`` every top-row node ``x_0_1 … x_0_L`` gets a 1×1 head and, in
    training mode, ``forward`` returns their logits as a list ordered ``[x_0_1, …, x_0_L]``
    (shallowest first, the final output last — the order ``unet.losses.DeepSupervisionLoss``
    weights). In eval mode, and always without deep supervision, it returns the final head's
    logits (from ``x_0_L``) as one tensor.

    Args:
        in_channels: input channels. Default 1.
        out_channels: logit channels. Default 1.
        channels: filters per level, shallowest first. Default ``(16, 32, 64, 128, 256)``.
        dropout: dropout inside every conv block, in [0, 1). Default 0.07.
        norm: ``"batch"``, ``"instance"`` or ``"none"``. Default ``"batch"``.
        pad_mode: ``"replicate"`` or ``"zeros"`` padding up to a multiple of ``2 ** depth``.
            Default ``"replicate"``.
        deep_supervision: add a head on every ``x_0_j`` and return all of them in training.
        image_classes: image-level head on ``x_{depth}_0`` (0 = none). Default 0. (No pretrained
            encoder: UNet++'s nested skips are wired for its own encoder.)
            Default False.

    Example:
        >>> import torch
        >>> from unet.models import UNetPlusPlus
        >>> model = UNetPlusPlus(channels=(8, 16, 32), deep_supervision=True)
        >>> [tuple(o.shape) for o in model.train()(torch.rand(2, 1, 37, 53))]
        [(2, 1, 37, 53), (2, 1, 37, 53)]
        >>> model.eval()(torch.rand(2, 1, 37, 53)).shape
        torch.Size([2, 1, 37, 53])
    """

    architecture = "unet_plus_plus"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        dropout: float = 0.07,
        norm: str = "batch",
        pad_mode: str = "replicate",
        deep_supervision: bool = False,
        image_classes: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, channels, dropout, norm, pad_mode, image_classes)
        if not isinstance(deep_supervision, bool):
            raise ValueError(f"deep_supervision must be True or False; got {deep_supervision!r}")
        self.deep_supervision = deep_supervision
        c, norm, dropout, depth = self.channels, self.norm, self.dropout, self.depth

        nodes = {"x_0_0": ConvBlock(self.in_channels, c[0], norm, dropout)}
        for i in range(1, depth + 1):
            nodes[f"x_{i}_0"] = Down(c[i - 1], c[i], norm, dropout)
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                # Inputs: x_{i+1}_{j-1} up-sampled to c[i] channels, plus x_i_0 … x_i_{j-1} (j × c[i]).
                nodes[f"x_{i}_{j}"] = Up(c[i + 1], j * c[i], c[i], norm, dropout)
        self.nodes = nn.ModuleDict(nodes)

        supervised = range(1, depth + 1) if deep_supervision else [depth]
        self.heads = nn.ModuleDict({f"x_0_{j}": nn.Conv2d(c[0], self.out_channels, 1) for j in supervised})
        self.image_head = self._make_image_head(c[depth])
        self.initialize()

    def model_kwargs(self) -> dict:
        return {**super().model_kwargs(), "deep_supervision": self.deep_supervision}

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        depth = self.depth
        feats: dict[tuple[int, int], torch.Tensor] = {}  # (i, j) -> features of node x_i_j
        for i in range(depth + 1):
            feats[i, 0] = self.nodes[f"x_{i}_0"](x if i == 0 else feats[i - 1, 0])
            # x_i_0 completes the anti-diagonal x_{i-1}_1, x_{i-2}_2, …, x_0_i of the figure.
            for j in range(1, i + 1):
                row = i - j
                feats[row, j] = self.nodes[f"x_{row}_{j}"](
                    feats[row + 1, j - 1], [feats[row, k] for k in range(j)]
                )
        if self.deep_supervision and self.training:
            masks = [self.heads[f"x_0_{j}"](feats[0, j]) for j in range(1, depth + 1)]
        else:
            masks = self.heads[f"x_0_{depth}"](feats[0, depth])
        return masks if self.image_head is None else (masks, self.image_head(feats[depth, 0]))
