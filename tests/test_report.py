"""``tools/report.py``: run folders -> the comparison table (default runs, variants, shipped weights, resumed runs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def report(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("report", REPO_ROOT / "tools" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REPO", tmp_path)
    return module


def _run(root: Path, bundle: str, name: str, dice: float, weights: bytes, summary: dict) -> None:
    run = root / "bundles" / bundle / "runs" / name
    (run / "eval").mkdir(parents=True)
    (run / "models").mkdir()
    per_class = {"dice": dice, "jaccard": dice - 0.1, "hd95": 5.0, "asd": 1.5}
    (run / "eval" / "summary.json").write_text(json.dumps({"RV": per_class, "MYO": per_class, "LV": per_class,
                                                           "mean": per_class}))
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "models" / "model.pt").write_bytes(weights)
    (run / "models" / "validation.jsonl").write_text(
        json.dumps({"iteration": 250, "val_mean_dice": dice / 2}) + "\n" + json.dumps({"iteration": 500, "val_mean_dice": dice}) + "\n")


def test_table_lists_default_runs_variants_and_the_shipped_weights(report, tmp_path):
    full = {"iterations": 1500, "iterations_this_session": 1500, "wall_time_s": 600.0, "best_iteration": 500}
    resumed = {"iterations": 1500, "iterations_this_session": 250, "wall_time_s": 120.0, "best_iteration": 500}
    _run(tmp_path, "supervised", "acdc_cpu_v1_7p", 0.6642, b"sup", resumed)
    _run(tmp_path, "gapmatch", "acdc_cpu_v1_7p", 0.5588, b"alg1", full)
    _run(tmp_path, "gapmatch", "acdc_cpu_v1_7p_em_gap", 0.6749, b"em", full)
    _run(tmp_path, "gapmatch", "acdc_cpu_v1_7p_rampup", 0.7337, b"ramp", full)
    (tmp_path / "bundles" / "supervised" / "models").mkdir(parents=True)
    (tmp_path / "bundles" / "supervised" / "models" / "model.pt").write_bytes(b"sup")
    (tmp_path / "bundles" / "gapmatch" / "models").mkdir(parents=True)
    (tmp_path / "bundles" / "gapmatch" / "models" / "model.pt").write_bytes(b"ramp")
    (tmp_path / "bundles" / "gapmatch" / "runs" / "acdc_cpu_v1_7p_broken").mkdir()  # no evaluation: not listed

    rows = report.collect_runs("acdc_cpu_v1")
    assert [r["label"] for r in rows] == ["supervised (shipped)", "gapmatch", "gapmatch [em_gap]",
                                         "gapmatch [rampup] (shipped)"]
    speed = {"supervised": {"s_per_iteration_median": 0.272, "ratio_to_supervised": 1.0, "pass_count": 1.0},
             "gapmatch": {"s_per_iteration_median": 0.869, "ratio_to_supervised": 3.2, "pass_count": 3.3}}
    lines = report.results_table(rows, speed).splitlines()
    assert len(lines) == 2 + 4
    sup, alg1, em, ramp = lines[2:]
    assert "| 66.42 | 56.42 | 5.00 | 1.50 |" in sup and "2.0 min (last 250 it.)" in sup and "79.41" in sup
    assert "| 55.88 |" in alg1 and "10.0 min |" in alg1 and "3.20 (pass count 3.3)" in alg1 and "90.10" in alg1
    # a variant gets neither the default step's speed row nor the paper's numbers
    assert "| 73.37 |" in ramp and "3.20" not in ramp and "90.10" not in ramp
    # the curves and example panels show each method once: default runs and shipped variants
    assert [r["label"] for r in report._plotted(rows, 7)] == ["supervised (shipped)", "gapmatch",
                                                               "gapmatch [rampup] (shipped)"]
    assert "| 67.49 |" in em
