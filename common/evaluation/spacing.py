"""Voxel spacing of evaluation volumes, in the axis order of the arrays the metrics see.

The loaders (:mod:`common.data.loading`) return plain arrays: NIfTI-like volumes are ``(x, y, z)`` on disk and,
for 2D models, transposed to ``(z, y, x)`` slice stacks (the SSL4MIS ACDC layout). The header spacing is
``(x, y, z)``, so it must be reordered the same way before it reaches the distance transform; getting this wrong
puts the 10 mm slice gap on an in-plane axis. :class:`HeaderSpacingd` reads the spacing from the file header
BEFORE loading (the path is still in the item) and stores it next to the data.
"""

from __future__ import annotations

import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

__all__ = ["HeaderSpacingd", "header_spacing", "SPACING_KEY", "SPACING_FILE_KEY"]

#: item key holding the spacing: a float64 tensor ``(ndim,)`` in array axis order, mm; ``(0,)`` when unknown
SPACING_KEY = "spacing"
#: item key naming the file the spacing came from (for error messages)
SPACING_FILE_KEY = "spacing_file"

_H5_SUFFIXES = (".h5", ".hdf5")


def header_spacing(path: str | os.PathLike, layout: str = "slices") -> tuple[float, ...] | None:
    """Voxel spacing (mm) of the image file ``path`` in the axis order the project's loaders produce.

    Args:
        path: a NIfTI/NRRD/MHA file (HDF5 files carry no spacing).
        layout: ``"slices"`` (2D models: 3D files become ``(z, y, x)`` stacks, so the header's ``(x, y, z)``
            spacing is reversed; 2D files stay ``(x, y)``) or ``"volume"`` (3D models: ``(x, y, z)`` as stored).

    Returns:
        One spacing per spatial axis of the loaded array, or ``None`` for HDF5 files (no spacing stored).

    Raises:
        ValueError: unknown ``layout``, or a header whose spacing is not positive and finite (the message names
            the file and the values).
    """
    if layout not in ("slices", "volume"):
        raise ValueError(f"layout must be 'slices' or 'volume', got {layout!r}")
    path = os.fspath(path)
    if path.lower().endswith(_H5_SUFFIXES):
        return None
    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)  # header only; the voxel data is not read
        shape = [int(s) for s in img.shape]
        zooms = [float(z) for z in img.header.get_zooms()]
    else:
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True)(path)
        shape = [int(s) for s in img.shape]
        zooms = [float(z) for z in np.asarray(img.meta.get("pixdim", [1.0] * 8))[1:]]
    # a trailing singleton 4th axis (X, Y, Z, 1) is a 3D volume for the loaders
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    ndim = min(len(shape), 3)
    spacing = zooms[:ndim]
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{path}: header spacing {zooms[:ndim]} is not {ndim} positive numbers (pixdim)")
    if layout == "slices" and ndim == 3:
        spacing = spacing[::-1]  # (x, y, z) header -> (z, y, x) arrays
    return tuple(spacing)


class HeaderSpacingd(MapTransform):
    """Store the voxel spacing of ``item[key]`` (a file path) under ``"spacing"`` before the file is loaded.

    Args:
        keys: the key whose file gives the spacing (normally ``"label"``: the distances are measured on it).
        spatial_dims: 2 (the loaders' ``"slices"`` layout) or 3 (``"volume"``).

    ``item["spacing"]`` becomes a float64 tensor ``(ndim,)`` in the loaded array's axis order (mm) or an
    empty tensor ``(0,)`` when the item has no spacing (HDF5 file, in-memory array); ``item["spacing_file"]``
    names the source. Tensors, not ``None``, so that the default collate and MONAI's decollate keep them.
    """

    def __init__(self, keys: Sequence[str] | str = "label", spatial_dims: int = 2, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.layout = "slices" if spatial_dims == 2 else "volume"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            spacing = header_spacing(value, self.layout) if isinstance(value, (str, os.PathLike)) else None
            d[SPACING_KEY] = torch.as_tensor(spacing if spacing else [], dtype=torch.float64)
            d[SPACING_FILE_KEY] = os.fspath(value) if isinstance(value, (str, os.PathLike)) else f"<in-memory {key}>"
            break  # one spacing per item: the first key present
        return d
