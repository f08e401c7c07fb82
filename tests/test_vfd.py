"""VFD: voxel sampling, sampled multi-resolution fusion, discriminator routing, BYOL, the method's update rules
(G-then-D separation, EMA), the bundle's 2D/3D iterations and an exact resume."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.losses import DiceLoss

from common.engines import load_checkpoint
from common.methods.vfd import VFDMethod
from common.networks import UNet2D
from common.networks.byol import byol_loss
from common.networks.multires_fusion import MultiResolutionFusion
from common.networks.voxel_discriminator import VoxelFeatureDiscriminator
from common.networks.voxel_sampling import VoxelSamples, sample_class_voxels, threshold_pseudo_labels
from helpers import StopTraining, TINY_2D, TINY_3D, run_training, workflow, root_cause




def _label_map(batch: int, size: int) -> torch.Tensor:
    """(B, 1, S, S) float labels with all four ACDC classes: LV disc, MYO ring, RV blob, background."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    lab = torch.zeros(size, size)
    lab[r < size / 4] = 2
    lab[r < size / 6] = 3
    lab[(yy < size / 4) & (xx < size / 4)] = 1
    return lab.expand(batch, 1, size, size).clone()


def _method(**kwargs) -> tuple[VFDMethod, UNet2D]:
    torch.manual_seed(0)
    net = UNet2D(1, 4)
    params = dict(num_classes=4, spatial_dims=2, voxels_per_class=16, consistency_rampup=10, ema_warmup=False)
    params.update(kwargs)
    return VFDMethod(net, DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True), **params), net


def _engine(net, step=5) -> SimpleNamespace:
    synced = []
    return SimpleNamespace(network=net, step_index=step, sync_gradients=lambda p: synced.append(len(list(p))),
                           state=SimpleNamespace(output={}), synced=synced)


def _set_teacher_confidence(method: VFDMethod, p_background: float) -> None:
    """Make the teacher predict background with probability ``p_background`` at every voxel."""
    head = method.teacher.module["backbone"].head
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([math.log(p_background / (1 - p_background) * 3), 0.0, 0.0, 0.0]))


def _batches(size: int = 32):
    torch.manual_seed(1)
    labeled = {"image": torch.rand(2, 1, size, size), "label": _label_map(2, size)}
    unlabeled = {"image": torch.rand(2, 1, size, size)}
    return labeled, unlabeled


def _snapshot(*modules) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values() if torch.is_tensor(t)]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- voxel sampling ----------------------------------------------------------------------------------------------
def test_sampling_caps_each_class_without_replacement():
    torch.manual_seed(0)
    class_map = torch.randint(-1, 3, (3, 20, 24))
    samples = sample_class_voxels(class_map, num_classes=3, per_class=50)
    assert samples.coords.shape == (len(samples), 2) and samples.spatial_size == (20, 24)
    # every voxel is of the class it is reported with, and no voxel comes twice
    assert torch.equal(class_map[samples.batch, samples.coords[:, 0], samples.coords[:, 1]], samples.classes)
    keys = samples.batch * 1000 + samples.coords[:, 0] * 24 + samples.coords[:, 1]
    assert keys.unique().numel() == len(samples)
    for b in range(3):
        for c in range(3):
            available = int((class_map[b] == c).sum())
            assert int(((samples.batch == b) & (samples.classes == c)).sum()) == min(50, available)
    assert (samples.classes >= 0).all()  # -1 (ignored) voxels never come out
    assert torch.equal(samples.batch, samples.batch.sort().values)  # image-major order


def test_pseudo_labels_below_threshold_are_excluded():
    logits = torch.zeros(1, 4, 2, 3)
    logits[0, 2, 0, 0] = 10.0  # confident class 2
    logits[0, 1, 1, 2] = math.log(0.7 / 0.1)  # class 1 at exactly p = 0.7: not above t
    logits[0, 3, 0, 1] = 2.0  # p = e^2 / (e^2 + 3) = 0.711 > 0.7
    pseudo = threshold_pseudo_labels(torch.softmax(logits, 1), 0.7)
    assert pseudo.tolist() == [[[2, 3, -1], [-1, -1, -1]]]
    samples = sample_class_voxels(pseudo, num_classes=4, per_class=10)
    assert sorted(zip(samples.classes.tolist(), samples.coords.tolist())) == [(2, [0, 0]), (3, [0, 1])]
    with pytest.raises(ValueError, match="threshold must be in"):
        threshold_pseudo_labels(torch.softmax(logits, 1), 1.5)


