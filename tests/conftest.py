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

# two cores: keep torch from oversubscribing when pytest runs alongside data workers
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
