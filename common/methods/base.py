"""The interface every semi-supervised method implements for :class:`~common.engines.SemiSupervisedTrainer`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterator, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from common.engines.semi_supervised_trainer import SemiSupervisedTrainer

__all__ = ["SemiSupervisedMethod", "Batch"]

#: A collated batch: ``image`` ``(B, C, *spatial)``, ``label`` ``(B, 1, *spatial)`` for labelled data, and
#: whatever else the transforms produced (e.g. ``image_strong`` for a FixMatch strong view).
Batch = Dict[str, torch.Tensor]


class SemiSupervisedMethod(nn.Module):
    """One semi-supervised algorithm: turns a labelled and an unlabelled batch into named losses.

    The trainer owns the loop (data, optimizer step, LR schedule, AMP, validation, checkpoints); a method owns
    what makes it different. Modules the method adds (projection heads, a teacher, a discriminator) are
    submodules, so their weights and buffers are saved and restored with the method's ``state_dict``.

    Per iteration the trainer calls, with the network and the method in train mode and gradients zeroed:

    1. :meth:`train_step` -> ``{"loss": total, name: value, ...}``. The trainer back-propagates ``loss``;
       gradients the step already accumulated itself (several backward passes, a temporary parameter
       perturbation) are kept, so ``loss`` may be only the remaining part. Every other entry is logged.
    2. the optimizer step on :meth:`optimized_parameters`;
    3. :meth:`after_step` (EMA teachers, updates of networks with their own optimizer).
    """

    #: whether the method needs the unlabelled stream (the trainer refuses to start without it).
    requires_unlabeled: bool = True

    def optimized_parameters(self, network: nn.Module) -> Iterator[nn.Parameter]:
        """Parameters of the main optimizer: the network's plus the method's own trainable ones.
        Override to leave out modules that have their own optimizer or are updated by EMA."""
        yield from network.parameters()
        yield from (p for p in self.parameters() if p.requires_grad)

    def train_step(
        self, engine: "SemiSupervisedTrainer", labeled: Batch, unlabeled: Optional[Batch]
    ) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, engine: "SemiSupervisedTrainer") -> None:
        """Called after the optimizer step of every iteration."""

    def inference_network(self, network: nn.Module) -> nn.Module:
        """The module to validate (default: the trained network)."""
        return network
