"""The shipped weights' training geometry (metadata.json) and the checks inference runs against it.

A 2D model sees every slice resized to its training patch, normalised as in training and oriented as the
training slices. ``metadata.json`` records these under ``"training_geometry"`` (a top-level key, allowed by the
MONAI bundle schema); ``inference.json`` reads its defaults from there, and :func:`check_training_geometry`
refuses an override that contradicts it (e.g. ``--patch_size [96,96]`` with weights trained on 128x128 slices
gives near-empty segmentations without any error) unless ``--geometry_mismatch warn`` is given.

:class:`InferenceInputs` checks every input file before inference: a file that cannot be segmented (a 4D
multi-channel or cine image, a 1D array, an unreadable file) is reported by name and skipped, the others are
processed, and :meth:`InferenceInputs.finish` ends the run with a non-zero exit listing the failures.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any, Mapping

__all__ = [
    "GEOMETRY_KEY",
    "GEOMETRY_FIELDS",
    "GeometryError",
    "read_training_geometry",
    "check_training_geometry",
    "InferenceInputs",
]

logger = logging.getLogger(__name__)

#: metadata.json key holding the training geometry
GEOMETRY_KEY = "training_geometry"
#: fields every training geometry has; the first three are compared with the inference settings
GEOMETRY_FIELDS = ("patch_size", "intensity_normalisation", "image_interpolation", "input_layout", "spatial_dims")

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


class GeometryError(ValueError):
    """Inference settings that contradict the weights' training geometry, or a metadata file without it."""


