"""Issue 15, evaluation / inference / geometry side: no silently wrong result, no unclear crash.

4. one metric definition for validation and evaluation (a false positive of a class absent from a volume);
5. distances in mm when the data carries a spacing, in the arrays' axis order, the unit named in every output,
   an error where mm are asked for and the data has none;
6. the weights' training geometry in metadata.json, used by inference, contradicting overrides refused, the
   axis convention selectable;
7. inference inputs checked one by one, the valid ones still segmented, a non-zero exit naming the others;
8. backbone size constraints checked when the config is built; inference pads to a valid size and crops back;
and the MONAI Label app's CORS policy (local origins only by default).

Tiny synthetic data, seconds each on a CPU.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from scipy import ndimage

from bundle_cli import CLI_TIMEOUT_S, cli_env
from helpers import BUNDLES, REPO_ROOT, TINY_2D, TINY_3D, bundle_dir, root_cause, workflow

from common.evaluation import multiclass_metrics, summarize
from common.networks import UNet2D

CLASSES = {1: "RV", 2: "MYO", 3: "LV"}


# -- helpers -----------------------------------------------------------------------------------------------------
def _one_hot(label_map: np.ndarray, num_classes: int = 4) -> torch.Tensor:
    """(*spatial) ints -> (C, *spatial) float one-hot, as validation's post-processing produces."""
    t = torch.as_tensor(label_map, dtype=torch.long)
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0).float()


def _sharp_unet(seed: int = 0, size: int = 32) -> UNet2D:
    """A deterministic random U-Net whose arg-max map is varied (BatchNorm statistics from data, sharp head),
    so that a transposed or mis-sized input shows in the segmentation."""
    torch.manual_seed(seed)
    net = UNet2D()
    with torch.no_grad():
        x = torch.rand(4, 1, size, size)
        for _ in range(3):
            net.train()(x)
        net.head.weight.mul_(50.0)
    return net.eval()


def _structured_volume(shape=(40, 32, 4), seed=0) -> np.ndarray:
    """A smooth, non-symmetric (x, y, z) volume: a random U-Net gives a non-trivial map on it."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.random(shape), sigma=(3, 2, 0)).astype(np.float32)
    x = np.linspace(0, 1, shape[0], dtype=np.float32)[:, None, None]
    return vol + 0.5 * x  # a ramp along x: W and H are not interchangeable


def _save_nifti(path: Path, array: np.ndarray, zooms=(1.5, 1.5, 10.0)) -> str:
    affine = np.diag([*zooms[: min(3, array.ndim)], *([1.0] * (3 - min(3, array.ndim))), 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(tuple(zooms[: array.ndim]) + (1.0,) * max(0, array.ndim - len(zooms)))
    nib.save(img, str(path))
    return str(path)


# == 4. one metric definition ====================================================================================
def _fp_case() -> tuple[np.ndarray, np.ndarray]:
    """A (S, H, W) volume with MYO and LV but no RV; the prediction is the truth plus a false-positive RV box."""
    gt = np.zeros((3, 24, 24), np.int64)
    gt[:, 6:18, 6:18] = 2  # MYO ring ...
    gt[:, 9:15, 9:15] = 3  # ... around the LV
    pred = gt.copy()
    pred[1, 0:4, 0:4] = 1  # RV where the truth has none
    return pred, gt


@pytest.mark.parametrize("bundle", BUNDLES)
def test_validation_metric_counts_a_false_positive_in_an_absent_class(bundle):
    """Validation's key metric (it selects models/model.pt) scores the case as evaluation does: RV 0, MYO 1,
    LV 1 -> 2/3. MONAI's MeanDice dropped the RV (empty ground truth) and said 1.0."""
    pred, gt = _fp_case()
    evaluation = summarize([multiclass_metrics(pred, gt, CLASSES)])["mean"]["dice"]
    assert evaluation == pytest.approx(2 / 3)

    parser = ConfigParser()
    parser.read_config(str(bundle_dir(bundle) / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle_dir(bundle))
    metric = parser.get_parsed_content("validate#key_metric#val_mean_dice")
    # as the evaluator runs it: attached to an engine whose output is the decollated post-processed batch
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "val_mean_dice")
    engine.run([[{"pred": _one_hot(pred), "label": _one_hot(gt)}]], max_epochs=1)
    assert float(engine.state.metrics["val_mean_dice"]) == pytest.approx(evaluation, abs=1e-6)


