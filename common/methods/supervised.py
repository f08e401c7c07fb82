"""The lower bound every paper reports: the segmentation loss on labelled data only."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from common.methods.base import Batch, SemiSupervisedMethod

__all__ = ["SupervisedMethod"]


class SupervisedMethod(SemiSupervisedMethod):
    """Supervised baseline: ``loss = loss_function(network(x_l), y_l)``; the unlabelled stream is not used.

    Args:
        loss_function: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, ...)``; called as
            ``loss_function(logits (B, C, *spatial), label (B, 1, *spatial))``.
    """

    requires_unlabeled = False

    def __init__(self, loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.loss_function = loss_function

    def train_step(self, engine, labeled: Batch, unlabeled: Optional[Batch]) -> Dict[str, torch.Tensor]:
        logits = engine.network(labeled["image"])
        loss = self.loss_function(logits, labeled["label"])
        return {"loss": loss, "loss_seg": loss.detach()}
