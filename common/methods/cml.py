"""CML: cross-view mutual learning with conflict-based feature learning (Wu et al., ACM MM 2024).

Two subnets (:class:`~common.networks.dual_subnet.DualSubnet`) see the same CutMixed input. A conflict loss pushes
their bottleneck features apart (each against a frozen copy of the other) so they learn different views; mixed
labelled pairs are supervised with the mixed ground truth, mixed unlabelled pairs with a heterogeneous target per
subnet: the other subnet's pseudo-label where the image comes from the first sample of the pair, its own inside the
pasted box. Training has two stages in one run: supervised pre-training on labelled CutMix, then self-training
initialised from the best pre-training state (weights and optimizer state), selected on validation.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from ignite.engine import Engine, Events
from monai.losses import DiceCELoss
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from common.engines.distributed import broadcast_state, is_distributed, rank
from common.losses.feature_discrepancy import feature_discrepancy
from common.methods.base import Batch, SemiSupervisedMethod
from common.mixing import MASK_POSITIONS, box_mask, cutmix
from common.pseudo_labels import PseudoLabeler

__all__ = ["CMLMethod", "CMLStageHandler", "cml_supervised_loss", "heterogeneous_targets", "two_stage_lr_scheduler"]

logger = logging.getLogger(__name__)


def cml_supervised_loss() -> DiceCELoss:
    """``0.5 * (CE + Dice)`` as in CML's code: softmax Dice per sample and per class (background included),
    ``(2 sum(p y) + 1e-5) / (sum p + sum y + 1e-5)``, loss ``1 - mean`` over samples x classes; CE averaged over
    pixels. Called as ``loss(logits (B, C, *spatial), label (B, 1, *spatial))``."""
    return DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, squared_pred=False, batch=False,
                      smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=0.5, lambda_ce=0.5)


def heterogeneous_targets(pseudo_0: torch.Tensor, pseudo_1: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
    """CML's unlabelled targets (paper Eq. 9) for ``X_mix = X_p * M + X_q * (1 - M)``.

    Args:
        pseudo_0, pseudo_1: pseudo-labels ``(B_u, 1, *spatial)`` of subnet 0 and subnet 1 on the unmixed batch,
            whose first half is ``p`` and second half ``q``.
        mask: ``M`` ``(1, 1, *spatial)``: 1 where the mixed image comes from ``p``, 0 in the box pasted from ``q``.

    Returns:
        ``[T_0, T_1]``, each ``(B_u / 2, 1, *spatial)``, with
        ``T_i = Yhat_p(subnet 1-i) * M + Yhat_q(subnet i) * (1 - M)``: outside the box a subnet learns from the
        other subnet, inside the box from itself.
    """
    if pseudo_0.shape != pseudo_1.shape:
        raise ValueError(f"pseudo-label shapes differ: {tuple(pseudo_0.shape)} vs {tuple(pseudo_1.shape)}")
    half = pseudo_0.shape[0] // 2
    pseudo = (pseudo_0, pseudo_1)
    return [cutmix(pseudo[1 - i][:half], pseudo[i][half:], mask) for i in (0, 1)]


def two_stage_lr_scheduler(optimizer: Optimizer, pretrain_iterations: int, kind: str = "constant",
                           max_iterations: int = 0, step_size: int = 2500, gamma: float = 0.1,
                           power: float = 0.9) -> LambdaLR:
    """Constant learning rate during pre-training, then ``kind`` counted from the first self-training iteration.

    ``constant`` (CML ACDC), ``step`` (CML LA: x ``gamma`` every ``step_size`` self-training iterations) or ``poly``
    (``(1 - s / S) ** power`` over the ``S = max_iterations - pretrain_iterations`` self-training iterations).
    Stepped once per iteration; the factor of 0-based iteration ``t`` is 1 for ``t < pretrain_iterations``.
    """
    pre = int(pretrain_iterations)
    if pre < 0:
        raise ValueError(f"pretrain_iterations must be >= 0, got {pretrain_iterations}")
    if kind not in ("constant", "step", "poly"):
        raise ValueError(f"unknown lr schedule '{kind}' (use constant, step or poly)")
    if kind == "step" and step_size < 1:
        raise ValueError(f"lr step_size must be >= 1, got {step_size}")
    total = max(1, int(max_iterations) - pre)

    def factor(t: int) -> float:
        s = t - pre
        if s < 0 or kind == "constant":
            return 1.0
        if kind == "step":
            return gamma ** (s // int(step_size))
        return max(0.0, 1.0 - min(s, total) / total) ** power

    return LambdaLR(optimizer, lr_lambda=factor)


class CMLMethod(SemiSupervisedMethod):
    """CML's two training stages, switched by iteration inside one run.

    Pre-training (0-based iterations ``t < pretrain_iterations``), labelled data only:
    ``L = lambda_labeled * [sup(P_0, Y_mix) + sup(P_1, Y_mix)] + lambda_discrepancy * L_dis(X^l_mix)``.

    Self-training, starting from the best pre-training state (see :class:`CMLStageHandler`):
    ``L = lambda_labeled * L_l + lambda_unlabeled * L_u + lambda_discrepancy * (L_dis^l + L_dis^u)`` where
    ``L_u = sup(P^u_0, T_0) + sup(P^u_1, T_1)`` on ``X^u_mix = X_p * M + X_q * (1 - M)`` with
    ``T_i = Yhat_p(subnet 1-i) * M + Yhat_q(subnet i) * (1 - M)`` (paper Eq. 9) and
    ``L_dis = dis(f_0, f_1) + dis(f_1, f_0)`` on the bottleneck features.

    Each batch is split in halves: ``a``/``p`` = first half, ``b``/``q`` = second half; one mask per batch
    (a new one for the labelled and for the unlabelled mix). Pseudo-labels come from both subnets on the unmixed
    unlabelled images, without gradients and with the network in train mode (as the code), then arg-max (or a
    foreground threshold) and the largest connected component per class.

    Args:
        num_classes: classes including background.
        pretrain_iterations: length of the pre-training stage (ACDC 10k, LA 2k; 0 = self-training from scratch).
        lambda_unlabeled: lambda1 (ACDC 0.5, LA 1.0).
        lambda_discrepancy: lambda2 (ACDC 0.1, LA 0.2).
        lambda_labeled: weight of the labelled term (1 in the paper).
        mask_ratio: beta, the side of the CutMix box as a fraction of the patch (ACDC 1/2, LA 2/3).
        mask_position: ``"random"`` (default: a new box position for every mix, uniform over the positions that keep
            the box inside the patch; the paper pastes "a random crop", the released code draws the position per
            mix and ``methods/cml.md`` reads "zero-centred" as a region of zeros) or ``"centre"`` (box in the middle
            of the patch; on ACDC 128x128 almost all heart lies inside it, so the region supervised by the other
            subnet holds ~1% of the foreground and mutual learning degrades to self-training).
        loss_function: ``sup(logits, label)``; default :func:`cml_supervised_loss`.
        largest_component: keep the largest connected component of each pseudo-label class (the paper's "NMS").
        pseudo_label_threshold: binary tasks: foreground probability threshold (LA code: 0.5); ``None`` = arg-max.
        restore_optimizer: at the stage switch also restore the optimizer state (SGD momentum) of the best
            pre-training iteration, as the code; the learning rates stay those of the LR scheduler.
    """

    requires_unlabeled = True

    def __init__(
        self,
        num_classes: int,
        pretrain_iterations: int,
        lambda_unlabeled: float = 0.5,
        lambda_discrepancy: float = 0.1,
        lambda_labeled: float = 1.0,
        mask_ratio: float = 0.5,
        mask_position: str = "random",
        loss_function: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        largest_component: bool = True,
        pseudo_label_threshold: Optional[float] = None,
        restore_optimizer: bool = True,
    ) -> None:
        super().__init__()
        if pretrain_iterations < 0:
            raise ValueError(f"pretrain_iterations must be >= 0, got {pretrain_iterations}")
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio (beta) must lie in (0, 1), got {mask_ratio}")
        if mask_position not in MASK_POSITIONS:
            raise ValueError(f"mask_position must be one of {MASK_POSITIONS}, got '{mask_position}'")
        for name, value in (("lambda_unlabeled", lambda_unlabeled), ("lambda_discrepancy", lambda_discrepancy),
                            ("lambda_labeled", lambda_labeled)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.num_classes = int(num_classes)
        self.pretrain_iterations = int(pretrain_iterations)
        self.lambda_unlabeled = float(lambda_unlabeled)
        self.lambda_discrepancy = float(lambda_discrepancy)
        self.lambda_labeled = float(lambda_labeled)
        self.mask_ratio = float(mask_ratio)
        self.mask_position = mask_position
        self.loss_function = loss_function if loss_function is not None else cml_supervised_loss()
        self.pseudo_labeler = PseudoLabeler(num_classes, largest_component, pseudo_label_threshold)
        self.restore_optimizer = bool(restore_optimizer)
        # stage bookkeeping, saved in the resume checkpoint through get_extra_state
        self.pretrain_best: Optional[float] = None
        self.pretrain_best_iteration = -1
        self.switched_at = -1  # 1-based iteration that started self-training from the snapshot, -1 before
        self._snapshot: Optional[Dict[str, Any]] = None

    # -- stages ------------------------------------------------------------------------------------------------
    def stage(self, step_index: int) -> int:
        """1 (pre-training) or 2 (self-training) for the 0-based iteration ``step_index``."""
        return 1 if step_index < self.pretrain_iterations else 2

    @property
    def has_switched(self) -> bool:
        return self.switched_at >= 0

    def offer_pretrain_state(self, network: nn.Module, optimizer: Optimizer, iteration: int, value: float) -> bool:
        """Keep a copy of the network and optimizer state if ``value`` (a validation score, higher is better) beats
        the best pre-training score so far. Returns whether it was kept."""
        if self.has_switched or not math.isfinite(value):
            return False
        if self.pretrain_best is not None and value <= self.pretrain_best:
            return False
        self.pretrain_best, self.pretrain_best_iteration = float(value), int(iteration)
        self._snapshot = {
            "network": {k: v.detach().clone() for k, v in network.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
        }
        return True

    def _start_self_training(self, engine: Any) -> None:
        network, optimizer = engine.network, engine.optimizer
        if self._snapshot is not None:
            network.load_state_dict(self._snapshot["network"])
            if self.restore_optimizer:
                # the snapshot brings the momentum buffers; the learning rates stay the scheduler's
                groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
                optimizer.load_state_dict(self._snapshot["optimizer"])
                for g, saved in zip(optimizer.param_groups, groups):
                    g.update(saved)
            logger.info(f"CML: self-training starts at iteration {engine.state.iteration} from the best pre-training "
                        f"state (iteration {self.pretrain_best_iteration}, score {self.pretrain_best:.4f})")
        elif self.pretrain_iterations > 0 and rank() == 0:
            logger.warning("CML: no validation score was recorded during pre-training (is CMLStageHandler attached "
                           "and validation enabled?); self-training continues from the last pre-training state")
        if is_distributed():
            broadcast_state([network])
            if self.restore_optimizer:
                with torch.no_grad():
                    for p in (p for g in optimizer.param_groups for p in g["params"]):
                        buf = optimizer.state.get(p, {}).get("momentum_buffer")
                        if buf is not None:
                            torch.distributed.broadcast(buf, src=0)
        self.switched_at = int(engine.state.iteration)
        self._snapshot = None  # not needed any more; keeps later checkpoints small

    def get_extra_state(self) -> Dict[str, Any]:
        return {
            "pretrain_best": float("nan") if self.pretrain_best is None else self.pretrain_best,
            "pretrain_best_iteration": self.pretrain_best_iteration,
            "switched_at": self.switched_at,
            "snapshot": self._snapshot if self._snapshot is not None else {},
        }

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        best = float(state["pretrain_best"])
        self.pretrain_best = None if math.isnan(best) else best
        self.pretrain_best_iteration = int(state["pretrain_best_iteration"])
        self.switched_at = int(state["switched_at"])
        self._snapshot = state["snapshot"] or None

    # -- losses ------------------------------------------------------------------------------------------------
    @staticmethod
    def _halves(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if n < 2 or n % 2:
            raise ValueError(f"CML mixes the first and the second half of the {what} batch, so its size must be even "
                             f"and >= 2; got {n} ({what}_batch_size)")
        return x[: n // 2], x[n // 2:]

    def _mask(self, like: torch.Tensor) -> torch.Tensor:
        return box_mask(like.shape[2:], self.mask_ratio, self.mask_position, device=like.device)

    def _supervise(self, outputs: list, targets: list) -> torch.Tensor:
        return self.loss_function(outputs[0].logits, targets[0]) + self.loss_function(outputs[1].logits, targets[1])

    @staticmethod
    def _discrepancy(outputs: list) -> torch.Tensor:
        f0, f1 = outputs[0].features[-1], outputs[1].features[-1]
        return feature_discrepancy(f0, f1) + feature_discrepancy(f1, f0)

    def train_step(self, engine: Any, labeled: Batch, unlabeled: Optional[Batch]) -> Dict[str, Any]:
        network = engine.network
        if not hasattr(network, "forward_branches"):
            raise TypeError("CMLMethod needs a two-branch network with forward_branches "
                            f"(common.networks.dual_subnet.DualSubnet), got {type(network).__name__}")
        stage = self.stage(engine.step_index)
        if stage == 2 and not self.has_switched:
            self._start_self_training(engine)

        x_a, x_b = self._halves(labeled["image"], "labeled")
        y_a, y_b = self._halves(labeled["label"], "labeled")
        mask_l = self._mask(x_a)
        out_l = network.forward_branches(cutmix(x_a, x_b, mask_l))
        y_mix = cutmix(y_a, y_b, mask_l)
        sup_l = self._supervise(out_l, [y_mix, y_mix])
        dis = self._discrepancy(out_l)
        result: Dict[str, Any] = {"stage": stage}
        if stage == 1:
            loss = self.lambda_labeled * sup_l + self.lambda_discrepancy * dis
        else:
            if unlabeled is None:
                raise ValueError("CML self-training needs an unlabelled batch")
            x_u = unlabeled["image"]
            x_p, x_q = self._halves(x_u, "unlabeled")
            with torch.no_grad():
                pseudo = [self.pseudo_labeler(o.logits).float() for o in network.forward_branches(x_u)]
            mask_u = self._mask(x_p)
            targets = heterogeneous_targets(pseudo[0], pseudo[1], mask_u)
            out_u = network.forward_branches(cutmix(x_p, x_q, mask_u))
            sup_u = self._supervise(out_u, targets)
            dis = dis + self._discrepancy(out_u)
            loss = self.lambda_labeled * sup_l + self.lambda_unlabeled * sup_u + self.lambda_discrepancy * dis
            result["loss_sup_u"] = sup_u.detach()
        result.update({"loss": loss, "loss_sup_l": sup_l.detach(), "loss_dis": dis.detach()})
        return result


class CMLStageHandler:
    """Selects the pre-training state that self-training starts from, as CML's code does with its best
    pre-training checkpoint.

    After every validation during pre-training (trainer iteration ``<= method.pretrain_iterations``) it offers the
    network and optimizer state to :meth:`CMLMethod.offer_pretrain_state`, which keeps the best. At the last
    pre-training iteration it runs ``validator`` once more unless a validation already ran at that iteration, so the
    stage boundary is always a candidate. Attach it after the ``ValidationHandler`` (the bundle lists it last), on
    every rank that validates (under ``torchrun`` the evaluator's metrics are collective).

    Args:
        method: the :class:`CMLMethod`.
        validator: the validation evaluator.
        network: the trained network (the one the evaluator scores).
        optimizer: the main optimizer.
        metric: the evaluator metric to maximise.
        validate_at_switch: run the boundary validation.
    """

    def __init__(self, method: CMLMethod, validator: Engine, network: nn.Module, optimizer: Optimizer,
                 metric: str = "val_mean_dice", validate_at_switch: bool = True) -> None:
        self.method = method
        self.validator = validator
        self.network = network
        self.optimizer = optimizer
        self.metric = metric
        self.validate_at_switch = validate_at_switch
        self.trainer: Optional[Engine] = None
        self._last_validated = -1

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        self.validator.add_event_handler(Events.COMPLETED, self._on_validation)
        if self.validate_at_switch and self.method.pretrain_iterations > 0:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=self.method.pretrain_iterations),
                                      self._validate_at_switch)

    def _validate_at_switch(self, trainer: Engine) -> None:
        if self._last_validated != trainer.state.iteration:
            self.validator.run(trainer.state.epoch)

    def _on_validation(self, validator: Engine) -> None:
        if self.trainer is None:
            return
        iteration = int(self.trainer.state.iteration)
        self._last_validated = iteration
        if iteration > self.method.pretrain_iterations or self.method.has_switched:
            return
        value = validator.state.metrics.get(self.metric)
        if value is None:
            raise KeyError(f"validation produced no metric '{self.metric}' (got {sorted(validator.state.metrics)})")
        if self.method.offer_pretrain_state(self.network, self.optimizer, iteration, float(value)):
            logger.info(f"CML: pre-training state of iteration {iteration} kept ({self.metric} = {float(value):.4f})")
