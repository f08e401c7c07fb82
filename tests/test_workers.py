"""Loader worker defaults (issue 16): workers only on the cores the training step leaves free, a mistyped count is
refused naming the key, and the bundles use the device-aware default."""

import json
from pathlib import Path

import pytest
import torch
from monai.data import Dataset

from common.data import TwoStreamLoader, default_num_workers, synthetic_items, train_transforms
from common.data import workers as workers_module
from tests.helpers import TINY_2D, root_cause, workflow

REPO = Path(__file__).resolve().parents[1]
TINY = {k: v for k, v in TINY_2D.items() if k != "num_workers"}


@pytest.mark.parametrize("cores, threads, streams, expected", [
    (2, 2, 2, 0), (2, 1, 1, 1), (3, 2, 2, 0), (3, 2, 1, 1), (6, 2, 2, 2), (16, 16, 2, 0), (1, 4, 1, 0),
])
def test_cpu_workers_share_only_the_cores_the_step_leaves(monkeypatch, cores, threads, streams, expected):
    monkeypatch.setattr(workers_module, "_cores", lambda: cores)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers("cpu", streams=streams, threads=threads) == expected


def test_torchrun_ranks_on_one_machine_share_the_free_cores(monkeypatch):
    monkeypatch.setattr(workers_module, "_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2, OMP_NUM_THREADS=1 each
    assert default_num_workers("cpu", streams=2, threads=1) == 0
    monkeypatch.setattr(workers_module, "_cores", lambda: 12)
    assert default_num_workers("cpu", streams=2, threads=2) == 2  # (12 - 4) // 4


def test_a_gpu_step_leaves_the_cpu_to_the_loader(monkeypatch):
    monkeypatch.setattr(workers_module, "_cores", lambda: 2)
    assert default_num_workers("cuda:0", threads=2) == workers_module.MAX_DEFAULT_WORKERS


@pytest.mark.parametrize("value", ["two", -1, 1.5, True, None])
def test_a_mistyped_worker_count_is_refused_naming_the_key(value):
    items = synthetic_items(4, [32, 32], 4, seed=0)
    with pytest.raises(ValueError, match="'num_workers' must be an integer >= 0"):
        TwoStreamLoader(Dataset(items, train_transforms(2, [32, 32], 4)), num_workers=value)


def test_bundles_default_to_the_device_aware_count(tmp_path, monkeypatch):
    for config in sorted(REPO.glob("bundles/*/configs/train.json")):
        streams = 1 if config.parts[-3] == "supervised" else 2
        assert json.loads(config.read_text())["num_workers"] == \
            f"$common.data.default_num_workers(@device, streams={streams})", config
    monkeypatch.setattr(workers_module, "_cores", lambda: torch.get_num_threads() + 1)  # one free core, one stream
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    wf = workflow("supervised", output_dir=str(tmp_path), **TINY, device="cpu")
    assert wf.parser.get_parsed_content("train#dataloader").num_workers == 1


def test_bundle_override_with_a_word_is_refused(tmp_path):
    wf = workflow("supervised", output_dir=str(tmp_path), **TINY, num_workers="two")
    with pytest.raises(Exception) as err:
        wf.parser.get_parsed_content("train#dataloader")
    assert "'num_workers' must be an integer" in str(root_cause(err.value))
