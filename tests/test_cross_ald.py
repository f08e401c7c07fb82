"""Cross-ALD: the SVGDF particle sampler, the mixed regulariser, the method (and its Table-3 rows), the bundle on
tiny synthetic 2D and 3D data."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from monai.losses import DiceLoss

from common.losses.class_separation import ClassSeparation
from common.losses.cross_ald import CrossALDRegularizer, random_derangement
from common.losses.dice_vat import DiceVAT
from common.methods.cross_ald import TABLE3_ROWS, CrossALDMethod, build_regularizer
from common.methods.ssnet import SSNetMethod
from common.networks import UNet2D, VNet3D
from common.svgdf import SVGDFSampler, per_sample_dice_divergence, rbf_kernel
from helpers import TINY_3D, run_training, workflow, assert_same_gradients

LOSS_NAMES = {"loss", "loss_seg", "loss_cross_ald", "loss_cs_labeled", "loss_cs_unlabeled", "consistency_weight"}
SMALL = (8, 16, 16, 32, 32)  # UNet2D widths small enough for fast tests, same topology


def _net(seed=0, mode="train"):
    torch.manual_seed(seed)
    net = UNet2D(1, 4, features=SMALL)
    return net.train() if mode == "train" else net.eval()


def _images(b=3, seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g)


def _mean_pairwise_distance(perturbations):
    """Mean over images and particle pairs of ||r_j - r_n||_2; ``(N, B, ...)``."""
    f = perturbations.flatten(2)
    n = f.shape[0]
    return torch.stack([(f[i] - f[j]).norm(dim=1) for i in range(n) for j in range(i + 1, n)]).mean().item()


def _engine(network, step=0):
    return SimpleNamespace(network=network, step_index=step, backward=lambda loss, **kw: loss.backward(**kw))


# -- sampler ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,norm,steps,eps", [("vat_like", "l2", 1, 6.0), ("vat_like", "l2", 2, 2.0),
                                                 ("projected", "l2", 2, 6.0), ("projected", "l2", 0, 1.0),
                                                 ("vat_like", "linf", 1, 0.05), ("projected", "linf", 2, 0.05)])
def test_particles_stay_inside_the_ball(mode, norm, steps, eps):
    net, x = _net(), _images()
    sampler = SVGDFSampler(num_particles=3, steps=steps, epsilon=eps, norm=norm, mode=mode)
    res = sampler(net, x)
    assert res.particles.shape == (3, *x.shape) and res.perturbations.shape == (3, *x.shape)
    r = res.perturbations.flatten(2)
    size = r.norm(dim=2) if norm == "l2" else r.abs().amax(dim=2)
    assert float(size.max()) <= eps * (1 + 1e-5)
    assert float(size.min()) > 0.5 * eps  # the particles move (uniform start / normalised step)
    torch.testing.assert_close(res.particles, x.unsqueeze(0) + res.perturbations)
    assert not res.particles.requires_grad


def test_one_particle_without_repulsion_is_the_vat_step():
    """N = 1, L = 1: phi = the Dice score, r = eps * score / ||score|| = SS-Net's Dice-VAT perturbation (B = 1,
    where the per-image Dice of the score equals VAT's batch Dice). Train mode: the same dropout masks are drawn."""
    net, x = _net(), _images(b=1)
    with torch.no_grad():
        target = torch.softmax(net.eval()(x), 1)
    net.train()
    vat = DiceVAT(epsilon=6.0, xi=10.0, iterations=1)
    torch.manual_seed(3)
    r_vat = vat.perturbation(net, x, target)
    for kwargs in ({"repulsion": False}, {"kernel": "none"}, {}):
        torch.manual_seed(3)
        res = SVGDFSampler(num_particles=1, steps=1, epsilon=6.0, xi=10.0, **kwargs)(net, x, target=target)
        torch.testing.assert_close(res.perturbations[0], r_vat, atol=1e-5, rtol=1e-4)


