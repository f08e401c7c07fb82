"""Virtual adversarial training with a Dice divergence (SS-Net's pixel-level smoothness, L_lds).

VAT (Miyato et al.) looks for the input perturbation ``r`` of L2 norm ``epsilon`` that changes the prediction
most, with one power iteration from a random start, and penalises the change. SS-Net (Wu et al., MICCAI 2022,
Eq. 2-3 and Algorithm 1) measures the change with a soft Dice loss instead of the KL divergence, which it found
better suited to segmentation; the KL form (the paper's ablation, Table 3) is kept as an option. Cross-ALD and
GapMatch's VAT variant reuse :class:`DiceVAT` (``perturbation`` for the direction, ``divergence`` for the
distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from common.networks.batchnorm import frozen_bn_stats

__all__ = ["DiceVAT", "VATResult", "l2_normalize_per_sample", "dice_divergence", "kl_divergence"]


def l2_normalize_per_sample(d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``d / (||d_b||_2 + eps)`` with the norm over all dims but the batch dim; shape ``(B, *)`` kept."""
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
    return d / (norm + eps)


def dice_divergence(
    probs: torch.Tensor, target: torch.Tensor, squared_pred: bool = True, joint_channels: bool = False,
    smooth: float = 1e-10,
) -> torch.Tensor:
    """Soft Dice loss between probabilities ``probs`` and a soft target, both ``(B, C, *spatial)``.

    Sums run over the whole batch (MONAI ``DiceLoss(batch=True)``). ``joint_channels=False``: per-class Dice
    averaged over all C classes, background included (SS-Net 2D); ``joint_channels=True``: one Dice over all
    channels together (SS-Net 3D's binary formula on the 2-channel tensors). ``squared_pred``: squared
    denominators (sum p^2 + sum q^2), which make the divergence zero exactly when ``probs == target``; with
    linear denominators a soft target never reaches zero.
    """
    if probs.shape != target.shape:
        raise ValueError(f"dice_divergence needs probs and target of one shape, got {tuple(probs.shape)} "
                         f"and {tuple(target.shape)}")
    loss = DiceLoss(include_background=True, squared_pred=squared_pred, batch=True, smooth_nr=smooth,
                    smooth_dr=smooth)
    if joint_channels:
        return loss(probs.reshape(1, 1, -1), target.reshape(1, 1, -1))
    return loss(probs, target)


def kl_divergence(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over classes, averaged over pixels and batch; ``(B, C, *spatial)``."""
    kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none")
    return kl.sum(dim=1).mean()


def _logits(output: Any) -> torch.Tensor:
    """The logits of a network output: a tensor, a ``BackboneOutput`` or a tuple whose first item is the logits."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot take logits from a network output of type {type(output).__name__}")


@dataclass
class VATResult:
    """``loss``: the smoothness loss (scalar, differentiable w.r.t. the network weights only);
    ``r_adv``: the perturbation ``(B, *input)``, constant; ``target``: the detached target probabilities."""

    loss: torch.Tensor
    r_adv: torch.Tensor
    target: torch.Tensor


