"""Reading one sample (HDF5, NIfTI/NRRD/MHA or an in-memory array) into channel-first tensors, with checks.

A data item is a dict such as ``{"image": "a.h5", "label": "a.h5"}`` (SSL4MIS layout: the key names the HDF5
dataset), ``{"image": "a.nii.gz", "label": "a_seg.nii.gz", "slice_index": 3}`` (a file read through MONAI's
``LoadImage``) or ``{"image": np.ndarray, "label": np.ndarray}`` (the embedded synthetic data).

Two array layouts are used, fixed by the model's dimensionality:

* ``"slices"`` (2D models): a volume is a stack ``(S, H, W)``, the SSL4MIS ACDC layout. NIfTI-like files load
  as ``(x, y, z)`` and are transposed to ``(z, y, x)``, which is how SSL4MIS wrote the ACDC HDF5 files.
* ``"volume"`` (3D models): ``(H, W, D)`` as stored, the UA-MT LA layout and the NIfTI array order.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["DataError", "LoadSampled", "read_array", "array_shape", "is_h5", "image_files", "find_loader",
           "check_label_values"]

H5_SUFFIXES = (".h5", ".hdf5")


class DataError(ValueError):
    """A data file or value that cannot be used; the message names the file and the problem."""


def is_h5(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(H5_SUFFIXES)


def _read_h5(path: str, key: str) -> np.ndarray:
    import h5py

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DataError(f"{path}: no dataset '{key}' (datasets present: {sorted(f.keys())})")
            return np.asarray(f[key][()])
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError variants for truncated or non-HDF5 files
        raise DataError(f"{path}: cannot be read as HDF5 ({type(e).__name__}: {e})") from e


def _read_image_file(path: str) -> np.ndarray:
    """Read a NIfTI/NRRD/MHA file with MONAI's reader; returns the array as stored, (x, y, z[, c])."""
    from monai.transforms import LoadImage

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        img = LoadImage(image_only=True)(path)
    except Exception as e:
        raise DataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from e
    arr = np.asarray(img)
    channel_dim = img.meta.get("original_channel_dim", "no_channel") if hasattr(img, "meta") else "no_channel"
    if arr.ndim == 4:
        if channel_dim in ("no_channel", None) or (isinstance(channel_dim, float) and np.isnan(channel_dim)):
            channel_dim = -1
        arr = np.moveaxis(arr, int(channel_dim), -1)
        if arr.shape[-1] != 1:
            raise DataError(
                f"{path}: 4D image with {arr.shape[-1]} channels along axis {channel_dim}; "
                "only single-channel images are supported"
            )
        arr = arr[..., 0]
    return arr


@functools.lru_cache(maxsize=16)
def _cached_read(path: str, key: str, mtime: float) -> np.ndarray:
    return _read_h5(path, key) if is_h5(path) else _read_image_file(path)


def read_array(path: str, key: str = "image") -> np.ndarray:
    """The array stored at ``path`` (the HDF5 dataset ``key`` for .h5 files). Cached: slices of one volume are
    read once per process."""
    path = os.fspath(path)
    mtime = os.path.getmtime(path) if os.path.exists(path) else -1.0
    return _cached_read(path, key, mtime)


def array_shape(path: str, key: str = "image") -> tuple[int, ...]:
    """Shape of the stored array without reading it where the format allows (HDF5, NIfTI)."""
    path = os.fspath(path)
    if is_h5(path):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if key not in f:
                    raise DataError(f"{path}: no dataset '{key}' (datasets present: {sorted(f.keys())})")
                return tuple(f[key].shape)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot be read as HDF5 ({type(e).__name__}: {e})") from e
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            shape = tuple(int(s) for s in nib.load(path).shape)
        except Exception as e:
            raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
        return shape if len(shape) < 4 or shape[3] != 1 else shape[:3]
    return tuple(read_array(path, key).shape)


def _normalise(arr: np.ndarray, mode: str, name: str) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    if mode == "none":
        return arr
    if mode == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode == "zscore":
        std = float(arr.std())
        return (arr - float(arr.mean())) / std if std > 0 else np.zeros_like(arr)
    raise DataError(f"{name}: unknown intensity normalisation '{mode}' (use none, minmax or zscore)")


