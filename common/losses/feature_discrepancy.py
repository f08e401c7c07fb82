"""CML's conflict loss: one plus the cosine similarity between two subnets' encoder features (Wu et al., ACM MM 2024,
Eq. 1), each subnet pushed away from a frozen copy of the other.

Written by hand: MONAI has no feature-similarity loss. Follows the released code: the cosine is taken along the
channel axis at every spatial position (eps 1e-6) and averaged over batch and positions (the paper writes it on the
whole feature vector). The value lies in [0, 2].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["feature_discrepancy", "FeatureDiscrepancyLoss"]


def feature_discrepancy(features: torch.Tensor, other: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 + mean cos(features, stopgrad(other))`` over batch and spatial positions; cosine along dim 1.

    Args:
        features: ``(B, C, *spatial)`` features of the subnet being trained.
        other: the other subnet's features, same shape; detached, so no gradient reaches the other subnet.

    Returns:
        scalar tensor in [0, 2]; gradients flow into ``features`` only.
    """
    if features.shape != other.shape:
        raise ValueError(f"feature shapes differ: {tuple(features.shape)} vs {tuple(other.shape)}")
    if features.ndim < 2:
        raise ValueError(f"features need a channel axis (B, C, ...), got shape {tuple(features.shape)}")
    return 1.0 + F.cosine_similarity(features, other.detach(), dim=1, eps=eps).mean()


class FeatureDiscrepancyLoss(nn.Module):
    """Symmetric CFL loss of two subnets: ``dis(f_0, f_1) + dis(f_1, f_0)`` (range [0, 4]), where each term only
    sends gradients into its first argument's subnet."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        return feature_discrepancy(f0, f1, self.eps) + feature_discrepancy(f1, f0, self.eps)
