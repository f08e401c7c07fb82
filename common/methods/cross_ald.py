"""Cross-ALD (Nguyen-Duc et al., MICCAI 2023): SS-Net with its VAT term replaced by the cross-adversarial local
distribution regulariser, plus the rows of the paper's ablation (Table 3) as options."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from common.losses.class_separation import ClassSeparation
from common.losses.cross_ald import CrossALDRegularizer
from common.losses.dice_vat import DiceVAT
from common.methods.ssnet import SSNetMethod
from common.svgdf import SVGDFSampler

__all__ = ["CrossALDMethod", "build_regularizer", "REGULARIZERS", "TABLE3_ROWS"]

#: the regulariser of each row of the paper's Table 3 (``build_regularizer(kind)``)
REGULARIZERS = ("cross_ald", "svgdf", "svgd", "vat", "vat_mixup", "random_mixup")

#: Table 3 row -> (``regularizer``, ``use_class_separation``); our reading of the ablation (bundle docs)
TABLE3_ROWS = {
    "RanMixup": ("random_mixup", False),
    "VAT": ("vat", False),
    "VAT + Mixup": ("vat_mixup", False),
    "SVGD": ("svgd", False),
    "SVGDF": ("svgdf", False),
    "SVGDF + L_cs": ("svgdf", True),
    "Cross-ALD": ("cross_ald", True),
}


def build_regularizer(
    kind: str = "cross_ald",
    num_particles: int = 2,
    steps: int = 1,
    epsilon: float = 6.0,
    step_size: Optional[float] = None,
    norm: str = "l2",
    mode: str = "projected",
    bandwidth: Optional[float] = None,
    features: str = "encoder",
    repulsion_jacobian: str = "partner",
    xi: float = 10.0,
    alpha: float = 0.5,
    pairing: str = "matched",
    target: str = "prediction",
    squared_pred: bool = True,
    joint_channels: bool = False,
    smooth: float = 1e-10,
    step_normalization: str = "l2",
    init_noise: float = 0.5,
) -> nn.Module:
    """The regulariser ``(network, x) -> scalar`` (with ``compute(network, x).loss``) of one ablation row.

    ==================  =====================================================================================
    ``kind``            regulariser
    ==================  =====================================================================================
    ``cross_ald``       SVGDF particles (kernel on the encoder bottleneck), mixed across images (Eq. 7)
    ``svgdf``           SVGDF particles, each against its own image (no mixing)
    ``svgd``            vanilla SVGD particles (kernel on the images), no mixing
    ``vat``             SS-Net's Dice-VAT L_lds (:class:`DiceVAT`: one adversarial example per image)
    ``vat_mixup``       one VAT example per image (``SVGDFSampler(num_particles=1, kernel="none")``), mixed
    ``random_mixup``    mixup of the natural images against the mixed predictions (no perturbation)
    ==================  =====================================================================================

    ``features`` (Phi of the ``cross_ald``/``svgdf`` kernel: ``"encoder"`` or ``"decoder"``) and the other arguments
    are those of :class:`~common.svgdf.SVGDFSampler` and
    :class:`~common.losses.cross_ald.CrossALDRegularizer`; the VAT rows ignore the kernel ones.
    """
    if kind not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got '{kind}'")
    dice = {"squared_pred": squared_pred, "joint_channels": joint_channels, "smooth": smooth}
    if kind == "vat":
        return DiceVAT(epsilon=epsilon, xi=xi, iterations=steps, divergence="dice", **dice)
    if kind == "random_mixup":
        return CrossALDRegularizer(None, mix=True, alpha=alpha, pairing="matched", target="mixed_targets", **dice)
    sampler_args = {"steps": steps, "epsilon": epsilon, "step_size": step_size, "norm": norm, "mode": mode,
                    "bandwidth": bandwidth, "repulsion_jacobian": repulsion_jacobian, "xi": xi,
                    "step_normalization": step_normalization, "init_noise": init_noise, **dice}
    if kind == "vat_mixup":
        sampler = SVGDFSampler(num_particles=1, kernel="none", **sampler_args)
    else:
        phi = "identity" if kind == "svgd" else features
        sampler = SVGDFSampler(num_particles=num_particles, features=phi, kernel="rbf", **sampler_args)
    mix = kind in ("cross_ald", "vat_mixup")
    return CrossALDRegularizer(sampler, mix=mix, alpha=alpha, pairing=pairing, target=target, **dice)


class CrossALDMethod(SSNetMethod):
    """``L = L_seg + lambda(t) * (w_R * R + cs_weight * (L_cs(labelled) + L_cs(unlabelled)))``.

    SS-Net's iteration (:class:`~common.methods.ssnet.SSNetMethod`) with its L_lds replaced by ``regularizer`` (the
    paper: "replacing l_vat with the proposed Cross-ALD regularization in SS-Net code"). On ``x = [x_l ; x_u]``:

    1. ``network.forward_features(x)`` -> logits, decoder embedding; ``L_seg = loss_function(logits_l, y_l)``;
    2. with ``use_class_separation``: prototype memory refresh from correct labelled foreground pixels, then L_cs of
       the labelled half (ground truth) and of the unlabelled half (argmax pseudo-labels), exactly SS-Net's pieces
       (:class:`~common.losses.class_separation.ClassSeparation`); without it the heads are not built or run;
    3. this part is back-propagated at once (frees its graph before the particle passes; the weights do not change
       in between, so the accumulated gradient is that of the total loss);
    4. ``R = regularizer(network, S)``, ``S`` = the unlabelled half (``unlabeled_only``, default: the paper defines
       R over ``x ~ P_Dul``, Eq. 8) or the whole batch (SS-Net's convention for the VAT term R replaces); the
       trainer back-propagates ``lambda R``.

    Args:
        loss_function: supervised loss ``(logits (B_l, C, *sp), label (B_l, 1, *sp)) -> scalar`` (SS-Net: soft Dice).
        regularizer: ``(network, x) -> R`` with ``compute(network, x).loss`` (:func:`build_regularizer`).
        class_separation: SS-Net's heads and memory (ignored, and not kept, when ``use_class_separation`` is off).
        consistency: ``lambda(t)`` from the 0-based iteration (SS-Net ramp) or a constant.
        cs_weight: L_cs weight relative to lambda(t) (0.1, SS-Net code).
        regularizer_weight: R weight relative to lambda(t) (1: lambda_Cross-ALD = lambda(t)).
        use_class_separation: L_cs on (Cross-ALD, "SVGDF + L_cs") or off (the other ablation rows).
        unlabeled_only: regularise the unlabelled half only (paper); ``False``: the whole batch (SS-Net code).
    """

    regularizer_loss_name = "loss_cross_ald"

    def __init__(
        self,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularizer: nn.Module,
        class_separation: Optional[ClassSeparation],
        consistency: Union[Callable[[int], float], float],
        cs_weight: float = 0.1,
        regularizer_weight: float = 1.0,
        use_class_separation: bool = True,
        unlabeled_only: bool = True,
    ) -> None:
        if use_class_separation and class_separation is None:
            raise ValueError("use_class_separation=True needs a ClassSeparation module (got None)")
        if not hasattr(regularizer, "compute"):
            raise TypeError(f"regularizer must have compute(network, x).loss, got {type(regularizer).__name__}")
        super().__init__(loss_function, regularizer, class_separation if use_class_separation else None,
                         consistency, cs_weight=cs_weight, lds_weight=regularizer_weight)
        self.use_class_separation = bool(use_class_separation)
        self.unlabeled_only = bool(unlabeled_only)

    @property
    def regularizer(self) -> nn.Module:
        """The Cross-ALD (or ablation-row) regulariser: SS-Net's L_lds slot."""
        return self.vat

    @property
    def regularizer_weight(self) -> float:
        return self.lds_weight

    def regularize(self, network: nn.Module, x: torch.Tensor, n_l: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        regularised = x[n_l:] if self.unlabeled_only else x
        if getattr(self.regularizer, "mix", False) and regularised.shape[0] < 2:
            # mixing pairs every image with another one: a single image has no partner
            raise ValueError(
                f"Cross-ALD mixes pairs of images but the regularised set has {regularised.shape[0]} image(s): "
                + ("set unlabeled_batch_size >= 2 (R is computed on the unlabelled half), or unlabeled_only=False"
                   if self.unlabeled_only else "use a batch of at least 2 images"))
        result = self.regularizer.compute(network, regularised)
        extra: Dict[str, torch.Tensor] = {}
        gamma = getattr(result, "gamma", None)
        if gamma is not None:
            extra["mix_gamma"] = gamma.detach().float().cpu()
        # sizes of the two terms of the Stein direction: whether the score or the repulsion steers the particles
        for name, value in (getattr(result, "stats", None) or {}).items():
            key = f"particle_{name}" if name == "repulsion_over_drive" else f"particle_{name}_norm"
            extra[key] = value.float().cpu()
        return result.loss, extra
