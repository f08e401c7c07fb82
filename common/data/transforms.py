"""MONAI dict-transform pipelines for the papers' ACDC (2D) and LA (3D) training, evaluation and FixMatch-style
weak/strong view pairs.

ACDC (SS-Net/CML variant, ``base.md`` section 3): with p = 0.5 a random rot90 then a flip along a random axis,
otherwise with p = 0.5 a rotation in [-20, 20] degrees, otherwise nothing; then the whole slice is resized to
the patch. LA: random crop of the patch (zero-padded when too small), rot90 in the axial plane and a flip along
axis 0 or 1.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from monai.transforms import (
    Compose,
    Randomizable,
    RandomizableTrait,
    Transform,
    CopyItemsd,
    Identityd,
    OneOf,
    RandAdjustContrastd,
    RandAxisFlipd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
    SpatialPadd,
)

from common.data.loading import LoadSampled

__all__ = [
    "acdc_train_transforms",
    "la_train_transforms",
    "train_transforms",
    "eval_transforms",
    "strong_intensity_transforms",
    "weak_strong_views",
]

KEYS = ("image", "label")


def _resize(patch_size: Sequence[int], image_mode: str) -> Resized:
    modes = (image_mode, "nearest")
    align = (True if image_mode in ("bilinear", "trilinear", "bicubic") else None, None)
    return Resized(KEYS, spatial_size=list(patch_size), mode=modes, align_corners=align, allow_missing_keys=True)


def acdc_train_transforms(
    patch_size: Sequence[int] = (128, 128),
    num_classes: int = 4,
    image_mode: str = "bilinear",
    augment: bool = True,
    intensity: str = "minmax",
) -> Compose:
    """Load, augment (rot90+flip / rotation / nothing = 0.5 / 0.25 / 0.25) and resize a 2D slice to
    ``patch_size``. ``image_mode`` is the image interpolation ("bilinear" for ACDC-CPU v1, "nearest" as in
    the papers' code); labels always use nearest."""
    rot_flip = Compose([RandRotate90d(KEYS, prob=1.0, max_k=4, allow_missing_keys=True),
                        RandAxisFlipd(KEYS, prob=1.0, allow_missing_keys=True)])
    rotate = RandRotated(KEYS, range_x=math.radians(20), prob=1.0, mode=("bilinear", "nearest"),
                         padding_mode="zeros", allow_missing_keys=True)
    steps: list[Callable] = [LoadSampled(KEYS, layout="slices", num_classes=num_classes, intensity=intensity)]
    if augment:
        steps.append(OneOf([rot_flip, rotate, Identityd(KEYS, allow_missing_keys=True)], weights=[0.5, 0.25, 0.25]))
    steps.append(_resize(patch_size, image_mode))
    return Compose(steps)


def la_train_transforms(
    patch_size: Sequence[int] = (112, 112, 80), num_classes: int = 2, augment: bool = True, intensity: str = "zscore"
) -> Compose:
    """Load, pad (symmetric zeros, +3 margin when a side is too small), random-crop ``patch_size``, then rot90 in
    the first two axes and a flip along axis 0 or 1."""
    steps: list[Callable] = [
        LoadSampled(KEYS, layout="volume", num_classes=num_classes, intensity=intensity),
        SpatialPadd(KEYS, spatial_size=[p + 3 for p in patch_size], method="symmetric", allow_missing_keys=True),
        RandSpatialCropd(KEYS, roi_size=list(patch_size), random_size=False, allow_missing_keys=True),
    ]
    if augment:
        steps += [
            RandRotate90d(KEYS, prob=1.0, max_k=4, spatial_axes=(0, 1), allow_missing_keys=True),
            OneOf([RandFlipd(KEYS, prob=1.0, spatial_axis=0, allow_missing_keys=True),
                   RandFlipd(KEYS, prob=1.0, spatial_axis=1, allow_missing_keys=True)]),
        ]
    return Compose(steps)


def train_transforms(
    spatial_dims: int, patch_size: Sequence[int], num_classes: int, augment: bool = True, image_mode: str = "bilinear",
    intensity: str | None = None,
) -> Compose:
    """The ACDC pipeline for 2D models, the LA pipeline for 3D models."""
    if spatial_dims == 2:
        return acdc_train_transforms(patch_size, num_classes, image_mode, augment, intensity or "minmax")
    if spatial_dims == 3:
        return la_train_transforms(patch_size, num_classes, augment, intensity or "zscore")
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def eval_transforms(spatial_dims: int, num_classes: int, intensity: str | None = None, with_label: bool = True) -> Compose:
    """Load whole volumes for evaluation: ``(1, S, H, W)`` slice stacks for 2D models, ``(1, H, W, D)`` for 3D."""
    keys = KEYS if with_label else ("image",)
    layout = "slices" if spatial_dims == 2 else "volume"
    return Compose([LoadSampled(keys, layout=layout, num_classes=num_classes,
                                intensity=intensity or ("minmax" if spatial_dims == 2 else "zscore"))])


def strong_intensity_transforms(key: str = "image_strong", noise_std: float = 0.05) -> Compose:
    """Intensity perturbations for the strong view. ColorJitter(brightness 0.8, contrast 0.8) of FixMatch
    reduces to brightness and contrast on one-channel MRI; gamma and Gaussian noise add MRI-typical
    perturbations. Geometry is untouched, so weak and strong views stay aligned pixel for pixel."""
    return Compose([
        RandScaleIntensityd(key, factors=0.8, prob=0.8),  # brightness: x * U(0.2, 1.8)
        RandShiftIntensityd(key, offsets=0.1, prob=0.5),
        RandAdjustContrastd(key, gamma=(0.5, 2.0), prob=0.8),
        RandGaussianNoised(key, std=noise_std, prob=0.5),
    ])


def weak_strong_views(weak: Compose, strong: Compose | None = None, key: str = "image") -> Compose:
    """Both views from one sampled image: ``image`` is the weak view (the geometric augmentation),
    ``image_strong`` is the same weak view plus ``strong`` intensity perturbations.

    The weak pipeline's leading deterministic transforms (the loading) are lifted to the top of the returned
    ``Compose``, so that a ``CacheDataset`` (the loader's ``cache_rate``) can keep their results. The random streams
    are those of ``Compose([weak, copy, strong])``: a ``Compose`` seeds only its randomizable members, in order, and
    the lifted transforms are not randomizable (``tests/test_two_stream.py``)."""
    leading: list[Callable] = []
    rest = list(weak.transforms) if isinstance(weak, Compose) and type(weak) is Compose else None
    while rest and isinstance(rest[0], Transform) and not isinstance(rest[0], (Randomizable, RandomizableTrait)):
        leading.append(rest.pop(0))
    weak_random = weak if not leading else Compose(rest)
    return Compose([*leading, weak_random, CopyItemsd(key, names=f"{key}_strong"),
                    strong or strong_intensity_transforms(f"{key}_strong")])
