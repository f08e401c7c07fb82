"""Switching BatchNorm running-statistics updates off for auxiliary forward passes."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["frozen_bn_stats"]


@contextlib.contextmanager
def frozen_bn_stats(*modules: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers of ``modules`` in train mode normalise with batch statistics but do
    not update their running mean/var (nor ``num_batches_tracked``). Used for passes that must not pollute the
    statistics: SS-Net's VAT passes, GapMatch's perturbed-weights pass, adversarial particles."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in layers]
    try:
        for m in layers:
            m.track_running_stats = False
        yield
    finally:
        for m, s in zip(layers, saved):
            m.track_running_stats = s
