"""SS-Net (Wu et al., MICCAI 2022): pixel-level smoothness (Dice-VAT) + prototype inter-class separation."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from common.losses.class_separation import ClassSeparation
from common.methods.base import Batch, SemiSupervisedMethod

__all__ = ["SSNetMethod"]


class SSNetMethod(SemiSupervisedMethod):
    """``L = L_seg + lambda(t) * (L_lds + cs_weight * (L_cs(labelled) + L_cs(unlabelled)))``.

    One iteration on ``x = [x_l ; x_u]`` (labelled first), network and heads in train mode:

    1. ``network.forward_features(x)`` -> logits and the decoder embedding ``(B, E, *spatial)``;
    2. ``L_seg = loss_function(logits_l, y_l)`` (SS-Net: soft Dice only);
    3. prototype memory refresh from correctly predicted labelled foreground pixels (no gradient);
    4. L_cs on the labelled half grouped by the ground truth, and on the unlabelled half grouped by the argmax
       of the current prediction (no threshold);
    5. L_lds = :class:`~common.losses.dice_vat.DiceVAT` on the whole batch (its own target forward, then the
       direction and adversarial passes with BN running statistics frozen, dropout active).

    The part of the loss from steps 1-4 is back-propagated before step 5 runs, which frees its graph during the
    three VAT passes; the parameters do not change in between, so the accumulated gradient is the gradient of
    the total loss (the trainer then back-propagates the remaining ``lambda * L_lds``). ``loss`` reports the
    total.

    Args:
        loss_function: supervised loss ``(logits (B_l, C, *sp), label (B_l, 1, *sp)) -> scalar``.
        vat: the smoothness term ``(network, x) -> scalar``, :class:`~common.losses.dice_vat.DiceVAT` (eps 6 on
            ACDC, 10 on LA); :class:`~common.methods.cross_ald.CrossALDMethod` puts its regulariser here.
        class_separation: heads + prototype memory (training only; the inference network is the backbone);
            ``None`` drops L_cs and the heads (ablations: one plain forward of the whole batch).
        consistency: ``lambda(t)`` from the 0-based iteration, e.g. ``RampUp(0.1, 30000, 150)``, or a constant.
        cs_weight: L_cs weight relative to lambda(t) (0.1 in the official code).
        lds_weight: L_lds weight relative to lambda(t) (1; 0 switches L_lds off for ablations).
    """

    #: name of the regulariser's entry in the step output (and the progress bar / TensorBoard)
    regularizer_loss_name = "loss_lds"

    def __init__(
        self,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        vat: nn.Module,
        class_separation: Optional[ClassSeparation],
        consistency: Union[Callable[[int], float], float],
        cs_weight: float = 0.1,
        lds_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if cs_weight < 0 or lds_weight < 0:
            raise ValueError(f"{type(self).__name__} weights must be >= 0, got cs_weight={cs_weight}, "
                             f"regularizer weight={lds_weight}")
        self.loss_function = loss_function
        self.vat = vat
        self.class_separation = class_separation
        self.consistency = consistency if callable(consistency) else (lambda _t, w=float(consistency): w)
        self.cs_weight = float(cs_weight)
        self.lds_weight = float(lds_weight)

    def regularize(self, network: nn.Module, x: torch.Tensor, n_l: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The smoothness term on the batch ``x = [x_l ; x_u]`` (``n_l`` labelled) and extra logged values."""
        return self.vat(network, x), {}

    def train_step(self, engine, labeled: Batch, unlabeled: Optional[Batch]) -> Dict[str, torch.Tensor]:
        network = engine.network
        x_l, y_l = labeled["image"], labeled["label"]
        n_l = x_l.shape[0]
        x = torch.cat([x_l, unlabeled["image"]], dim=0)
        weight = float(self.consistency(engine.step_index))

        if self.class_separation is not None:
            out = network.forward_features(x)
            logits, embedding = out.logits, out.embedding
            loss_seg = self.loss_function(logits[:n_l], y_l)
            loss_cs_l, loss_cs_u = self.class_separation.labeled_and_unlabeled(embedding, logits, y_l, n_l)
            del out, embedding
        else:
            # the same full-batch forward (BN statistics of the whole batch), without the heads (ablations)
            logits = network(x)
            loss_seg = self.loss_function(logits[:n_l], y_l)
            loss_cs_l = loss_cs_u = x.new_zeros(())
        main = loss_seg + weight * self.cs_weight * (loss_cs_l + loss_cs_u)
        if main.requires_grad:
            engine.backward(main)
        del logits

        if self.lds_weight > 0:
            loss_reg, extra = self.regularize(network, x, n_l)
        else:
            loss_reg, extra = x.new_zeros(()), {}
        loss = main.detach() + weight * self.lds_weight * loss_reg
        return {
            "loss": loss,
            "loss_seg": loss_seg.detach(),
            self.regularizer_loss_name: loss_reg.detach(),
            "loss_cs_labeled": loss_cs_l.detach(),
            "loss_cs_unlabeled": loss_cs_u.detach(),
            "consistency_weight": torch.tensor(weight),
            **extra,
        }
