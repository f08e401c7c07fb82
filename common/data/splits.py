"""Labelled / unlabelled / validation splits for the layouts users already have.

* ACDC, SSL4MIS layout: ``train_slices.list``, ``val.list``, ``test.list`` and ``data/[slices/]<name>.h5``.
  The labelled set is the first K slices of ``train_slices.list``; the list is grouped by patient, so K is
  the number of slices of the first ``labeled_patients`` patients (3 -> 68, 7 -> 136, as in SSL4MIS).
* LA, UA-MT layout: ``train.list``, ``test.list`` and ``<case>/mri_norm2.h5``; the first K cases are labelled.
  LA has no validation split: like SS-Net and CML, validation uses ``test.list`` (test-set selection).
* A MONAI datalist JSON with the keys ``training`` (labelled), ``unlabeled``, ``validation`` and ``test``.
* The embedded synthetic data.

Each returns a :class:`DataSplit`; :meth:`DataSplit.save` writes the split actually used into a run folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from common.data.loading import DataError, array_shape, is_h5
from common.data.synthetic import synthetic_items

__all__ = [
    "DataSplit",
    "acdc_split",
    "la_split",
    "datalist_split",
    "synthetic_split",
    "load_split",
    "expand_to_slices",
    "ACDC_LABELED_SLICES",
]

# SSL4MIS mapping of labelled patients to labelled slices (first K names of train_slices.list).
ACDC_LABELED_SLICES = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}


@dataclass
class DataSplit:
    """Items for each role. Labelled and validation items have ``image`` and ``label``; unlabelled only
    ``image``. ``source`` says where they came from; ``info`` holds what the rule chose (e.g. K)."""

    labeled: list[dict]
    unlabeled: list[dict]
    validation: list[dict]
    test: list[dict] = field(default_factory=list)
    source: str = ""
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "source": self.source,
            **self.info,
            "num_labeled": len(self.labeled),
            "num_unlabeled": len(self.unlabeled),
            "num_validation": len(self.validation),
            "num_test": len(self.test),
        }

    def save(self, path: str) -> str:
        """Write the split (item names or paths, never arrays) to ``path`` (a folder or a .json file)."""
        if not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "split.json")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

        def describe(item: dict) -> Any:
            if "name" in item:
                return item["name"] if "slice_index" not in item else f"{item['name']}#{item['slice_index']}"
            return {k: v for k, v in item.items() if isinstance(v, (str, int, float))}

        content = {
            **self.summary(),
            **{role: [describe(i) for i in getattr(self, role)] for role in ("labeled", "unlabeled", "validation", "test")},
        }
        with open(path, "w") as f:
            json.dump(content, f, indent=1)
        return path


def _read_list(path: str) -> list[str]:
    """Names from a list file: blank lines are skipped, duplicates refused."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: list file not found")
    with open(path) as f:
        names = [line.strip() for line in f]
    names = [n for n in names if n]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DataError(f"{path}: entry '{n}' is listed twice")
        seen.add(n)
    if not names:
        raise DataError(f"{path}: the list is empty")
    return names


def _require_dir(path: str, what: str) -> None:
    if not path:
        raise DataError(f"dataset_dir is empty: set it to the {what} folder (e.g. --dataset_dir /data/{what})")
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} dataset folder not found")


def _acdc_file(root: str, name: str, kind: str) -> str:
    candidates = [os.path.join(root, "data", "slices", f"{name}.h5"), os.path.join(root, "data", f"{name}.h5")]
    if kind == "volume":
        candidates = candidates[1:]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise DataError(f"{candidates[-1]}: file for '{name}' not found (listed in the ACDC lists under {root})")


def _patient_of(name: str) -> str:
    m = re.match(r"(patient\d+)", name)
    return m.group(1) if m else name.split("_")[0]


def acdc_split(
    dataset_dir: str, labeled_patients: int | None = 7, labeled_slices: int | None = None, use_test: bool = False
) -> DataSplit:
    """ACDC split: the first ``labeled_patients`` patients' slices of ``train_slices.list`` (or exactly
    ``labeled_slices`` slices) are labelled, the other slices unlabelled; validation = ``val.list`` volumes.

    ``use_test`` also reads ``test.list`` (40 volumes) when the folder has it.
    """
    _require_dir(dataset_dir, "ACDC")
    slices = _read_list(os.path.join(dataset_dir, "train_slices.list"))
    patients: list[str] = []
    for n in slices:
        p = _patient_of(n)
        if p not in patients:
            patients.append(p)
    if labeled_slices is None:
        if labeled_patients is None:
            raise DataError("acdc_split needs labeled_patients or labeled_slices")
        if not 0 < labeled_patients <= len(patients):
            raise DataError(
                f"labeled_patients={labeled_patients} is outside 1..{len(patients)} "
                f"(patients in {os.path.join(dataset_dir, 'train_slices.list')})"
            )
        chosen = set(patients[:labeled_patients])
        labeled_slices = 0
        while labeled_slices < len(slices) and _patient_of(slices[labeled_slices]) in chosen:
            labeled_slices += 1
    elif not 0 < labeled_slices <= len(slices):
        raise DataError(f"labeled_slices={labeled_slices} is outside 1..{len(slices)}")
    lab = [{"image": _acdc_file(dataset_dir, n, "slice"), "name": n} for n in slices[:labeled_slices]]
    for item in lab:
        item["label"] = item["image"]
    unlab = [{"image": _acdc_file(dataset_dir, n, "slice"), "name": n} for n in slices[labeled_slices:]]
    val = [
        {"image": (p := _acdc_file(dataset_dir, n, "volume")), "label": p, "name": n}
        for n in _read_list(os.path.join(dataset_dir, "val.list"))
    ]
    test = []
    if use_test and os.path.isfile(os.path.join(dataset_dir, "test.list")):
        test = [
            {"image": (p := _acdc_file(dataset_dir, n, "volume")), "label": p, "name": n}
            for n in _read_list(os.path.join(dataset_dir, "test.list"))
        ]
    info = {"labeled_patients": len({_patient_of(i["name"]) for i in lab}), "labeled_slices": labeled_slices}
    return DataSplit(lab, unlab, val, test, source="acdc", info=info)


