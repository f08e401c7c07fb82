"""BYOL projector/predictor heads and loss, applied to voxel feature vectors (VFD's voxel-wise representation
learning; Grill et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BYOLHead", "byol_loss"]


class BYOLHead(nn.Sequential):
    """``Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)``: BYOL's projector and predictor
    shape, here with VFD's width 64. Maps ``(N, in_channels)`` to ``(N, out_channels)``."""

    def __init__(self, in_channels: int = 64, hidden_channels: int = 64, out_channels: int = 64) -> None:
        for name, value in (("in_channels", in_channels), ("hidden_channels", hidden_channels),
                            ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        super().__init__(
            nn.Linear(in_channels, hidden_channels),
            nn.BatchNorm1d(hidden_channels),
            nn.ReLU(),
            nn.Linear(hidden_channels, out_channels),
        )


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over N of ``|| p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z)`` (VFD Eq. 3) for ``(N, F)`` inputs;
    ``target`` is detached (the teacher side gets no gradient)."""
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ValueError(f"prediction and target must both be (N, F), got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")
    p = F.normalize(prediction, dim=1)
    z = F.normalize(target.detach(), dim=1)
    return (p - z).pow(2).sum(dim=1).mean()
