"""Multi-resolution context fusion: encoder maps of several depths, each brought to a common width and
upsampled to full resolution, summed and convolved into one feature vector per voxel (VFD's voxel-wise
feature layer and the front of its discriminator).

Upsampling the features instead of down-sampling the label is the paper's "multi-resolution context resizing"
(no label information is lost). A full-resolution 64-channel map is costly (in 3D ~1 GB for a 4-volume batch;
in 2D the fusion conv alone costs about as much as the backbone's forward), and VFD only reads it at a few
sampled voxels, so :meth:`MultiResolutionFusion.sample` evaluates it at those voxels only: each level's map is
interpolated at the sampled voxels' ``k^D`` neighbourhoods (a gather with the same sampling positions and weights as
``F.interpolate(align_corners=False)``) and the fusion conv is applied to those neighbourhoods. Without
normalisation, or with BatchNorm in eval mode, this equals the dense map at the sampled voxels; with BatchNorm
in train mode, the fusion layer's BatchNorm takes its statistics over the sampled voxels instead of all voxels.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.voxel_sampling import VoxelSamples

__all__ = ["MultiResolutionFusion"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MODE = {2: "bilinear", 3: "trilinear"}


def _activation(act: str, negative_slope: float) -> nn.Module:
    if act == "relu":
        return nn.ReLU()
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope)
    raise ValueError(f"activation must be 'relu' or 'leakyrelu', got '{act}'")


def _interpolate_at(level: torch.Tensor, batch: torch.Tensor, points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(level, size, mode="(tri)linear", align_corners=False)`` read at full-resolution voxels only.

    Args:
        level: one encoder level's map ``(B, C, *spatial_l)``.
        batch: ``(N,)`` long, the image of each point row.
        points: ``(N, P, D)`` long full-resolution coordinates (outside the volume: clamped, the caller masks them).
        size: the full-resolution spatial shape.

    Returns ``(N, P, C)``. Each point reads its ``2^D`` neighbours at the level's resolution with the weights
    ``F.interpolate`` uses (source ``(i + 0.5) * S_l / S - 0.5`` clamped at the edges), as whole channel vectors: a
    gather of contiguous rows in the channels-last layout, whose backward adds rows, where ``grid_sample`` reads and
    scatters each channel separately (issue 16: 17% of VFD's CPU step went to ``grid_sample`` and its backward).
    """
    spatial_l = level.shape[2:]
    channels = level.shape[1]
    rows = level.movedim(1, -1).reshape(-1, channels)  # (B * prod(spatial_l), C); a view when channels-last
    # the 2^D corners as (flat offset within the image (N, P), weight (N, P) or None = 1), built one dim at a time
    corners: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = [(torch.zeros_like(points[..., 0]), None)]
    for d, (s_l, s) in enumerate(zip(spatial_l, size)):
        stride = 1
        for later in spatial_l[d + 1:]:
            stride *= int(later)
        coord = points[..., d].clamp(0, int(s) - 1)  # outside points read the edge (masked by the caller)
        if int(s_l) == int(s):  # same resolution: the interpolation reads the voxel itself
            corners = [(i + coord * stride, w) for i, w in corners]
            continue
        src = ((coord.to(level.dtype) + 0.5) * (float(s_l) / float(s)) - 0.5).clamp(0, int(s_l) - 1)
        lo = src.floor()
        frac = src - lo
        lo = lo.long()
        hi = (lo + 1).clamp_max(int(s_l) - 1)
        step = []
        for i, w in corners:
            step.append((i + lo * stride, 1.0 - frac if w is None else w * (1.0 - frac)))
            step.append((i + hi * stride, frac if w is None else w * frac))
        corners = step
    voxels_l = 1
    for s_l in spatial_l:
        voxels_l *= int(s_l)
    image_offset = (batch * voxels_l)[:, None]
    out: Optional[torch.Tensor] = None
    for i, w in corners:
        flat = (i + image_offset).reshape(-1)
        v = rows.index_select(0, flat).view(*points.shape[:2], channels)
        v = v if w is None else v * w[..., None]
        out = v if out is None else out + v
    return out


