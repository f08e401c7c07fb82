"""GapMatch (Huang et al., AAAI 2025): FixMatch instance perturbation + GAP weight perturbation, and the same
recipe around any other unsupervised loss (the paper's plug-and-play Table 2)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch

from common.gap import GapPerturber
from common.losses.unsupervised import UnsupervisedLoss
from common.methods.base import Batch, SemiSupervisedMethod

__all__ = ["GapMatchMethod"]


class GapMatchMethod(SemiSupervisedMethod):
    """Supervised loss + (optionally GAP-perturbed) unsupervised loss, Algorithm 1 of the paper.

    One iteration: the unsupervised loss fixes its targets at theta (pseudo-labels and confidence mask for
    FixMatch), then, with GAP, ``g1 + alpha * g2`` of ``w * L_u`` is accumulated by
    :class:`~common.gap.GapPerturber` (theta restored exactly afterwards), and the returned ``loss`` is the
    supervised loss at theta, whose gradient the trainer adds before the optimizer step. Without GAP the
    returned ``loss`` is ``L_sup + w * L_u`` (one backward pass).

    Args:
        loss_function: supervised loss, ``loss_function(logits (B, C, *sp), label (B, 1, *sp))`` (CE + Dice).
        unsupervised_loss: a :class:`~common.losses.unsupervised.UnsupervisedLoss` (FixMatch for GapMatch).
        gap: ``True``/``False``, or a :class:`~common.gap.GapPerturber` (``True`` builds one from
            ``epsilon``/``alpha``).
        epsilon, alpha: GAP radius and perturbed-gradient weight when ``gap`` is ``True``.
        unsupervised_weight: ``w``: a number, or a callable of the 0-based iteration (e.g.
            :class:`~common.engines.schedules.RampUp`). Algorithm 1 has none (``1``).
    """

    def __init__(
        self,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        unsupervised_loss: UnsupervisedLoss,
        gap: Union[bool, GapPerturber] = True,
        epsilon: float = 0.05,
        alpha: float = 1.0,
        unsupervised_weight: Union[float, Callable[[int], float]] = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(unsupervised_loss, UnsupervisedLoss):
            raise TypeError(f"unsupervised_loss must be an UnsupervisedLoss, got {type(unsupervised_loss).__name__}")
        if isinstance(gap, GapPerturber):
            self.gap: Optional[GapPerturber] = gap
        elif isinstance(gap, bool):
            self.gap = GapPerturber(epsilon=epsilon, alpha=alpha) if gap else None
        else:
            raise TypeError(f"gap must be true, false or a GapPerturber, got {gap!r}")
        if not callable(unsupervised_weight) and not (
            isinstance(unsupervised_weight, (int, float)) and unsupervised_weight >= 0
        ):
            raise ValueError(f"unsupervised_weight must be a number >= 0 or a schedule, got {unsupervised_weight!r}")
        self.loss_function = loss_function
        self.unsupervised_loss = unsupervised_loss
        self.unsupervised_weight = unsupervised_weight

    def weight(self, iteration: int) -> float:
        w = self.unsupervised_weight
        return float(w(iteration)) if callable(w) else float(w)

    def train_step(self, engine, labeled: Batch, unlabeled: Optional[Batch]) -> Dict[str, torch.Tensor]:
        network = engine.network
        w = self.weight(engine.step_index)
        targets = self.unsupervised_loss.targets(network, labeled, unlabeled)
        logs: Dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            loss_u, parts = self.unsupervised_loss(network, targets)
            if not logs:  # keep the terms of the unperturbed pass
                logs.update({f"unsup_{k}": v for k, v in parts.items()})
            return w * loss_u

        out: Dict[str, torch.Tensor] = {}
        if self.gap is not None:
            params = [p for g in engine.optimizer.param_groups for p in g["params"]]
            result = self.gap.step(closure, params, modules=(network, self), engine=engine)
            unsup = result.loss
            out["loss_unsup_perturbed"] = (result.loss_perturbed if result.loss_perturbed is not None
                                           else torch.zeros_like(unsup))
            out["gap_grad_norm"] = result.grad_norm
        else:
            unsup = closure()

        loss_sup = self.loss_function(network(labeled["image"]), labeled["label"])
        total = loss_sup if self.gap is not None else loss_sup + unsup
        out.update({
            "loss": total,
            "loss_sup": loss_sup.detach(),
            "loss_unsup": unsup.detach(),
            "unsup_weight": torch.tensor(w),
            **logs,
        })
        return out

    def after_step(self, engine) -> None:
        self.unsupervised_loss.after_step(engine.network)