# == 5. physical units ===========================================================================================
# The case, arrays in the loaders' (z, y, x) order, spacing 10 x 1.5 x 1.5 mm (header (x, y, z) = 1.5, 1.5, 10):
# truth: 2 slices of a 5 x 5 square; prediction: the same square one slice higher and 2 rows longer in y.
# Pooled surface distances (medpy): the top 5 % in voxels are the 2-row in-plane ones (2.0 voxels = 3 mm), in mm
# the one-slice-plus-one-pixel diagonals, sqrt(10^2 + 1.5^2) = 10.1119 mm. Applying the header spacing in header
# order to (z, y, x) arrays (the old bug) would make the slice gap 1.5 mm.
ZYX_SPACING = (10.0, 1.5, 1.5)
HD95_MM = math.sqrt(10.0**2 + 1.5**2)  # 10.1119
HD95_VOXEL = 2.0


def _hd95_case() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((8, 16, 16), np.int64)
    gt[2:4, 4:9, 4:9] = 1
    pred = np.zeros_like(gt)
    pred[3:5, 4:11, 4:9] = 1
    return pred, gt


def _reference_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """medpy's definition written out independently: surface = mask minus its cross-element erosion, every
    pairwise distance in physical units, pooled 95th percentile (linear interpolation)."""
    def surface(m):
        m = m.astype(bool)
        return np.argwhere(m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1)))

    sp, sg = surface(pred) * np.asarray(spacing), surface(gt) * np.asarray(spacing)
    d = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


class _Oracle(torch.nn.Module):
    """A 'network' returning fixed logits for the whole (S, H, W) stack of one volume, sent as one slice batch."""

    def __init__(self, label_stack: np.ndarray, num_classes: int = 4) -> None:
        super().__init__()
        self.logits = 10.0 * _one_hot(label_stack, num_classes).movedim(0, 1)  # (S, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == self.logits.shape[0], "the oracle needs every slice in one batch"
        return self.logits


def _evaluate(tmp_path: Path, items: list[dict], pred_stack: np.ndarray, **override) -> Path:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": items}))
    oracle = _Oracle(pred_stack)
    torch.save(oracle.state_dict(), tmp_path / "oracle.pt")
    out = tmp_path / "run"
    wf = workflow("supervised", ("train.json", "evaluate.json"), data_source="datalist",
                  dataset_dir=str(datalist), output_dir=str(out), patch_size=[16, 16], num_workers=0,
                  network=oracle, ckpt_path=str(tmp_path / "oracle.pt"), **override)
    wf.run()
    return out / "eval"


def test_evaluation_reports_hd95_in_mm_from_the_nifti_header(tmp_path):
    pred, gt = _hd95_case()  # (z, y, x)
    # the expected values, from the independent reference
    assert _reference_hd95(pred, gt, (1, 1, 1)) == pytest.approx(HD95_VOXEL)
    assert _reference_hd95(pred, gt, ZYX_SPACING) == pytest.approx(HD95_MM, abs=1e-4)
    assert _reference_hd95(pred, gt, ZYX_SPACING[::-1]) == pytest.approx(3.0)  # header order on (z, y, x): wrong

    image = np.random.default_rng(0).random(gt.shape).astype(np.float32)
    items = [{"image": _save_nifti(tmp_path / "img.nii.gz", image.transpose(2, 1, 0)),
              "label": _save_nifti(tmp_path / "lab.nii.gz", gt.transpose(2, 1, 0).astype(np.uint8))}]
    out = _evaluate(tmp_path, items, pred)
    with open(out / "metrics_per_case.csv", newline="") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    assert float(rows["RV"]["hd95_mm"]) == pytest.approx(HD95_MM, abs=1e-4)  # not 2.0 (voxels), not 3.0 (axes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance_unit"] == "mm" and summary["RV"]["hd95"] == pytest.approx(HD95_MM, abs=1e-4)
    assert json.loads((out / "metrics.json").read_text())["distance_unit"] == "mm"


