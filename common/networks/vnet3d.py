"""The 3D V-Net used by UA-MT, SS-Net, Cross-ALD, GapMatch, CML and VFD on LA (9.44 M parameters, 2 classes).

MONAI's ``VNet`` uses residual stages, PReLU and a different width schedule, so the paper network is defined
here: plain 3x3x3 conv-BN-ReLU stages, strided-conv downsampling, transposed-conv upsampling added to the skip.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from common.networks.outputs import EncoderDecoder

__all__ = ["VNet3D"]


class _ConvStage(nn.Sequential):
    """``n_layers`` x (3x3x3 conv (pad 1) -> BN -> ReLU); the first layer maps in -> out channels."""

    def __init__(self, n_layers: int, in_channels: int, out_channels: int) -> None:
        layers: List[nn.Module] = []
        for i in range(n_layers):
            layers += [
                nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm3d(out_channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class _Down(nn.Sequential):
    """Kernel-2 stride-2 conv -> BN -> ReLU (halves each spatial dim)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Sequential):
    """Kernel-2 stride-2 transposed conv -> BN -> ReLU (doubles each spatial dim)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class VNet3D(EncoderDecoder):
    """UA-MT / SS-Net 3D V-Net.

    Args:
        in_channels: image channels.
        out_channels: number of classes (background included).
        n_filters: width of the first stage; the five encoder stages have 1, 2, 4, 8, 16 times this.
        has_dropout: apply ``Dropout3d(dropout)`` to the bottleneck x5 and to the last decoder map x9
            (training model); the test model is built with ``has_dropout=False`` and has the same parameters.
        dropout: the Dropout3d probability.

    ``forward(x)`` maps ``(B, in_channels, H, W, D)`` to logits ``(B, out_channels, H, W, D)``; H, W and D
    must be divisible by 16. ``forward_features(x)`` returns logits, the ``n_filters``-channel decoder
    embedding x9 and the five encoder maps x1..x5 from the same pass.
    """

    #: every input size must be a multiple of this (4 stride-2 convolutions, skips concatenated/added on the way up);
    #: checked by :func:`common.networks.sizes.check_input_size` when a config is built
    size_divisor = 16

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        has_dropout: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        f = [n_filters * m for m in (1, 2, 4, 8, 16)]
        self.has_dropout = has_dropout
        # Encoder: stage i at width f[i]; a strided conv between stages doubles the channels.
        self.block_one = _ConvStage(1, in_channels, f[0])
        self.block_one_dw = _Down(f[0], f[1])
        self.block_two = _ConvStage(2, f[1], f[1])
        self.block_two_dw = _Down(f[1], f[2])
        self.block_three = _ConvStage(3, f[2], f[2])
        self.block_three_dw = _Down(f[2], f[3])
        self.block_four = _ConvStage(3, f[3], f[3])
        self.block_four_dw = _Down(f[3], f[4])
        self.block_five = _ConvStage(3, f[4], f[4])
        # Decoder: a transposed conv halves the channels, is added to the skip, then a conv stage.
        self.block_five_up = _Up(f[4], f[3])
        self.block_six = _ConvStage(3, f[3], f[3])
        self.block_six_up = _Up(f[3], f[2])
        self.block_seven = _ConvStage(3, f[2], f[2])
        self.block_seven_up = _Up(f[2], f[1])
        self.block_eight = _ConvStage(2, f[1], f[1])
        self.block_eight_up = _Up(f[1], f[0])
        self.block_nine = _ConvStage(1, f[0], f[0])
        self.head = nn.Conv3d(f[0], out_channels, kernel_size=1)
        # Parameter-free, so a has_dropout=False model has the same state_dict keys.
        self.dropout_enc: Optional[nn.Module] = nn.Dropout3d(dropout) if has_dropout else None
        self.dropout_dec: Optional[nn.Module] = nn.Dropout3d(dropout) if has_dropout else None
        self.embedding_channels = f[0]
        self.encoder_channels = f

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Encoder maps x1..x5: ``[(B, 16, H, W, D), (B, 32, H/2, W/2, D/2), ..., (B, 256, H/16, W/16, D/16)]``.

        x5 is returned after its dropout when ``has_dropout``.
        """
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.dropout_enc is not None:
            x5 = self.dropout_enc(x5)
        return [x1, x2, x3, x4, x5]

    def decode(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Decoder embedding x9 ``(B, 16, H, W, D)`` from the encoder maps (after its dropout when ``has_dropout``)."""
        x = self.block_six(self.block_five_up(feats[4]) + feats[3])
        x = self.block_seven(self.block_six_up(x) + feats[2])
        x = self.block_eight(self.block_seven_up(x) + feats[1])
        x = self.block_nine(self.block_eight_up(x) + feats[0])
        if self.dropout_dec is not None:
            x = self.dropout_dec(x)
        return x
