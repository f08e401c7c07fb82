"""CML: CutMix masks, heterogeneous targets, conflict loss, the dual-subnet ensemble, the two training stages and the
bundle (2D and 3D training, evaluation, inference export)."""

from __future__ import annotations

import io
import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from common.losses.feature_discrepancy import FeatureDiscrepancyLoss, feature_discrepancy
from common.methods.cml import CMLMethod, cml_supervised_loss, heterogeneous_targets, two_stage_lr_scheduler
from common.mixing import box_mask, cutmix
from common.networks.dual_subnet import DualSubnet
from common.pseudo_labels import PseudoLabeler
from helpers import TINY_2D, TINY_3D, bundle_dir, workflow

# -- CutMix mask ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, ratio, side", [((128, 128), 0.5, (64, 64)), ((256, 256), 0.5, (128, 128)),
                                               ((112, 112, 80), 2 / 3, (74, 74, 53)), ((30, 20), 1 / 3, (10, 6))])
def test_centred_mask_zero_region_has_the_configured_size_and_is_centred(size, ratio, side):
    mask = box_mask(size, ratio)
    assert mask.shape == (1, 1, *size) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    zeros = torch.nonzero(mask[0, 0] == 0)
    lo, hi = zeros.min(0).values, zeros.max(0).values
    assert tuple((hi - lo + 1).tolist()) == side
    assert int((mask == 0).sum()) == int(np.prod(side))  # one solid box
    for d, (s, b) in enumerate(zip(size, side)):
        assert int(lo[d]) == (s - b) // 2  # margins before and after differ by at most one voxel
        assert abs(int(lo[d]) - (s - 1 - int(hi[d]))) <= 1


def test_random_mask_position_stays_inside_and_varies():
    torch.manual_seed(0)
    starts = set()
    for _ in range(30):
        mask = box_mask((16, 12), 0.5, position="random")
        zeros = torch.nonzero(mask[0, 0] == 0)
        lo, hi = zeros.min(0).values, zeros.max(0).values
        assert tuple((hi - lo + 1).tolist()) == (8, 6) and int(hi[0]) < 16 and int(hi[1]) < 12
        starts.add(tuple(lo.tolist()))
    assert len(starts) > 5


@pytest.mark.parametrize("kwargs, message", [({"ratio": 1.0}, "(0, 1)"), ({"ratio": 0.0}, "(0, 1)"),
                                             ({"position": "corner"}, "'corner'"), ({"ratio": (0.5,)}, "1 values")])
def test_mask_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        box_mask((8, 8), **{"ratio": 0.5, **kwargs})


def test_cutmix_mixes_images_and_label_maps():
    mask = box_mask((4, 4), 0.5)  # zeros at rows/cols 1..2
    a, b = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    mixed = cutmix(a, b, mask)
    assert torch.equal(mixed, 1 - mask)
    la, lb = torch.full((1, 1, 4, 4), 3), torch.full((1, 1, 4, 4), 2)
    lm = cutmix(la, lb, mask)
    assert lm.dtype == la.dtype and torch.equal(lm, torch.where(mask.bool(), la, lb))
    with pytest.raises(ValueError, match="same shape"):
        cutmix(a, torch.ones(2, 1, 4, 4), mask)


# -- heterogeneous targets -----------------------------------------------------------------------------------------


