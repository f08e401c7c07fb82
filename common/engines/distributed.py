"""Data-parallel helpers for :class:`~common.engines.SemiSupervisedTrainer` under ``torchrun``.

Gradients are averaged across ranks by hand instead of wrapping the network in
``DistributedDataParallel``: the methods run several forward/backward passes per iteration, call
``torch.autograd.grad`` (which DDP does not support) and perturb parameters between passes (GapMatch), and
DDP's reducer only handles one forward followed by one backward. Averaging the gradients once before each
optimizer step is what DDP computes in the one-pass case, and it holds in all the others.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_gradients", "broadcast_state", "all_reduce_mean"]


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def all_reduce_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` of ``params`` over ranks in one collective. A parameter without a gradient on this
    rank contributes zeros, so ranks whose steps touched different parameters stay in step."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the input is unchanged)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    torch.distributed.all_reduce(out)
    return out / world_size()


def broadcast_state(modules: Iterable[nn.Module], src: int = 0, buffers_only: bool = False) -> None:
    """Copy parameters and buffers (e.g. BatchNorm running statistics) from rank ``src`` to every rank;
    ``buffers_only`` after each step, as DDP does with ``broadcast_buffers=True``."""
    if not is_distributed():
        return
    with torch.no_grad():
        for module in modules:
            tensors = list(module.buffers()) if buffers_only else list(module.parameters()) + list(module.buffers())
            for t in tensors:
                torch.distributed.broadcast(t.data, src=src)
