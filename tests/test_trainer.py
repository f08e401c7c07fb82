"""SemiSupervisedTrainer through the supervised bundle config: resume, stopping rules, NaN guard."""

import json

import pytest
import torch
from ignite.engine import Events

from common.data.loading import DataError
from common.engines import NonFiniteLossError, load_checkpoint
from helpers import StopTraining, TINY_2D, run_training, workflow, root_cause




def _record_losses(wf, stop_at=None):
    losses = []
    trainer = wf.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        losses.append((engine.state.iteration, float(engine.state.output["loss"])))
        if stop_at is not None and engine.state.iteration == stop_at:
            raise StopTraining()

    return losses


def test_resume_continues_with_the_same_losses(tmp_path):
    params = {**TINY_2D, "iterations": 8, "val_interval": 4, "checkpoint_interval": 2, "lr_schedule": "poly"}
    ref = workflow("supervised", output_dir=str(tmp_path / "ref"), **params)
    ref_losses = _record_losses(ref)
    ref.run()

    cut = workflow("supervised", output_dir=str(tmp_path / "cut"), **params)
    cut_losses = _record_losses(cut, stop_at=5)  # dies after iteration 5; the last checkpoint is at 4
    with pytest.raises(RuntimeError) as info:
        cut.run()
    assert isinstance(root_cause(info.value), StopTraining)
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["trainer"]["iteration"] == 4

    again = workflow("supervised", output_dir=str(tmp_path / "cut"), **params)
    again_losses = _record_losses(again)
    again.run()
    assert [i for i, _ in again_losses] == [5, 6, 7, 8]
    for (i, a), (j, b) in zip(ref_losses[4:], again_losses):
        assert i == j and a == pytest.approx(b, abs=1e-6)
    ref_w = ref.parser.get_parsed_content("network").state_dict()
    for k, v in again.parser.get_parsed_content("network").state_dict().items():
        torch.testing.assert_close(v, ref_w[k], atol=1e-6, rtol=0)
    history = [json.loads(l) for l in open(tmp_path / "cut" / "models" / "validation.jsonl")]
    assert [h["iteration"] for h in history] == [4, 8]


def test_stops_at_max_iterations_and_writes_summary(tmp_path):
    wf = run_training("supervised", tmp_path, iterations=3, val_interval=3)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["best_iteration"] == 3 and (tmp_path / "models" / "model.pt").is_file()
    assert json.loads((tmp_path / "split.json").read_text())["num_labeled"] == 8


def test_max_epochs_limits_training(tmp_path):
    # MONAI Label sets train#trainer#max_epochs; an epoch is floor(8 labelled / 2) = 4 iterations
    wf = run_training("supervised", tmp_path, **{"iterations": 100, "val_interval": 4, "train#trainer#max_epochs": 1})
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 4


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    params = {**TINY_2D, "iterations": 6, "val_interval": 2, "checkpoint_interval": 2}
    wf = workflow("supervised", output_dir=str(tmp_path), **params)
    method = wf.parser.get_parsed_content("method")
    original = method.train_step

    def poisoned(engine, labeled, unlabeled):
        out = original(engine, labeled, unlabeled)
        if engine.state.iteration == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    method.train_step = poisoned
    with pytest.raises(RuntimeError) as info:
        wf.run()
    err = root_cause(info.value)
    assert isinstance(err, NonFiniteLossError) and "loss 'loss' is nan at iteration 3" in str(err)
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["trainer"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["network"].values() if v.is_floating_point())


def test_nan_loss_skip_policy(tmp_path):
    wf = workflow("supervised", output_dir=str(tmp_path), **{**TINY_2D, "iterations": 4, "nonfinite": "skip"})
    method = wf.parser.get_parsed_content("method")
    original = method.train_step
    method.train_step = lambda e, l, u: {**original(e, l, u), "loss": torch.tensor(float("inf"), requires_grad=True)} \
        if e.state.iteration == 2 else original(e, l, u)
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 4 and trainer.skipped_iterations == 1


def test_method_needing_unlabeled_data_refuses_empty_set(tmp_path):
    wf = workflow("supervised", output_dir=str(tmp_path),
                  **{**TINY_2D, "synthetic": {**TINY_2D["synthetic"], "num_unlabeled": 0}})
    method = wf.parser.get_parsed_content("method")
    type(method).requires_unlabeled = True
    try:
        with pytest.raises(RuntimeError) as info:
            wf.parser.get_parsed_content("train#trainer")
        err = root_cause(info.value)
        assert isinstance(err, DataError) and "needs unlabelled data, but the unlabelled set is empty" in str(err)
    finally:
        type(method).requires_unlabeled = False
