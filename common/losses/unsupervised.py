"""Unsupervised losses as closures over fixed targets: FixMatch (GapMatch's instance perturbation) and the
base SSL losses of GapMatch's Table 2 (entropy minimisation, pseudo-label, ICT, MixUp, CutMix, VAT).

Each loss is used in two calls per iteration:

1. :meth:`UnsupervisedLoss.targets` (no gradient, once, at the current weights theta): pseudo-labels,
   confidence masks, teacher outputs, mixing coefficients, random directions: everything that must be the
   SAME in the theta and theta* passes of GAP (``common.gap.GapPerturber``);
2. :meth:`UnsupervisedLoss.forward` ``(network, targets) -> (loss, logs)``: the differentiable loss at the
   current weights. GAP calls it at theta and at theta*; without GAP it is called once.

:meth:`UnsupervisedLoss.after_step` runs after the optimizer step (EMA teachers).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from common.engines.ema import EMA

__all__ = [
    "UnsupervisedLoss",
    "masked_ce_dice",
    "FixMatchLoss",
    "PseudoLabelLoss",
    "EntropyMinimisationLoss",
    "MixConsistencyLoss",
    "VATLoss",
]

Targets = Dict[str, torch.Tensor]
Logs = Dict[str, torch.Tensor]


def _probability(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def masked_ce_dice(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ce_weight: float = 1.0, dice_weight: float = 1.0,
    dice: Optional[DiceLoss] = None,
) -> Tuple[torch.Tensor, Logs]:
    """Cross-entropy + Dice against hard pseudo-labels on the pixels where ``mask`` is 1.

    CE = sum(mask * CE) / max(sum(mask), 1); Dice is computed on masked probabilities and masked one-hot
    targets (squared denominators, summed over the batch, averaged over all classes: the SSL4MIS form), so
    unconfident pixels contribute nothing to either term and an empty mask gives 0 with zero gradient.

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)`` integer class indices.
        mask: ``(B, *spatial)`` float in {0, 1}.
    """
    num_classes = logits.shape[1]
    ce_map = F.cross_entropy(logits.float(), target, reduction="none")
    ce = (ce_map * mask).sum() / mask.sum().clamp_min(1.0)
    out: Logs = {"ce": ce.detach()}
    loss = ce_weight * ce
    if dice_weight:
        m = mask.unsqueeze(1)
        probs = torch.softmax(logits.float(), dim=1) * m
        onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype) * m
        dice_fn = dice or DiceLoss(squared_pred=True, batch=True)
        d = dice_fn(probs, onehot)
        out["dice"] = d.detach()
        loss = loss + dice_weight * d
    return loss, out


class UnsupervisedLoss(nn.Module):
    """Base class; see the module docstring for the two-call protocol."""

    def targets(self, network: nn.Module, labeled: Dict[str, torch.Tensor],
                unlabeled: Dict[str, torch.Tensor]) -> Targets:
        raise NotImplementedError

    def forward(self, network: nn.Module, targets: Targets) -> Tuple[torch.Tensor, Logs]:  # type: ignore[override]
        raise NotImplementedError

    def after_step(self, network: nn.Module) -> None:
        """Called after the optimizer step."""

    @staticmethod
    def _image(batch: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"the unlabelled batch has no '{key}' (has {sorted(batch)}); for a strong view set "
                           "train#unlabeled_preprocessing to common.data.weak_strong_views")
        return batch[key]


class PseudoLabelLoss(UnsupervisedLoss):
    """Hard pseudo-labels from the network itself (Lee 2013), optionally thresholded.

    ``targets``: ``p = softmax(f(u[target_key]))`` without gradient (train mode: the FixMatch convention),
    ``y_hat = argmax p``, ``mask = [max p >= threshold]``. ``forward``: ``masked_ce_dice(f(u[input_key]), y_hat,
    mask)``.

    Args:
        threshold: confidence threshold tau in [0, 1]; 0 keeps every pixel (classic pseudo-labelling).
        input_key: the view the loss is computed on.
        target_key: the view the pseudo-labels come from.
        ce_weight, dice_weight: weights of the two terms (classic pseudo-labelling: CE only).
    """

    def __init__(self, threshold: float = 0.0, input_key: str = "image", target_key: str = "image",
                 ce_weight: float = 1.0, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.threshold = _probability("pseudo-label threshold", threshold)
        self.input_key = input_key
        self.target_key = target_key
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.dice = DiceLoss(squared_pred=True, batch=True)

    @torch.no_grad()
    def targets(self, network, labeled, unlabeled) -> Targets:
        probs = torch.softmax(network(self._image(unlabeled, self.target_key)).float(), dim=1)
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= self.threshold).to(probs.dtype)
        return {"input": self._image(unlabeled, self.input_key), "pseudo_label": pseudo, "mask": mask}

    def forward(self, network, targets):
        logits = network(targets["input"])
        loss, logs = masked_ce_dice(logits, targets["pseudo_label"], targets["mask"], self.ce_weight,
                                    self.dice_weight, self.dice)
        logs["mask_ratio"] = targets["mask"].mean()
        return loss, logs


class FixMatchLoss(PseudoLabelLoss):
    """FixMatch weak-to-strong consistency (GapMatch Eqs. 4-7): pseudo-labels from the weak view where the
    maximum probability is >= tau, CE + Dice of the strong-view prediction against them on those pixels."""

    def __init__(self, threshold: float = 0.95, weak_key: str = "image", strong_key: str = "image_strong",
                 ce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__(threshold, input_key=strong_key, target_key=weak_key, ce_weight=ce_weight,
                         dice_weight=dice_weight)


class EntropyMinimisationLoss(UnsupervisedLoss):
    """Mean per-pixel entropy of the softmax, normalised by log C (SSL4MIS ``entropy_loss``; Vu et al. 2019).

    Args:
        input_key: the unlabelled view the entropy is computed on.
        eps: inside the log, as in SSL4MIS.
    """

    def __init__(self, input_key: str = "image", eps: float = 1e-6) -> None:
        super().__init__()
        self.input_key = input_key
        self.eps = float(eps)

    def targets(self, network, labeled, unlabeled) -> Targets:
        return {"input": self._image(unlabeled, self.input_key)}

    def forward(self, network, targets):
        probs = torch.softmax(network(targets["input"]).float(), dim=1)
        entropy = -(probs * torch.log(probs + self.eps)).sum(dim=1) / math.log(probs.shape[1])
        loss = entropy.mean()
        return loss, {"entropy": loss.detach()}


class MixConsistencyLoss(UnsupervisedLoss):
    """Mixing consistency with a mean teacher: ICT, MixUp and CutMix differ only in their options.

    ``targets``: pairs ``(u_a, u_b)`` of unlabelled images, a mixing mask ``M`` (a per-sample blend factor
    ``lam`` for ``mix="blend"``, a box for ``mix="box"``), the mixed image ``M u_b + (1 - M) u_a`` and the
    teacher target ``M T(u_b) + (1 - M) T(u_a)`` (``T`` = softmax of the EMA teacher). ``forward``: mean
    squared error between the student's softmax on the mixed image and the target.

    - ICT (Verma et al.; SSL4MIS defaults): ``mix="blend"``, ``beta_alpha=0.2``, ``pairing="halves"`` (the
      first half of the unlabelled batch mixed with the second half).
    - MixUp (Zhang et al. mixing, our consistency form [R]): ``mix="blend"``, ``beta_alpha=1.0``,
      ``pairing="permutation"`` (every image mixed with a random partner).
    - CutMix (Yun et al. box, French et al. mean-teacher consistency): ``mix="box"``, a box of area
      ``1 - lam`` (clipped to side ratios in [0.01, 0.99]) at a uniform position, ``lam ~ Beta(1, 1)``,
      ``pairing="permutation"``; the box masks come from ``common.mixing.box_mask``.

    Args:
        network: the student; the teacher is an EMA copy of it (made here).
        mix: "blend" or "box".
        beta_alpha: parameter of the Beta distribution of ``lam``.
        pairing: "halves" or "permutation".
        ema_decay: teacher decay (SSL4MIS warm-up ``min(1 - 1/(t+1), decay)``).
        input_key: the unlabelled view that is mixed.
    """

    def __init__(self, network: nn.Module, mix: str = "blend", beta_alpha: float = 0.2, pairing: str = "halves",
                 ema_decay: float = 0.99, input_key: str = "image") -> None:
        super().__init__()
        if mix not in ("blend", "box"):
            raise ValueError(f"mix must be 'blend' or 'box', got {mix!r}")
        if pairing not in ("halves", "permutation"):
            raise ValueError(f"pairing must be 'halves' or 'permutation', got {pairing!r}")
        if not beta_alpha > 0:
            raise ValueError(f"beta_alpha must be > 0, got {beta_alpha!r}")
        self.mix = mix
        self.beta_alpha = float(beta_alpha)
        self.pairing = pairing
        self.input_key = input_key
        self.teacher = EMA(network, decay=ema_decay, warmup=True)

    def _pairs(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.pairing == "halves":
            if u.shape[0] < 2:
                raise ValueError(f"pairing='halves' needs an unlabelled batch of >= 2 images, got {u.shape[0]}")
            half = u.shape[0] // 2
            return u[:half], u[half:2 * half]
        perm = torch.randperm(u.shape[0], device=u.device)
        return u, u[perm]

    def _mask(self, u: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *spatial)`` weights of the second image of each pair."""
        lam = torch.distributions.Beta(self.beta_alpha, self.beta_alpha).sample((u.shape[0],)).to(u.device, u.dtype)
        if self.mix == "blend":
            return lam.view(-1, *([1] * (u.dim() - 1))).expand(-1, 1, *u.shape[2:]).contiguous()
        from common.mixing import box_mask

        # CutMix: a box covering a fraction 1 - lam of the patch (side ratio (1 - lam)^(1/dims)) receives u_b;
        # box_mask marks its box with zeros
        dims = u.dim() - 2
        sides = [min(max((1.0 - float(l)) ** (1.0 / dims), 0.01), 0.99) for l in lam]
        boxes = [1.0 - box_mask(u.shape[2:], s, position="random", device=u.device) for s in sides]
        return torch.cat(boxes).to(u.dtype)

    @torch.no_grad()
    def targets(self, network, labeled, unlabeled) -> Targets:
        u = self._image(unlabeled, self.input_key)
        u_a, u_b = self._pairs(u)
        m = self._mask(u_a)
        mixed = m * u_b + (1 - m) * u_a
        t_a = torch.softmax(self.teacher(u_a).float(), dim=1)
        t_b = torch.softmax(self.teacher(u_b).float(), dim=1)
        return {"input": mixed, "target": m * t_b + (1 - m) * t_a}

    def forward(self, network, targets):
        probs = torch.softmax(network(targets["input"]).float(), dim=1)
        loss = torch.mean((probs - targets["target"]) ** 2)
        return loss, {"mse": loss.detach()}

    def after_step(self, network: nn.Module) -> None:
        self.teacher.update(network)


