"""Issue 15, the configuration side: no wrong result with exit code 0 and no buried message.

* command-line values reach the config with the type of the value they replace (``--resume false``);
* resuming with changed settings either applies them consistently (a longer run rebuilds the LR schedule) or
  stops, listing the differing keys;
* a data setting the chosen source does not read is an error;
* the last line of a failed run is the real error, and the labelled set's labels are checked before training;
* the log is by iteration: one line per validation, no "Epoch[N] Complete", no "resuming" on a fresh run.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ignite.engine import Events

from bundle_cli import BUNDLES, bundle_dir, cli_env, tiny_training_overlay
from common import bundle_utils
from common.data.loading import DataError
from common.engines import CheckpointError
from helpers import TINY_2D, root_cause, run_training, workflow

FAKE_MAIN = "/x/site-packages/monai/bundle/__main__.py"  # what check_cli_overrides recognises as the bundle CLI


def _cli_workflow(monkeypatch, bundle: str, cli: dict, **override):
    """A bundle workflow as ``python -m monai.bundle run training --config_file train.json --k v ...`` builds it:
    the ``--k v`` texts on ``sys.argv``, and the values python-fire hands to MONAI as overrides."""
    from fire.parser import DefaultParseValue

    cfg = str(bundle_dir(bundle) / "configs" / "train.json")
    argv = [FAKE_MAIN, "run", "training", "--config_file", cfg]
    for key, text in cli.items():
        argv += [f"--{key}", text]
    monkeypatch.setattr(sys, "argv", argv)
    fire_values = {key: DefaultParseValue(text) for key, text in cli.items()}
    return workflow(bundle, **{**TINY_2D, **override, **fire_values})


# -- 1. override values as users type them -----------------------------------------------------------------------
@pytest.mark.parametrize("bundle", BUNDLES)
def test_cli_false_and_null_arrive_typed_in_every_bundle(bundle, monkeypatch, tmp_path):
    wf = _cli_workflow(monkeypatch, bundle, {"resume": "false", "num_labeled": "null", "val_interval": "2.0"},
                       output_dir=str(tmp_path))
    assert wf.parser.get_parsed_content("resume") is False
    assert wf.parser.get_parsed_content("train#checkpoint").resume is False
    assert wf.parser.get_parsed_content("num_labeled") is None
    assert wf.parser.get_parsed_content("split").summary()["num_labeled"] == TINY_2D["synthetic"]["num_labeled"]
    val_interval = wf.parser.get_parsed_content("val_interval")
    assert val_interval == 2 and type(val_interval) is int


def test_gapmatch_gap_false_on_the_cli_turns_gap_off(monkeypatch, tmp_path):
    wf = _cli_workflow(monkeypatch, "gapmatch", {"gap": "false"}, output_dir=str(tmp_path))
    assert wf.parser.get_parsed_content("method").gap is None


@pytest.mark.parametrize("text, default, expected", [
    ("false", True, False), ("True", False, True), ("0", True, False), ("yes", False, True),
    ("8", 200, 8), ("1e3", 200, 1000), ("0.5", 0.01, 0.5), ("3", 0.01, 3.0),
    ("null", None, None), ("None", None, None), ("7", None, 7), ("0.9", None, 0.9),
    ("123", "default", "123"), ("1e3", "default", "1e3"), ("007", "default", "007"),
    ("[96,96]", [128, 128], [96, 96]), ("96,96", [128, 128], [96, 96]), ("[96, 96.0]", [128, 128], [96, 96]),
    ('{"num_labeled": 2}', {"num_labeled": 16}, {"num_labeled": 2}),
    ("$@iterations // 2", 50, "$@iterations // 2"), ("@iterations", 50, "@iterations"),
])
def test_override_text_takes_the_type_of_the_value_it_replaces(text, default, expected):
    value = bundle_utils.coerce_override("key", text, default)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key, text, expected", [
    ("resume", "maybe", "--resume: expected true or false"),
    ("iterations", "abc", "--iterations: expected a whole number"),
    ("iterations", "2.5", "--iterations: expected a whole number"),
    ("learning_rate", "fast", "--learning_rate: expected a number"),
    ("num_labeled", "seven", "--num_labeled: expected null or a number"),
    ("patch_size", "big", "--patch_size: expected a list like [128, 128]"),
    ("patch_size", "[96,x]", "--patch_size: expected a list like [128, 128]"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_option(key, text, expected):
    cfg = str(bundle_dir("supervised") / "configs" / "train.json")
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")) as info:
        bundle_utils.check_cli_overrides([FAKE_MAIN, "run", "training", "--config_file", cfg, f"--{key}", text])
    assert text in str(info.value)


def test_a_refused_override_names_a_referenced_default():
    """VFD's adv_rampup defaults to "@iterations": the message names the reference, not only the number it has in
    the config files (the run may set --iterations too)."""
    cfg = str(bundle_dir("vfd") / "configs" / "train.json")
    argv = [FAKE_MAIN, "run", "training", "--config_file", cfg, "--iterations", "4", "--adv_rampup", "2.5"]
    with pytest.raises(ValueError, match=r'--adv_rampup: expected a whole number \(its default is "@iterations", '
                                         r"200 in the config files\), got '2.5'"):
        bundle_utils.check_cli_overrides(argv)


def test_cli_resume_false_trains_a_new_run(tmp_path):
    """README's ``--resume false``, typed as documented, after a finished run of the same name."""
    overlay = tiny_training_overlay(tmp_path / "tiny.json", tmp_path / "run", resume=True)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           f"['{bundle_dir('supervised') / 'configs' / 'train.json'}','{overlay}']"]
    import subprocess

    first = subprocess.run(cmd, cwd=str(tmp_path), env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(cmd + ["--resume", "false"], cwd=str(tmp_path), env=cli_env(OMP_NUM_THREADS="1"),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations_this_session"] == TINY_2D["iterations"]
    assert "resume is false: starting a new run" in again.stdout + again.stderr


# -- 2. same run name, changed settings ----------------------------------------------------------------------------
def _expected_lrs(bundle: str, folder: Path, params: dict, first: int, total: int) -> list[float]:
    """The learning rates of iterations ``first+1..total`` of an uninterrupted run of ``total`` iterations."""
    reference = workflow(bundle, output_dir=str(folder), **{**TINY_2D, **params, "iterations": total})
    scheduler = reference.parser.get_parsed_content("lr_scheduler")
    lrs = []
    for t in range(total):  # iteration t + 1 runs at the scheduler's position t
        if t >= first:
            lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.step()
    return lrs


@pytest.mark.parametrize("bundle", BUNDLES)
def test_longer_run_on_resume_rebuilds_the_lr_schedule(bundle, tmp_path, caplog):
    # poly in every bundle; CML runs its schedule after pre-training, so pre-train for 2 iterations only
    params = {"val_interval": 4, "lr_schedule": "poly", **({"pretrain_iterations": 2} if bundle == "cml" else {})}
    run_training(bundle, tmp_path / "run", **params, iterations=4)

    caplog.set_level(logging.INFO)
    again = workflow(bundle, output_dir=str(tmp_path / "run"), **{**TINY_2D, **params, "iterations": 8})
    lrs = []
    optimizer = again.parser.get_parsed_content("optimizer")
    again.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_STARTED, lambda e: lrs.append((e.state.iteration, optimizer.param_groups[0]["lr"])))
    again.run()
    assert [i for i, _ in lrs] == [5, 6, 7, 8]
    expected = _expected_lrs(bundle, tmp_path / "reference", params, 4, 8)
    assert all(lr > 0 for lr in expected)
    assert [lr for _, lr in lrs] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    if bundle == "supervised":  # the numbers: lr 0.01, power 0.9, over 8 iterations
        assert [round(lr, 5) for _, lr in lrs] == [0.00536, 0.00414, 0.00287, 0.00154]
    assert "with changed settings (iterations: 4 -> 8)" in caplog.text


@pytest.mark.parametrize("bundle, change, listed", [
    ("supervised", {"learning_rate": 0.02}, "learning_rate: 0.01 -> 0.02"),
    ("supervised", {"synthetic": {**TINY_2D["synthetic"], "num_labeled": 6}}, "synthetic#num_labeled: 8 -> 6"),
    ("supervised", {"network_def#dropout": [0.1] * 5}, "network_def#dropout: (absent) -> [0.1, 0.1, 0.1, 0.1, 0.1]"),
    ("gapmatch", {"gap": False}, "gap: true -> false"),
])
def test_resume_with_changed_method_data_or_network_is_refused(bundle, change, listed, tmp_path):
    run_training(bundle, tmp_path, iterations=2, val_interval=2)
    again = workflow(bundle, output_dir=str(tmp_path), **{**TINY_2D, "iterations": 2, "val_interval": 2, **change})
    with pytest.raises(RuntimeError) as info:
        again.run()
    err = root_cause(info.value)
    assert isinstance(err, CheckpointError)
    assert listed in str(err) and "--resume false" in str(err) and "--run_name" in str(err)


def test_resume_past_a_shorter_length_is_refused(tmp_path):
    run_training("supervised", tmp_path, iterations=4, val_interval=4)
    again = workflow("supervised", output_dir=str(tmp_path), **{**TINY_2D, "iterations": 2, "val_interval": 2})
    with pytest.raises(RuntimeError) as info:
        again.run()
    assert "is at iteration 4, past this run's 2 iterations" in str(root_cause(info.value))


# -- 3. a data setting the chosen source does not read ----------------------------------------------------------
@pytest.mark.parametrize("bundle", BUNDLES)
def test_dataset_dir_with_the_synthetic_source_is_refused(bundle, tmp_path):
    wf = workflow(bundle, output_dir=str(tmp_path / "run"), **{**TINY_2D, "dataset_dir": str(tmp_path)})
    with pytest.raises(RuntimeError) as info:
        wf.parser.get_parsed_content("split")
    err = root_cause(info.value)
    assert isinstance(err, DataError)
    assert "dataset_dir is set" in str(err) and "data_source is 'synthetic'" in str(err)
    assert "--data_source acdc" in str(err)


def test_synthetic_settings_with_another_source_are_refused():
    cfg = str(bundle_dir("supervised") / "configs" / "train.json")
    with pytest.raises(ValueError, match="--synthetic#num_labeled is set but data_source is 'acdc'"):
        bundle_utils.check_cli_overrides([FAKE_MAIN, "run", "training", "--config_file", cfg, "--data_source", "acdc",
                                          "--synthetic#num_labeled", "3"])


# -- 9. the real error last, labels checked before training ---------------------------------------------------------
def _nifti_datalist(folder: Path, bad_label_value: int | None = None, missing: bool = False) -> tuple[Path, Path]:
    """Two labelled NIfTI volumes (64x64x2), one unlabelled, one for validation; the second labelled volume's
    label gets ``bad_label_value`` in one voxel. Returns the datalist and the bad (or missing) file."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)

    def pair(name: str) -> dict:
        image = rng.random((64, 64, 2)).astype(np.float32)
        label = np.zeros((64, 64, 2), np.uint8)
        label[20:40, 20:40] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / f"{name}_seg.nii.gz"))
        return {"image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz"}

    training = [pair("case0"), pair("case1")]
    bad = folder / "case1_seg.nii.gz"
    if bad_label_value is not None:
        label = np.zeros((64, 64, 2), np.uint8)
        label[10, 10, 1] = bad_label_value
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(bad))
    unlabeled = [{"image": pair("case2")["image"]}]
    validation = [pair("case3")]
    if missing:
        bad = folder / "case9.nii.gz"
        unlabeled.append({"image": bad.name})
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": training, "unlabeled": unlabeled, "validation": validation}))
    return datalist, bad


def test_labels_out_of_range_stop_before_training_naming_the_file(tmp_path):
    datalist, bad = _nifti_datalist(tmp_path / "data", bad_label_value=7)
    wf = workflow("supervised", output_dir=str(tmp_path / "run"),
                  **{**TINY_2D, "data_source": "datalist", "dataset_dir": str(datalist)})
    with pytest.raises(RuntimeError) as info:
        wf.parser.get_parsed_content("train#dataloader")  # built before the first iteration
    err = root_cause(info.value)
    assert isinstance(err, DataError) and str(bad) in str(err) and "[7]" in str(err)


@pytest.mark.parametrize("case", ["bad_label", "missing_file"])
def test_cli_last_line_is_the_real_error(case, tmp_path):
    import subprocess

    datalist, bad = _nifti_datalist(tmp_path / "data", bad_label_value=7 if case == "bad_label" else None,
                                    missing=case == "missing_file")
    overlay = tiny_training_overlay(tmp_path / "tiny.json", tmp_path / "run")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           f"['{bundle_dir('supervised') / 'configs' / 'train.json'}','{overlay}']",
           "--data_source", "datalist", "--dataset_dir", str(datalist)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert str(bad) in last and last.startswith("DataError: "), proc.stderr[-3000:]
    if case == "bad_label":
        assert "[7]" in last


# -- logging by iteration ----------------------------------------------------------------------------------------
def test_fresh_run_logs_one_line_per_validation_and_no_epochs(tmp_path):
    import subprocess

    # 6 iterations over an epoch of 4 (8 labelled / batch 2): Ignite would log its epoch lines
    overlay = tiny_training_overlay(tmp_path / "tiny.json", tmp_path / "run", iterations=6, val_interval=2)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           f"['{bundle_dir('supervised') / 'configs' / 'train.json'}','{overlay}']"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Epoch[" not in out and "resuming" not in out.lower() and "resumed" not in out
    assert "Metrics --" not in out and "Key metric" not in out and "Got new best" not in out
    assert len([line for line in out.splitlines() if "validation at iteration" in line]) == 3
    history = (tmp_path / "run" / "models" / "validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in history] == [2, 4, 6]
