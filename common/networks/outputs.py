"""What a backbone returns from one forward pass when a method needs more than the logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

__all__ = ["BackboneOutput"]


@dataclass
class BackboneOutput:
    """Logits ``(B, C, *spatial)``, decoder embedding ``(B, E, *spatial)`` and encoder maps, shallow to deep."""

    logits: torch.Tensor
    embedding: torch.Tensor
    features: List[torch.Tensor]