def test_projected_single_particle_step_is_a_normalised_dice_ascent():
    """``projected``, N = 1, L = 1: r = Proj(r0 + tau * g / ||g||), g = grad_r Dice(p(x + r0), p(x))."""
    net, x = _net(mode="eval"), _images(b=2)
    sampler = SVGDFSampler(num_particles=1, steps=1, epsilon=3.0, step_size=2.0, mode="projected", repulsion=False)
    torch.manual_seed(4)
    res = sampler(net, x)
    torch.manual_seed(4)
    noise = torch.rand((1, *x.shape)) - 0.5
    r0 = noise[0] * (3.0 / noise[0].flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    r0.requires_grad_(True)
    d = per_sample_dice_divergence(torch.softmax(net(x + r0), 1), res.target).sum()
    (g,) = torch.autograd.grad(d, r0)
    r = r0.detach() + 2.0 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    r = r * (3.0 / r.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(res.perturbations[0], r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["vat_like", "projected"])
def test_repulsion_makes_particles_more_diverse(mode):
    """The kernel-gradient term of Eq. 6 pushes the particles apart: with the same random starts, the mean pairwise
    distance of SVGDF particles is clearly larger with it than without (fixed, eval-mode network)."""
    net, x = _net(mode="eval"), _images(b=2)
    dist = {}
    for repulsion in (True, False):
        torch.manual_seed(7)
        res = SVGDFSampler(num_particles=4, epsilon=6.0, mode=mode, repulsion=repulsion)(net, x)
        dist[repulsion] = _mean_pairwise_distance(res.perturbations)
    assert dist[True] > 1.1 * dist[False], dist


def test_identity_kernel_repulsion_is_the_same_for_both_jacobians():
    """On raw images (vanilla SVGD) grad_{x_j} k(x_j, x_n) = -grad_{x_n} k(x_j, x_n): the two forms agree."""
    net, x = _net(mode="eval"), _images(b=2)
    out = []
    for jac in ("own", "partner"):
        torch.manual_seed(9)
        out.append(SVGDFSampler(num_particles=3, features="identity", repulsion_jacobian=jac)(net, x).perturbations)
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-4)
    torch.manual_seed(9)  # with encoder features they differ (whose Jacobian carries the kernel gradient)
    partner = SVGDFSampler(num_particles=3, repulsion_jacobian="partner")(net, x).perturbations
    torch.manual_seed(9)
    own = SVGDFSampler(num_particles=3, repulsion_jacobian="own")(net, x).perturbations
    assert float((partner - own).abs().max()) > 1e-3


def test_median_heuristic_kernel():
    f = torch.randn(5, 2, 7)
    k, h = rbf_kernel(f)
    torch.testing.assert_close(k[:, 0, 1], torch.full((5,), 0.5))  # exp(-log 2) for N = 2
    torch.testing.assert_close(k.diagonal(dim1=1, dim2=2), torch.ones(5, 2))
    torch.testing.assert_close(h, (f[:, 0] - f[:, 1]).pow(2).sum(-1) / math.log(2))
    k3, _ = rbf_kernel(torch.randn(4, 3, 7), bandwidth=2.0)
    assert k3.shape == (4, 3, 3) and bool((k3 <= 1).all())


def test_sampling_leaves_weights_and_bn_statistics_alone():
    net, x = _net(), _images()
    bn_before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    for feats in ("encoder", "decoder", "identity"):
        for jac in ("own", "partner"):
            SVGDFSampler(num_particles=2, features=feats, repulsion_jacobian=jac, mode="projected", steps=2)(net, x)
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        if k in bn_before:
            torch.testing.assert_close(v, bn_before[k], msg=k)
    assert net.training


def test_custom_feature_extractor_and_3d():
    torch.manual_seed(0)
    net = VNet3D(1, 2, n_filters=2).train()
    frozen = copy.deepcopy(net).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    res = SVGDFSampler(num_particles=2, epsilon=10.0, features=lambda v: frozen.encode(v)[-1], joint_channels=True,
                       squared_pred=False, smooth=1e-8)(net, x)
    assert res.particles.shape == (2, 2, 1, 16, 16, 16) and res.kernel.shape == (2, 2, 2)
    assert float(res.perturbations.flatten(2).norm(dim=2).max()) <= 10.0 * (1 + 1e-5)


def test_bad_sampler_arguments_are_named():
    for kwargs, word in [({"num_particles": 0}, "num_particles"), ({"mode": "sgld"}, "mode"),
                         ({"norm": "l1"}, "norm"), ({"kernel": "imq"}, "kernel"), ({"features": "bottleneck"}, "features"),
                         ({"epsilon": -1}, "epsilon"), ({"steps": 0}, "steps"), ({"bandwidth": 0.0}, "bandwidth"),
                         ({"repulsion_jacobian": "x"}, "repulsion_jacobian")]:
        with pytest.raises(ValueError, match=word):
            SVGDFSampler(**kwargs)
    with pytest.raises(ValueError, match="spatial"):
        SVGDFSampler()(_net(), torch.rand(2, 4))


# -- regulariser -----------------------------------------------------------------------------------------------
def test_derangement_has_no_fixed_points():
    torch.manual_seed(0)
    for n in (2, 3, 8, 17):
        for _ in range(20):
            p = random_derangement(n)
            assert sorted(p.tolist()) == list(range(n)) and not bool((p == torch.arange(n)).any())
    with pytest.raises(ValueError, match="at least 2"):
        random_derangement(1)


@pytest.mark.parametrize("pairing", ["matched", "all"])
def test_mixing_uses_one_gamma_for_images_and_particles(pairing):
    net, x = _net(), _images(b=4)
    reg = CrossALDRegularizer(SVGDFSampler(num_particles=2, epsilon=6.0), mix=True, alpha=0.5, pairing=pairing)
    torch.manual_seed(11)
    res = reg.compute(net, x)
    g, pi, pairs = res.gamma, res.partner, res.pairs
    assert 0.0 < float(g) < 1.0 and not bool((pi == torch.arange(4)).any())
    assert pairs.shape == ((2, 2) if pairing == "matched" else (4, 2))
    torch.testing.assert_close(res.mixed_images, g * x + (1 - g) * x[pi])
    r = res.particles - x.unsqueeze(0)
    for k, (n, m) in enumerate(pairs.tolist()):
        # x~' - x~ = gamma r_i(n) + (1 - gamma) r_j(m): the particles are mixed with the images' gamma
        torch.testing.assert_close(res.mixed_particles[k] - res.mixed_images, g * r[n] + (1 - g) * r[m][pi],
                                   atol=1e-5, rtol=1e-4)
    assert res.loss.requires_grad and torch.isfinite(res.loss)
    res.loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in net.parameters())


