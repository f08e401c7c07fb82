"""Exponential moving average of a network's weights (mean-teacher style); MONAI has no EMA utility."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """A frozen copy of ``network`` updated as ``theta_t <- a theta_t + (1 - a) theta_s``.

    With ``warmup=True`` the effective decay is ``min(1 - 1/(step + 1), decay)`` (SSL4MIS mean teacher), so the
    teacher follows the student closely at the start. Buffers (BatchNorm running statistics) are copied.

    Args:
        network: the student to follow; the copy is made at construction.
        decay: the decay ``a``.
        warmup: use the SSL4MIS warm-up of the decay.
    """

    def __init__(self, network: nn.Module, decay: float = 0.99, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(network)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        step = int(self.num_updates)
        return min(1.0 - 1.0 / (step + 1), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        a = self.current_decay()
        for t, s in zip(self.module.parameters(), network.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1.0 - a)
        for t, s in zip(self.module.buffers(), network.buffers()):
            t.copy_(s)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
