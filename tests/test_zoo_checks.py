"""The MONAI model-zoo checks (``ci/verify_bundle.py`` and ``ci/unit_tests``), mirrored offline for every bundle.

Every bundle with ``configs/metadata.json`` is checked: required files, version and changelog, metadata against
the zoo schema, bundle properties of the train and inference workflows, ``verify_net_in_out``, and a short
training run through ``python -m monai.bundle run training`` (which also checks TensorBoard logging, the
progress bar and the end-of-run summary: the defaults a user sees).
"""

from __future__ import annotations

import json
import re

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata, verify_net_in_out

from bundle_cli import BUNDLES, Timer, bundle_config, bundle_dir, run_cli, tiny_training_overlay
from helpers import TINY_2D, workflow

#: files a bundle of this project ships (the zoo requires LICENSE and metadata.json and prefers inference.json)
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/inference.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
)


@pytest.fixture(params=BUNDLES)
def bundle(request) -> str:
    return request.param


def test_required_files(bundle):
    root = bundle_dir(bundle)
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    assert not missing, f"bundles/{bundle} lacks {missing}"


def test_version_and_changelog(bundle):
    meta = bundle_config(bundle, "metadata.json")
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta.get("version", "")), f"version {meta.get('version')!r} is not x.y.z"
    assert meta["version"] in meta.get("changelog", {}), f"changelog lacks the current version {meta['version']}"


def test_metadata_valid_against_zoo_schema(bundle, schema_path):
    meta_file = bundle_dir(bundle) / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    schema = json.loads(schema_path.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(meta), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)
    # MONAI's own verb (offline: the schema file exists, so nothing is downloaded); raises on failure
    verify_metadata(meta_file=str(meta_file), filepath=str(schema_path))
    # what ckpt_export, verify_net_in_out and MONAI Label read
    fmt = meta["network_data_format"]
    assert "image" in fmt["inputs"] and "pred" in fmt["outputs"]
    assert "background" in fmt["outputs"]["pred"]["channel_def"].values()


def _nifti_folder(folder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).random((48, 40, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / "case0.nii.gz"))
    return str(folder)


def test_check_properties_clean_train(bundle, tmp_path):
    wf = workflow(bundle, ("train.json",), workflow_type="train", output_dir=str(tmp_path), **TINY_2D)
    assert wf.check_properties() == []


def test_check_properties_clean_inference(bundle, tmp_path):
    wf = workflow(bundle, ("inference.json",), workflow_type="infer", output_dir=str(tmp_path / "eval"),
                  dataset_dir=_nifti_folder(tmp_path / "input"))
    assert wf.check_properties() == []


def test_verify_net_in_out(bundle):
    root = bundle_dir(bundle)
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=str(root / "configs" / "inference.json"), bundle_root=str(root), device="cpu")
    # MONAI checks channels and dtype only; a segmentation network must also keep the spatial size
    meta = bundle_config(bundle, "metadata.json")["network_data_format"]
    net = workflow(bundle, ("inference.json",), workflow_type="infer").parser.get_parsed_content("network_def")
    shape = meta["inputs"]["image"]["spatial_shape"]
    x = torch.rand(1, meta["inputs"]["image"]["num_channels"], *[s if isinstance(s, int) else 64 for s in shape])
    with torch.no_grad():
        y = net.eval()(x)
    assert tuple(y.shape) == (1, meta["outputs"]["pred"]["num_channels"], *x.shape[2:])


def test_short_training_through_the_cli(bundle, tmp_path):
    """``python -m monai.bundle run training`` from the bundle folder, as the zoo's unit tests run bundles."""
    out = tmp_path / "run"
    overlay = tiny_training_overlay(tmp_path / "tiny.json", out)
    with Timer(f"{bundle} cli training (4 iterations)"):
        proc = run_cli(["-m", "monai.bundle", "run", "training", "--config_file",
                        f"['configs/train.json','{overlay}']"], cwd=bundle_dir(bundle))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == TINY_2D["iterations"] and summary["skipped_iterations"] == 0
    assert summary["best_iteration"] in (2, 4) and (out / "models" / "model.pt").is_file()
    # tracking by default: TensorBoard event files in the run folder
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard event file in the run folder"
    # a progress bar with the step's losses (tqdm writes to stderr), and the end-of-run summary on stdout
    bar = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("training:")]
    assert bar and "loss=" in bar[-1] and f"{TINY_2D['iterations']}/{TINY_2D['iterations']}" in bar[-1], bar[-3:]
    assert "training finished" in proc.stdout and "best_value" in proc.stdout
