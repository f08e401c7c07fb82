"""Shared fixtures: repository paths, the real ACDC folder (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("SEMISEG_SHARED", REPO_ROOT.parent / "shared"))
ACDC_DIR = SHARED_DIR / "data" / "ACDC"
SCHEMA_PATH = SHARED_DIR / "conventions" / "meta_schema_20240725.json"

# Few cores: when the machine is already busy, one intra-op thread per process avoids the oversubscription
# that makes spinning OpenMP threads crawl; alone (as in CI) use the cores.
_cores = os.cpu_count() or 1
torch.set_num_threads(int(os.environ.get("SEMISEG_TEST_THREADS", 1 if os.getloadavg()[0] > _cores else _cores)))


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    if not (ACDC_DIR / "train_slices.list").is_file():
        pytest.skip(f"real ACDC data not found at {ACDC_DIR} (set SEMISEG_SHARED to the shared folder)")
    return ACDC_DIR


@pytest.fixture(scope="session")
def schema_path() -> Path:
    if not SCHEMA_PATH.is_file():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA_PATH}")
    return SCHEMA_PATH