def read_training_geometry(meta_file: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json["training_geometry"]`` of a bundle.

    Returns:
        A dict with at least :data:`GEOMETRY_FIELDS`: ``patch_size`` (list of ints, the slices/patches the
        weights were trained on), ``intensity_normalisation`` (``minmax``/``zscore``/``none``),
        ``image_interpolation`` (resize of the image to the patch), ``input_layout`` (``WHS``: NIfTI
        ``(x, y, z)``, see :mod:`common.evaluation.inferers`), ``spatial_dims``.

    Raises:
        GeometryError: file missing/unreadable, key or field missing (the message names file and key).
    """
    meta_file = os.fspath(meta_file)
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GeometryError(f"{meta_file}: cannot read the bundle metadata ({type(e).__name__}: {e})") from e
    geometry = meta.get(GEOMETRY_KEY)
    if not isinstance(geometry, Mapping):
        raise GeometryError(f"{meta_file}: no '{GEOMETRY_KEY}' object (patch_size, intensity_normalisation, "
                            "image_interpolation, input_layout, spatial_dims of the shipped weights)")
    missing = [k for k in GEOMETRY_FIELDS if k not in geometry]
    if missing:
        raise GeometryError(f"{meta_file}: '{GEOMETRY_KEY}' lacks {missing}")
    return dict(geometry)


def check_training_geometry(geometry: Mapping[str, Any], on_mismatch: str = "error", weights: str | None = None,
                            shipped_weights: str | None = None, **used: Any) -> list[str]:
    """Compare the inference settings ``used`` (e.g. ``patch_size=[96, 96]``) with the training ``geometry``.

    Args:
        geometry: from :func:`read_training_geometry`.
        on_mismatch: ``"error"`` (default), ``"warn"`` or ``"ignore"``.
        weights, shipped_weights: the checkpoint used and the bundle's own ``models/model.pt``. The metadata
            describes the shipped weights only: other weights (``--ckpt_path``, e.g. a 3D V-Net with ``la.json``)
            are not checked against it.
        used: setting name -> value; names absent from ``geometry`` are not compared.

    Returns:
        One line per differing setting (empty when everything matches).

    Raises:
        GeometryError: a setting differs and ``on_mismatch == "error"``; the message names every differing
            key with both values and how to proceed.
        ValueError: unknown ``on_mismatch``.
    """
    if on_mismatch not in ("error", "warn", "ignore"):
        raise ValueError(f"geometry_mismatch must be 'error', 'warn' or 'ignore', got {on_mismatch!r}")

    if weights is not None and shipped_weights is not None and \
            os.path.realpath(os.fspath(weights)) != os.path.realpath(os.fspath(shipped_weights)):
        logger.info("weights %s are not the bundle's shipped %s: their geometry is not checked against "
                    "metadata.json", weights, shipped_weights)
        return []

    def norm(v: Any) -> Any:
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    diffs = [f"{k} {norm(v)!r} (weights trained with {norm(geometry[k])!r})"
             for k, v in used.items() if k in geometry and norm(v) != norm(geometry[k])]
    if not diffs or on_mismatch == "ignore":
        return diffs
    message = ("inference settings differ from the weights' training geometry (metadata.json "
               f"'{GEOMETRY_KEY}'): " + "; ".join(diffs) + ". Predictions are likely to be wrong; drop the "
               "override, or pass --geometry_mismatch warn if these weights were trained that way")
    if on_mismatch == "error":
        raise GeometryError(message)
    warnings.warn(message, stacklevel=2)
    logger.warning(message)
    return diffs


def _reason(path: str, spatial_dims: int) -> str | None:
    """Why ``path`` cannot be segmented by a one-channel model, or None."""
    try:
        if path.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).shape)  # header only
        else:
            from monai.transforms import LoadImage

            shape = tuple(int(s) for s in LoadImage(image_only=True)(path).shape)
    except Exception as e:  # any reader failure is this file's problem, not the run's
        return f"cannot be read as an image ({type(e).__name__}: {e})"
    core = shape
    while len(core) > 3 and core[-1] == 1:  # (X, Y, Z, 1): a 3D volume with a singleton 4th axis
        core = core[:-1]
    if len(core) > 3:
        extra = core[3:]
        what = "a cine/time series" if len(extra) == 1 and extra[0] > 3 else "a multi-channel image"
        return (f"shape {shape} is {len(shape)}D ({what}: {'x'.join(map(str, extra))} along axes 4+); the model "
                f"takes one-channel {'2D or 3D' if spatial_dims == 2 else '3D'} images: save each frame/channel "
                "as its own file")
    if len(core) < 2:
        return f"shape {shape}: expected a 2D image or a 3D volume"
    if spatial_dims == 3 and len(core) != 3:
        return f"shape {shape}: the 3D model needs a 3D volume"
    if min(core) < 1:
        return f"shape {shape} is empty"
    return None


class InferenceInputs:
    """The input files of an inference run, each checked before anything runs.

    Args:
        dataset_dir: a folder (every NIfTI/NRRD/MHA file directly in it, sorted) or one image file.
        spatial_dims: 2 (slice-wise model: 2D images and 3D volumes accepted) or 3.

    Attributes:
        items: ``[{"image": path}]`` of the files that passed (the datalist).
        failures: ``[(path, reason)]`` of those that did not; each is logged when found.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist or holds no image file (message names it).
    """

    def __init__(self, dataset_dir: str | os.PathLike, spatial_dims: int = 2) -> None:
        dataset_dir = os.fspath(dataset_dir)
        if os.path.isfile(dataset_dir):
            files = [dataset_dir]
        elif os.path.isdir(dataset_dir):
            files = sorted(os.path.join(dataset_dir, f) for f in os.listdir(dataset_dir)
                           if f.lower().endswith(IMAGE_SUFFIXES))
        else:
            raise FileNotFoundError(f"dataset_dir {dataset_dir}: input folder or file not found")
        if not files:
            raise FileNotFoundError(f"dataset_dir {dataset_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.dataset_dir = dataset_dir
        self.items: list[dict] = []
        self.failures: list[tuple[str, str]] = []
        for path in files:
            reason = _reason(path, spatial_dims)
            if reason is None:
                self.items.append({"image": path})
            else:
                self.failures.append((path, reason))
                logger.error("skipping %s: %s", path, reason)
                print(f"skipping {path}: {reason}", file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return len(self.items)

    def finish(self, output_dir: str | None = None) -> None:
        """End of the run: nothing if every input was segmented, else exit non-zero with one line per failure.

        Raises:
            SystemExit: (code 1) with the list of failed files and reasons as its last line. SystemExit rather
                than an exception so that MONAI's config evaluation does not bury it under "Failed to evaluate".
        """
        done = len(self.items)
        if not self.failures:
            return
        where = f" (written to {output_dir})" if output_dir and done else ""
        lines = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in self.failures)
        raise SystemExit(f"inference failed for {len(self.failures)} of {done + len(self.failures)} inputs in "
                         f"{self.dataset_dir}, the other {done} were segmented{where}. Failed: {lines}")