class DiceVAT(nn.Module):
    """L_lds = D(p(x + r_adv), p(x)) with the adversarial perturbation r_adv of SS-Net (Algorithm 1).

    1. target ``q = softmax(network(x))`` without gradient, in whatever mode the network is in (SS-Net: train
       mode, so this pass updates BatchNorm running statistics like any training forward). A caller that
       already has target probabilities can pass them (they are detached).
    2. ``r_ini`` = uniform(-0.5, 0.5) noise of the input's shape, unit L2 norm per sample.
    3. ``iterations`` times: ``g = grad_r D(softmax(network(x + xi * r)), q)``, ``r = g / ||g||_2`` per sample.
    4. ``r_adv = epsilon * r``; ``loss = D(softmax(network(x + r_adv)), q)``.

    Steps 3-4 run with the network's BatchNorm running-statistic updates switched off (batch statistics are
    still used) and dropout as the mode sets it (active in train mode, as in the official code). The direction
    is found with ``torch.autograd.grad`` w.r.t. ``r`` only, so no parameter ``.grad`` is touched by it (the
    official code back-propagates into the weights and zeroes them afterwards: same direction, more work).

    Args:
        epsilon: L2 norm of ``r_adv`` per sample (SS-Net: 6 on ACDC, 10 on LA).
        xi: scale of the random start / finite-difference step (10 in the official code).
        iterations: power iterations (1).
        divergence: ``"dice"`` (SS-Net) or ``"kl"`` (classic VAT, the paper's ablation).
        squared_pred: Dice with squared denominators (SS-Net 2D code); ``False`` = linear (paper Eq. 3 as
            written, SS-Net 3D code).
        joint_channels: one Dice over all channels (SS-Net 3D's binary formula) instead of the class mean.
        smooth: Dice smoothing in numerator and denominator (1e-10 in 2D, 1e-8 in 3D).

    ``forward(network, x, target=None) -> loss`` and ``compute(...) -> VATResult``: ``network(x)`` must return
    logits ``(B, C, *spatial)`` (or a ``BackboneOutput``/tuple with them first) for ``x`` ``(B, C_in, *spatial)``;
    2D and 3D alike.
    """

    def __init__(
        self,
        epsilon: float = 6.0,
        xi: float = 10.0,
        iterations: int = 1,
        divergence: str = "dice",
        squared_pred: bool = True,
        joint_channels: bool = False,
        smooth: float = 1e-10,
    ) -> None:
        super().__init__()
        if epsilon < 0:
            raise ValueError(f"DiceVAT epsilon must be >= 0, got {epsilon}")
        if xi <= 0:
            raise ValueError(f"DiceVAT xi must be > 0, got {xi}")
        if int(iterations) < 1:
            raise ValueError(f"DiceVAT iterations must be >= 1, got {iterations}")
        if divergence not in ("dice", "kl"):
            raise ValueError(f"DiceVAT divergence must be 'dice' or 'kl', got '{divergence}'")
        self.epsilon = float(epsilon)
        self.xi = float(xi)
        self.iterations = int(iterations)
        self.divergence_name = divergence
        self.squared_pred = bool(squared_pred)
        self.joint_channels = bool(joint_channels)
        self.smooth = float(smooth)

    def extra_repr(self) -> str:
        return (f"epsilon={self.epsilon}, xi={self.xi}, iterations={self.iterations}, "
                f"divergence='{self.divergence_name}', squared_pred={self.squared_pred}, "
                f"joint_channels={self.joint_channels}")

    def divergence(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """D(prediction, target) for ``logits`` and target probabilities, both ``(B, C, *spatial)``; scalar."""
        if self.divergence_name == "kl":
            return kl_divergence(logits, target)
        return dice_divergence(torch.softmax(logits, dim=1), target, self.squared_pred, self.joint_channels,
                               self.smooth)

    @torch.no_grad()
    def target(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``softmax(network(x))`` without gradient ``(B, C, *spatial)`` (a normal forward in the current mode)."""
        return torch.softmax(_logits(network(x)), dim=1)

    def perturbation(self, network: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The adversarial perturbation ``r_adv`` ``(B, *x.shape[1:])``, L2 norm ``epsilon`` per sample, no
        gradient. Runs ``iterations`` forward + input-backward passes with BN running stats frozen."""
        target = target.detach()
        x = x.detach()
        d = l2_normalize_per_sample(torch.rand_like(x) - 0.5)
        # Under autocast small input gradients can underflow in half precision; the direction is normalised
        # afterwards, so scaling the divergence changes nothing else.
        scale = 1024.0 if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") else 1.0
        with frozen_bn_stats(network), torch.enable_grad():
            for _ in range(self.iterations):
                d = d.detach().requires_grad_(True)
                distance = self.divergence(_logits(network(x + self.xi * d)), target)
                (grad,) = torch.autograd.grad(distance * scale, d, allow_unused=True)
                if grad is None:  # the output does not depend on the input: no direction to find
                    grad = torch.zeros_like(d)
                d = l2_normalize_per_sample(grad.float())
        return (self.epsilon * d).detach().to(x.dtype)

    def compute(self, network: nn.Module, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> VATResult:
        """Target, perturbation and L_lds in one call (see the class docstring)."""
        if x.dim() < 3:
            raise ValueError(f"DiceVAT needs an input (B, C, *spatial), got shape {tuple(x.shape)}")
        target = self.target(network, x) if target is None else target.detach()
        r_adv = self.perturbation(network, x, target)
        with frozen_bn_stats(network):
            loss = self.divergence(_logits(network(x.detach() + r_adv)), target)
        return VATResult(loss=loss, r_adv=r_adv, target=target)

    def forward(self, network: nn.Module, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L_lds (scalar); gradients reach the network weights only."""
        return self.compute(network, x, target).loss