def la_split(dataset_dir: str, labeled_cases: int = 8) -> DataSplit:
    """LA split: the first ``labeled_cases`` cases of ``train.list`` are labelled, the rest unlabelled.

    LA has no validation split; validation uses ``test.list`` as SS-Net and CML do (test-set selection),
    which reports must say.
    """
    _require_dir(dataset_dir, "LA")
    cases = _read_list(os.path.join(dataset_dir, "train.list"))
    if not 0 < labeled_cases <= len(cases):
        raise DataError(f"labeled_cases={labeled_cases} is outside 1..{len(cases)} (cases in train.list)")

    def case_file(name: str) -> str:
        path = os.path.join(dataset_dir, name, "mri_norm2.h5")
        if not os.path.isfile(path):
            raise DataError(f"{path}: file for LA case '{name}' not found")
        return path

    lab = [{"image": (p := case_file(n)), "label": p, "name": n} for n in cases[:labeled_cases]]
    unlab = [{"image": case_file(n), "name": n} for n in cases[labeled_cases:]]
    test = [{"image": (p := case_file(n)), "label": p, "name": n} for n in _read_list(os.path.join(dataset_dir, "test.list"))]
    return DataSplit(lab, unlab, list(test), list(test), source="la", info={"labeled_cases": labeled_cases,
                                                                            "validation_is_test": True})


def datalist_split(datalist: str, base_dir: str | None = None, num_labeled: int | None = None) -> DataSplit:
    """Split from a MONAI datalist JSON: ``training`` items (``image``, ``label``) are labelled, ``unlabeled``
    items (``image``) unlabelled, ``validation`` and ``test`` as named. Relative paths are resolved against
    ``base_dir`` (default: the datalist's folder). ``num_labeled`` keeps only the first K training items
    labelled and moves the others to the unlabelled set."""
    if not os.path.isfile(datalist):
        raise DataError(f"{datalist}: datalist file not found")
    try:
        with open(datalist) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{datalist}: not valid JSON ({e})") from e
    if not isinstance(content, dict) or "training" not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataError(f"{datalist}: a datalist needs the key 'training' (found {keys})")
    base = base_dir or os.path.dirname(os.path.abspath(datalist))

    def items(key: str, required: Sequence[str]) -> list[dict]:
        out = []
        seen: set[str] = set()
        for i, raw in enumerate(content.get(key, []) or []):
            if isinstance(raw, str):
                raw = {"image": raw}
            if not isinstance(raw, dict):
                raise DataError(f"{datalist}: {key}[{i}] must be an object or a path, got {type(raw).__name__}")
            missing = [k for k in required if not raw.get(k)]
            if missing:
                raise DataError(f"{datalist}: {key}[{i}] is missing {missing}")
            item = dict(raw)
            for k in ("image", "label"):
                if k in item and isinstance(item[k], str) and not os.path.isabs(item[k]):
                    item[k] = os.path.join(base, item[k])
                if k in item and isinstance(item[k], str) and not os.path.isfile(item[k]):
                    raise DataError(f"{item[k]}: file listed in {datalist} ({key}[{i}]) not found")
            if item["image"] in seen:
                raise DataError(f"{datalist}: {key} lists '{item['image']}' twice")
            seen.add(item["image"])
            item.setdefault("name", os.path.basename(item["image"]).split(".")[0])
            out.append(item)
        return out

    lab = items("training", ("image", "label"))
    unlab = items("unlabeled", ("image",))
    if num_labeled is not None:
        if not 0 < num_labeled <= len(lab):
            raise DataError(f"num_labeled={num_labeled} is outside 1..{len(lab)} (training items in {datalist})")
        unlab = [{"image": i["image"], "name": i["name"]} for i in lab[num_labeled:]] + unlab
        lab = lab[:num_labeled]
    return DataSplit(lab, unlab, items("validation", ("image", "label")), items("test", ("image",)),
                     source="datalist", info={"datalist": os.path.abspath(datalist)})


