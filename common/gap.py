"""Gradient-based Adversarial Perturbation (GAP) of the weights (GapMatch, Huang et al., AAAI 2025, Algorithm 1).

GAP is SAM-like but applied to the unsupervised loss only, and it keeps the unperturbed gradient as well:

    g1     = grad L_u(theta)
    theta* = theta + eps * g1 / ||g1||_2        (norm over all trainable parameters jointly)
    g2     = grad L_u(theta*)                   (first order: no differentiation through the perturbation)
    g_u    = g1 + alpha * g2                    (left in ``.grad`` at the restored theta)

The labelled gradient is then accumulated on top by the caller, and one optimizer step uses the sum. It is
plug-and-play: any method that can express its unsupervised loss as a closure (targets fixed outside it)
can switch it on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from common.networks.batchnorm import frozen_bn_stats

__all__ = ["GapPerturber", "GapResult"]


@dataclass
class GapResult:
    """What one GAP step computed (all detached).

    Attributes:
        loss: ``L_u(theta)``.
        loss_perturbed: ``L_u(theta*)``; ``None`` when the perturbation was skipped.
        grad_norm: ``||g1||_2`` over all parameters (after averaging across ranks); scaled by the AMP
            loss scale when a grad scaler is active.
        perturbed: whether the theta* pass ran.
    """

    loss: torch.Tensor
    loss_perturbed: Optional[torch.Tensor]
    grad_norm: torch.Tensor
    perturbed: bool


class GapPerturber:
    """Accumulates ``g1 + alpha * g2`` of an unsupervised-loss closure into the parameters' ``.grad``.

    Args:
        epsilon: radius of the weight perturbation ``eps`` (>= 0). ``0`` gives ``g2 = g1`` for a deterministic
            network, i.e. ``(1 + alpha)`` times the plain gradient.
        alpha: weight of the perturbed gradient (>= 0). ``0`` skips the theta* pass.
        freeze_bn: keep BatchNorm running statistics unchanged during the theta* pass (the perturbed model
            must not pollute them; batch statistics are still used for normalisation).

    Gradients already in ``.grad`` when :meth:`step` is called (e.g. from an earlier backward pass of the same
    iteration) are kept and do not enter the direction ``g1``.
    """

    def __init__(self, epsilon: float = 0.05, alpha: float = 1.0, freeze_bn: bool = True) -> None:
        if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and epsilon == epsilon):
            raise ValueError(f"GAP epsilon must be a number >= 0, got {epsilon!r}")
        if not (isinstance(alpha, (int, float)) and alpha >= 0 and alpha == alpha):
            raise ValueError(f"GAP alpha must be a number >= 0, got {alpha!r}")
        self.epsilon = float(epsilon)
        self.alpha = float(alpha)
        self.freeze_bn = bool(freeze_bn)

    def __repr__(self) -> str:
        return f"GapPerturber(epsilon={self.epsilon}, alpha={self.alpha}, freeze_bn={self.freeze_bn})"

    def step(
        self,
        closure: Callable[[], torch.Tensor],
        params: Sequence[nn.Parameter],
        modules: Sequence[nn.Module] = (),
        engine: Optional[Any] = None,
    ) -> GapResult:
        """Run Algorithm 1 steps 5-10 for ``closure``.

        Args:
            closure: computes the scalar unsupervised loss at the current parameters, with every random
                choice and every target (pseudo-labels, masks, teacher outputs) fixed outside it, so that the
                theta and theta* passes differ only in the weights.
            params: the trainable parameters (perturbed and restored; their ``.grad`` receives the result).
            modules: modules whose BatchNorm running statistics must not change in the theta* pass.
            engine: a :class:`~common.engines.SemiSupervisedTrainer`; its ``backward`` (AMP-aware) and
                ``sync_gradients`` (torchrun) are used. ``None``: plain ``loss.backward()``, single process.
        """
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("GapPerturber.step got no trainable parameters")
        backward = engine.backward if engine is not None else (lambda loss: loss.backward())

        # keep gradients of earlier passes out of the direction g1
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None

        loss = closure()
        if loss.requires_grad:
            backward(loss)
        if engine is not None:
            # every rank must perturb identically: take the direction from the rank-averaged g1
            engine.sync_gradients(params)
        grads: List[Optional[torch.Tensor]] = [p.grad for p in params]
        present = [g for g in grads if g is not None]
        if present:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in present]))
        else:
            grad_norm = torch.zeros((), device=loss.device)

        perturbed = False
        loss_perturbed = None
        # skip when there is no direction (empty confidence mask) or AMP overflowed (the scaler skips the step)
        if self.alpha > 0 and present and bool(torch.isfinite(grad_norm)) and float(grad_norm) > 0:
            scale = self.epsilon / grad_norm
            with torch.no_grad():
                backup = [p.detach().clone() for p in params]
                for p, g in zip(params, grads):
                    if g is not None:
                        p.add_(g.to(p.dtype) * scale)
            try:
                with frozen_bn_stats(*modules) if self.freeze_bn else contextlib.nullcontext():
                    loss_perturbed = closure()
                    if loss_perturbed.requires_grad:
                        # accumulates alpha * g2 (evaluated at theta*) onto g1
                        backward(loss_perturbed * self.alpha if self.alpha != 1.0 else loss_perturbed)
            finally:
                with torch.no_grad():
                    for p, b in zip(params, backup):
                        p.copy_(b)  # exact restore (subtracting the step again would not be bit-exact)
            perturbed = True
            loss_perturbed = loss_perturbed.detach()

        for p, g in zip(params, earlier):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        return GapResult(loss.detach(), loss_perturbed, grad_norm.detach(), perturbed)

