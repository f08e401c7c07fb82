"""Embedded synthetic data: multi-class discs (2D) or spheres (3D) from MONAI's test-image generators.

Every bundle trains on it out of the box, with nothing to download; the same seed gives the same arrays.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from monai.data import create_test_image_2d, create_test_image_3d

__all__ = ["synthetic_image", "synthetic_items"]


def synthetic_image(
    spatial_size: Sequence[int], num_classes: int, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """One image in [0, 1] and its label in ``0..num_classes-1``, both shaped ``spatial_size`` (2D or 3D)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    size = [int(s) for s in spatial_size]
    rad_max = max(3, min(size) // 6)
    common = dict(num_objs=8 if len(size) == 2 else 6, rad_max=rad_max, rad_min=min(3, rad_max - 1), noise_max=0.25,
                  num_seg_classes=num_classes - 1, random_state=rng)
    if len(size) == 2:
        image, label = create_test_image_2d(size[0], size[1], **common)
    elif len(size) == 3:
        image, label = create_test_image_3d(size[0], size[1], size[2], **common)
    else:
        raise ValueError(f"synthetic data is 2D or 3D, got spatial_size {spatial_size}")
    return image.astype(np.float32), label.astype(np.uint8)


def synthetic_items(
    count: int, spatial_size: Sequence[int], num_classes: int, seed: int, with_label: bool = True,
    name_prefix: str = "synthetic",
) -> list[dict]:
    """``count`` in-memory items ``{"image", "label", "name"}`` (2D slices or 3D volumes)."""
    rng = np.random.RandomState(seed)
    items = []
    for i in range(count):
        image, label = synthetic_image(spatial_size, num_classes, rng)
        item = {"image": image, "name": f"{name_prefix}_{i:03d}"}
        if with_label:
            item["label"] = label
        items.append(item)
    return items