def test_sampling_rejects_bad_values():
    with pytest.raises(ValueError, match=r"got range \[4, 4\]"):
        sample_class_voxels(torch.full((1, 4, 4), 4), num_classes=4, per_class=3)
    with pytest.raises(ValueError, match="voxels per class must be >= 1, got 0"):
        sample_class_voxels(torch.zeros(1, 4, 4), num_classes=4, per_class=0)


# -- fusion, discriminator, BYOL --------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_sampled_fusion_equals_the_dense_map(dims):
    torch.manual_seed(0)
    size = (16, 12) if dims == 2 else (8, 12, 8)
    feats = [torch.randn((2, c) + tuple(s // 2 ** i for s in size)) for i, c in enumerate((4, 6, 8))]
    class_map = torch.randint(0, 3, (2,) + size)
    samples = sample_class_voxels(class_map, 3, per_class=1000)  # every voxel, borders included
    for norm, train in ((True, False), (False, True)):  # BN in eval mode, or no BN: sampled == dense exactly
        fusion = MultiResolutionFusion(dims, [4, 6, 8], channels=5, norm=norm,
                                       act="relu" if norm else "leakyrelu").train(train)
        if norm:  # non-trivial running statistics
            for m in fusion.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        dense = fusion(feats, size)
        expected = dense[(samples.batch, slice(None), *samples.coords.unbind(1))]
        torch.testing.assert_close(fusion.sample(feats, samples), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fusion.sample(feats, samples, dense=True), expected)



@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sampled_fusion_gradients_equal_the_dense_maps(dims, channels_last):
    """The gather-based read of each level (issue 16) back-propagates like the dense interpolate + conv."""
    torch.manual_seed(0)
    size = (16, 12) if dims == 2 else (8, 12, 8)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    base = [torch.randn((2, c) + tuple(s // 2 ** i for s in size)) for i, c in enumerate((4, 6, 8))]
    samples = sample_class_voxels(torch.randint(0, 3, (2,) + size), 3, per_class=7)
    fusion = MultiResolutionFusion(dims, [4, 6, 8], channels=5, norm=False, act="leakyrelu")
    if channels_last:
        for p in fusion.parameters():
            if p.dim() == dims + 2:
                p.data = p.data.contiguous(memory_format=fmt)
    weights = torch.randn(len(samples), 5)
    grads = {}
    for mode in ("sampled", "dense"):
        feats = [(f.contiguous(memory_format=fmt) if channels_last else f.clone()).requires_grad_() for f in base]
        fusion.zero_grad()
        if mode == "dense":
            out = fusion(feats, size)[(samples.batch, slice(None), *samples.coords.unbind(1))]
        else:
            out = fusion.sample(feats, samples)
        (out * weights).sum().backward()
        grads[mode] = [f.grad for f in feats] + [p.grad.clone() for p in fusion.parameters()]
    for sampled, dense in zip(grads["sampled"], grads["dense"]):
        torch.testing.assert_close(sampled, dense, atol=1e-5, rtol=1e-4)


def test_fusion_gradient_reaches_every_level():
    torch.manual_seed(0)
    feats = [torch.randn(2, c, 16 // 2 ** i, 16 // 2 ** i, requires_grad=True) for i, c in enumerate((4, 6, 8, 10))]
    fusion = MultiResolutionFusion(2, [4, 6, 8, 10], channels=8)
    samples = sample_class_voxels(torch.randint(0, 2, (2, 16, 16)), 2, per_class=5)
    fusion.sample(feats, samples).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_voxels_reach_the_head_of_their_class():
    torch.manual_seed(0)
    disc = VoxelFeatureDiscriminator(2, [4, 6], num_classes=4, channels=8)
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    class_map = torch.full((2, 8, 8), -1)
    class_map[0, :4] = 1
    class_map[1, 4:] = 3
    samples = sample_class_voxels(class_map, 4, per_class=100)
    logits = disc(feats, samples)
    # each logit is the output of its class's head on the shared MLP features
    hidden = disc.mlp(disc.fusion.sample(feats, samples))
    for c in (1, 3):
        rows = samples.classes == c
        torch.testing.assert_close(logits[rows], disc.heads[c](hidden[rows]).squeeze(1))
    logits.sum().backward()
    grads = [float(h.weight.grad.abs().sum()) for h in disc.heads]
    assert grads[0] == 0 and grads[2] == 0 and grads[1] > 0 and grads[3] > 0
    with pytest.raises(ValueError, match=r"classes must be in \[0, 3\]"):
        disc.classify(torch.zeros(1, 8), torch.tensor([4]))


def test_byol_loss_is_two_minus_two_cosine():
    torch.manual_seed(0)
    p, z = torch.randn(7, 5, requires_grad=True), torch.randn(7, 5, requires_grad=True)
    loss = byol_loss(p, z)
    torch.testing.assert_close(loss, (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean())
    loss.backward()
    assert z.grad is None and p.grad is not None  # no gradient into the teacher side


# -- the method's update rules ----------------------------------------------------------------------------------
def test_optimizer_sets_are_disjoint_and_discriminator_state_is_in_the_state_dict():
    method, net = _method()
    main = {id(p) for p in method.optimized_parameters(net)}
    disc = {id(p) for p in method.discriminator.parameters()}
    teacher = {id(p) for p in method.teacher.parameters()}
    assert not main & disc and not main & teacher
    assert {id(p) for g in method.discriminator_optimizer.param_groups for p in g["params"]} == disc
    group = method.discriminator_optimizer.param_groups[0]
    assert group["lr"] == 2e-4 and tuple(group["betas"]) == (0.5, 0.999)
    # the teacher covers the backbone, the voxel feature layer and the projector (not the predictor)
    assert set(method.teacher.module.keys()) == {"backbone", "feature_layer", "projector"}
    labeled, unlabeled = _batches()
    engine = _engine(net)
    method.train_step(engine, labeled, unlabeled)["loss"].backward()
    method.after_step(engine)
    state = method.state_dict()
    assert "_extra_state" in state and state["_extra_state"]["discriminator_optimizer"]["state"]
    fresh, _ = _method()
    fresh.load_state_dict(state)
    restored = fresh.discriminator_optimizer.state_dict()["state"]
    for k, v in state["_extra_state"]["discriminator_optimizer"]["state"].items():
        torch.testing.assert_close(restored[k]["exp_avg"], v["exp_avg"])


def test_generator_update_leaves_discriminator_and_discriminator_update_leaves_segmentation_network():
    method, net = _method()
    optimizer = torch.optim.SGD(list(method.optimized_parameters(net)), lr=0.1, momentum=0.9)
    labeled, unlabeled = _batches()
    engine = _engine(net)
    method.train()
    _set_teacher_confidence(method, 0.9)  # unlabelled voxels pass the threshold
    d_before = _snapshot(method.discriminator)
    out = method.train_step(engine, labeled, unlabeled)
    assert float(out["loss_adv"]) > 0  # the generator term went through the discriminator
    out["loss"].backward()
    assert all(p.grad is None for p in method.discriminator.parameters())
    assert all(p.requires_grad for p in method.discriminator.parameters())  # restored after the frozen pass
    optimizer.step()
    assert _same(d_before, _snapshot(method.discriminator))

    seg_modules = (net, method.feature_layer, method.projector, method.predictor, method.teacher)
    seg_before = _snapshot(*seg_modules)
    grads_before = [p.grad.clone() for p in method.optimized_parameters(net)]
    stats = method.discriminator_step(engine)
    assert _same(seg_before, _snapshot(*seg_modules))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, method.optimized_parameters(net)))
    assert not _same(d_before, _snapshot(method.discriminator))
    assert engine.synced == [len(list(method.discriminator.parameters()))]
    assert set(stats) >= {"loss_d", "d_real"} and torch.isfinite(stats["loss_d"])
    assert method.discriminator_step(engine) == {}  # the cache is used once


def test_ema_update_matches_the_formula():
    method, net = _method(ema_decay=0.9)
    optimizer = torch.optim.SGD(list(method.optimized_parameters(net)), lr=0.5)
    labeled, unlabeled = _batches()
    engine = _engine(net)
    teacher_before = copy.deepcopy(method.teacher.module)
    method.train_step(engine, labeled, unlabeled)["loss"].backward()
    optimizer.step()
    method.after_step(engine)
    student = method._student_modules(net)
    changed = 0
    for (name, t_new), t_old, s in zip(method.teacher.module.named_parameters(), teacher_before.parameters(),
                                       student.parameters()):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s.detach(), msg=name)
        changed += int(not torch.equal(t_new, t_old))
    assert changed > 0
    for t, s in zip(method.teacher.module.buffers(), student.buffers()):
        assert torch.equal(t, s)  # BatchNorm statistics are copied
    # with the UA-MT warm-up the decay is min(1 - 1/(k + 1), lambda) at the k-th update
    warm, _ = _method(ema_decay=0.99, ema_warmup=True)
    assert warm.teacher.current_decay() == 0.0
    warm.teacher.num_updates.fill_(9)
    assert warm.teacher.current_decay() == pytest.approx(0.9)


def test_confidence_threshold_gates_the_adversarial_voxels():
    labeled, unlabeled = _batches()
    for p_background, expect_voxels in ((0.69, False), (0.72, True)):
        method, net = _method()
        _set_teacher_confidence(method, p_background)
        out = method.train_step(_engine(net), labeled, unlabeled)
        unl = method._cache["unlabeled_samples"]
        if expect_voxels:
            assert len(unl) == 2 * 16 and (unl.classes == 0).all() and float(out["confident_fraction"]) == 1.0
            assert float(out["loss_adv"]) > 0
        else:
            assert len(unl) == 0 and float(out["confident_fraction"]) == 0.0 and float(out["loss_adv"]) == 0.0
        assert len(method._cache["labeled_samples"]) == 2 * 4 * 16  # ground truth: 16 voxels of each class


def test_warmup_weight_and_bad_arguments():
    method, _ = _method(consistency_weight=0.001, consistency_rampup=100)
    assert method.consistency(0) == pytest.approx(0.001 * math.exp(-5))
    assert method.consistency(50) == pytest.approx(0.001 * math.exp(-5 * 0.25))
    assert method.consistency(100) == pytest.approx(0.001)
    for kwargs, message in (({"threshold": 1.5}, "threshold must be in"),
                            ({"voxels_per_class": 0}, "voxels_per_class must be >= 1, got 0"),
                            ({"feature_levels": [0, 7]}, r"feature_levels must be indices in \[0, 4\]"),
                            ({"pairing": "nearest"}, "pairing must be 'shuffle' or 'same', got 'nearest'"),
                            ({"adv_weight": -1.0}, "adv_weight must be a finite number >= 0, got -1.0"),
                            ({"adv_rampup": float("nan")}, "adv_rampup must be a finite number >= 0, got nan"),
                            ({"adv_rampup": float("inf")}, "adv_rampup must be a finite number >= 0, got inf"),
                            ({"adv_rampup": True}, "adv_rampup must be a finite number >= 0, got True"),
                            ({"consistency_rampup": "5"}, "consistency_rampup must be a finite number >= 0, got '5'"),
                            ({"feature_weight": float("nan")}, "feature_weight must be a finite number >= 0, got nan")):
        with pytest.raises(ValueError, match=message):
            _method(**kwargs)
    with pytest.raises(TypeError, match="ema_warmup must be a bool"):
        _method(ema_warmup="false")
    with pytest.raises(TypeError, match="forward_features"):
        VFDMethod(torch.nn.Conv2d(1, 4, 3), DiceLoss(), num_classes=4, spatial_dims=2)
    method, net = _method()
    labeled, unlabeled = _batches()
    labeled["label"][0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\], got values in \[0, 5\]"):
        method.train_step(_engine(net), labeled, unlabeled)


def test_adv_rampup_scales_only_the_adversarial_term():
    """alpha(t) = alpha exp(-5 (1 - t / adv_rampup)^2): the total loss moves by exactly (alpha(t) - alpha) L_adv
    against the constant-alpha method on the same batch; 0 keeps alpha constant."""
    def step(t, **kwargs):
        method, net = _method(adv_weight=0.01, **kwargs)
        labeled, unlabeled = _batches()
        _set_teacher_confidence(method, 0.95)  # every unlabelled voxel confident: L_adv > 0
        torch.manual_seed(3)
        return method.train_step(_engine(net, step=t), labeled, unlabeled)

    for t, factor in ((0, math.exp(-5)), (50, math.exp(-5 * 0.25)), (100, 1.0), (400, 1.0)):
        ramped, constant = step(t, adv_rampup=100), step(t)
        assert float(ramped["adv_weight"]) == pytest.approx(0.01 * factor)
        assert float(constant["adv_weight"]) == pytest.approx(0.01)
        assert float(ramped["loss_adv"]) == pytest.approx(float(constant["loss_adv"])) and float(ramped["loss_adv"]) > 1
        expected = float(constant["loss"]) - 0.01 * (1 - factor) * float(constant["loss_adv"])
        assert float(ramped["loss"]) == pytest.approx(expected, rel=1e-5)


# -- the bundle -------------------------------------------------------------------------------------------------
def _record(wf, stop_at=None):
    records = []
    trainer = wf.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_COMPLETED)
    def _rec(engine):
        records.append((engine.state.iteration, {k: float(v) for k, v in engine.state.output.items()
                                                 if torch.is_tensor(v) and v.numel() == 1}))
        if stop_at is not None and engine.state.iteration == stop_at:
            raise StopTraining()

    return records


@pytest.mark.parametrize("dims", [2, 3])
def test_one_bundle_iteration_has_finite_losses(dims, tmp_path):
    configs = ("train.json",) if dims == 2 else ("train.json", "la.json")
    tiny = {**(TINY_2D if dims == 2 else TINY_3D), "iterations": 1, "val_interval": 1}
    wf = workflow("vfd", configs, output_dir=str(tmp_path), **tiny)
    records = _record(wf)
    wf.run()
    wf.finalize()
    (_, losses), = records
    for name in ("loss", "loss_seg", "loss_consistency", "loss_adv", "loss_feature", "loss_d", "d_real"):
        assert math.isfinite(losses[name]), name
    assert losses["loss_feature"] > 0 and losses["loss_d"] > 0
    method = wf.parser.get_parsed_content("method")
    assert method.spatial_dims == dims and (tmp_path / "models" / "model.pt").is_file()


def test_resume_continues_identically(tmp_path):
    params = {**TINY_2D, "iterations": 6, "val_interval": 3, "checkpoint_interval": 2}
    ref = workflow("vfd", output_dir=str(tmp_path / "ref"), **params)
    ref_records = _record(ref)
    ref.run()

    cut = workflow("vfd", output_dir=str(tmp_path / "cut"), **params)
    _record(cut, stop_at=3)  # dies after iteration 3; the last checkpoint is at 2
    with pytest.raises(RuntimeError) as info:
        cut.run()
    assert isinstance(root_cause(info.value), StopTraining)
    state = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    assert state["trainer"]["iteration"] == 2
    assert state["method"]["_extra_state"]["discriminator_optimizer"]["state"]  # Adam moments are saved

    again = workflow("vfd", output_dir=str(tmp_path / "cut"), **params)
    again_records = _record(again)
    again.run()
    assert [i for i, _ in again_records] == [3, 4, 5, 6]
    for (i, a), (j, b) in zip(ref_records[2:], again_records):
        assert i == j and a.keys() == b.keys()
        for name in a:
            assert a[name] == pytest.approx(b[name], abs=1e-6), (i, name)
    for key in ("network", "method"):
        ref_state = ref.parser.get_parsed_content(key).state_dict()
        for name, value in again.parser.get_parsed_content(key).state_dict().items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, ref_state[name], atol=1e-6, rtol=0, msg=name)
    ref_opt = ref.parser.get_parsed_content("method").discriminator_optimizer.state_dict()["state"]
    again_opt = again.parser.get_parsed_content("method").discriminator_optimizer.state_dict()["state"]
    for k in ref_opt:
        torch.testing.assert_close(again_opt[k]["exp_avg_sq"], ref_opt[k]["exp_avg_sq"], atol=1e-9, rtol=0)


# -- the scale of the adversarial terms (issue 13) --------------------------------------------------------------------


def test_adv_loss_is_the_eq2_sum_over_each_images_voxels_averaged_over_images():
    """Hand-made: 2 unlabelled images, discriminator logit = 0 everywhere -> every voxel term is log 2 (BCE vs 1).
    Eq. 2: (1/M) sum_m sum_{voxels of image m} log 2 over the confident voxels (image 0: 12 of 16, image 1: 4)."""
    from common.methods.vfd import reduce_voxel_terms, voxel_weights

    pseudo = torch.full((2, 4, 4), -1, dtype=torch.long)
    pseudo[0, :3] = 1  # 12 confident voxels of class 1
    pseudo[1, 0] = 2  # 4 of class 2
    samples = sample_class_voxels(pseudo, num_classes=4, per_class=2)  # 2 sampled of each (image, class)
    terms = F.binary_cross_entropy_with_logits(torch.zeros(len(samples)), torch.ones(len(samples)), reduction="none")
    weights = voxel_weights(pseudo, samples, 4)
    by_hand = (12 * math.log(2) + 4 * math.log(2)) / 2
    assert reduce_voxel_terms(terms, samples, weights, 2, "image_sum").item() == pytest.approx(by_hand, rel=1e-6)
    assert reduce_voxel_terms(terms, samples, weights, 2, "sampled_sum").item() == pytest.approx(4 * math.log(2) / 2)
    assert reduce_voxel_terms(terms, samples, weights, 2, "mean").item() == pytest.approx(math.log(2))
    assert sorted(weights.tolist()) == [2.0, 2.0, 6.0, 6.0]


@pytest.mark.parametrize("reduction", ["sampled_sum", "image_sum"])
def test_method_adv_loss_is_the_per_image_sum(reduction):
    assert _method()[0].adv_reduction == "sampled_sum"  # the default
    method, net = _method(voxels_per_class=1024, adv_reduction=reduction)
    _set_teacher_confidence(method, 0.9)  # every unlabelled voxel confident background
    x = torch.randn(4, 1, 32, 32)
    torch.manual_seed(1)
    out = method.train_step(_engine(net), {"image": x[:2], "label": _label_map(2, 32)}, {"image": x[2:]})
    fused_logits = method.discriminator(method._cache["unlabeled_features"], method._cache["unlabeled_samples"])
    per_voxel = F.binary_cross_entropy_with_logits(fused_logits, torch.ones_like(fused_logits), reduction="none")
    assert len(method._cache["unlabeled_samples"]) == 2 * 32 * 32  # all voxels sampled: weights 1
    assert out["loss_adv"].item() == pytest.approx(per_voxel.sum().item() / 2, rel=1e-5)
    with pytest.raises(ValueError, match="adv_reduction"):
        _method(adv_reduction="sum")


class _ZeroLoss(torch.nn.Module):
    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return 0.0 * logits.sum()


def test_adv_term_carries_more_than_one_percent_of_the_backbone_gradient_at_initialisation():
    """alpha L_adv's gradient on the backbone against the whole step's, with the paper's alpha = 0.01 (0.1.x: ~0.1%)."""
    def backbone_grad(adv_only: bool, reduction: str) -> torch.Tensor:
        method, net = _method(voxels_per_class=64, adv_reduction=reduction)
        _set_teacher_confidence(method, 0.9)
        if adv_only:
            method.feature_weight, method.loss_function = 0.0, _ZeroLoss()
            method.consistency = lambda t: 0.0
        torch.manual_seed(2)
        x = torch.randn(4, 1, 32, 32)
        out = method.train_step(_engine(net, step=9), {"image": x[:2], "label": _label_map(2, 32)}, {"image": x[2:]})
        out["loss"].backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    share = float(backbone_grad(True, "sampled_sum").norm() / backbone_grad(False, "sampled_sum").norm())
    old = float(backbone_grad(True, "mean").norm() / backbone_grad(False, "mean").norm())
    assert share > 0.01, share
    assert share > 10 * old, (share, old)