def synthetic_split(
    spatial_dims: int = 2,
    num_labeled: int = 16,
    num_unlabeled: int = 48,
    num_validation: int = 4,
    spatial_size: Sequence[int] | None = None,
    num_classes: int = 4,
    slices_per_volume: int = 4,
    seed: int = 0,
) -> DataSplit:
    """Embedded synthetic split. In 2D, training items are slices and validation items are stacks of
    ``slices_per_volume`` slices, so the volume evaluation path runs as on ACDC."""
    size = list(spatial_size or ([128, 128] if spatial_dims == 2 else [64, 64, 48]))
    if len(size) != spatial_dims:
        raise ValueError(f"spatial_size {size} does not match spatial_dims={spatial_dims}")
    lab = synthetic_items(num_labeled, size, num_classes, seed, name_prefix="labeled")
    unlab = synthetic_items(num_unlabeled, size, num_classes, seed + 1, with_label=False, name_prefix="unlabeled")
    if spatial_dims == 2:
        import numpy as np

        val = []
        for v in range(num_validation):
            stack = synthetic_items(slices_per_volume, size, num_classes, seed + 100 + v)
            val.append({"image": np.stack([s["image"] for s in stack]), "label": np.stack([s["label"] for s in stack]),
                        "name": f"validation_{v:03d}"})
    else:
        val = synthetic_items(num_validation, size, num_classes, seed + 100, name_prefix="validation")
    return DataSplit(lab, unlab, val, [], source="synthetic", info={"spatial_size": size, "seed": seed})


def expand_to_slices(items: Sequence[dict]) -> list[dict]:
    """For 2D training: turn volume items into one item per slice (``slice_index``); 2D items pass through.

    HDF5 volumes are ``(S, H, W)``; NIfTI-like volumes ``(x, y, z)`` are sliced along z (see
    :mod:`common.data.loading`)."""
    out: list[dict] = []
    for item in items:
        if "slice_index" in item:
            out.append(item)
            continue
        image = item["image"]
        if hasattr(image, "shape"):
            shape = tuple(image.shape)
            n_slices = shape[0] if len(shape) == 3 else 0
        else:
            shape = array_shape(image, "image")
            n_slices = 0 if len(shape) == 2 else (shape[0] if is_h5(image) else shape[2])
        if len(shape) not in (2, 3):
            raise DataError(f"{item.get('name', image)}: expected a 2D slice or a 3D volume, got shape {shape}")
        if n_slices == 0:
            out.append(item)
            continue
        for k in range(n_slices):
            if hasattr(image, "shape"):
                sl = {key: (val[k] if hasattr(val, "shape") else val) for key, val in item.items()}
                sl["name"] = f"{item.get('name', 'volume')}#{k}"
                out.append(sl)
            else:
                out.append({**item, "slice_index": k})
    return out


def load_split(
    source: str,
    dataset_dir: str = "",
    num_labeled: int | None = None,
    spatial_dims: int = 2,
    num_classes: int = 4,
    seed: int = 0,
    synthetic: dict | None = None,
    save_to: str | None = None,
) -> DataSplit:
    """The split for ``source`` (``synthetic``, ``acdc``, ``la`` or ``datalist``), saved to ``save_to`` if given.

    ``num_labeled`` means labelled patients for ACDC, cases for LA, the first K training items of a datalist
    (``None`` keeps them all) and labelled images for synthetic data. For ``datalist``, ``dataset_dir`` is the
    JSON file (or a folder holding ``datalist.json``).

    Raises:
        DataError: an unknown source, a ``num_labeled`` that is not a whole number, a ``dataset_dir`` given with
            the synthetic source (which would silently train on synthetic data), or any problem of the data.
    """
    source = source.lower()
    if num_labeled is not None:
        if isinstance(num_labeled, float) and num_labeled.is_integer():
            num_labeled = int(num_labeled)
        if isinstance(num_labeled, bool) or not isinstance(num_labeled, int):
            raise DataError(f"num_labeled must be a whole number or null, got {num_labeled!r}")
    if source == "synthetic" and dataset_dir:
        raise DataError(
            f"dataset_dir is set ({dataset_dir!r}) but data_source is 'synthetic', which does not read it; "
            "add --data_source acdc (or la, datalist) or a data overlay such as configs/acdc.json"
        )
    if source == "synthetic":
        kwargs = dict(synthetic or {})
        if num_labeled is not None:
            kwargs["num_labeled"] = num_labeled
        split = synthetic_split(spatial_dims=spatial_dims, num_classes=num_classes, seed=seed, **kwargs)
    elif source == "acdc":
        split = acdc_split(dataset_dir, labeled_patients=num_labeled if num_labeled is not None else 7)
    elif source == "la":
        split = la_split(dataset_dir, labeled_cases=num_labeled if num_labeled is not None else 8)
    elif source == "datalist":
        path = os.path.join(dataset_dir, "datalist.json") if os.path.isdir(dataset_dir) else dataset_dir
        split = datalist_split(path, num_labeled=num_labeled)
    else:
        raise DataError(f"unknown data source '{source}' (use synthetic, acdc, la or datalist)")
    if not split.labeled:
        raise DataError(f"the {source} split has no labelled items")
    if save_to:
        split.save(save_to)
    return split
