"""Reading samples: HDF5 and NIfTI, channel and layout handling, and clear errors for bad files and values."""

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import DataError, LoadSampled, expand_to_slices


def _h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return str(path)


def test_h5_slice_loads_channel_first(tmp_path):
    p = _h5(tmp_path / "s.h5", image=np.random.rand(20, 30).astype(np.float32), label=np.ones((20, 30), np.uint8))
    d = LoadSampled(num_classes=4)({"image": p, "label": p})
    assert d["image"].shape == (1, 20, 30) and d["label"].shape == (1, 20, 30)  # non-square slices are fine
    assert d["image"].dtype == torch.float32


def test_h5_without_label_names_file(tmp_path):
    p = _h5(tmp_path / "nolabel.h5", image=np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match=r"nolabel.h5: no dataset 'label'"):
        LoadSampled(num_classes=4)({"image": p, "label": p})


def test_label_out_of_range_names_values(tmp_path):
    lab = np.zeros((4, 4), np.uint8)
    lab[0, 0] = 7
    p = _h5(tmp_path / "bad.h5", image=np.zeros((4, 4), np.float32), label=lab)
    with pytest.raises(DataError, match=r"bad.h5: label values \[7\] are outside the 4 classes"):
        LoadSampled(num_classes=4)({"image": p, "label": p})


def test_shape_mismatch_names_both(tmp_path):
    p = _h5(tmp_path / "mis.h5", image=np.zeros((4, 4), np.float32), label=np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError, match=r"shape mismatch: image \(4, 4\).*label \(4, 5\)"):
        LoadSampled(num_classes=4)({"image": p, "label": p})


def test_nan_image_refused(tmp_path):
    img = np.zeros((4, 4), np.float32)
    img[1, 1] = np.nan
    p = _h5(tmp_path / "nan.h5", image=img, label=np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="nan.h5: image contains 1 NaN/Inf"):
        LoadSampled(num_classes=4)({"image": p, "label": p})


def test_truncated_h5_names_file(tmp_path):
    p = _h5(tmp_path / "t.h5", image=np.random.rand(64, 64).astype(np.float32), label=np.zeros((64, 64), np.uint8))
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 3])
    with pytest.raises(DataError, match="t.h5: cannot be read as HDF5"):
        LoadSampled(num_classes=4)({"image": p, "label": p})


def test_nifti_volume_slices_match_ssl4mis_layout(tmp_path):
    vol = np.random.rand(3, 5, 7).astype(np.float32)  # (S, H, W) as in the ACDC HDF5 files
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), str(path))  # NIfTI stores (x, y, z)
    items = expand_to_slices([{"image": str(path), "name": "v"}])
    assert [i["slice_index"] for i in items] == [0, 1, 2]
    d = LoadSampled(keys="image", intensity="none")(items[1])
    np.testing.assert_allclose(d["image"][0].numpy(), vol[1])


def test_4d_nifti_with_channel_axis(tmp_path):
    vol = np.random.rand(6, 5, 4, 1).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "c.nii.gz"))
    d = LoadSampled(keys="image", layout="volume", intensity="none")({"image": str(tmp_path / "c.nii.gz")})
    assert d["image"].shape == (1, 6, 5, 4)
    nib.save(nib.Nifti1Image(np.random.rand(6, 5, 4, 3).astype(np.float32), np.eye(4)), str(tmp_path / "m.nii.gz"))
    with pytest.raises(DataError, match="m.nii.gz: 4D image with 3 channels"):
        LoadSampled(keys="image", layout="volume")({"image": str(tmp_path / "m.nii.gz")})


def test_constant_image_normalises_to_zeros(tmp_path):
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), 5.0, np.float32), np.eye(4)), str(tmp_path / "k.nii.gz"))
    d = LoadSampled(keys="image", layout="volume", intensity="minmax")({"image": str(tmp_path / "k.nii.gz")})
    assert torch.count_nonzero(d["image"]) == 0


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_nifti_names_file(tmp_path, name):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.random.rand(32, 32, 8).astype(np.float32), np.eye(4)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        LoadSampled(keys="image", layout="volume")({"image": str(path)})
    # slicing reads only the header; the slice's own load is what refuses the truncated data
    item = expand_to_slices([{"image": str(path), "name": "cut"}])[0]
    with pytest.raises(DataError, match=name.replace(".", r"\.") + ": cannot be read"):
        LoadSampled(keys="image", intensity="none")(item)
