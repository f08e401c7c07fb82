"""``tools/report.py``: run folders and committed run records -> the comparison table (default runs, variants,
shipped weights, resumed runs, records without their run folder, archiving)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
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


def _record(root: Path, bundle: str, name: str, dice: float, sha: str | None, **extra) -> Path:
    labeled, variant = re.fullmatch(r"acdc_cpu_v\d+_(\d+)p(?:_(\w+))?", name).groups()
    record = {"record_version": 1, "run": name, "bundle": bundle, "protocol": "acdc_cpu_v1",
              "labeled": int(labeled), "variant": variant,
              "source": "carried over for the test", "model_sha256": sha,
              "eval": {"distance_unit": "voxel", "RV": {"dice": dice}, "MYO": {"dice": dice}, "LV": {"dice": dice},
                       "mean": {"dice": dice, "jaccard": dice - 0.1, "hd95": 7.0, "asd": 2.0}},
              "summary": {"best_iteration": 1250, "wall_time_min": 25.3}, "history": [], **extra}
    path = root / "docs" / "runs" / bundle / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def _shipped(root: Path, bundle: str, weights: bytes) -> str:
    (root / "bundles" / bundle / "models").mkdir(parents=True, exist_ok=True)
    (root / "bundles" / bundle / "models" / "model.pt").write_bytes(weights)
    return hashlib.sha256(weights).hexdigest()


def test_a_record_without_its_run_folder_still_gives_its_row_and_shipped_is_decided_by_sha(report, tmp_path):
    sha = _shipped(tmp_path, "ssnet", b"ssnet weights")
    _record(tmp_path, "ssnet", "acdc_cpu_v1_7p", 0.6944, sha)
    _record(tmp_path, "ssnet", "acdc_cpu_v1_7p_other", 0.60, "0" * 64)  # other weights: not shipped
    _record(tmp_path, "supervised", "acdc_cpu_v1_3p", 0.3151, None,  # not shipped, time of the last session only
            summary={"best_iteration": 500, "wall_time_min": 8.5, "iterations_this_session": 500,
                     "wall_time_last_session_only": True})
    _record(tmp_path, "ssnet", "acdc_cpu_v2_7p", 0.9, sha)  # another protocol: not listed

    rows = report.collect_runs("acdc_cpu_v1")
    assert [r["label"] for r in rows] == ["supervised", "ssnet (shipped)", "ssnet [other]"]
    assert all(r["run"] is None and r["source"] == "carried over for the test" for r in rows)
    speed = {"ssnet": {"s_per_iteration_median": 1.526, "ratio_to_supervised": 5.62, "pass_count": 6.7,
                       "cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "threads": 2}}
    sup, ssnet, other = report.results_table(rows, speed).splitlines()[2:]
    assert "| 31.51 | 21.51 | 7.00 | 2.00 | 31.5 / 31.5 / 31.5 | 500 | 8.5 min (last 500 it.) |" in sup
    assert "| 69.44 | 59.44 |" in ssnet and "| 1250 | 25.3 min | 1.526 | 5.62 (pass count 6.7) | 86.78 |" in ssnet
    assert "| 60.00 |" in other and "1.526" not in other and "86.78" not in other
    # the example panel of a record is drawn with the shipped weights (same sha); other records have no weights
    assert rows[1]["weights"] == tmp_path / "bundles" / "ssnet" / "models" / "model.pt"
    assert rows[0]["weights"] is None and rows[2]["weights"] is None
    notes = report.provenance(rows, speed, tmp_path / "docs" / "speed.jsonl")
    assert "Intel(R) Xeon(R) Processor, 2 cores, 2 torch threads" in notes
    assert "supervised, 3p; ssnet (shipped), 7p; ssnet [other], 7p: carried over for the test." in notes

    # new weights shipped: the record no longer matches them
    _shipped(tmp_path, "ssnet", b"retrained")
    assert [r["label"] for r in report.collect_runs("acdc_cpu_v1")] == ["supervised", "ssnet", "ssnet [other]"]


def test_a_run_folder_overrides_its_record_and_is_archived(report, tmp_path):
    full = {"iterations": 1500, "iterations_this_session": 1500, "wall_time_s": 600.0, "best_iteration": 500,
            "best_model": "/elsewhere/model.pt", "device": "cpu", "torch_threads": 1}
    # the superseded record of the earlier default run keeps its own row, and the method's columns until a new
    # default run exists
    sha_old = _shipped(tmp_path, "cml", b"old cml")
    _record(tmp_path, "cml", "acdc_cpu_v1_7p_v0_1_0", 0.7099, sha_old, superseded=True,
            original_run="acdc_cpu_v1_7p")
    _record(tmp_path, "cml", "acdc_cpu_v1_7p_rampup_v0_1_0", 0.71, None, superseded=True,
            original_run="acdc_cpu_v1_7p_rampup")
    rows = report.collect_runs("acdc_cpu_v1")
    assert [(r["label"], r["method_row"]) for r in rows] == [("cml [v0_1_0] (shipped)", True),
                                                             ("cml [rampup_v0_1_0]", False)]
    speed = {"cml": {"s_per_iteration_median": 0.685, "ratio_to_supervised": 2.52, "pass_count": 2.7}}
    assert "| 0.685 |" in report.results_table(rows, speed).splitlines()[2]

    # a record and the run folder of the same name: the run folder wins
    _record(tmp_path, "cml", "acdc_cpu_v1_7p", 0.50, None)
    _run(tmp_path, "cml", "acdc_cpu_v1_7p", 0.7300, b"new cml", full)
    (tmp_path / "bundles" / "cml" / "runs" / "acdc_cpu_v1_7p_rampup").mkdir()  # still training: no evaluation
    rows = report.collect_runs("acdc_cpu_v1")
    assert [(r["label"], r["method_row"]) for r in rows] == [("cml", True), ("cml [v0_1_0] (shipped)", False),
                                                             ("cml [rampup_v0_1_0]", False)]
    assert rows[0]["run"] == tmp_path / "bundles" / "cml" / "runs" / "acdc_cpu_v1_7p" and rows[0]["history"]
    new, old, _ = report.results_table(rows, speed).splitlines()[2:]
    assert "| 73.00 |" in new and "| 0.685 |" in new and "| 70.99 |" in old and "0.685" not in old
    assert [r["label"] for r in report._plotted(rows, 7)] == ["cml", "cml [v0_1_0] (shipped)"]

    # archiving replaces the record by the run folder's; without the folder the table is the same
    written = report.archive_runs("acdc_cpu_v1")
    path = tmp_path / "docs" / "runs" / "cml" / "acdc_cpu_v1_7p.json"
    assert written == [path]
    record = json.loads(path.read_text())
    assert record["eval"]["mean"]["dice"] == 0.73 and record["eval"]["RV"]["jaccard"] == pytest.approx(0.63)
    assert record["summary"]["wall_time_s"] == 600.0 and "best_model" not in record["summary"]
    assert record["summary"]["torch_threads"] == 1 and record["archived"]["cores"]
    assert [h["iteration"] for h in record["history"]] == [250, 500]
    assert record["source"].startswith("archived by tools/report.py from the run folder "
                                       "bundles/cml/runs/acdc_cpu_v1_7p/")
    assert record["model_sha256"] == hashlib.sha256(b"new cml").hexdigest()
    assert report.archive_runs("acdc_cpu_v1") == []  # unchanged: not rewritten
    table = report.results_table(rows, speed)
    shutil.rmtree(tmp_path / "bundles" / "cml" / "runs")
    _shipped(tmp_path, "cml", b"new cml")  # the new weights shipped: found by sha in the record
    rows = report.collect_runs("acdc_cpu_v1")
    assert [r["label"] for r in rows] == ["cml (shipped)", "cml [v0_1_0]", "cml [rampup_v0_1_0]"]
    assert rows[0]["run"] is None and rows[0]["history"] == record["history"]
    notes = report.provenance(rows, {}, tmp_path / "speed.jsonl")
    assert f"{record['archived']['cpu']}, {record['archived']['cores']} cores (cml (shipped), 7p)" in notes
    assert "Other rows: machine not recorded" in notes
    # the same rows; only "(shipped)" moved to the new run
    assert [l.split(" | ", 1)[1] for l in report.results_table(rows, speed).splitlines()[2:]] == \
        [l.split(" | ", 1)[1] for l in table.splitlines()[2:]]
