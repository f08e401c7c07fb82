"""Two segmentation subnets side by side, ensembled into one network for validation, inference and export.

CML (Wu et al., ACM MM 2024) trains two subnets "with the same architecture and non-shared parameters"; its code
gives the second decoder a different up-sampling: 2D (ACDC) branch 0 is the SSL4MIS U-Net (1x1 conv + bilinear
up-sampling), branch 1 up-samples with stride-2 transposed convolutions; 3D (LA) branch 0 is the V-Net (transposed
convolutions), branch 1 up-samples trilinearly followed by a 3x3x3 conv + BN + ReLU.

``forward(x)`` returns ONE tensor, so MONAI's evaluator (arg-max post-processing), ``inference.json``,
``verify_net_in_out`` and TorchScript export all see the ensemble as an ordinary segmentation network. With the
paper's probability averaging it is the log of the mean softmax probability, ``log((p_0 + p_1) / 2)``: its arg-max is
the arg-max of the averaged probabilities and its softmax gives back those probabilities exactly (the log
probabilities of one pixel already sum to one in probability space). The methods use :meth:`DualSubnet.forward_branches`
for each subnet's logits and encoder features.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from common.networks.outputs import BackboneOutput
from common.networks.unet2d import UNet2D, _ConvBlock
from common.networks.vnet3d import VNet3D

__all__ = ["DualSubnet", "UNet2DTransposedUp", "VNet3DTrilinearUp", "ENSEMBLE_MODES"]

#: how :class:`DualSubnet` combines the subnets in ``forward``
ENSEMBLE_MODES = ("probabilities", "logits")


class _TransposedUpBlock(nn.Module):
    """Stride-2 transposed conv (deep -> skip channels), concat with the skip, conv block."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(deep_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = _ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv.forward_concat(skip, self.up(deep))  # = conv(cat([skip, up])), see _ConvBlock


class UNet2DTransposedUp(UNet2D):
    """:class:`UNet2D` whose four up blocks use stride-2 transposed convolutions instead of 1x1 conv + bilinear
    up-sampling (CML's second 2D decoder). Same encoder, head, shapes and methods as :class:`UNet2D`."""

    def __init__(self, in_channels: int = 1, out_channels: int = 4, features: Sequence[int] = (16, 32, 64, 128, 256),
                 dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)) -> None:
        super().__init__(in_channels, out_channels, features, dropout)
        f = list(features)
        self.up = nn.ModuleList([_TransposedUpBlock(f[4 - i], f[3 - i], f[3 - i]) for i in range(4)])


class _TrilinearUp(nn.Sequential):
    """Trilinear x2 (align_corners=True) -> 3x3x3 conv -> BN -> ReLU (CML's second 3D decoder)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class VNet3DTrilinearUp(VNet3D):
    """:class:`VNet3D` whose four decoder up-sampling layers are trilinear up-sampling + conv instead of transposed
    convolutions (CML's second 3D decoder). Same encoder, head, shapes and methods as :class:`VNet3D`."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, n_filters: int = 16, has_dropout: bool = True,
                 dropout: float = 0.5) -> None:
        super().__init__(in_channels, out_channels, n_filters, has_dropout, dropout)
        f = [n_filters * m for m in (1, 2, 4, 8, 16)]
        self.block_five_up = _TrilinearUp(f[4], f[3])
        self.block_six_up = _TrilinearUp(f[3], f[2])
        self.block_seven_up = _TrilinearUp(f[2], f[1])
        self.block_eight_up = _TrilinearUp(f[1], f[0])


class DualSubnet(nn.Module):
    """Two subnets (encoder + decoder each) evaluated on the same input; ``forward`` is their ensemble.

    Args:
        spatial_dims: 2 (two U-Nets, ACDC) or 3 (two V-Nets, LA).
        in_channels: image channels.
        out_channels: number of classes (background included).
        shared_backbone: ``False`` (paper): two subnets with their own parameters, branch 1 with the other
            up-sampling. ``True`` reproduces CML's released 2D code, where both "subnets" are one network run twice
            (they differ only by dropout masks while training; in eval mode they are identical).
        ensemble: ``"probabilities"`` (paper): ``forward`` returns ``log(mean_i softmax(logits_i))``;
            ``"logits"`` (released code): the mean of the logits.
        has_dropout: 3D only, the V-Nets' Dropout3d on the bottleneck and the last decoder map (train mode only).
        features, dropout: 2D only, the U-Nets' widths and encoder dropout rates.

    Shapes: ``forward(x)`` maps ``(B, in_channels, *spatial)`` to ``(B, out_channels, *spatial)``;
    :meth:`forward_branches` returns one :class:`BackboneOutput` per branch (logits, decoder embedding, encoder maps
    shallow to deep; ``features[-1]`` is the bottleneck: 256 channels at 1/16 resolution).
    State-dict keys are ``subnets.0.*`` and ``subnets.1.*`` (only ``subnets.0.*`` with a shared backbone).
    """

    #: both backbones (U-Net, V-Net) need input sizes divisible by 16 (see common.networks.sizes)
    size_divisor = 16

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 4,
        shared_backbone: bool = False,
        ensemble: str = "probabilities",
        has_dropout: bool = True,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if ensemble not in ENSEMBLE_MODES:
            raise ValueError(f"ensemble must be one of {ENSEMBLE_MODES}, got '{ensemble}'")
        if spatial_dims == 2:
            first: nn.Module = UNet2D(in_channels, out_channels, features, dropout)
            second: Optional[nn.Module] = (
                None if shared_backbone else UNet2DTransposedUp(in_channels, out_channels, features, dropout)
            )
        else:
            first = VNet3D(in_channels, out_channels, has_dropout=has_dropout)
            second = None if shared_backbone else VNet3DTrilinearUp(in_channels, out_channels, has_dropout=has_dropout)
        self.subnets = nn.ModuleList([first] if second is None else [first, second])
        self.spatial_dims = spatial_dims
        self.shared_backbone = bool(shared_backbone)
        self.average_probabilities = ensemble == "probabilities"
        self.num_branches = 2

    def branch(self, index: int) -> nn.Module:
        """The network of branch ``index`` (0 or 1); the same module for both with a shared backbone."""
        if index not in (0, 1):
            raise IndexError(f"DualSubnet has branches 0 and 1, got {index}")
        return self.subnets[0] if self.shared_backbone else self.subnets[index]

    def forward_branches(self, x: torch.Tensor) -> List[BackboneOutput]:
        """Both branches' logits, decoder embeddings and encoder maps for the same input ``x``.
        With a shared backbone the network runs twice (different dropout masks in train mode, as the released code)."""
        return [self.branch(i).forward_features(x) for i in range(self.num_branches)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A shared backbone gives identical branches in eval mode: one pass is their mean.
        outputs: List[torch.Tensor] = []
        for subnet in self.subnets:
            outputs.append(subnet(x))
        stacked = torch.stack(outputs, dim=0)
        if not self.average_probabilities:
            return stacked.mean(dim=0)
        # log of the mean probability, computed stably in log space
        return torch.logsumexp(torch.log_softmax(stacked, dim=2), dim=0) - math.log(len(outputs))