def test_mm_asked_for_data_without_spacing_is_an_error_naming_the_file(tmp_path):
    pred, gt = _hd95_case()
    path = tmp_path / "case.h5"
    with h5py.File(path, "w") as f:  # SSL4MIS layout: no spacing stored
        f["image"] = np.random.default_rng(0).random(gt.shape).astype(np.float32)
        f["label"] = gt.astype(np.uint8)
    items = [{"image": str(path), "label": str(path)}]
    with pytest.raises(Exception) as info:
        _evaluate(tmp_path, items, pred, distance_unit="mm")
    message = str(root_cause(info.value))
    assert "distance_unit 'mm'" in message and str(path) in message and "spacing" in message
    # by default (auto) the same data is evaluated in voxels, and says so
    out = _evaluate(tmp_path, items, pred)
    with open(out / "metrics_per_case.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["class"] == "RV")
    assert float(row["hd95_voxel"]) == pytest.approx(HD95_VOXEL)


# == 6. inference geometry =======================================================================================
@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_records_the_training_geometry_that_inference_uses(bundle):
    root = bundle_dir(bundle)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    geometry = meta["training_geometry"]
    trained = json.loads((root / "configs" / "acdc_cpu_v1.json").read_text())
    assert geometry["patch_size"] == trained["patch_size"] == meta["network_data_format"]["inputs"]["image"][
        "spatial_shape"]
    assert geometry["image_interpolation"] == trained["image_interpolation"]
    assert geometry["intensity_normalisation"] == "minmax" and geometry["input_layout"] == "WHS"
    assert "(x, y, z)" in geometry["axis_convention"]
    wf = workflow(bundle, ("inference.json",), workflow_type="infer")
    for key in ("patch_size", "image_interpolation", "intensity_normalisation", "input_layout", "spatial_dims"):
        assert wf.parser.get_parsed_content(key) == geometry[key], key


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_refuses_a_patch_size_the_weights_were_not_trained_on(bundle, tmp_path):
    (tmp_path / "in").mkdir()
    _save_nifti(tmp_path / "in" / "a.nii.gz", _structured_volume())
    with pytest.raises(Exception) as info:
        wf = workflow(bundle, ("inference.json",), workflow_type="infer", dataset_dir=str(tmp_path / "in"),
                      output_dir=str(tmp_path / "out"), patch_size=[96, 96])
        wf.run()
    message = str(root_cause(info.value))
    assert "patch_size [96, 96]" in message and "[128, 128]" in message and "geometry_mismatch" in message
    assert not (tmp_path / "out").exists()
    # on purpose: --geometry_mismatch warn runs, with the same message as a warning
    with pytest.warns(UserWarning, match=r"patch_size \[96, 96\]"):
        workflow(bundle, ("inference.json",), workflow_type="infer", dataset_dir=str(tmp_path / "in"),
                 output_dir=str(tmp_path / "out"), patch_size=[96, 96], geometry_mismatch="warn")


def _infer(tmp_path: Path, folder: Path, out: Path, net: torch.nn.Module, **override):
    torch.save(net.state_dict(), tmp_path / "model.pt")
    wf = workflow("supervised", ("inference.json",), workflow_type="infer", dataset_dir=str(folder),
                  output_dir=str(out), ckpt_path=str(tmp_path / "model.pt"), **override)
    wf.run()
    return wf


def test_input_layout_selects_the_axis_convention(tmp_path):
    """The same scan stored (x, y, z) and (y, x, z): with the matching --input_layout both segmentations agree;
    the default layout on the transposed file does not (the silent failure of issue 15)."""
    net = _sharp_unet()
    vol = _structured_volume()
    (tmp_path / "whs").mkdir(), (tmp_path / "hws").mkdir()
    _save_nifti(tmp_path / "whs" / "a.nii.gz", vol)
    _save_nifti(tmp_path / "hws" / "a.nii.gz", vol.transpose(1, 0, 2).copy())
    _infer(tmp_path, tmp_path / "whs", tmp_path / "o1", net, patch_size=[32, 32])
    _infer(tmp_path, tmp_path / "hws", tmp_path / "o2", net, patch_size=[32, 32],
           input_layout="HWS")
    _infer(tmp_path, tmp_path / "hws", tmp_path / "o3", net, patch_size=[32, 32])
    ref = np.asarray(nib.load(str(tmp_path / "o1" / "a_seg.nii.gz")).dataobj)
    hws = np.asarray(nib.load(str(tmp_path / "o2" / "a_seg.nii.gz")).dataobj)
    wrong = np.asarray(nib.load(str(tmp_path / "o3" / "a_seg.nii.gz")).dataobj)
    assert len(np.unique(ref)) > 1
    np.testing.assert_array_equal(hws, ref.transpose(1, 0, 2))
    assert not np.array_equal(wrong, ref.transpose(1, 0, 2))


# == 7. inference inputs =========================================================================================
def test_bad_inputs_are_named_and_the_others_still_segmented(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    vol = _structured_volume((40, 32, 3))
    _save_nifti(folder / "a_volume.nii.gz", vol)
    _save_nifti(folder / "b_two_channels.nii.gz", np.stack([vol, vol], -1))
    _save_nifti(folder / "c_cine.nii.gz", np.stack([vol] * 12, -1))
    _save_nifti(folder / "d_slice.nii.gz", vol[:, :, 1].copy())
    _save_nifti(folder / "e_singleton.nii.gz", vol[..., None].copy())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        _infer(tmp_path, folder, out, _sharp_unet(size=32), patch_size=[32, 32])
    message = str(info.value.code)
    assert "b_two_channels.nii.gz" in message and "c_cine.nii.gz" in message and "2 of 5" in message
    assert "a_volume" not in message.split("Failed:")[1]
    assert nib.load(str(out / "a_volume_seg.nii.gz")).shape == (40, 32, 3)
    assert nib.load(str(out / "d_slice_seg.nii.gz")).shape == (40, 32)  # 2D in, 2D out
    assert nib.load(str(out / "e_singleton_seg.nii.gz")).shape[:3] == (40, 32, 3)
    assert sorted(p.name for p in out.iterdir()) == ["a_volume_seg.nii.gz", "d_slice_seg.nii.gz",
                                                      "e_singleton_seg.nii.gz"]


def test_cli_exit_code_and_last_line_list_the_failed_inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    vol = _structured_volume((32, 32, 2))
    _save_nifti(folder / "good.nii.gz", vol)
    _save_nifti(folder / "cine.nii.gz", np.stack([vol] * 12, -1))
    torch.save(_sharp_unet().state_dict(), tmp_path / "model.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--ckpt_path",
         str(tmp_path / "model.pt")],
        cwd=bundle_dir("supervised"), env=cli_env(PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "cine.nii.gz" in last and "1 of 2" in last, proc.stderr[-2000:]
    assert (tmp_path / "out" / "good_seg.nii.gz").is_file()


# == 8. network geometry =========================================================================================
@pytest.mark.parametrize("bundle", BUNDLES)
def test_invalid_patch_size_is_refused_before_anything_is_written(bundle, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception) as info:
        wf = workflow(bundle, ("train.json",), **{**TINY_2D, "patch_size": [100, 100]}, output_dir=str(out))
        wf.run()
    message = str(root_cause(info.value))
    assert "patch_size [100, 100]" in message and "[96, 96] or [112, 112]" in message, message
    assert not out.exists()


def test_invalid_3d_patch_size_is_refused_with_the_nearest_sizes(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception) as info:
        wf = workflow("supervised", ("train.json", "la.json"), **{**TINY_3D, "patch_size": [100, 100, 80]},
                      output_dir=str(out))
        wf.run()
    message = str(root_cause(info.value))
    assert "[96, 96, 80] or [112, 112, 80]" in message, message
    assert not out.exists()


def test_inference_pads_to_a_valid_size_and_crops_back(tmp_path):
    """--patch_size [100,100] (allowed on purpose): every slice is resized to 100 x 100, padded to 112 x 112 for
    the U-Net and the logits cropped back; the output has the input's shape."""
    from common.evaluation import ResizedSliceInferer

    net = _sharp_unet()
    folder = tmp_path / "in"
    folder.mkdir()
    _save_nifti(folder / "a.nii.gz", _structured_volume((40, 36, 2)))
    _infer(tmp_path, folder, tmp_path / "out", net, patch_size=[100, 100])
    assert nib.load(str(tmp_path / "out" / "a_seg.nii.gz")).shape == (40, 36, 2)

    # the padding itself: native 100 x 100 slices, zero-padded to 112 x 112 at the end, logits cropped back
    x = torch.rand(1, 1, 3, 100, 100)
    y = ResizedSliceInferer(patch_size=None)(x, net)
    assert y.shape == (1, 4, 3, 100, 100)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x[0, :, 1][None], (0, 12, 0, 12))
        np.testing.assert_allclose(y[0, :, 1].numpy(), net(padded)[0, :, :100, :100].numpy(), atol=1e-5)


# == MONAI Label: CORS ===========================================================================================
def _cors_module():
    spec = importlib.util.spec_from_file_location("semiseg_cors_test", REPO_ROOT / "tools" / "monailabel_app" /
                                                  "cors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_monailabel_app_allows_only_local_origins_by_default():
    cors = _cors_module()
    patterns = cors.origin_patterns({}, environ={})
    for origin in ("http://localhost:3000", "http://127.0.0.1:8000", "http://localhost", "http://[::1]:8080"):
        assert cors.origin_allowed(origin, patterns), origin
    for origin in ("http://evil.example", "http://localhost.evil.example", "https://127.0.0.1.nip.io",
                   "null", "http://10.0.0.5:8000"):
        assert not cors.origin_allowed(origin, patterns), origin

    # configurable: --conf cors_origins, else the environment variable
    custom = cors.origin_patterns({"cors_origins": "https://viewer.example.org"}, environ={})
    assert cors.origin_allowed("https://viewer.example.org", custom)
    assert not cors.origin_allowed("http://localhost:3000", custom)
    assert cors.origin_patterns({}, environ={cors.ENV_VAR: "http://localhost:*"}) == ["http://localhost:*"]
    with pytest.raises(ValueError, match="'evil.example' is not an origin pattern"):
        cors.origin_patterns({"cors_origins": "evil.example"}, environ={})

    # applied to the server's CORS middleware (MONAI Label 0.8.5: allow_origins ["*"] with credentials)
    class Middleware:
        def __init__(self, cls, **kwargs):
            self.cls, self.kwargs = cls, kwargs

    class CORSMiddleware:
        pass

    class App:
        user_middleware = [Middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True)]
        middleware_stack = object()

    app = App()
    assert cors.restrict_app_cors(app, patterns)
    options = app.user_middleware[0].kwargs
    assert options["allow_origins"] == [] and options["allow_credentials"] is True
    assert re.fullmatch(options["allow_origin_regex"], "http://localhost:5173")
    assert not re.fullmatch(options["allow_origin_regex"], "http://evil.example")
    assert app.middleware_stack is None  # rebuilt with the new options on the next request
