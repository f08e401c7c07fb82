"""Class-specific voxel sampling: which voxels of a batch feed voxel-wise heads (VFD's BYOL layer and
discriminator), and the thresholded pseudo-labels that assign unlabelled voxels to a class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["VoxelSamples", "sample_class_voxels", "threshold_pseudo_labels"]

#: class index of voxels that no class head may see (pseudo-label below the threshold)
IGNORE_INDEX = -1


@dataclass
class VoxelSamples:
    """A set of N voxels of a ``(B, *spatial)`` batch, ordered by image then class.

    Attributes:
        batch: ``(N,)`` long, the image of each voxel.
        coords: ``(N, D)`` long, its coordinates at full resolution (D = 2 or 3 spatial dims).
        classes: ``(N,)`` long, its class (ground truth or pseudo-label).
        spatial_size: the full-resolution spatial shape the coordinates refer to.
    """

    batch: torch.Tensor
    coords: torch.Tensor
    classes: torch.Tensor
    spatial_size: Tuple[int, ...]

    def __len__(self) -> int:
        return int(self.batch.numel())

    @property
    def num_images(self) -> int:
        return int(self.batch.max()) + 1 if len(self) else 0


def threshold_pseudo_labels(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``argmax`` of ``probs (B, C, *spatial)`` where the maximum probability exceeds ``threshold``, else
    ``-1`` (ignored): VFD's Eq. 1. Returns ``(B, *spatial)`` long."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"pseudo-label threshold must be in [0, 1), got {threshold}")
    confidence, labels = probs.max(dim=1)
    return torch.where(confidence > threshold, labels, torch.full_like(labels, IGNORE_INDEX))


def sample_class_voxels(
    class_map: torch.Tensor, num_classes: int, per_class: int, generator: Optional[torch.Generator] = None
) -> VoxelSamples:
    """For every image and class, up to ``per_class`` voxels of that class, uniformly without replacement.

    Args:
        class_map: ``(B, *spatial)`` integer class of each voxel; ``-1`` marks voxels to leave out.
        num_classes: classes ``0..num_classes-1`` are sampled; other values are an error.
        per_class: the cap per image and class (a class with fewer voxels contributes all of them).
        generator: random generator (default: the global torch RNG, which resume checkpoints restore).

    The subset is drawn as the ``per_class`` smallest of i.i.d. uniform keys among the class's voxels, which is
    a uniform sample without replacement and runs as one ``topk`` per class over the whole batch.
    """
    if per_class < 1:
        raise ValueError(f"voxels per class must be >= 1, got {per_class}")
    if class_map.dim() < 3:
        raise ValueError(f"class_map must be (B, *spatial) with 2 or 3 spatial dims, got shape {tuple(class_map.shape)}")
    if class_map.is_floating_point():
        class_map = class_map.round().long()
    lo, hi = int(class_map.min()), int(class_map.max())
    if lo < IGNORE_INDEX or hi >= num_classes:
        raise ValueError(f"class_map values must be in [-1, {num_classes - 1}] (num_classes={num_classes}), "
                         f"got range [{lo}, {hi}]")
    batch_size, spatial = class_map.shape[0], tuple(class_map.shape[1:])
    flat = class_map.reshape(batch_size, -1)
    k = min(int(per_class), flat.shape[1])
    keys = torch.rand(flat.shape, device=flat.device, generator=generator)
    images = torch.arange(batch_size, device=flat.device)[:, None].expand(batch_size, k)
    batch_idx, flat_idx, classes = [], [], []
    for c in range(num_classes):
        masked = torch.where(flat == c, keys, torch.full_like(keys, 2.0))  # keys < 1; 2 = not this class
        values, index = masked.topk(k, dim=1, largest=False)
        valid = values < 2.0
        batch_idx.append(images[valid])
        flat_idx.append(index[valid])
        classes.append(torch.full_like(index[valid], c))
    batch_idx, flat_idx, classes = torch.cat(batch_idx), torch.cat(flat_idx), torch.cat(classes)
    order = torch.argsort(batch_idx * num_classes + classes, stable=True)  # image-major, then class
    batch_idx, flat_idx, classes = batch_idx[order], flat_idx[order], classes[order]
    coords = torch.stack(torch.unravel_index(flat_idx, spatial), dim=1)
    return VoxelSamples(batch=batch_idx, coords=coords, classes=classes, spatial_size=spatial)