def test_heterogeneous_targets_on_a_hand_made_example():
    # unlabelled batch of 2: p = sample 0, q = sample 1; subnet i labels sample s with the constant 1 + 2 * i + s
    p0, q0, p1, q1 = 1, 2, 3, 4
    pseudo_0 = torch.tensor([p0, q0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).float()
    pseudo_1 = torch.tensor([p1, q1]).view(2, 1, 1, 1).expand(2, 1, 4, 4).float()
    mask = box_mask((4, 4), 0.5)
    t0, t1 = heterogeneous_targets(pseudo_0, pseudo_1, mask)
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[1:3, 1:3] = True
    # subnet 0: outside the box the other subnet's label of p, inside the box its own label of q (paper Eq. 9)
    assert torch.equal(t0[0, 0], torch.where(box, torch.tensor(float(q0)), torch.tensor(float(p1))))
    assert torch.equal(t1[0, 0], torch.where(box, torch.tensor(float(q1)), torch.tensor(float(p0))))
    assert t0.shape == (1, 1, 4, 4)


class _ScriptedLabeler:
    """Returns hand-made pseudo-labels: the first call is subnet 0's, the second subnet 1's."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __call__(self, logits):
        return self.labels.pop(0)


def _engine(network, optimizer, iteration):
    return types.SimpleNamespace(network=network, optimizer=optimizer, step_index=iteration - 1,
                                 state=types.SimpleNamespace(iteration=iteration))


def test_train_step_supervises_each_subnet_with_its_heterogeneous_target():
    torch.manual_seed(0)
    net = DualSubnet(2, 1, 4).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    seen = []
    method = CMLMethod(num_classes=4, pretrain_iterations=0, mask_position="centre",  # a known box to check against
                       loss_function=lambda logits, target: (seen.append(target.clone()), logits.mean() * 0)[1])
    method.switched_at = 0  # self-training from scratch
    pseudo = [torch.randint(0, 4, (4, 1, 32, 32)) for _ in range(2)]
    method.pseudo_labeler = _ScriptedLabeler(pseudo)
    labeled = {"image": torch.randn(4, 1, 32, 32), "label": torch.randint(0, 4, (4, 1, 32, 32)).float()}
    out = method.train_step(_engine(net, opt, 1), labeled, {"image": torch.randn(4, 1, 32, 32)})
    assert out["stage"] == 2 and "loss_sup_u" in out
    mask = box_mask((32, 32), 0.5, position="centre")
    y_mix = cutmix(labeled["label"][:2], labeled["label"][2:], mask)
    assert torch.equal(seen[0], y_mix) and torch.equal(seen[1], y_mix)
    inside = ~mask.bool()
    for i, target in enumerate(seen[2:]):
        other, own = pseudo[1 - i][:2].float(), pseudo[i][2:].float()
        assert torch.equal(target, torch.where(inside, own, other))


def test_released_code_options_train():
    # shared backbone (one U-Net run twice), random box position, logit averaging: a finite step in both stages
    torch.manual_seed(0)
    net = DualSubnet(2, 1, 4, shared_backbone=True, ensemble="logits").train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    method = CMLMethod(num_classes=4, pretrain_iterations=1, mask_position="random")
    labeled = {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 4, (2, 1, 32, 32)).float()}
    for iteration in (1, 2):
        out = method.train_step(_engine(net, opt, iteration), labeled, {"image": torch.randn(2, 1, 32, 32)})
        out["loss"].backward()
        opt.step()
        assert out["stage"] == iteration and math.isfinite(float(out["loss"].detach()))
    assert 0.0 <= float(out["loss_dis"]) <= 8.0  # two inputs x two directions, each in [0, 2]


def test_odd_batch_is_refused_with_its_size():
    net = DualSubnet(2, 1, 4)
    method = CMLMethod(num_classes=4, pretrain_iterations=5)
    labeled = {"image": torch.randn(3, 1, 32, 32), "label": torch.zeros(3, 1, 32, 32)}
    with pytest.raises(ValueError, match="even and >= 2; got 3"):
        method.train_step(_engine(net, None, 1), labeled, None)


# -- losses --------------------------------------------------------------------------------------------------------


def test_feature_discrepancy_range_and_extremes():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 5, 5)
    assert float(feature_discrepancy(f, f)) == pytest.approx(2.0, abs=1e-5)
    assert float(feature_discrepancy(f, -f)) == pytest.approx(0.0, abs=1e-5)
    for _ in range(20):
        v = float(feature_discrepancy(torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)))
        assert 0.0 <= v <= 2.0
    expected = 1 + F.cosine_similarity(f[:1], f[1:], dim=1).mean()
    assert float(feature_discrepancy(f[:1], f[1:])) == pytest.approx(float(expected), abs=1e-6)


def test_feature_discrepancy_gradient_reaches_only_its_own_subnet():
    torch.manual_seed(0)
    net = DualSubnet(2, 1, 4).train()
    out = net.forward_branches(torch.randn(2, 1, 32, 32))
    f0, f1 = out[0].features[-1], out[1].features[-1]
    feature_discrepancy(f0, f1).backward()
    grads_0 = [p.grad for p in net.branch(0).parameters() if p.grad is not None]
    assert grads_0 and any(float(g.abs().sum()) > 0 for g in grads_0)
    assert all(p.grad is None for p in net.branch(1).parameters())
    net.zero_grad(set_to_none=True)
    out = net.forward_branches(torch.randn(2, 1, 32, 32))
    FeatureDiscrepancyLoss()(out[0].features[-1], out[1].features[-1]).backward()
    assert all(any(p.grad is not None for p in net.branch(i).parameters()) for i in (0, 1))


def test_supervised_loss_matches_the_papers_code():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16, 16)
    label = torch.randint(0, 4, (3, 1, 16, 16))
    label[0] = 0  # a sample without foreground: per-sample Dice with background
    probs = logits.softmax(1)
    onehot = F.one_hot(label[:, 0], 4).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).flatten(2).sum(2)
    union = (probs + onehot).flatten(2).sum(2)
    dice = 1 - ((2 * inter + 1e-5) / (union + 1e-5)).mean()
    expected = 0.5 * (F.cross_entropy(logits, label[:, 0]) + dice)
    assert float(cml_supervised_loss()(logits, label.float())) == pytest.approx(float(expected), rel=1e-5)


# -- pseudo-labels -------------------------------------------------------------------------------------------------


def test_pseudo_labels_keep_the_largest_component_per_class_and_sample():
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[0, 0:3, 0:3] = 1  # 9 px
    label[0, 6:8, 6:8] = 1  # 4 px, dropped
    label[0, 0:2, 5:8] = 2  # 6 px (class 2 keeps its only component)
    label[1, 5:7, 0:2] = 1  # sample 1: the small one is its largest
    logits = F.one_hot(label, 3).permute(0, 3, 1, 2).float()
    out = PseudoLabeler(3)(logits)
    expected = label.clone()
    expected[0, 6:8, 6:8] = 0
    assert out.shape == (2, 1, 8, 8) and out.dtype == torch.long
    assert torch.equal(out[:, 0], expected)
    assert torch.equal(PseudoLabeler(3, largest_component=False)(logits)[:, 0], label)
    binary = torch.zeros(1, 2, 4, 4)
    binary[0, 0, 2:] = 1.0  # p(fg) = 0.5 on the first two rows, < 0.5 below
    assert int(PseudoLabeler(2, threshold=0.5)(binary).sum()) == 8  # ties are foreground with the LA threshold
    assert int(PseudoLabeler(2)(binary).sum()) == 0  # and background with arg-max
    with pytest.raises(ValueError, match="num_classes == 2"):
        PseudoLabeler(4, threshold=0.5)


# -- the dual-subnet network ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 32, 32)), (3, (1, 1, 16, 16, 16))])
def test_ensemble_output_is_the_mean_of_the_subnets_probabilities(spatial_dims, shape):
    torch.manual_seed(0)
    classes = 4 if spatial_dims == 2 else 2
    net = DualSubnet(spatial_dims, 1, classes).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        out = net(x)
        l0, l1 = [o.logits for o in net.forward_branches(x)]
    mean_prob = (l0.softmax(1) + l1.softmax(1)) / 2
    assert not torch.allclose(l0, l1)
    torch.testing.assert_close(out.softmax(1), mean_prob, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.exp(), mean_prob, atol=1e-6, rtol=1e-5)  # log of the mean probability
    assert torch.equal(out.argmax(1), mean_prob.argmax(1))
    logits_net = DualSubnet(spatial_dims, 1, classes, ensemble="logits").eval()
    logits_net.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(logits_net(x), (l0 + l1) / 2)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), out, atol=1e-5, rtol=1e-5)


def test_subnets_differ_in_up_sampling_and_shared_backbone_reproduces_the_code():
    net = DualSubnet(2, 1, 4)
    assert isinstance(net.branch(1).up[0].up, torch.nn.ConvTranspose2d)
    assert isinstance(net.branch(0).up[0].up, torch.nn.Upsample)
    assert set(net.state_dict()) >= {"subnets.0.head.weight", "subnets.1.head.weight"}
    shared = DualSubnet(2, 1, 4, shared_backbone=True)
    assert shared.branch(0) is shared.branch(1) and len(shared.subnets) == 1
    vnet = DualSubnet(3, 1, 2)
    assert isinstance(vnet.branch(0).block_five_up[0], torch.nn.ConvTranspose3d)
    assert isinstance(vnet.branch(1).block_five_up[0], torch.nn.Upsample)
    with pytest.raises(ValueError, match="'mean'"):
        DualSubnet(2, 1, 4, ensemble="mean")


# -- stages --------------------------------------------------------------------------------------------------------


def _sgd_step(net, opt, seed):
    torch.manual_seed(seed)
    opt.zero_grad()
    net(torch.randn(2, 1, 32, 32)).square().mean().backward()
    opt.step()


def test_self_training_starts_from_the_best_pretraining_weights_and_optimizer_state():
    torch.manual_seed(0)
    net = DualSubnet(2, 1, 4).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    method = CMLMethod(num_classes=4, pretrain_iterations=3)
    _sgd_step(net, opt, 1)
    assert method.offer_pretrain_state(net, opt, iteration=1, value=0.5)
    best_net = {k: v.clone() for k, v in net.state_dict().items()}
    best_buf = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    _sgd_step(net, opt, 2)
    assert not method.offer_pretrain_state(net, opt, iteration=2, value=0.4)  # worse: not kept
    _sgd_step(net, opt, 3)
    for g in opt.param_groups:
        g["lr"] = 0.123  # the scheduler's learning rate must survive the restore
    # the snapshot travels through the resume checkpoint (weights_only)
    restored = CMLMethod(num_classes=4, pretrain_iterations=3)
    state = method.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    restored.pseudo_labeler = _ScriptedLabeler([torch.zeros(2, 1, 32, 32, dtype=torch.long)] * 2)
    loaded = []
    original = net.load_state_dict
    net.load_state_dict = lambda sd, *a, **k: (loaded.append({k_: v.clone() for k_, v in sd.items()}),
                                               original(sd, *a, **k))[1]
    batch = {"image": torch.randn(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32)}
    out = restored.train_step(_engine(net, opt, 4), batch, {"image": torch.randn(2, 1, 32, 32)})
    assert out["stage"] == 2 and restored.switched_at == 4 and restored.pretrain_best_iteration == 1
    assert len(loaded) == 1
    for k, v in best_net.items():
        assert torch.equal(loaded[0][k], v), k
    for p, b in zip(net.parameters(), best_buf):
        assert torch.equal(opt.state[p]["momentum_buffer"], b)
    assert all(g["lr"] == 0.123 for g in opt.param_groups)
    assert restored.get_extra_state()["snapshot"] == {}  # dropped after the switch


def test_two_stage_lr_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = two_stage_lr_scheduler(opt, pretrain_iterations=4, kind="step", max_iterations=20, step_size=5)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:9] == pytest.approx([0.01] * 9)  # 4 pre-training + the first 5 self-training iterations
    assert lrs[9:14] == pytest.approx([0.001] * 5) and lrs[14] == pytest.approx(0.0001)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    constant = two_stage_lr_scheduler(opt, 4, "constant", 20)
    for _ in range(10):
        opt.step()
        constant.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="'cosine'"):
        two_stage_lr_scheduler(opt, 4, "cosine", 20)


# -- the bundle ----------------------------------------------------------------------------------------------------


#: pre-training = iterations 1..3; validations at 2 (interval) and 3 (stage boundary); self-training 4..5
TWO_STAGES = {**TINY_2D, "iterations": 5, "pretrain_iterations": 3, "val_interval": 2, "checkpoint_interval": 2}


class _Stop(Exception):
    pass


def _recorded_run(output_dir, stop_at=None):
    """Train the 2D bundle with TWO_STAGES, recording losses, stages, the weights at each validation and the
    weights self-training starts from."""
    wf = workflow("cml", output_dir=str(output_dir), **TWO_STAGES)
    trainer = wf.parser.get_parsed_content("train#trainer")
    network = wf.parser.get_parsed_content("network")
    method = wf.parser.get_parsed_content("method")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    rec = {"wf": wf, "losses": [], "stages": [], "validations": {}, "first_stage2": {}}
    evaluator.add_event_handler(Events.COMPLETED, lambda e: rec["validations"].__setitem__(
        trainer.state.iteration, ({k: v.clone() for k, v in network.state_dict().items()},
                                  float(e.state.metrics["val_mean_dice"]))))
    original = method._start_self_training

    def spy(engine):
        original(engine)
        rec["first_stage2"].update({k: v.clone() for k, v in network.state_dict().items()})

    method._start_self_training = spy

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        rec["losses"].append((engine.state.iteration, float(engine.state.output["loss"])))
        rec["stages"].append(engine.state.output["stage"])
        if stop_at is not None and engine.state.iteration == stop_at:
            raise _Stop()

    if stop_at is None:
        wf.run()
    else:
        with pytest.raises(RuntimeError):
            wf.run()
    return rec


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cml_two_stages")
    return out, _recorded_run(out)


def test_bundle_2d_self_training_starts_from_the_best_pretraining_state(two_stage_run):
    out, rec = two_stage_run
    method = rec["wf"].parser.get_parsed_content("method")
    assert rec["stages"] == [1, 1, 1, 2, 2]
    history = [json.loads(line) for line in open(out / "models" / "validation.jsonl")]
    assert [h["iteration"] for h in history] == [2, 3, 4]
    scores = {i: rec["validations"][i][1] for i in (2, 3)}
    best_it = 2 if scores[2] >= scores[3] else 3  # the first of equal scores is kept
    assert method.pretrain_best_iteration == best_it and method.switched_at == 4
    assert method.pretrain_best == pytest.approx(scores[best_it])
    for k, v in rec["validations"][best_it][0].items():
        assert torch.equal(rec["first_stage2"][k], v), k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 5 and summary["pretrain_iterations"] == 3


def test_bundle_2d_evaluate_overlay_scores_the_best_model(two_stage_run):
    out, _ = two_stage_run
    ev = workflow("cml", ["train.json", "evaluate.json"], workflow_type="eval", output_dir=str(out), **TINY_2D)
    ev.run()
    result = json.loads((out / "eval" / "summary.json").read_text())
    assert set(result["mean"]) >= {"dice", "jaccard", "hd95", "asd"}


def test_bundle_2d_resume_across_the_stage_switch_is_exact(two_stage_run, tmp_path):
    _, ref = two_stage_run
    # dies after iteration 3 (the boundary validation ran, no checkpoint since 2): the resumed run replays 3..5 from
    # the checkpoint of iteration 2, whose method state holds the pre-training snapshot of iteration 2
    _recorded_run(tmp_path, stop_at=3)
    again = _recorded_run(tmp_path)
    assert [i for i, _ in again["losses"]] == [3, 4, 5] and again["stages"] == [1, 2, 2]
    for (i, a), (j, b) in zip(ref["losses"][2:], again["losses"]):
        assert i == j and a == pytest.approx(b, abs=1e-6)
    ref_w = ref["wf"].parser.get_parsed_content("network").state_dict()
    for k, v in again["wf"].parser.get_parsed_content("network").state_dict().items():
        torch.testing.assert_close(v, ref_w[k], atol=1e-6, rtol=0)


def test_bundle_3d_la_overlay_one_iteration_each_stage(tmp_path):
    params = {**TINY_3D, "data_source": "synthetic", "labeled_batch_size": 2, "unlabeled_batch_size": 2,
              "iterations": 2, "pretrain_iterations": 1, "val_interval": 10}
    wf = workflow("cml", ["train.json", "la.json"], output_dir=str(tmp_path), **params)
    stages = []
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (stages.append(e.state.output["stage"]),
                                                                      e.state.output["loss"]))
    method = wf.parser.get_parsed_content("method")
    assert method.mask_ratio == pytest.approx(2 / 3) and method.pseudo_labeler.threshold == 0.5
    wf.run()
    assert stages == [1, 2] and method.switched_at == 2
    assert (tmp_path / "models" / "validation.jsonl").is_file()  # the stage-boundary validation ran
    assert math.isfinite(float(trainer.state.output["loss"]))


def test_inference_config_exports_the_ensemble(tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out
    from monai.data import load_net_with_metadata

    root = bundle_dir("cml")
    net = DualSubnet(2, 1, 4).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=str(root / "configs" / "inference.json"), bundle_root=str(root))
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt),
                meta_file=str(root / "configs" / "metadata.json"), config_file=str(root / "configs" / "inference.json"),
                bundle_root=str(root))
    loaded, meta, _ = load_net_with_metadata(str(ts))
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-5)
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4


def test_metadata_follows_the_schema(schema_path):
    jsonschema = pytest.importorskip("jsonschema")
    meta = json.loads((bundle_dir("cml") / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(schema_path.read_text()))
    assert meta["version"] in meta["changelog"]


# -- the mix box position (issue 13) ----------------------------------------------------------------------------------


def test_random_box_covers_every_allowed_start_roughly_uniformly_and_stays_inside():
    """size 20, side 8 -> starts 0..12 (13 positions): both ends reached, each about 1/13 of the draws."""
    torch.manual_seed(3)
    draws = 2600
    counts = torch.zeros(2, 13)
    for _ in range(draws):
        zeros = torch.nonzero(box_mask((20, 16), (0.4, 0.5), position="random")[0, 0] == 0)
        lo, hi = zeros.min(0).values, zeros.max(0).values
        assert tuple((hi - lo + 1).tolist()) == (8, 8)
        assert int(lo.min()) >= 0 and int(hi[0]) <= 19 and int(hi[1]) <= 15  # fully inside the patch
        counts[0, int(lo[0])] += 1
        if int(lo[1]) < 13:
            counts[1, int(lo[1])] += 1
    rows = counts[0]
    assert rows[0] > 0 and rows[12] > 0  # both ends of the allowed range
    expected = draws / 13
    assert float(((rows - expected) ** 2 / expected).sum()) < 36.4  # chi-square, 12 dof, p = 0.0003
    cols = counts[1, :9]  # 16 - 8 + 1 = 9 positions along the second axis
    assert cols[0] > 0 and cols[8] > 0 and counts[1, 9:].sum() == 0


def test_cml_draws_a_new_random_box_per_mix_by_default_and_centres_only_when_asked():
    method = CMLMethod(num_classes=4, pretrain_iterations=0)
    assert method.mask_position == "random"
    like = torch.zeros(2, 1, 32, 32)
    torch.manual_seed(0)
    masks = [method._mask(like) for _ in range(10)]
    assert len({tuple(torch.nonzero(m[0, 0] == 0).min(0).values.tolist()) for m in masks}) > 3
    centred = CMLMethod(num_classes=4, pretrain_iterations=0, mask_position="centre")
    assert all(torch.equal(centred._mask(like), box_mask((32, 32), 0.5, position="centre")) for _ in range(3))


def test_bundle_default_is_the_random_box_and_the_released_code_overlay_exists():
    cfg = json.loads((bundle_dir("cml") / "configs" / "train.json").read_text())
    assert cfg["mask_position"] == "random"
    assert json.loads((bundle_dir("cml") / "configs" / "acdc_cpu_v1.json").read_text())["mask_position"] == "random"
    code = json.loads((bundle_dir("cml") / "configs" / "released_code.json").read_text())
    assert code == {"shared_backbone": True, "ensemble": "logits", "mask_position": "random"}


@pytest.mark.parametrize("spatial", [(2, 30), (3, 9)])
def test_keep_largest_components_equals_monai_transform(spatial):
    """The one-labelling implementation equals MONAI's KeepLargestConnectedComponent (independent per class) on
    random maps in 2D and 3D, dense and sparse, with many equal-sized components (tie-breaks), sides from 1 (a volume
    shaped (a, b, 1) is numbered differently by a joint labelling: its ties must still resolve as MONAI's)."""
    from monai.transforms import KeepLargestConnectedComponent

    from common.pseudo_labels import keep_largest_components

    dims, side = spatial
    reference = KeepLargestConnectedComponent(applied_labels=[1, 2, 3], is_onehot=False, independent=True)
    rng = np.random.default_rng(0)
    for trial in range(300):
        shape = tuple(int(s) for s in rng.integers(1 if trial % 2 else 2, side, size=dims))
        if trial % 3 == 0:
            labels = rng.integers(0, 4, shape)
        elif trial % 3 == 1:
            labels = (rng.random(shape) < 0.2) * rng.integers(1, 4, shape)
        else:  # a lattice of equal blobs: every class has many components of the same size
            labels = np.zeros(shape, dtype=np.int64)
            labels[tuple(slice(0, None, 3) for _ in shape)] = 1 + trial % 3
        labels = labels.astype(np.int64)
        expected = np.asarray(reference(torch.as_tensor(labels[None]).clone()))[0]
        assert np.array_equal(keep_largest_components(labels, [1, 2, 3]), expected), (trial, shape)
    tied = np.array([[0, 1], [2, 0], [1, 0]], dtype=np.int64)[..., None]  # (3, 2, 1): two 1-voxel components of class 1
    expected = np.asarray(reference(torch.as_tensor(tied[None]).clone()))[0]
    assert np.array_equal(keep_largest_components(tied, [1, 2, 3]), expected)
