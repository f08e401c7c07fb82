"""Tests for common.evaluation.metrics: parity with medpy 0.5.2 on real ACDC labels, conventions, tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from common.evaluation import binary_metrics, multiclass_metrics, summarize, write_metric_tables

mb = pytest.importorskip("medpy.metric.binary")

ACDC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ACDC"
ACDC_CASE = ACDC_DIR / "data" / "patient002_frame01.h5"
CLASSES = {1: "RV", 2: "Myo", 3: "LV"}


@pytest.fixture(scope="module")
def acdc_label() -> np.ndarray:
    if not ACDC_CASE.is_file():
        pytest.skip(f"real ACDC data not found at {ACDC_CASE} (shared data folder missing)")
    h5py = pytest.importorskip("h5py")
    with h5py.File(ACDC_CASE, "r") as f:
        return f["label"][:].astype(np.int64)  # (slices, H, W), classes 0..3


def _perturb(label: np.ndarray, kind: str) -> np.ndarray:
    """Deterministic realistic 'prediction' from a label map."""
    if kind == "shift":
        return np.roll(label, shift=(0, 3, -2), axis=(0, 1, 2))
    pred = label.copy()
    cross = ndimage.generate_binary_structure(label.ndim, 1)
    # RV over-segmented into the background, LV rim swallowed by the myocardium.
    pred[ndimage.binary_dilation(label == 1, cross, iterations=2) & (label == 0)] = 1
    lv = label == 3
    pred[lv & ~ndimage.binary_erosion(lv, cross)] = 2
    if kind == "morph_noise":
        # Scattered false positives/negatives far from the structures (tests the pooled HD95).
        rng = np.random.default_rng(0)
        flip = rng.random(label.shape) < 0.002
        pred[flip] = rng.integers(0, 4, size=int(flip.sum()))
    return pred


def _assert_matches_medpy(pred: np.ndarray, gt: np.ndarray, spacing=None) -> None:
    ours = multiclass_metrics(pred, gt, CLASSES, spacing=spacing)
    for c, name in CLASSES.items():
        p, g = pred == c, gt == c
        assert p.any() and g.any()
        m = ours[name]
        assert m["both_empty"] is False
        ref = {
            "dice": mb.dc(p, g),
            "jaccard": mb.jc(p, g),
            "hd95": mb.hd95(p, g, voxelspacing=spacing),
            "asd": mb.asd(p, g, voxelspacing=spacing),
            "assd": mb.assd(p, g, voxelspacing=spacing),
        }
        for key, value in ref.items():
            assert isinstance(m[key], float)
            assert m[key] == pytest.approx(value, abs=1e-3), (name, key, m[key], value)


@pytest.mark.parametrize("kind", ["shift", "morph", "morph_noise"])
def test_matches_medpy_on_acdc(acdc_label: np.ndarray, kind: str) -> None:
    _assert_matches_medpy(_perturb(acdc_label, kind), acdc_label)


def test_matches_medpy_on_acdc_with_spacing(acdc_label: np.ndarray) -> None:
    _assert_matches_medpy(_perturb(acdc_label, "morph_noise"), acdc_label, spacing=(10.0, 1.5625, 1.3))


def test_matches_medpy_2d_touching_border() -> None:
    # Foreground touching the array border: voxels outside must count as background in the erosion.
    g = np.zeros((40, 50), bool)
    g[0:15, 0:20] = True
    p = np.zeros_like(g)
    p[3:18, 2:25] = True
    p[35:40, 45:50] = True
    m = binary_metrics(p, g, spacing=(1.0, 2.5))
    assert m["hd95"] == pytest.approx(mb.hd95(p, g, voxelspacing=(1.0, 2.5)), abs=1e-6)
    assert m["asd"] == pytest.approx(mb.asd(p, g, voxelspacing=(1.0, 2.5)), abs=1e-6)
    assert m["assd"] == pytest.approx(mb.assd(p, g, voxelspacing=(1.0, 2.5)), abs=1e-6)


def test_empty_prediction_scores_zero() -> None:
    g = np.zeros((8, 8), bool)
    g[2:5, 2:5] = True
    m = binary_metrics(np.zeros_like(g), g)
    assert [m[k] for k in ("dice", "jaccard", "hd95", "asd", "assd")] == [0.0] * 5
    assert m["both_empty"] is False


def test_empty_ground_truth_gives_nan_distances() -> None:
    p = np.zeros((8, 8), bool)
    p[2:5, 2:5] = True
    m = binary_metrics(p, np.zeros_like(p))
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert all(math.isnan(m[k]) for k in ("hd95", "asd", "assd"))
    assert m["both_empty"] is False


def test_both_empty_is_nan_and_flagged() -> None:
    z = np.zeros((6, 6, 6), np.uint8)
    m = binary_metrics(z, z)
    assert m["both_empty"] is True
    assert all(math.isnan(m[k]) for k in ("dice", "jaccard", "hd95", "asd", "assd"))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        binary_metrics(np.zeros((4, 5)), np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        multiclass_metrics(np.zeros((4, 5)), np.zeros((5, 4)), {1: "a"})


def _m(d: float, h: float) -> dict[str, float]:
    return {"dice": d, "jaccard": d / 2, "hd95": h, "asd": h / 2, "assd": h / 4}


def test_summarize_ignores_nan_and_averages_classes() -> None:
    nan = float("nan")
    cases = [
        {"A": _m(0.8, 2.0), "B": _m(0.4, nan)},
        {"A": _m(0.6, 4.0), "B": _m(nan, nan)},
    ]
    s = summarize(cases)
    assert list(s) == ["A", "B", "mean"]
    assert s["A"]["dice"] == pytest.approx(0.7) and s["A"]["hd95"] == pytest.approx(3.0)
    assert s["B"]["dice"] == pytest.approx(0.4) and math.isnan(s["B"]["hd95"])
    assert s["mean"]["dice"] == pytest.approx(0.55)
    assert s["mean"]["jaccard"] == pytest.approx(0.275)
    assert s["mean"]["hd95"] == pytest.approx(3.0)  # B's all-NaN mean is ignored


def test_write_metric_tables(tmp_path: Path) -> None:
    nan = float("nan")
    cases = [("case1", {"A": _m(0.8, 2.0), "B": _m(0.4, nan)}), ("case2", {"A": _m(0.6, 4.0), "B": _m(0.2, 1.0)})]
    out = tmp_path / "nested" / "eval"
    summary = write_metric_tables(cases, str(out))
    assert summary["A"]["dice"] == pytest.approx(0.7) and summary["mean"]["dice"] == pytest.approx(0.5)

    with open(out / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # distances name their unit (voxel by default: no spacing was given)
    assert list(rows[0]) == ["case", "class", "dice", "jaccard", "hd95_voxel", "asd_voxel", "assd_voxel"]
    assert [(r["case"], r["class"]) for r in rows] == [("case1", "A"), ("case1", "B"), ("case2", "A"), ("case2", "B")]
    assert float(rows[0]["dice"]) == pytest.approx(0.8)
    assert math.isnan(float(rows[1]["hd95_voxel"]))

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"distance_unit", "cases", "summary"} and metrics["distance_unit"] == "voxel"
    assert metrics["cases"]["case1"]["B"]["hd95"] is None  # NaN stored as null
    assert metrics["cases"]["case2"]["A"]["dice"] == pytest.approx(0.6)
    summary_json = json.loads((out / "summary.json").read_text())
    assert summary_json == {"distance_unit": "voxel", **metrics["summary"]}
    assert summary_json["A"]["dice"] == pytest.approx(0.7)
    assert summary_json["B"]["hd95"] == pytest.approx(1.0)
    assert summary_json["mean"]["dice"] == pytest.approx(0.5)
