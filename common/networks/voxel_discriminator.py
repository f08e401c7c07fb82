"""VFD's multitask voxel-wise feature discriminator: is a voxel's multi-resolution feature from a labelled
(real) or an unlabelled (fake) image, judged by the prediction head of the voxel's class."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from common.networks.multires_fusion import MultiResolutionFusion
from common.networks.voxel_sampling import VoxelSamples

__all__ = ["VoxelFeatureDiscriminator"]


class VoxelFeatureDiscriminator(nn.Module):
    """Fusion of the encoder maps -> two MLP layers -> one linear real/fake head per class.

    The paper gives the structure (per-level conv, upsampling to one size, sum, conv, "two MLPs", C parallel
    prediction layers, Fig. 3a) and the width 64; kernel sizes, activations and normalisation are not given.
    Ours: 1x1 convs, a k^D fusion conv and ``Linear(64, 64)`` MLP layers, each followed by LeakyReLU(0.2), and no
    normalisation (the common GAN-discriminator choice, and it keeps the sampled evaluation exact).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the encoder levels it reads.
        num_classes: number of prediction heads (background included).
        channels: fusion and MLP width.
        kernel_size: fusion conv kernel.
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], num_classes: int, channels: int = 64,
                 kernel_size: int = 3, negative_slope: float = 0.2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.fusion = MultiResolutionFusion(spatial_dims, in_channels, channels, kernel_size, norm=False,
                                            act="leakyrelu", negative_slope=negative_slope)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels), nn.LeakyReLU(negative_slope),
            nn.Linear(channels, channels), nn.LeakyReLU(negative_slope),
        )
        self.heads = nn.ModuleList(nn.Linear(channels, 1) for _ in range(num_classes))

    def classify(self, voxel_features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Real/fake logits ``(N,)`` of fused voxel features ``(N, channels)``, each read from the head of its
        class ``classes (N,)``."""
        if voxel_features.shape[0] != classes.shape[0]:
            raise ValueError(f"{voxel_features.shape[0]} voxel features but {classes.shape[0]} classes")
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"voxel classes must be in [0, {self.num_classes - 1}], got range "
                             f"[{int(classes.min())}, {int(classes.max())}]")
        hidden = self.mlp(voxel_features)
        all_heads = torch.cat([head(hidden) for head in self.heads], dim=1)  # (N, C)
        return all_heads.gather(1, classes[:, None].long()).squeeze(1)

    def forward(self, features: Sequence[torch.Tensor], samples: VoxelSamples, dense: bool = False) -> torch.Tensor:
        """Logits ``(N,)`` for the sampled voxels of the encoder maps ``features`` (see
        :meth:`MultiResolutionFusion.sample`)."""
        return self.classify(self.fusion.sample(features, samples, dense=dense), samples.classes)