class MultiResolutionFusion(nn.Module):
    """``E^1..E^L -> per level (1x1 conv -> [BN] -> act) -> upsample to full size -> sum -> k^D conv -> [BN] -> act``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each encoder level, shallow to deep (e.g. U-Net x0..x3: 16, 32, 64, 128).
        channels: the common width and the output width (the paper's 64).
        kernel_size: the fusion conv's kernel (odd; zero padding keeps the size).
        norm: BatchNorm after each conv (the voxel-wise feature layer) or none (the discriminator).
        act: ``"relu"`` or ``"leakyrelu"``.
        negative_slope: LeakyReLU slope.

    ``forward(features, spatial_size)`` returns the dense map ``(B, channels, *spatial_size)``;
    ``sample(features, samples)`` returns ``(N, channels)`` at ``samples``' voxels (see the module docstring).
    ``features`` are the encoder maps ``[(B, in_channels[l], *spatial_l)]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        channels: int = 64,
        kernel_size: int = 3,
        norm: bool = True,
        act: str = "relu",
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(in_channels) < 1:
            raise ValueError("in_channels must name at least one encoder level")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        conv, bn = _CONV[spatial_dims], _BN[spatial_dims]
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.kernel_size = kernel_size
        self.in_channels = list(in_channels)
        self.lateral = nn.ModuleList(
            nn.Sequential(conv(c, channels, kernel_size=1), bn(channels) if norm else nn.Identity(),
                          _activation(act, negative_slope))
            for c in self.in_channels
        )
        self.fuse_conv = conv(channels, channels, kernel_size=kernel_size, padding=kernel_size // 2)
        self.fuse_norm = bn(channels) if norm else nn.Identity()
        self.fuse_act = _activation(act, negative_slope)
        r = kernel_size // 2
        offsets = torch.tensor(list(itertools.product(range(-r, r + 1), repeat=spatial_dims)), dtype=torch.long)
        self.register_buffer("offsets", offsets, persistent=False)  # (k^D, D), row-major like the conv kernel

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} encoder maps, got {len(features)}")
        for level, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.dim() != self.spatial_dims + 2 or f.shape[1] != c:
                raise ValueError(f"encoder map {level} must be (B, {c}, *{self.spatial_dims} spatial dims), "
                                 f"got shape {tuple(f.shape)}")

    def lateral_maps(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Each level at its own resolution after its 1x1 conv: ``[(B, channels, *spatial_l)]``."""
        self._check(features)
        return [layer(f) for layer, f in zip(self.lateral, features)]

    def forward(self, features: Sequence[torch.Tensor], spatial_size: Sequence[int]) -> torch.Tensor:
        size = tuple(int(s) for s in spatial_size)
        summed = sum(F.interpolate(m, size=size, mode=_MODE[self.spatial_dims], align_corners=False)
                     for m in self.lateral_maps(features))
        return self.fuse_act(self.fuse_norm(self.fuse_conv(summed)))

    def sample(self, features: Sequence[torch.Tensor], samples: VoxelSamples, dense: bool = False) -> torch.Tensor:
        """Fused features ``(N, channels)`` at ``samples``' voxels (``spatial_size`` = the samples' full size).

        ``dense=True`` computes the whole map and indexes it (the literal construction; memory-heavy).
        """
        size = tuple(int(s) for s in samples.spatial_size)
        if len(size) != self.spatial_dims:
            raise ValueError(f"samples have {len(size)} spatial dims, the fusion expects {self.spatial_dims}")
        if len(samples) and int(samples.batch.max()) >= features[0].shape[0]:
            raise ValueError(f"samples refer to image {int(samples.batch.max())}, but the batch has "
                             f"{features[0].shape[0]} images")
        if dense:
            fused = self(features, size)
            return fused[(samples.batch, slice(None), *samples.coords.unbind(1))]
        maps = self.lateral_maps(features)
        n = len(samples)
        if n == 0:
            return maps[0].new_zeros((0, self.channels))
        points = samples.coords[:, None, :] + self.offsets[None]  # (N, k^D, D)
        bounds = torch.tensor(size, device=points.device)
        inside = ((points >= 0) & (points < bounds)).all(dim=-1)  # outside = the conv's zero padding
        summed: Optional[torch.Tensor] = None
        for m in maps:
            v = _interpolate_at(m, samples.batch, points, size)
            summed = v if summed is None else summed + v
        values = summed * inside[..., None].to(summed.dtype)  # (N, k^D, C)
        # the fusion conv at one output voxel = a linear map of its k^D x C neighbourhood (kernel taps in the
        # conv's row-major order, channels last); one GEMM instead of N convolutions of k^D inputs
        weight = self.fuse_conv.weight.movedim(1, -1).reshape(self.channels, -1)
        out = F.linear(values.reshape(n, -1), weight, self.fuse_conv.bias)  # (N, C)
        out = out.view((n, self.channels) + (1,) * self.spatial_dims)  # BatchNorm{2,3}d's input rank
        return self.fuse_act(self.fuse_norm(out)).reshape(n, self.channels)
