"""Experiment tracking: ``--tracking mlflow`` logs to a local store inside the run folder.

TensorBoard (the default), the progress bar and the end-of-run summary are checked for every bundle by the CLI
training run of ``test_zoo_checks.py``.

MLflow's store: MONAI 1.6.1's ``MLFlowHandler`` refuses ``file:`` URIs and plain paths (the filesystem store,
which MLflow >= 3.13 also refuses unless ``MLFLOW_ALLOW_FILE_STORE`` is set), so the local store is MONAI's
default for ``--tracking mlflow``: a SQLite file ``<output_dir>/mlruns.db`` with the artifacts in
``<output_dir>/mlruns/``, i.e. inside the run folder of the bundle's ``output_dir``.
"""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.utils import path_to_sqlite_uri

from bundle_cli import BUNDLES, TINY_2D, Timer, bundle_dir, run_cli, tiny_training_overlay
from common.engines.semi_supervised_trainer import loss_terms
from common.engines.tracking import adapt_tracking_handler


def test_adapt_tracking_handler_logs_every_loss_term():
    from monai.handlers import from_engine

    class MLFlowHandler:  # stands in for MONAI's (same class name), which needs mlflow installed
        def __init__(self, output_transform):
            self.output_transform = output_transform

    output = {"loss": torch.tensor(1.5), "loss_seg": torch.tensor(1.0), "image": torch.zeros(2, 1, 4, 4)}
    default = MLFlowHandler(from_engine(["loss"], first=True))
    assert default.output_transform(output) == (output["loss"],)  # the 1-tuple MLflow cannot log
    assert adapt_tracking_handler(default).output_transform is loss_terms
    assert default.output_transform(output) == {"loss": 1.5, "loss_seg": 1.0}
    custom = MLFlowHandler(lambda out: out["loss"].item())  # a user's own transform is kept
    assert adapt_tracking_handler(custom).output_transform is not loss_terms


@pytest.mark.parametrize("bundle", BUNDLES)
def test_mlflow_store_is_inside_the_run_folder(bundle, tmp_path):
    root = bundle_dir(bundle)
    wf = ConfigWorkflow(config_file=str(root / "configs" / "train.json"), meta_file=str(root / "configs" /
                        "metadata.json"), logging_file=False, workflow_type="train", tracking="mlflow",
                        bundle_root=str(root), output_dir=str(tmp_path / "run"), **TINY_2D)
    uri = wf.parser.get_parsed_content("tracking_uri")
    assert uri == path_to_sqlite_uri(str(tmp_path / "run" / "mlruns.db"))
    trainer_handlers = [h for h in wf.parser["train"]["handlers"] if isinstance(h, dict)]
    assert any(h.get("_target_") == "MLFlowHandler" for h in trainer_handlers)
    # MONAI only adds the ids a bundle lacks: the MLflow run is named after the bundle's run_name
    assert wf.parser["run_name"] == json.loads((root / "configs" / "train.json").read_text())["run_name"]


@pytest.mark.slow
def test_training_with_mlflow_tracking(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="install the extra: pip install -e .[mlflow]")
    bundle = "supervised"
    out = tmp_path / "run"
    overlay = tiny_training_overlay(tmp_path / "tiny.json", out)
    with Timer(f"{bundle} cli training with --tracking mlflow"):
        run_cli(["-m", "monai.bundle", "run", "training", "--config_file", f"['configs/train.json','{overlay}']",
                 "--tracking", "mlflow"], cwd=bundle_dir(bundle))
    assert (out / "mlruns.db").is_file() and not (bundle_dir(bundle) / "mlruns.db").exists()

    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(out / "mlruns.db")))
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "default"  # train.json's run_name
    assert {"loss", "loss_seg", "val_mean_dice", "val_hd95_voxel"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, TINY_2D["iterations"] + 1))
    validations = [json.loads(line) for line in (out / "models" / "validation.jsonl").read_text().splitlines()]
    assert run.data.metrics["val_mean_dice"] == pytest.approx(validations[-1]["val_mean_dice"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts
    assert str(out / "mlruns") in run.info.artifact_uri
