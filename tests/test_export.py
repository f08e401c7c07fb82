"""``python -m monai.bundle ckpt_export`` for every bundle that ships ``models/model.pt``: the TorchScript module
carries the metadata and the inference config, and its output equals the eager network's on a real ACDC slice
(for CML the network is the two-subnet ensemble that inference uses)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata

from bundle_cli import BUNDLES, Timer, bundle_config, bundle_dir, require_model, run_cli

#: a real validation volume of the SSL4MIS ACDC layout: (slices, H, W) image in [0, 1]
ACDC_VOLUME = "data/patient002_frame01.h5"


def acdc_slice(acdc_dir: Path, size=(128, 128)) -> torch.Tensor:
    """The middle slice of :data:`ACDC_VOLUME`, bilinearly resized to ``size``: a (1, 1, H, W) float32 tensor."""
    path = acdc_dir / ACDC_VOLUME
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with h5py.File(path, "r") as f:
        image = np.asarray(f["image"], dtype=np.float32)
    x = torch.from_numpy(image[image.shape[0] // 2])[None, None]
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def eager_network(root: Path, ckpt: Path) -> torch.nn.Module:
    """``network_def`` of the bundle's inference config with the checkpoint loaded strictly, in eval mode."""
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(str(ckpt), map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def export_and_compare(root: Path, ckpt: Path, out: Path, x: torch.Tensor) -> dict:
    """Run ``ckpt_export`` (conventions section 3) from the bundle folder, reload the TorchScript file with its
    metadata, and compare its output with the eager network's on ``x``. Returns the loaded metadata."""
    ts_path = out / "model.ts"
    run_cli(["-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", ts_path, "--ckpt_file", ckpt,
             "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"], cwd=root)
    scripted, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=("inference.json",))
    bundle_meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] == bundle_meta["version"]
    assert meta["network_data_format"] == bundle_meta["network_data_format"]
    assert json.loads(extra["inference.json"]) == json.loads((root / "configs" / "inference.json").read_text())

    eager = eager_network(root, ckpt)
    with torch.no_grad():
        expected = eager(x)
        got = scripted.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a trained segmentation network: the comparison is on a meaningful output, not an all-background map
    assert expected.shape[1] == bundle_meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    assert expected.argmax(1).unique().numel() > 1, "the exported model predicts a single class on a cardiac slice"
    return meta


@pytest.mark.parametrize("bundle", BUNDLES)
def test_ckpt_export_matches_eager_network(bundle, tmp_path, acdc_dir):
    ckpt = require_model(bundle)
    shape = bundle_config(bundle, "metadata.json")["network_data_format"]["inputs"]["image"]["spatial_shape"]
    x = acdc_slice(acdc_dir, size=tuple(shape) if len(shape) == 2 and all(isinstance(s, int) for s in shape)
                   else (128, 128))
    with Timer(f"{bundle} ckpt_export + comparison"):
        export_and_compare(bundle_dir(bundle), ckpt, tmp_path, x)
