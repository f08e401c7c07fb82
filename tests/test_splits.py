"""Labelled/unlabelled splits of the SSL4MIS/UA-MT layouts and datalists, and their errors."""

import json

import h5py
import numpy as np
import pytest

from common.data import ACDC_LABELED_SLICES, DataError, acdc_split, datalist_split, la_split, load_split


@pytest.mark.parametrize("patients", [1, 3, 7])
def test_acdc_first_k_slices_rule(acdc_dir, patients):
    split = acdc_split(str(acdc_dir), labeled_patients=patients)
    k = ACDC_LABELED_SLICES[patients]
    names = [line.strip() for line in open(acdc_dir / "train_slices.list") if line.strip()]
    assert [i["name"] for i in split.labeled] == names[:k]
    assert [i["name"] for i in split.unlabeled] == names[k:]
    assert split.info == {"labeled_patients": patients, "labeled_slices": k}
    assert len(split.validation) == 20 and all("label" in v for v in split.validation)
    assert all("label" not in u for u in split.unlabeled)


def test_acdc_seven_patients_is_136_slices(acdc_dir):
    split = acdc_split(str(acdc_dir), labeled_patients=7)
    assert len(split.labeled) == 136 and len(split.unlabeled) == 1312 - 136
    assert {i["name"].split("_")[0] for i in split.labeled} == {
        "patient099", "patient038", "patient050", "patient100", "patient058", "patient021", "patient049"}


def test_split_is_written_to_the_run_folder(acdc_dir, tmp_path):
    load_split("acdc", str(acdc_dir), num_labeled=3, save_to=str(tmp_path))
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["labeled_slices"] == 68 and len(saved["labeled"]) == 68 and saved["num_unlabeled"] == 1244


def test_missing_dataset_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        acdc_split(str(tmp_path / "nowhere"), 7)
    with pytest.raises(DataError, match="dataset_dir is empty"):
        load_split("acdc", "", 7)


def test_too_many_labeled_patients(acdc_dir):
    with pytest.raises(DataError, match="labeled_patients=80 is outside 1..70"):
        acdc_split(str(acdc_dir), labeled_patients=80)


def _fake_acdc(root, names, volumes=("v1",)):
    (root / "data").mkdir(parents=True)
    for n in set(names) | set(volumes):
        with h5py.File(root / "data" / f"{n}.h5", "w") as f:
            f["image"] = np.zeros((8, 8), np.float32)
            f["label"] = np.zeros((8, 8), np.uint8)
    (root / "train_slices.list").write_text("\n".join(names) + "\n\n")
    (root / "val.list").write_text("\n".join(volumes) + "\n")


def test_duplicated_and_blank_list_entries(tmp_path):
    _fake_acdc(tmp_path / "a", ["patient001_frame01_slice_1", "patient002_frame01_slice_1"])
    split = acdc_split(str(tmp_path / "a"), labeled_patients=1)  # the trailing blank line is skipped
    assert len(split.labeled) == 1 and len(split.unlabeled) == 1
    _fake_acdc(tmp_path / "b", ["patient001_frame01_slice_1", "patient001_frame01_slice_1"])
    with pytest.raises(DataError, match="listed twice"):
        acdc_split(str(tmp_path / "b"), labeled_patients=1)


def test_missing_listed_file_is_named(tmp_path):
    _fake_acdc(tmp_path, ["patient001_frame01_slice_1"])
    (tmp_path / "train_slices.list").write_text("patient001_frame01_slice_1\npatient009_frame01_slice_1\n")
    with pytest.raises(DataError, match="patient009_frame01_slice_1"):
        acdc_split(str(tmp_path), labeled_patients=1)


def test_la_split(tmp_path):
    cases = [f"case{i}" for i in range(5)]
    for c in cases:
        (tmp_path / c).mkdir()
        with h5py.File(tmp_path / c / "mri_norm2.h5", "w") as f:
            f["image"] = np.zeros((4, 4, 4), np.float32)
            f["label"] = np.zeros((4, 4, 4), np.uint8)
    (tmp_path / "train.list").write_text("\n".join(cases[:4]))
    (tmp_path / "test.list").write_text(cases[4])
    split = la_split(str(tmp_path), labeled_cases=2)
    assert [i["name"] for i in split.labeled] == ["case0", "case1"]
    assert [i["name"] for i in split.unlabeled] == ["case2", "case3"]
    assert [i["name"] for i in split.validation] == ["case4"] and split.info["validation_is_test"]
    with pytest.raises(DataError, match="labeled_cases=9"):
        la_split(str(tmp_path), labeled_cases=9)


def test_datalist_split_and_errors(tmp_path):
    for n in ("a", "b", "c", "u"):
        (tmp_path / f"{n}.nii.gz").write_bytes(b"")
    good = {"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}, {"image": "c.nii.gz", "label": "b.nii.gz"}],
            "unlabeled": [{"image": "u.nii.gz"}], "validation": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(good))
    split = datalist_split(str(path))
    assert len(split.labeled) == 2 and len(split.unlabeled) == 1 and split.labeled[0]["image"] == str(tmp_path / "a.nii.gz")
    split = datalist_split(str(path), num_labeled=1)
    assert len(split.labeled) == 1 and [u["image"] for u in split.unlabeled] == [str(tmp_path / n) for n in ("c.nii.gz", "u.nii.gz")]
    path.write_text(json.dumps({"validation": []}))
    with pytest.raises(DataError, match="needs the key 'training'"):
        datalist_split(str(path))
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(DataError, match=r"training\[0\] is missing \['label'\]"):
        datalist_split(str(path))
    path.write_text(json.dumps({"training": [{"image": "zz.nii.gz", "label": "b.nii.gz"}]}))
    with pytest.raises(DataError, match="zz.nii.gz"):
        datalist_split(str(path))


def test_no_labeled_cases(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [], "unlabeled": []}))
    with pytest.raises(DataError, match="no labelled items"):
        load_split("datalist", str(path))