def test_gamma_follows_beta_alpha():
    reg = CrossALDRegularizer(None, mix=True, alpha=0.5, target="mixed_targets")
    torch.manual_seed(0)
    draws = torch.stack([reg.draw_gamma(torch.device("cpu")) for _ in range(4000)])
    assert abs(float(draws.mean()) - 0.5) < 0.03
    assert abs(float(draws.var()) - 0.125) < 0.01  # Beta(a, a): 1 / (4 (2a + 1)) = 0.125 for a = 0.5


def test_random_mixup_targets_the_mixed_predictions():
    net, x = _net(mode="eval"), _images(b=3)
    reg = build_regularizer("random_mixup")
    torch.manual_seed(2)
    res = reg.compute(net, x)
    with torch.no_grad():
        q = torch.softmax(net(x), 1)
    torch.testing.assert_close(res.target, res.gamma * q + (1 - res.gamma) * q[res.partner])
    torch.testing.assert_close(res.mixed_particles[0], res.mixed_images)
    with pytest.raises(ValueError, match="natural images"):
        CrossALDRegularizer(None, mix=False)


# -- method ----------------------------------------------------------------------------------------------------
def _method_setup(kind="cross_ald", use_cs=True, unlabeled_only=False):
    torch.manual_seed(0)
    net = UNet2D(1, 4, features=SMALL).train()
    method = CrossALDMethod(
        loss_function=DiceLoss(softmax=True, to_onehot_y=True, squared_pred=True, batch=True, smooth_nr=1e-10,
                               smooth_dr=1e-10),
        regularizer=build_regularizer(kind, num_particles=2, epsilon=6.0),
        class_separation=ClassSeparation(4, in_channels=SMALL[0], memory_size=8), consistency=0.5, cs_weight=0.1,
        use_class_separation=use_cs, unlabeled_only=unlabeled_only).train()
    x = _images(b=4)
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 4:28, 4:28] = 1
    y[:, :, 8:24, 8:24] = 2
    y[:, :, 12:20, 12:20] = 3
    return net, method, {"image": x[:2], "label": y}, {"image": x[2:]}