class LoadSampled(MapTransform):
    """Load ``image`` (and ``label`` when present) of an item into float tensors ``(1, *spatial)``.

    Args:
        keys: keys to load; ``label`` keys are checked to hold integers in ``[0, num_classes)``.
        layout: ``"slices"`` for 2D models (volumes as ``(S, H, W)``) or ``"volume"`` for 3D models.
        num_classes: number of classes including background; ``None`` skips the label range check.
        intensity: normalisation applied per volume to images read from NIfTI-like files (``"minmax"``,
            ``"zscore"`` or ``"none"``). HDF5 files in the SSL4MIS/UA-MT layout are already normalised and are
            left untouched; in-memory arrays too.
        label_keys: which of ``keys`` are labels.

    The item may carry ``slice_index`` to take one 2D slice out of a ``(S, H, W)`` stack. Problems (missing
    files or datasets, NaN/Inf intensities, labels outside the classes, image/label shape mismatch) raise
    :class:`DataError` naming the file.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        layout: str = "slices",
        num_classes: int | None = None,
        intensity: str = "minmax",
        label_keys: Sequence[str] = ("label",),
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if layout not in ("slices", "volume"):
            raise ValueError(f"layout must be 'slices' or 'volume', got '{layout}'")
        self.layout = layout
        self.num_classes = num_classes
        self.intensity = intensity
        self.label_keys = tuple(label_keys)

    def _load(self, value: Any, key: str, is_label: bool) -> tuple[np.ndarray, str]:
        if isinstance(value, (np.ndarray, torch.Tensor)):
            arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
            return arr, f"<in-memory {key}>"
        if not isinstance(value, (str, os.PathLike)):
            raise DataError(f"item key '{key}' must be a file path or an array, got {type(value).__name__}")
        path = os.fspath(value)
        if is_h5(path):
            return read_array(path, "label" if is_label else "image"), path
        arr = read_array(path, key)
        if not is_label:
            arr = _normalise(arr, self.intensity, path)
        if self.layout == "slices" and arr.ndim == 3:
            arr = np.ascontiguousarray(arr.transpose(2, 1, 0))
        return arr, path

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        slice_index = d.get("slice_index")
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for key in self.key_iterator(d):
            is_label = key in self.label_keys
            arr, name = self._load(d[key], str(key), is_label)
            if slice_index is not None and arr.ndim == 3 and self.layout == "slices":
                if not 0 <= int(slice_index) < arr.shape[0]:
                    raise DataError(f"{name}: slice_index {slice_index} outside 0..{arr.shape[0] - 1}")
                arr = arr[int(slice_index)]
            if arr.ndim < 2:
                raise DataError(f"{name}: '{key}' has shape {arr.shape}; expected a 2D or 3D array")
            if is_label:
                arr = self._check_label(arr, name)
            else:
                arr = arr.astype(np.float32, copy=False)
                if not np.isfinite(arr).all():
                    n_bad = int((~np.isfinite(arr)).sum())
                    raise DataError(f"{name}: image contains {n_bad} NaN/Inf values")
            shapes[str(key)] = (arr.shape, name)
            d[key] = torch.as_tensor(np.ascontiguousarray(arr))[None]
        if len({s for s, _ in shapes.values()}) > 1:
            desc = ", ".join(f"{k} {s} ({n})" for k, (s, n) in shapes.items())
            raise DataError(f"image/label shape mismatch: {desc}")
        return d

    def _check_label(self, arr: np.ndarray, name: str) -> np.ndarray:
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise DataError(f"{name}: label contains NaN/Inf values")
            if not np.array_equal(arr, np.round(arr)):
                raise DataError(f"{name}: label has non-integer values (e.g. {arr[arr != np.round(arr)].flat[0]})")
        if self.num_classes is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.num_classes:
                bad = [int(v) if float(v).is_integer() else float(v)
                       for v in np.unique(arr[(arr < 0) | (arr >= self.num_classes)])[:8].tolist()]
                raise DataError(
                    f"{name}: label values {bad} are outside the {self.num_classes} classes 0..{self.num_classes - 1}"
                )
        return arr.astype(np.float32)


IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def image_files(folder: str) -> list[dict]:
    """``[{"image": path}]`` for every NIfTI/NRRD/MHA file directly in ``folder`` (sorted); an error naming the
    folder if there is none."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: input folder not found")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return [{"image": f} for f in files]


def find_loader(transform: Any) -> LoadSampled | None:
    """The first :class:`LoadSampled` of a transform chain (``Compose`` nested or not), or None."""
    if isinstance(transform, LoadSampled):
        return transform
    for child in getattr(transform, "transforms", None) or ():
        found = find_loader(child)
        if found is not None:
            return found
    return None


def check_label_values(items: Sequence[Mapping], loader: LoadSampled, key: str = "label") -> int:
    """Read the label of every item once (a file shared by several slice items once) and check it as
    ``loader`` does while training: integer values in ``[0, num_classes)``.

    Run before training starts, so a bad label stops the run at once with its file named, instead of when that
    slice is first drawn, inside a loader worker, minutes or hours in. Returns the number of labels read.

    Raises:
        DataError: naming the file (or the in-memory item's name) and the values outside the classes.
    """
    if loader.num_classes is None:
        return 0
    seen: set[str] = set()
    count = 0
    for item in items:
        value = item.get(key)
        if value is None:
            continue
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            if path in seen:
                continue
            seen.add(path)
            arr, name = loader._load(path, key, is_label=True)
        else:
            arr, _ = loader._load(value, key, is_label=True)
            name = f"{item.get('name', 'an in-memory item')} (in-memory {key})"
        loader._check_label(np.asarray(arr), name)
        count += 1
    return count
