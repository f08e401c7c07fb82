"""Iteration-dependent loss weights and learning-rate schedules used by the papers.

The learning-rate schedules are torch schedulers (stepped once per iteration by MONAI's
``LrScheduleHandler(epoch_level=False)``), so their state is saved in checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, LRScheduler, PolynomialLR, StepLR

__all__ = ["sigmoid_rampup", "RampUp", "make_lr_scheduler"]


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - min(current, length) / length)^2): e^-5 at 0, 1 from ``length`` on (1 when length is 0)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


class RampUp:
    """``max_value * sigmoid_rampup(floor(t / step), length / step)`` at 0-based iteration ``t``.

    SS-Net-style code passes ``iteration // 150`` with a length of 200 units (30k iterations): that is
    ``RampUp(w, length=30000, step=150)``. A shortened run scales both (ACDC-CPU v1: length 1500, step 7.5).
    ``step=1`` gives the smooth form (VFD's Gaussian warm-up).
    """

    def __init__(self, max_value: float, length: float, step: float = 1.0) -> None:
        if step <= 0:
            raise ValueError(f"RampUp step must be > 0, got {step}")
        self.max_value = float(max_value)
        self.length = float(length)
        self.step = float(step)

    def __call__(self, iteration: int) -> float:
        return self.max_value * sigmoid_rampup(math.floor(iteration / self.step), self.length / self.step)

    def __repr__(self) -> str:
        return f"RampUp(max_value={self.max_value}, length={self.length}, step={self.step})"


def make_lr_scheduler(
    optimizer: Optimizer, kind: str, max_iterations: int, step_size: int = 2500, gamma: float = 0.1, power: float = 0.9
) -> LRScheduler:
    """``constant`` (SS-Net/CML 2D), ``poly`` (SSL4MIS: lr0 (1 - t/T)^power) or ``step`` (LA: x gamma every
    ``step_size`` iterations)."""
    if kind == "constant":
        return ConstantLR(optimizer, factor=1.0, total_iters=0)
    if kind == "poly":
        return PolynomialLR(optimizer, total_iters=max(1, int(max_iterations)), power=power)
    if kind == "step":
        return StepLR(optimizer, step_size=int(step_size), gamma=gamma)
    raise ValueError(f"unknown lr schedule '{kind}' (use constant, poly or step)")