@pytest.mark.parametrize("row", list(TABLE3_ROWS))
def test_every_table3_row_trains(row):
    kind, use_cs = TABLE3_ROWS[row]
    net, method, labeled, unlabeled = _method_setup(kind, use_cs)
    out = method.train_step(_engine(net), labeled, unlabeled)
    assert LOSS_NAMES <= set(out) and all(torch.isfinite(v).all() for v in out.values())
    assert float(out["loss_cross_ald"]) > 0
    out["loss"].backward()
    assert (method.class_separation is not None) == use_cs
    assert ("mix_gamma" in out) == (kind in ("cross_ald", "vat_mixup", "random_mixup"))
    if not use_cs:
        assert float(out["loss_cs_labeled"]) == 0 and not any(k.startswith("class_separation")
                                                             for k in method.state_dict())


def test_step_gradient_equals_one_backward_of_the_total_loss():
    net, method, labeled, unlabeled = _method_setup("cross_ald", True)
    with torch.no_grad():  # fill the memory with the labels so that L_cs is non-zero at once
        emb = net.forward_features(labeled["image"]).embedding
    gt = labeled["label"][:, 0].long()
    method.class_separation.update_memory(emb, gt, gt)
    net2, method2 = copy.deepcopy(net), copy.deepcopy(method)
    torch.manual_seed(5)
    out = method.train_step(_engine(net), labeled, unlabeled)
    out["loss"].backward()
    torch.manual_seed(5)  # the same draws in the same order, one graph
    x = torch.cat([labeled["image"], unlabeled["image"]])
    o = net2.forward_features(x)
    pred = o.logits.detach().argmax(1)
    method2.class_separation.update_memory(o.embedding[:2], pred[:2], gt)
    total = (method2.loss_function(o.logits[:2], labeled["label"])
             + 0.5 * (method2.regularizer(net2, x) + 0.1 * (method2.class_separation(o.embedding[:2], gt)
                                                            + method2.class_separation(o.embedding[2:], pred[2:]))))
    total.backward()
    assert float(out["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    assert_same_gradients((net, method), (net2, method2))


def test_vat_row_with_class_separation_is_ssnet():
    """regularizer='vat' + L_cs reproduces SS-Net's step exactly (same losses and gradients): Cross-ALD replaces
    only SS-Net's L_lds."""
    net, method, labeled, unlabeled = _method_setup("vat", True)
    net2 = copy.deepcopy(net)
    ssnet = SSNetMethod(method.loss_function, DiceVAT(epsilon=6.0), copy.deepcopy(method.class_separation),
                        consistency=0.5, cs_weight=0.1).train()
    torch.manual_seed(6)
    out = method.train_step(_engine(net), labeled, unlabeled)
    out["loss"].backward()
    torch.manual_seed(6)
    ref = ssnet.train_step(_engine(net2), labeled, unlabeled)
    ref["loss"].backward()
    assert float(out["loss_cross_ald"]) == pytest.approx(float(ref["loss_lds"]), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-6)
    for (name, a), b in zip(net.named_parameters(), net2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5, msg=name)


def test_unlabeled_only_regularises_the_unlabelled_half():
    net, method, labeled, unlabeled = _method_setup("cross_ald", True, unlabeled_only=True)
    seen = []
    compute = method.regularizer.compute
    method.regularizer.compute = lambda network, x: seen.append(x.shape[0]) or compute(network, x)
    method.train_step(_engine(net), labeled, unlabeled)
    assert seen == [2]


def test_single_unlabelled_image_is_refused_with_the_setting_to_change():
    net, method, labeled, unlabeled = _method_setup("cross_ald", True, unlabeled_only=True)
    with pytest.raises(ValueError, match="unlabeled_batch_size >= 2"):
        method.train_step(_engine(net), labeled, {"image": unlabeled["image"][:1]})


def test_bad_method_arguments_are_named():
    with pytest.raises(ValueError, match="regularizer must be one of"):
        build_regularizer("mixmatch")
    with pytest.raises(ValueError, match="cs_weight"):
        CrossALDMethod(DiceLoss(), build_regularizer("vat"), ClassSeparation(2), 0.1, cs_weight=-1)
    with pytest.raises(ValueError, match="ClassSeparation"):
        CrossALDMethod(DiceLoss(), build_regularizer("vat"), None, 0.1, use_class_separation=True)


# -- bundle ----------------------------------------------------------------------------------------------------
def test_overlays_and_ablation_options():
    wf = workflow("cross_ald", ["train.json", "acdc_cpu_v1.json"], output_dir="/tmp/unused", dataset_dir="/none")
    p = wf.parser
    ramp = p.get_parsed_content("consistency_schedule")
    assert (ramp.max_value, ramp.length, ramp.step) == (0.1, 1500.0, 7.5)
    assert p["lr_schedule"] == "constant" and p["iterations"] == 1500 and p["val_interval"] == 250
    assert p["labeled_batch_size"] == 4 and p["unlabeled_batch_size"] == 4 and p["seed"] == 1337
    assert p["learning_rate"] == 0.01 and p["patch_size"] == [128, 128] and p["num_labeled"] == 7
    method = p.get_parsed_content("method")
    reg = method.regularizer
    assert isinstance(reg, CrossALDRegularizer) and reg.mix and reg.alpha == 0.5 and reg.pairing == "matched"
    s = reg.sampler
    assert (s.num_particles, s.steps, s.epsilon, s.norm, s.mode, s.features, s.bandwidth) == (
        2, 1, 6.0, "l2", "vat_like", "encoder", None)
    assert method.class_separation is not None and method.cs_weight == 0.1 and method.unlabeled_only
    assert not workflow("cross_ald", ["train.json"], output_dir="/tmp/unused", unlabeled_only=False).parser.\
        get_parsed_content("method").unlabeled_only
    la = workflow("cross_ald", ["train.json", "la.json"], output_dir="/tmp/unused", dataset_dir="/none").parser
    ramp = la.get_parsed_content("consistency_schedule")
    assert (ramp.max_value, ramp.length, ramp.step) == (1.0, 6000.0, 150.0)
    s = la.get_parsed_content("method").regularizer.sampler
    assert (s.epsilon, s.squared_pred, s.joint_channels, s.smooth) == (10.0, False, True, 1e-8)
    assert workflow("cross_ald", ["train.json"], output_dir="/tmp/unused", kernel_features="decoder").parser.\
        get_parsed_content("method").regularizer.sampler.features == "decoder"
    row = workflow("cross_ald", ["train.json"], output_dir="/tmp/unused", regularizer="svgd",
                   use_class_separation=False).parser.get_parsed_content("method")
    assert row.class_separation is None and row.regularizer.sampler.features == "identity" and not row.regularizer.mix


def _check_iteration(wf, tmp_path, dims):
    out = wf.parser.get_parsed_content("train#trainer").state.output
    assert LOSS_NAMES <= set(out)
    for name in LOSS_NAMES | {"mix_gamma"}:
        assert torch.isfinite(torch.as_tensor(out[name])).all(), name
    assert float(out["loss_cross_ald"]) > 0 and out["image"].dim() == dims + 2
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "cross_ald"
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    wf.parser.get_parsed_content("network_def", instantiate=True).load_state_dict(weights, strict=True)


def test_bundle_2d_iteration(tmp_path):
    wf = run_training("cross_ald", tmp_path, iterations=1, val_interval=1)
    _check_iteration(wf, tmp_path, 2)


def test_bundle_3d_la_iteration(tmp_path):
    wf = run_training("cross_ald", tmp_path, configs=("train.json", "la.json"), tiny=TINY_3D, data_source="synthetic",
                      iterations=1, val_interval=1, unlabeled_batch_size=2)
    _check_iteration(wf, tmp_path, 3)
