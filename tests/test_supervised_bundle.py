"""The supervised bundle end to end: evaluation tables, NIfTI inference matching the HDF5 protocol, layouts."""

from __future__ import annotations

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.networks import UNet2D
from helpers import TINY_2D, run_training, workflow


def _reference_prediction(net: torch.nn.Module, volume: np.ndarray, patch=(128, 128)) -> np.ndarray:
    """The ACDC protocol written out by hand: resize each (H, W) slice, predict, nearest back, arg-max."""
    out = []
    with torch.no_grad():
        for sl in volume:
            x = torch.as_tensor(sl, dtype=torch.float32)[None, None]
            y = net(F.interpolate(x, size=patch, mode="bilinear", align_corners=True))
            y = F.interpolate(y, size=sl.shape, mode="nearest")
            out.append(y.argmax(1)[0].numpy())
    return np.stack(out)


def test_nifti_inference_matches_the_slice_protocol(acdc_dir, tmp_path):
    with h5py.File(acdc_dir / "data" / "patient002_frame01.h5") as f:
        image = f["image"][()]  # (S, H, W), non-square 256 x 232
    affine = np.diag([1.37, 1.37, 10.0, 1.0])  # anisotropic spacing, as in ACDC
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(tmp_path / "in" / "case.nii.gz"))
    torch.manual_seed(0)
    net = UNet2D()
    with torch.no_grad():  # give BatchNorm real statistics and sharpen the head: a varied, deterministic net
        x = F.interpolate(torch.as_tensor(image)[:, None], size=(128, 128), mode="bilinear", align_corners=True)
        for _ in range(3):
            net.train()(x)
        net.head.weight.mul_(50.0)
    net.eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")

    wf = workflow("supervised", ("inference.json",), workflow_type="inference", dataset_dir=str(tmp_path / "in"),
                  output_dir=str(tmp_path / "out"), ckpt_path=str(tmp_path / "model.pt"))
    assert wf.check_properties() == []
    wf.run()
    seg = nib.load(str(tmp_path / "out" / "case_seg.nii.gz"))
    assert seg.shape == (232, 256, 10) and np.allclose(seg.affine, affine)
    predicted = np.asarray(seg.dataobj).transpose(2, 1, 0)
    expected = _reference_prediction(net, image)
    assert len(np.unique(expected)) > 1  # a random net still gives a non-trivial map, so a transpose would show
    np.testing.assert_array_equal(predicted, expected)


def test_evaluate_writes_per_class_tables(tmp_path):
    run_training("supervised", tmp_path, iterations=2, val_interval=2)
    wf = workflow("supervised", ("train.json", "evaluate.json"), **TINY_2D, output_dir=str(tmp_path))
    wf.run()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary) >= {"RV", "MYO", "LV", "mean"}
    assert set(summary["mean"]) >= {"dice", "jaccard", "hd95", "asd"}
    rows = (tmp_path / "eval" / "metrics_per_case.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 3  # header + 2 validation volumes x 3 classes


def test_missing_weights_are_named(tmp_path):
    wf = workflow("supervised", ("train.json", "evaluate.json"), **TINY_2D, output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        wf.run()
    assert str(tmp_path / "models" / "model.pt") in repr(info.value.__cause__) + str(info.value.__cause__)


def test_3d_overlay_trains_on_volumes_smaller_than_the_patch(tmp_path):
    from helpers import TINY_3D

    tiny = {**TINY_3D, "synthetic": {**TINY_3D["synthetic"], "spatial_size": [40, 40, 24]}, "patch_size": [32, 32, 32]}
    wf = run_training("supervised", tmp_path, configs=("train.json", "la.json"), tiny=tiny)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 2 and np.isfinite(summary["best_value"])
    history = [json.loads(l) for l in open(tmp_path / "models" / "validation.jsonl")]
    assert history and "val_mean_dice" in history[0]
