"""What a backbone returns from one forward pass when a method needs more than the logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

__all__ = ["BackboneOutput", "EncoderDecoder"]


@dataclass
class BackboneOutput:
    """Logits ``(B, C, *spatial)``, decoder embedding ``(B, E, *spatial)`` and encoder maps, shallow to deep."""

    logits: torch.Tensor
    embedding: torch.Tensor
    features: List[torch.Tensor]


class EncoderDecoder(nn.Module):
    """A backbone made of ``encode(x) -> maps``, ``decode(maps) -> embedding`` and a 1x1 ``head``: ``forward`` gives
    the logits (what inference and TorchScript see), ``forward_features`` everything the methods need, from the
    same single pass. Subclasses define ``encode``, ``decode`` and the module ``head``."""

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def decode(self, feats: List[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))

    def forward_features(self, x: torch.Tensor) -> BackboneOutput:
        feats = self.encode(x)
        embedding = self.decode(feats)
        return BackboneOutput(logits=self.head(embedding), embedding=embedding, features=feats)
