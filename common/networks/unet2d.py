"""The 2D U-Net used by SSL4MIS, SS-Net, Cross-ALD, GapMatch and CML on ACDC (1.81 M parameters, 4 classes).

MONAI's ``UNet``/``BasicUNet`` differ in block layout and dropout, so the paper networks are defined here to
match the papers' parameter counts and behaviour.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.outputs import EncoderDecoder

__all__ = ["UNet2D"]


class _ConvBlock(nn.Module):
    """3x3 conv -> BN -> LeakyReLU -> Dropout -> 3x3 conv -> BN -> LeakyReLU.

    The activations work in place on the BatchNorm outputs, which nothing else reads (BatchNorm's backward uses
    its input): the same values without a second full-size map per activation, 2-3% of a channels-last U-Net
    training step on the CPU (issue 16; autograd's version counters refuse any unsafe reuse)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def forward_concat(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``forward(torch.cat([skip, up], dim=1))`` without building the concatenation.

        The first conv is linear in its input channels, so it is applied to the two parts with the matching slices
        of its weight and summed; the parameters and the result are the same (up to float summation order).
        Concatenating channels-last maps interleaves them pixel by pixel, and the up-sampled part's gradient then
        comes back as a strided slice that ``upsample_bilinear2d_backward`` copies first: skipping both made a
        channels-last U-Net training step 5-8% faster on the CPU (issue 16).
        """
        conv = self.block[0]
        split = skip.shape[1]
        out = F.conv2d(skip, conv.weight[:, :split], conv.bias, padding=1)
        out = out + F.conv2d(up, conv.weight[:, split:], None, padding=1)
        # the remaining six layers one by one (TorchScript cannot iterate over a slice of the Sequential)
        out = self.block[3](self.block[2](self.block[1](out)))
        return self.block[6](self.block[5](self.block[4](out)))


class _DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = _ConvBlock(in_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class _UpBlock(nn.Module):
    """1x1 conv on the deep map, bilinear x2 (align_corners=True), concat with the skip, conv block."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(deep_channels, skip_channels, kernel_size=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = _ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv.forward_concat(skip, self.up(self.reduce(deep)))


class UNet2D(EncoderDecoder):
    """SSL4MIS 2D U-Net.

    Args:
        in_channels: image channels.
        out_channels: number of classes (background included).
        features: widths of the five encoder levels.
        dropout: encoder dropout per level; the decoder has none.

    ``forward(x)`` maps ``(B, in_channels, H, W)`` to logits ``(B, out_channels, H, W)``; H and W must be
    divisible by 16. ``forward_features(x)`` returns logits, the 16-channel decoder embedding and the five
    encoder maps from the same pass.
    """

    #: every input size must be a multiple of this (4 max-poolings, skips concatenated/added on the way up);
    #: checked by :func:`common.networks.sizes.check_input_size` when a config is built
    size_divisor = 16

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    ) -> None:
        super().__init__()
        if len(features) != 5 or len(dropout) != 5:
            raise ValueError(f"UNet2D needs 5 feature widths and 5 dropout rates, got {features} and {dropout}")
        f = list(features)
        self.in_conv = _ConvBlock(in_channels, f[0], dropout[0])
        self.down = nn.ModuleList([_DownBlock(f[i], f[i + 1], dropout[i + 1]) for i in range(4)])
        self.up = nn.ModuleList([_UpBlock(f[4 - i], f[3 - i], f[3 - i]) for i in range(4)])
        self.head = nn.Conv2d(f[0], out_channels, kernel_size=3, padding=1)
        self.embedding_channels = f[0]
        self.encoder_channels = f

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Encoder maps x0..x4: ``[(B, 16, H, W), (B, 32, H/2, W/2), ..., (B, 256, H/16, W/16)]``."""
        feats = [self.in_conv(x)]
        for block in self.down:
            feats.append(block(feats[-1]))
        return feats

    def decode(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Decoder embedding ``(B, 16, H, W)`` from the encoder maps."""
        x = feats[4]
        for i, block in enumerate(self.up):
            x = block(x, feats[3 - i])
        return x
