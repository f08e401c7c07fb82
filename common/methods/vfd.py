"""VFD: voxel-wise adversarial semi-supervised learning with a voxel-wise feature discriminator, voxel-wise BYOL
representation learning and a mean teacher (Lee, Park, Shin, Chung; arXiv 2205.06987).

One iteration (``methods/vfd.md``): the student and the EMA teacher see the labelled and unlabelled images;
the student is trained on

    L_total = L_dice + gamma(t) L_c + alpha L_adv + beta L_feature

with ``L_dice`` on labelled images, ``L_c`` the teacher/student softmax MSE on all images with the Gaussian
warm-up ``gamma(t) = gamma_max exp(-5 (1 - t / t_max)^2)``, ``L_feature`` the BYOL loss between the student's
predicted projection and the teacher's projection of same-class voxel features of labelled images, and
``L_adv`` the non-saturating generator loss of the discriminator on unlabelled voxels (routed to the head of
their teacher pseudo-label). After the student's SGD step, the discriminator takes one Adam step on detached
features (labelled = real, unlabelled = fake), then the teacher (backbone + voxel feature layer + projector)
is updated by EMA.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.engines.ema import EMA
from common.engines.schedules import RampUp, sigmoid_rampup
from common.methods.base import Batch, SemiSupervisedMethod
from common.networks.batchnorm import frozen_bn_stats
from common.networks.byol import BYOLHead, byol_loss
from common.networks.multires_fusion import MultiResolutionFusion
from common.networks.voxel_discriminator import VoxelFeatureDiscriminator
from common.networks.voxel_sampling import VoxelSamples, sample_class_voxels, threshold_pseudo_labels

if TYPE_CHECKING:  # pragma: no cover
    from common.engines.semi_supervised_trainer import SemiSupervisedTrainer

__all__ = ["VFDMethod", "ADV_REDUCTIONS", "voxel_weights", "reduce_voxel_terms"]

#: reductions of the voxel-wise adversarial terms (see :class:`VFDMethod`)
ADV_REDUCTIONS = ("image_sum", "sampled_sum", "mean")


def voxel_weights(class_map: torch.Tensor, samples: VoxelSamples, num_classes: int) -> torch.Tensor:
    """Weight of each sampled voxel so that a weighted sum over the sample estimates the sum over every eligible
    voxel of its image: ``(voxels of class c in image b) / (sampled voxels of class c in image b)``.

    Args:
        class_map: ``(B, *spatial)`` class of each voxel (``-1`` = not eligible), the map ``samples`` was drawn from.
        samples: the sampled voxels (N of them).
        num_classes: C.

    Returns:
        ``(N,)`` float weights (1 where every voxel of the class was sampled).
    """
    if class_map.is_floating_point():
        class_map = class_map.round()
    flat = class_map.reshape(class_map.shape[0], -1).long()
    offsets = torch.arange(flat.shape[0], device=flat.device)[:, None] * num_classes
    eligible = flat >= 0
    counts = torch.bincount((flat + offsets)[eligible], minlength=flat.shape[0] * num_classes)
    cell = samples.batch * num_classes + samples.classes
    sampled = torch.bincount(cell, minlength=flat.shape[0] * num_classes)
    return counts[cell].float() / sampled[cell].clamp_min(1).float()


def reduce_voxel_terms(terms: torch.Tensor, samples: VoxelSamples, weights: Optional[torch.Tensor],
                       num_images: int, reduction: str) -> torch.Tensor:
    """Reduce per-voxel loss terms ``(N,)`` to a scalar (see ``adv_reduction`` of :class:`VFDMethod`).

    ``"image_sum"``: ``(1 / num_images) sum_n sum_{voxels of image n} w_i t_i`` (Eq. 2's ``1/N sum_n sum_i``);
    ``"sampled_sum"``: the same with ``w = 1``; ``"mean"``: the mean over the N terms.
    """
    if reduction == "mean":
        return terms.mean()
    if reduction == "image_sum":
        terms = terms * weights
    return terms.sum() / max(int(num_images), 1)


@contextlib.contextmanager
def _frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Gradients flow through ``module`` to its inputs but not into its parameters (the discriminator during
    the generator's loss)."""
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class VFDMethod(SemiSupervisedMethod):
    """Voxel-wise feature discriminator + voxel-wise BYOL + mean teacher.

    Args:
        network: the student backbone (``UNet2D`` or ``VNet3D``; needs ``forward_features`` and
            ``encoder_channels``); the teacher starts as a copy of it. It is not a submodule of the method
            (the trainer saves it), only copied.
        loss_function: the supervised loss ``(logits (B, C, *sp), label (B, 1, *sp)) -> scalar`` (V-Net Dice).
        num_classes: classes, background included (one discriminator head each).
        spatial_dims: 2 or 3.
        feature_levels: encoder levels fed to the voxel feature layer and the discriminator (U-Net x0..x3,
            V-Net x1..x4 = indices 0..3 of ``forward_features().features``).
        feature_channels: width of the voxel feature layer, BYOL heads and discriminator (paper: 64).
        adv_weight: alpha, weight of ``L_adv`` (paper: 0.01).
        adv_rampup: iterations over which alpha rises by the same Gaussian warm-up as ``gamma(t)``,
            ``alpha(t) = alpha exp(-5 (1 - t / adv_rampup)^2)`` (0 = constant alpha, as the paper prints it). Not in
            the paper: the warm-up keeps a discriminator that has not yet learned, and pseudo-labels that are still
            mostly wrong, from steering the student's early features (semi-supervised adversarial segmentation
            code, e.g. Hung et al. 2018, starts its unlabelled adversarial term late for the same reason).
        feature_weight: beta, weight of ``L_feature`` (paper: 0.1 LA, 100 MO).
        consistency_weight: gamma_max of the Gaussian warm-up (paper: 0.001).
        consistency_rampup: t_max of the warm-up in iterations (ours: the total iterations).
        ema_decay: teacher decay lambda (not stated; 0.99).
        ema_warmup: use ``min(1 - 1/(step + 1), ema_decay)`` (UA-MT / SSL4MIS code) instead of a constant decay.
        threshold: pseudo-label confidence threshold t (paper: 0.7); less confident unlabelled voxels are not
            used in the adversarial terms.
        voxels_per_class: sampled voxels per image and class for the voxel-wise heads.
        discriminator_lr: Adam learning rate of the discriminator (paper: 2e-4).
        discriminator_betas: Adam betas of the discriminator (paper: 0.5, 0.999).
        pairing: BYOL pairs of same-class voxels: ``"shuffle"`` pairs a student voxel with the teacher vector of
            another random voxel of the same class in the batch; ``"same"`` with the teacher vector at the same
            voxel.
        dense_features: compute the full-resolution fused maps and index them (literal, memory-heavy) instead of
            evaluating the fusion at the sampled voxels only.
        adv_reduction: how the voxel terms of ``L_adv`` and of the discriminator objective are reduced.
            ``"sampled_sum"`` (default): Eq. 2's form, per image the sum over its sampled voxels (at most
            ``voxels_per_class`` per class), then the mean over images. ``"image_sum"``: Eq. 2 literally, per image
            the sum over *every* eligible voxel (labelled: all; unlabelled: the confident ones), estimated from the
            sample by weighting each voxel by ``(voxels of its class in its image) / (sampled voxels of that
            class)``; on ACDC-CPU v1 (16,384 voxels a slice) ``alpha L_adv`` then reaches ~60-80 against a Dice term
            below 1 and the run fell far below the run without ``L_adv`` (bundle docs: 0.346 against 0.615 val Dice
            at iteration 500), so the default is the closest setting that trains. ``"mean"``: the mean over all
            sampled voxels (bundle 0.1.x; there ``alpha L_adv`` carried ~0.02% of the backbone gradient with the
            shipped weights).
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: nn.Module,
        num_classes: int,
        spatial_dims: int,
        feature_levels: Sequence[int] = (0, 1, 2, 3),
        feature_channels: int = 64,
        adv_weight: float = 0.01,
        adv_rampup: float = 0.0,
        feature_weight: float = 0.1,
        consistency_weight: float = 0.001,
        consistency_rampup: float = 6000,
        ema_decay: float = 0.99,
        ema_warmup: bool = True,
        threshold: float = 0.7,
        voxels_per_class: int = 1024,
        discriminator_lr: float = 2e-4,
        discriminator_betas: Sequence[float] = (0.5, 0.999),
        pairing: str = "shuffle",
        dense_features: bool = False,
        adv_reduction: str = "sampled_sum",
    ) -> None:
        super().__init__()
        if not hasattr(network, "forward_features") or not hasattr(network, "encoder_channels"):
            raise TypeError(f"VFD needs a backbone with forward_features() and encoder_channels (UNet2D, VNet3D), "
                            f"got {type(network).__name__}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        levels = [int(level) for level in feature_levels]
        n_levels = len(network.encoder_channels)
        if not levels or any(not 0 <= level < n_levels for level in levels):
            raise ValueError(f"feature_levels must be indices in [0, {n_levels - 1}], got {list(feature_levels)}")
        for name, value in (("adv_weight", adv_weight), ("adv_rampup", adv_rampup), ("feature_weight", feature_weight),
                            ("consistency_weight", consistency_weight), ("consistency_rampup", consistency_rampup),
                            ("discriminator_lr", discriminator_lr)):
            # a bool from a JSON overlay would count as 1, an infinite ramp keeps alpha at e^-5 alpha forever
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if voxels_per_class < 1:
            raise ValueError(f"voxels_per_class must be >= 1, got {voxels_per_class}")
        if adv_reduction not in ADV_REDUCTIONS:
            raise ValueError(f"adv_reduction must be one of {ADV_REDUCTIONS}, got {adv_reduction!r}")
        if pairing not in ("shuffle", "same"):
            raise ValueError(f"pairing must be 'shuffle' or 'same', got '{pairing}'")
        for name, value in (("ema_warmup", ema_warmup), ("dense_features", dense_features)):
            if not isinstance(value, bool):  # a CLI "false" arrives as a (truthy) string
                raise TypeError(f"{name} must be a bool (True/False), got {value!r}")
        betas = tuple(float(b) for b in discriminator_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"discriminator_betas must be two values in [0, 1), got {list(discriminator_betas)}")

        self.loss_function = loss_function
        self.num_classes = int(num_classes)
        self.spatial_dims = int(spatial_dims)
        self.feature_levels = levels
        self.adv_weight = float(adv_weight)
        self.adv_rampup = float(adv_rampup)
        self.feature_weight = float(feature_weight)
        self.consistency = RampUp(consistency_weight, consistency_rampup, step=1.0)
        self.threshold = float(threshold)
        self.voxels_per_class = int(voxels_per_class)
        self.pairing = pairing
        self.dense_features = bool(dense_features)
        self.adv_reduction = adv_reduction

        in_channels = [network.encoder_channels[level] for level in levels]
        c = int(feature_channels)
        # student representation branch (trained by the main optimizer with the backbone)
        self.feature_layer = MultiResolutionFusion(spatial_dims, in_channels, c, norm=True, act="relu")
        self.projector = BYOLHead(c, c, c)
        self.predictor = BYOLHead(c, c, c)
        # teacher: EMA of backbone + voxel feature layer + projector (BYOL target branch)
        self.teacher = EMA(self._student_modules(network), decay=ema_decay, warmup=ema_warmup)
        # discriminator with its own optimizer (not in optimized_parameters)
        self.discriminator = VoxelFeatureDiscriminator(spatial_dims, in_channels, num_classes, c)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=discriminator_lr,
                                                        betas=betas)
        self._cache: Optional[dict] = None

    # -- parameters and state -------------------------------------------------------------------------------
    def _student_modules(self, network: nn.Module) -> nn.ModuleDict:
        """The student modules the teacher averages, keyed like the teacher's copy."""
        return nn.ModuleDict({"backbone": network, "feature_layer": self.feature_layer, "projector": self.projector})

    def optimized_parameters(self, network: nn.Module) -> Iterator[nn.Parameter]:
        """Backbone + voxel feature layer + projector + predictor; the discriminator has its own Adam and the
        teacher is an EMA."""
        yield from network.parameters()
        for module in (self.feature_layer, self.projector, self.predictor):
            yield from module.parameters()

    def get_extra_state(self) -> dict:
        # the discriminator's Adam moments travel with the method's state_dict, so every resume checkpoint has them
        return {"discriminator_optimizer": self.discriminator_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])

    # -- pieces -------------------------------------------------------------------------------------------
    def _partners(self, classes: torch.Tensor) -> torch.Tensor:
        """Index of the teacher vector each student voxel is paired with (same class)."""
        partner = torch.arange(classes.numel(), device=classes.device)
        if self.pairing == "same":
            return partner
        for c in torch.unique(classes).tolist():
            members = torch.nonzero(classes == c, as_tuple=True)[0]
            if members.numel() > 1:
                # a random cycle through the class: everyone gets another voxel of the class
                cycle = members[torch.randperm(members.numel(), device=members.device)]
                partner[cycle] = cycle.roll(1)
        return partner

    def _fused(self, fusion: MultiResolutionFusion, features: List[torch.Tensor], samples: VoxelSamples) -> torch.Tensor:
        return fusion.sample(features, samples, dense=self.dense_features)

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor],
                     samples: VoxelSamples) -> torch.Tensor:
        """``L_feature``: BYOL loss between the student's ``predictor(projector(V_s))`` and the teacher's
        ``projector(V_t)`` at the sampled labelled voxels (``samples``, ground-truth classes)."""
        if len(samples) < 2:  # BatchNorm over the sampled voxels needs two
            return student_features[0].new_zeros(())
        prediction = self.predictor(self.projector(self._fused(self.feature_layer, student_features, samples)))
        with torch.no_grad(), frozen_bn_stats(self.teacher):
            teacher = self.teacher.module
            target = teacher["projector"](self._fused(teacher["feature_layer"], teacher_features, samples))
        return byol_loss(prediction, target[self._partners(samples.classes)])

    def discriminator_step(self, engine: Optional["SemiSupervisedTrainer"] = None) -> Dict[str, torch.Tensor]:
        """One Adam step of the discriminator on the detached features cached by the last :meth:`train_step`:
        labelled voxels (ground-truth heads) are real, confident unlabelled voxels (pseudo-label heads) fake."""
        cache, self._cache = self._cache, None
        if cache is None:
            return {}
        params = list(self.discriminator.parameters())
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        terms, stats = [], {}
        with torch.enable_grad():
            # Eq. 2: (1/N) sum over labelled images of their voxel sums + (1/M) the same over unlabelled images
            if len(cache["labeled_samples"]):
                real = self.discriminator(cache["labeled_features"], cache["labeled_samples"], dense=self.dense_features)
                bce = F.binary_cross_entropy_with_logits(real, torch.ones_like(real), reduction="none")
                terms.append(reduce_voxel_terms(bce, cache["labeled_samples"], cache["labeled_weights"],
                                                cache["num_labeled"], self.adv_reduction))
                stats["d_real"] = torch.sigmoid(real.detach()).mean()
            if len(cache["unlabeled_samples"]):
                fake = self.discriminator(cache["unlabeled_features"], cache["unlabeled_samples"],
                                          dense=self.dense_features)
                bce = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake), reduction="none")
                terms.append(reduce_voxel_terms(bce, cache["unlabeled_samples"], cache["unlabeled_weights"],
                                                cache["num_unlabeled"], self.adv_reduction))
                stats["d_fake"] = torch.sigmoid(fake.detach()).mean()
            if terms:
                loss = torch.stack(terms).sum()
                loss.backward()
                stats["loss_d"] = loss.detach()
        if engine is not None:
            engine.sync_gradients(params)  # every rank calls it, also one without voxels this time
        self.discriminator_optimizer.step()
        return stats

    # -- the iteration ------------------------------------------------------------------------------------
    def train_step(self, engine: "SemiSupervisedTrainer", labeled: Batch, unlabeled: Optional[Batch]
                   ) -> Dict[str, torch.Tensor]:
        if unlabeled is None:
            raise ValueError("VFD needs an unlabelled batch")
        x_l, y_l, x_u = labeled["image"], labeled["label"], unlabeled["image"]
        n_l = x_l.shape[0]
        lo, hi = float(y_l.min()), float(y_l.max())
        if lo < 0 or hi > self.num_classes - 1:
            raise ValueError(f"labels must be class indices in [0, {self.num_classes - 1}], got values in "
                             f"[{lo:g}, {hi:g}]")
        images = torch.cat([x_l, x_u])
        spatial = tuple(images.shape[2:])
        if len(spatial) != self.spatial_dims:
            raise ValueError(f"VFD was built for {self.spatial_dims}D images, got a batch of shape {tuple(images.shape)}")

        student = engine.network.forward_features(images)
        features = [student.features[level] for level in self.feature_levels]
        with torch.no_grad(), frozen_bn_stats(self.teacher):
            teacher = self.teacher.module["backbone"].forward_features(images)
            teacher_probs = torch.softmax(teacher.logits.float(), dim=1)
            teacher_features = [teacher.features[level][:n_l] for level in self.feature_levels]

        loss_seg = self.loss_function(student.logits[:n_l], y_l)
        loss_c = F.mse_loss(torch.softmax(student.logits.float(), dim=1), teacher_probs)
        gamma = self.consistency(engine.step_index)

        # class-specific voxels: ground truth for labelled images, confident teacher pseudo-labels otherwise
        pseudo = threshold_pseudo_labels(teacher_probs[n_l:], self.threshold)
        labeled_samples = sample_class_voxels(y_l[:, 0], self.num_classes, self.voxels_per_class)
        unlabeled_samples = sample_class_voxels(pseudo, self.num_classes, self.voxels_per_class)

        labeled_features = [f[:n_l] for f in features]
        unlabeled_features = [f[n_l:] for f in features]
        loss_feature = self.feature_loss(labeled_features, teacher_features, labeled_samples)

        labeled_weights = voxel_weights(y_l[:, 0], labeled_samples, self.num_classes)
        unlabeled_weights = voxel_weights(pseudo, unlabeled_samples, self.num_classes)
        n_u = x_u.shape[0]
        if len(unlabeled_samples):
            with _frozen_parameters(self.discriminator):
                fake = self.discriminator(unlabeled_features, unlabeled_samples, dense=self.dense_features)
            # non-saturating generator form of Eq. 2's unlabelled half, reduced as Eq. 2 (see adv_reduction)
            bce = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake), reduction="none")
            loss_adv = reduce_voxel_terms(bce, unlabeled_samples, unlabeled_weights, n_u, self.adv_reduction)
        else:
            loss_adv = loss_seg.new_zeros(())

        self._cache = {
            "labeled_features": [f.detach().float() for f in labeled_features],
            "unlabeled_features": [f.detach().float() for f in unlabeled_features],
            "labeled_samples": labeled_samples,
            "unlabeled_samples": unlabeled_samples,
            "labeled_weights": labeled_weights,
            "unlabeled_weights": unlabeled_weights,
            "num_labeled": n_l,
            "num_unlabeled": n_u,
        }
        alpha = self.adv_weight * sigmoid_rampup(engine.step_index, self.adv_rampup)
        loss = loss_seg + gamma * loss_c + alpha * loss_adv + self.feature_weight * loss_feature
        return {
            "loss": loss,
            "loss_seg": loss_seg.detach(),
            "loss_consistency": loss_c.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_feature": loss_feature.detach(),
            "consistency_weight": torch.tensor(gamma),
            "adv_weight": torch.tensor(alpha),
            "confident_fraction": (pseudo >= 0).float().mean(),
        }

    def after_step(self, engine: "SemiSupervisedTrainer") -> None:
        """G-then-D: the discriminator's step (after the student's), then the teacher's EMA update."""
        stats = self.discriminator_step(engine)
        self.teacher.update(self._student_modules(engine.network))
        if isinstance(engine.state.output, dict):
            engine.state.output.update(stats)
