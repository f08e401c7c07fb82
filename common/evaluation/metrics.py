"""Segmentation metrics with medpy 0.5.2 semantics (methods/base.md section 6).

This is the ONE metric definition of the project: validation (the ``val_mean_dice`` that selects
``models/model.pt``), evaluation tables and reports all use it (SSL4MIS/medpy semantics: a class whose ground
truth is empty in a volume but predicted there scores Dice 0; MONAI's ``MeanDice`` would drop it).

Definitions (all distances in voxel units, or in the units of ``spacing`` when given, normally mm):

- surface(A) = A minus its one-step binary erosion with the connectivity-1 (cross) element,
  voxels outside the array counting as background;
- d(A->B) = Euclidean distance of every surface voxel of A to the nearest surface voxel of B;
- dice = 2|P∩G| / (|P| + |G|), jaccard = |P∩G| / |P∪G|;
- hd95 = 95th percentile (numpy linear interpolation) of the POOLED d(P->G) and d(G->P);
- asd = mean of d(P->G) only (directed, as medpy ``asd``);
- assd = mean of the POOLED d(P->G) and d(G->P) (as medpy 0.5.2 ``assd``; older medpy releases
  averaged the two directed means instead); the VFD paper's ASSD.

Empty-mask conventions of :func:`binary_metrics`:

- prediction empty, ground truth not: every metric is 0 (the papers' code convention; it flatters
  hd95/asd, kept for parity with the published tables);
- ground truth empty, prediction not: dice = jaccard = 0, hd95 = asd = assd = NaN;
- both empty: every metric is NaN and ``both_empty`` is True so callers can skip the case.

NaN values are ignored by :func:`summarize`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.metrics.utils import get_mask_edges
from scipy import ndimage

__all__ = [
    "METRIC_KEYS",
    "DISTANCE_KEYS",
    "DISTANCE_UNITS",
    "binary_metrics",
    "multiclass_metrics",
    "summarize",
    "write_metric_tables",
    "metric_column",
]

#: Metric names, in the column order used by the tables.
METRIC_KEYS: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd", "assd")

#: The metrics that are distances (their unit is ``voxel`` or ``mm``).
DISTANCE_KEYS: tuple[str, ...] = ("hd95", "asd", "assd")

#: Units a distance can be reported in: ``voxel`` (no spacing) or ``mm`` (NIfTI/NRRD/MHA header spacing).
DISTANCE_UNITS: tuple[str, ...] = ("voxel", "mm")

_NAN = float("nan")


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {pred.shape} and gt {gt.shape}")
    if pred.ndim < 2:
        raise ValueError(f"masks must have at least 2 dimensions, got shape {pred.shape}")
    return pred, gt


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (d(P->G), d(G->P)) as float64 arrays; both masks non-empty, bool."""
    # MONAI's get_mask_edges with spacing=None is scipy's binary_erosion with the default cross element
    # on a zero-padded bounding-box crop: identical to medpy's surface. Never pass spacing to it (that
    # switches to sub-voxel edges); spacing is applied in the distance transform only.
    edges_p, edges_g = get_mask_edges(pred, gt, crop=True)
    edges_p, edges_g = np.asarray(edges_p, dtype=bool), np.asarray(edges_g, dtype=bool)
    # Hand-written: MONAI's get_surface_distance returns float32 (off medpy's float64 by ~1e-5 beyond
    # ~100 voxels), so the distances use scipy's exact float64 EDT as medpy does.
    d_pg = ndimage.distance_transform_edt(~edges_g, sampling=spacing)[edges_p]
    d_gp = ndimage.distance_transform_edt(~edges_p, sampling=spacing)[edges_g]
    return d_pg, d_gp


def binary_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, distances: bool = True
) -> dict[str, Any]:
    """Dice, Jaccard, HD95, ASD and ASSD of one binary mask pair.

    Args:
        pred: prediction mask, shape (D1, ..., Dn) with n >= 2; non-zero voxels are foreground.
        gt: ground-truth mask of the same shape.
        spacing: optional voxel spacing, one value per axis of ``pred`` in the ARRAY's axis order
            (medpy's ``voxelspacing``); ``None`` means voxel units.
        distances: ``False`` skips the surface distances (hd95/asd/assd are NaN): the overlap metrics alone
            are cheap, which is what validation's Dice needs.

    Returns:
        ``{"dice", "jaccard", "hd95", "asd", "assd"}`` as python floats, plus ``"both_empty"`` (bool),
        True only when both masks are empty (then every metric is NaN). See the module docstring for
        the empty-mask conventions.

    Raises:
        ValueError: if the shapes differ (the message names both), ndim < 2, or ``spacing`` has the
            wrong length.
    """
    pred, gt = _check_pair(pred, gt)
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) != pred.ndim:
            raise ValueError(f"spacing has {len(spacing)} values but the masks have shape {pred.shape}")
    p, g = pred.astype(bool), gt.astype(bool)
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))

    if n_p == 0 and n_g == 0:
        return {**{k: _NAN for k in METRIC_KEYS}, "both_empty": True}
    if n_p == 0:
        return {**{k: 0.0 for k in METRIC_KEYS}, "both_empty": False}
    inter = int(np.count_nonzero(p & g))
    dice = 2.0 * inter / (n_p + n_g)
    jaccard = inter / (n_p + n_g - inter)
    if n_g == 0 or not distances:
        return {"dice": dice, "jaccard": jaccard, "hd95": _NAN, "asd": _NAN, "assd": _NAN, "both_empty": False}

    d_pg, d_gp = _surface_distances(p, g, spacing)
    # Hand-written: MONAI's HausdorffDistanceMetric(percentile=95) takes the max of the two directed
    # percentiles, whereas medpy takes the percentile of the pooled distances.
    pooled = np.concatenate([d_pg, d_gp])
    hd95 = float(np.percentile(pooled, 95))
    asd = float(d_pg.mean())
    assd = float(pooled.mean())
    return {"dice": dice, "jaccard": jaccard, "hd95": hd95, "asd": asd, "assd": assd, "both_empty": False}


