"""SS-Net: the method's step (gradients, detached parts, memory) and the bundle on tiny synthetic 2D and 3D data."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from monai.losses import DiceLoss

from common.engines.schedules import RampUp
from common.losses.class_separation import ClassSeparation
from common.losses.dice_vat import DiceVAT
from common.methods.ssnet import SSNetMethod
from common.networks import UNet2D
from helpers import TINY_2D, TINY_3D, run_training, workflow, assert_same_gradients

LOSS_NAMES = {"loss", "loss_seg", "loss_lds", "loss_cs_labeled", "loss_cs_unlabeled", "consistency_weight"}


def _engine(network, step=0):
    def backward(loss, **kw):
        loss.backward(**kw)

    return SimpleNamespace(network=network, step_index=step, backward=backward)


def _setup():
    torch.manual_seed(0)
    net = UNet2D(1, 4).train()
    method = SSNetMethod(
        loss_function=DiceLoss(softmax=True, to_onehot_y=True, squared_pred=True, batch=True, smooth_nr=1e-10,
                               smooth_dr=1e-10),
        vat=DiceVAT(epsilon=6.0), class_separation=ClassSeparation(4, memory_size=8), consistency=0.5,
        cs_weight=0.1).train()
    torch.manual_seed(1)
    x = torch.rand(4, 1, 32, 32)
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 4:28, 4:28] = 1
    y[:, :, 8:24, 8:24] = 2
    y[:, :, 12:20, 12:20] = 3
    return net, method, {"image": x[:2], "label": y}, {"image": x[2:]}


def _first_iteration_memory(method, net, labeled):
    """Fill the prototype memory with the labels themselves, so that L_cs is non-zero from the first step."""
    with torch.no_grad():
        emb = net.forward_features(labeled["image"]).embedding
    gt = labeled["label"][:, 0].long()
    method.class_separation.update_memory(emb, gt, gt)


def test_step_gradient_equals_one_backward_of_the_total_loss():
    net, method, labeled, unlabeled = _setup()
    _first_iteration_memory(method, net, labeled)
    net2, method2 = copy.deepcopy(net), copy.deepcopy(method)

    torch.manual_seed(5)
    out = method.train_step(_engine(net), labeled, unlabeled)
    assert LOSS_NAMES <= set(out) and all(torch.isfinite(v) for v in out.values())
    assert float(out["loss_cs_labeled"]) > 0 and float(out["loss_cs_unlabeled"]) > 0 and float(out["loss_lds"]) > 0
    out["loss"].backward()

    # the same computation as one graph and one backward (same random draws in the same order)
    torch.manual_seed(5)
    x = torch.cat([labeled["image"], unlabeled["image"]])
    o = net2.forward_features(x)
    gt = labeled["label"][:, 0].long()
    pred = o.logits.detach().argmax(1)
    method2.class_separation.update_memory(o.embedding[:2], pred[:2], gt)
    total = (method2.loss_function(o.logits[:2], labeled["label"])
             + 0.5 * (method2.vat(net2, x) + 0.1 * (method2.class_separation(o.embedding[:2], gt)
                                                      + method2.class_separation(o.embedding[2:], pred[2:]))))
    total.backward()
    assert float(out["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    assert_same_gradients((net, method), (net2, method2))


def test_lambda_zero_leaves_only_the_supervised_gradient():
    net, method, labeled, unlabeled = _setup()
    method.consistency = lambda t: 0.0
    net2 = copy.deepcopy(net)
    torch.manual_seed(7)
    out = method.train_step(_engine(net), labeled, unlabeled)
    out["loss"].backward()
    torch.manual_seed(7)  # same dropout masks in the main forward
    o = net2.forward_features(torch.cat([labeled["image"], unlabeled["image"]]))
    method.loss_function(o.logits[:2], labeled["label"]).backward()
    for (name, a), b in zip(net.named_parameters(), net2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in method.class_separation.parameters())


def test_memory_holds_projected_correct_foreground_and_is_checkpointed():
    net, method, labeled, unlabeled = _setup()
    method.train_step(_engine(net), labeled, unlabeled)["loss"].backward()
    counts = method.class_separation.memory_count.tolist()
    assert counts[0] == 0  # background is never a prototype
    state = method.state_dict()
    assert "class_separation.memory" in state and "class_separation.memory_count" in state
    assert not any(k.startswith("loss_function") for k in state)


def test_rampup_and_overlays():
    wf = workflow("ssnet", ["train.json", "acdc_cpu_v1.json"], output_dir="/tmp/unused", dataset_dir="/nonexistent")
    p = wf.parser
    ramp = p.get_parsed_content("consistency_schedule")
    assert (ramp.max_value, ramp.length, ramp.step) == (0.1, 1500.0, 7.5)
    assert ramp(1499) == pytest.approx(0.1 * torch.exp(torch.tensor(-5 * (1 / 200) ** 2)).item())  # 199 // 200
    assert p["lr_schedule"] == "constant" and p["iterations"] == 1500 and p["val_interval"] == 250
    assert p["labeled_batch_size"] == 4 and p["unlabeled_batch_size"] == 4 and p["seed"] == 1337
    vat = p.get_parsed_content("vat")
    assert (vat.epsilon, vat.xi, vat.iterations, vat.squared_pred) == (6.0, 10.0, 1, True)
    paper = workflow("ssnet", ["train.json", "acdc.json"], output_dir="/tmp/unused", dataset_dir="/nonexistent").parser
    ramp = paper.get_parsed_content("consistency_schedule")
    assert (ramp.max_value, ramp.length, ramp.step) == (0.1, 30000.0, 150.0)
    assert paper["labeled_batch_size"] == 12 and paper["patch_size"] == [256, 256]
    la = workflow("ssnet", ["train.json", "la.json"], output_dir="/tmp/unused", dataset_dir="/nonexistent").parser
    ramp = la.get_parsed_content("consistency_schedule")
    assert (ramp.max_value, ramp.length, ramp.step) == (1.0, 6000.0, 150.0)
    vat = la.get_parsed_content("vat")
    assert (vat.epsilon, vat.squared_pred, vat.joint_channels, vat.smooth) == (10.0, False, True, 1e-8)
    assert la["lr_schedule"] == "step" and la["lr_step_size"] == 2500 and la["iterations"] == 15000


def _check_iteration(wf, tmp_path, dims):
    out = wf.parser.get_parsed_content("train#trainer").state.output
    assert LOSS_NAMES <= set(out)
    for name in LOSS_NAMES:
        assert torch.isfinite(torch.as_tensor(out[name])).all(), name
    assert out["image"].dim() == dims + 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "ssnet"
    # the shipped weights are the plain backbone: no head keys
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    network = wf.parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(weights, strict=True)


def test_bundle_2d_iteration(tmp_path):
    wf = run_training("ssnet", tmp_path, iterations=2, val_interval=2)
    _check_iteration(wf, tmp_path, 2)


def test_bundle_3d_la_iteration(tmp_path):
    wf = run_training("ssnet", tmp_path, configs=("train.json", "la.json"), tiny=TINY_3D, data_source="synthetic",
                      iterations=1, val_interval=1)
    _check_iteration(wf, tmp_path, 3)


def test_bad_weights_are_named():
    with pytest.raises(ValueError, match="cs_weight"):
        SSNetMethod(DiceLoss(), DiceVAT(), ClassSeparation(2), consistency=RampUp(0.1, 10), cs_weight=-1)