class VATLoss(UnsupervisedLoss):
    """Virtual adversarial training (Miyato et al. 2018) as a closure, on SS-Net's
    :class:`~common.losses.dice_vat.DiceVAT`.

    ``targets``: the clean prediction ``q = softmax(f(u))`` without gradient (fixed for the theta and theta*
    passes). ``forward``: the adversarial direction is searched at the CURRENT weights (theta, or theta* under
    GAP) by power iteration from a random start, then ``D(softmax(f(u + r_adv)), q)``. BatchNorm running
    statistics are not updated by the VAT passes (``DiceVAT``).

    Args:
        divergence: ``"kl"`` (classic VAT, the method Table 2 cites) or ``"dice"`` (SS-Net's Dice-VAT).
        epsilon: L2 norm of ``r_adv`` per sample (SS-Net's ACDC value 6 [R]).
        xi: finite-difference scale of the power iteration (SS-Net: 10).
        iterations: power iterations.
        input_key: the unlabelled view.
    """

    def __init__(self, divergence: str = "kl", epsilon: float = 6.0, xi: float = 10.0, iterations: int = 1,
                 input_key: str = "image") -> None:
        super().__init__()
        from common.losses.dice_vat import DiceVAT

        self.vat = DiceVAT(epsilon=epsilon, xi=xi, iterations=iterations, divergence=divergence)
        self.input_key = input_key

    @torch.no_grad()
    def targets(self, network, labeled, unlabeled) -> Targets:
        u = self._image(unlabeled, self.input_key)
        return {"input": u, "clean": self.vat.target(network, u)}

    def forward(self, network, targets):
        loss = self.vat.compute(network, targets["input"], targets["clean"]).loss
        return loss, {"vat": loss.detach()}
