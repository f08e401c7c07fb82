"""CutMix for segmentation: box masks and the mix of two batches (images, labels or pseudo-labels).

A mask ``M`` is a float tensor of ones with one box of zeros; mixing two batches keeps ``a`` where ``M = 1`` and
pastes ``b`` into the box: ``mix(a, b, M) = a * M + b * (1 - M)``. Because ``M`` is binary the mix of two label
maps is again a label map, so images, ground truth and pseudo-labels are mixed with the same function.

CML (Wu et al., ACM MM 2024) pastes "a random crop" with a "zero-centred" mask (a box of zeros of sides
``int(beta * size)``); its released code draws the box position uniformly for every mix, which is what CML uses by
default (``position="random"``). ``position="centre"`` puts the box in the middle of the patch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["box_mask", "cutmix", "MASK_POSITIONS"]

#: where :func:`box_mask` puts the box of zeros
MASK_POSITIONS = ("centre", "random")


def box_mask(
    spatial_size: Sequence[int],
    ratio: float | Sequence[float],
    position: str = "centre",
    device: torch.device | str | None = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A CutMix mask: ones with a box of zeros of side ``int(ratio * size)`` along every spatial dim.

    Args:
        spatial_size: ``(H, W)`` or ``(H, W, D)`` of the patches to mix.
        ratio: the box side as a fraction of the patch side (CML's beta), in (0, 1); one value or one per dim.
        position: ``"centre"`` puts the box in the middle (``start = (size - side) // 2``); ``"random"`` draws each
            start uniformly among the positions that keep the box inside the patch (torch's global generator
            unless ``generator`` is given, so a checkpointed RNG state replays the same masks).
        device: where the mask is created.
        generator: optional torch generator for the random position.

    Returns:
        float tensor ``(1, 1, *spatial_size)`` (broadcasts over batch and channels): 0 inside the box, 1 elsewhere.
    """
    size = [int(s) for s in spatial_size]
    if not size or any(s < 1 for s in size):
        raise ValueError(f"spatial_size must be positive sizes, got {tuple(spatial_size)}")
    ratios = [float(ratio)] * len(size) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    if len(ratios) != len(size):
        raise ValueError(f"ratio has {len(ratios)} values for {len(size)} spatial dims: {ratio}")
    if any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"mask ratio must lie in (0, 1), got {ratio}")
    if position not in MASK_POSITIONS:
        raise ValueError(f"mask position must be one of {MASK_POSITIONS}, got '{position}'")
    sides = [int(r * s) for r, s in zip(ratios, size)]
    if position == "centre":
        starts = [(s - b) // 2 for s, b in zip(size, sides)]
    else:
        starts = [int(torch.randint(0, s - b + 1, (1,), generator=generator)) for s, b in zip(size, sides)]
    mask = torch.ones([1, 1, *size], device=device)
    box = tuple(slice(st, st + b) for st, b in zip(starts, sides))
    mask[(slice(None), slice(None)) + box] = 0.0
    return mask


def cutmix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a * mask + b * (1 - mask)``: ``a`` outside the box, ``b`` inside.

    Args:
        a, b: ``(N, C, *spatial)`` tensors of the same shape (images, one-channel label maps, probabilities).
        mask: ``(1, 1, *spatial)`` or ``(N, 1, *spatial)`` binary mask from :func:`box_mask`.

    Label maps (integer tensors) are mixed exactly and keep their dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f"cutmix needs two batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if mask.shape[2:] != a.shape[2:]:
        raise ValueError(f"mask spatial shape {tuple(mask.shape[2:])} does not match the batch's {tuple(a.shape[2:])}")
    if not a.is_floating_point():
        keep = mask.to(torch.bool)
        return torch.where(keep, a, b)
    m = mask.to(a.dtype)
    return a * m + b * (1 - m)
