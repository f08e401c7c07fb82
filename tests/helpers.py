"""Helpers for tests that run bundle configs the way ``python -m monai.bundle run`` does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.bundle import ConfigWorkflow

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (REPO_ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())

#: overrides that make any 2D bundle train in seconds on tiny synthetic data
TINY_2D = {
    "data_source": "synthetic",
    "synthetic": {"num_labeled": 8, "num_unlabeled": 8, "num_validation": 2, "spatial_size": [64, 64]},
    "patch_size": [64, 64],
    "labeled_batch_size": 2,
    "unlabeled_batch_size": 2,
    "iterations": 4,
    "val_interval": 2,
    "num_workers": 0,
}

#: the same for the 3D (LA overlay) settings
TINY_3D = {
    "data_source": "synthetic",
    "synthetic": {"num_labeled": 4, "num_unlabeled": 4, "num_validation": 1, "spatial_size": [48, 48, 32]},
    "patch_size": [32, 32, 32],
    "labeled_batch_size": 1,
    "unlabeled_batch_size": 1,
    "iterations": 2,
    "val_interval": 2,
    "num_workers": 0,
}


def bundle_dir(name: str) -> Path:
    return REPO_ROOT / "bundles" / name


def workflow(bundle: str, configs: Sequence[str] = ("train.json",), workflow_type: str = "train",
             **override: Any) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of ``bundles/<bundle>/configs/<configs...>`` with ``override``."""
    root = bundle_dir(bundle)
    files = [str(root / "configs" / c) for c in configs]
    override.setdefault("bundle_root", str(root))
    wf = ConfigWorkflow(config_file=files if len(files) > 1 else files[0],
                        meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type=workflow_type, **override)
    wf.initialize()
    return wf


def run_training(bundle: str, output_dir: str | os.PathLike, configs: Sequence[str] = ("train.json",),
                 tiny: dict | None = None, **override: Any) -> ConfigWorkflow:
    """Train ``bundle`` on tiny synthetic data into ``output_dir``; returns the finished workflow."""
    params = {**(TINY_2D if tiny is None else tiny), "output_dir": str(output_dir), **override}
    wf = workflow(bundle, configs, **params)
    wf.run()
    wf.finalize()
    return wf


class StopTraining(Exception):
    """Raised from a handler to end a test run at a chosen point."""


def root_cause(exc: BaseException) -> BaseException:
    """MONAI wraps errors raised inside a config expression in RuntimeError("Failed to evaluate ...")."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def assert_same_gradients(modules, reference_modules, atol: float = 1e-6, rtol: float = 1e-4) -> None:
    """Every parameter of ``modules`` has the gradient of the same parameter of ``reference_modules`` (a
    parameter without a reference gradient must have none or a zero one)."""
    named = [item for m in modules for item in m.named_parameters()]
    reference = [p for m in reference_modules for p in m.parameters()]
    assert len(named) == len(reference)
    for (name, a), b in zip(named, reference):
        if b.grad is None:
            assert a.grad is None or float(a.grad.abs().max()) == 0, name
        else:
            torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol, msg=name)