def multiclass_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    class_names: Mapping[int, str],
    spacing: Sequence[float] | None = None,
    distances: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`binary_metrics` of ``pred == c`` vs ``gt == c`` for every class ``c`` in ``class_names``.

    Args:
        pred: integer label map, shape (D1, ..., Dn) with n >= 2.
        gt: integer label map of the same shape.
        class_names: class index -> name; background is only evaluated if listed.
        spacing: optional voxel spacing, one value per axis (array order).
        distances: see :func:`binary_metrics`.

    Returns:
        ``{name: binary_metrics(...)}`` in the order of ``class_names``.
    """
    pred, gt = _check_pair(pred, gt)
    return {name: binary_metrics(pred == c, gt == c, spacing, distances) for c, name in class_names.items()}


def _nanmean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else _NAN


def summarize(cases: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """NaN-ignoring mean of each metric per class over cases, plus the mean over classes.

    Args:
        cases: one ``{class_name: {metric: value}}`` dict per case (as from :func:`multiclass_metrics`).

    Returns:
        ``{class_name: {metric: mean}, ..., "mean": {metric: mean over the classes' means}}``; classes in
        order of first appearance; a metric that is NaN everywhere stays NaN.
    """
    class_order: list[str] = []
    for case in cases:
        class_order.extend(name for name in case if name not in class_order)
    summary: dict[str, dict[str, float]] = {
        name: {k: _nanmean([case[name][k] for case in cases if name in case]) for k in METRIC_KEYS}
        for name in class_order
    }
    summary["mean"] = {k: _nanmean([summary[name][k] for name in class_order]) for k in METRIC_KEYS}
    return summary


def _json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None (JSON null) recursively."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def metric_column(metric: str, distance_unit: str) -> str:
    """Column / display name of ``metric``: distances carry their unit (``hd95_mm``, ``hd95_voxel``)."""
    return f"{metric}_{distance_unit}" if metric in DISTANCE_KEYS else metric


def write_metric_tables(
    cases: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]],
    out_dir: str | os.PathLike,
    distance_unit: str = "voxel",
) -> dict[str, dict[str, float]]:
    """Write ``metrics_per_case.csv``, ``metrics.json`` and ``summary.json`` into ``out_dir``.

    Args:
        cases: ``(case_name, {class_name: {metric: value}})`` pairs.
        out_dir: output folder, created if needed.
        distance_unit: ``"voxel"`` or ``"mm"``: the unit the distances of ``cases`` are in; it names the CSV
            columns (``hd95_mm`` ...) and is stored as ``"distance_unit"`` in both JSON files.

    Returns:
        :func:`summarize` of the cases. The CSV has one row per case x class (columns ``case, class, dice,
        jaccard, hd95_<unit>, asd_<unit>, assd_<unit>``; NaN written as ``nan``); the JSON files store NaN as
        null. ``metrics.json`` is ``{"distance_unit", "cases": {case: {class: metrics}}, "summary": summary}``;
        ``summary.json`` is ``summary`` plus ``"distance_unit"``.

    Raises:
        ValueError: ``distance_unit`` is not one of :data:`DISTANCE_UNITS`.
    """
    if distance_unit not in DISTANCE_UNITS:
        raise ValueError(f"distance_unit must be one of {DISTANCE_UNITS}, got {distance_unit!r}")
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize([per_class for _, per_class in cases])
    with open(os.path.join(out_dir, "metrics_per_case.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "class", *(metric_column(k, distance_unit) for k in METRIC_KEYS)])
        for case_name, per_class in cases:
            for class_name, m in per_class.items():
                writer.writerow([case_name, class_name, *(repr(float(m[k])) for k in METRIC_KEYS)])
    per_case = {case_name: per_class for case_name, per_class in cases}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(_json_safe({"distance_unit": distance_unit, "cases": per_case, "summary": summary}), f, indent=2,
                  allow_nan=False)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(_json_safe({"distance_unit": distance_unit, **summary}), f, indent=2, allow_nan=False)
    return summary
