"""GapMatch: the GAP perturber (Algorithm 1) against a manual computation, FixMatch pseudo-labels, the Table-2
base losses, and the bundle's 2D / 3D / overlay configs on tiny synthetic data."""

import copy
import json

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from common.gap import GapPerturber
from common.losses.unsupervised import (
    EntropyMinimisationLoss,
    FixMatchLoss,
    MixConsistencyLoss,
    PseudoLabelLoss,
    VATLoss,
    masked_ce_dice,
)
from common.methods.gapmatch import GapMatchMethod
from helpers import TINY_3D, run_training


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv: BatchNorm buffers, no dropout (so two passes at equal weights are equal)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, classes, 1))

    def forward(self, x):
        return self.net(x)


class FakeEngine:
    """The parts of SemiSupervisedTrainer a method uses."""

    def __init__(self, network, optimizer, sync=None):
        self.network = network
        self.optimizer = optimizer
        self.step_index = 0
        self.sync_calls = 0
        self._sync = sync

    def backward(self, loss):
        loss.backward()

    def sync_gradients(self, params):
        self.sync_calls += 1
        if self._sync is not None:
            self._sync(params)


def _batches(seed=0, b=2, size=8):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.rand(b, 1, size, size, generator=g)
    y_l = torch.randint(0, 3, (b, 1, size, size), generator=g).float()
    u = torch.rand(b, 1, size, size, generator=g)
    u_s = (u * 1.3 + 0.05 * torch.randn(u.shape, generator=g)).clamp(0, 1)
    return {"image": x_l, "label": y_l}, {"image": u, "image_strong": u_s}


def _bn_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def _sup_loss():
    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_step_equals_sgd_update_of_g1_alpha_g2_gl(alpha):
    torch.manual_seed(0)
    eps, lr, wd, mom = 0.3, 0.1, 1e-2, 0.9
    net = TinyNet()
    labeled, unlabeled = _batches()
    ref = copy.deepcopy(net)
    theta0 = [p.detach().clone() for p in net.parameters()]

    # the method, through the optimizer
    unsup = FixMatchLoss(threshold=0.4)
    method = GapMatchMethod(_sup_loss(), unsup, gap=True, epsilon=eps, alpha=alpha)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    engine = FakeEngine(net, opt)
    opt.zero_grad(set_to_none=True)
    out = method.train_step(engine, labeled, unlabeled)
    out["loss"].backward()
    opt.step()
    assert engine.sync_calls == 1 and out["loss_unsup_perturbed"] > out["loss_unsup"]  # ascent direction

    # manual Algorithm 1 on a copy: same call order so BatchNorm statistics evolve identically
    params = list(ref.parameters())
    targets = FixMatchLoss(threshold=0.4).targets(ref, labeled, unlabeled)
    assert targets["mask"].sum() > 0
    l1, _ = unsup(ref, targets)
    g1 = torch.autograd.grad(l1, params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(eps * g / norm)
    l2, _ = unsup(ref, targets)
    g2 = torch.autograd.grad(l2, params)
    with torch.no_grad():
        for p, t in zip(params, theta0):
            p.copy_(t)
    gl = torch.autograd.grad(_sup_loss()(ref(labeled["image"]), labeled["label"]), params)
    for p, a, b, c in zip(params, g1, g2, gl):
        p.grad = a + alpha * b + c
    torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd).step()

    for p, q, t in zip(net.parameters(), ref.parameters(), theta0):
        assert not torch.equal(p, t)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # the same by hand: first SGD step with momentum = lr * (g + wd * theta)
    for p, t, a, b, c in zip(net.parameters(), theta0, g1, g2, gl):
        torch.testing.assert_close(p, t - lr * (a + alpha * b + c + wd * t), rtol=1e-5, atol=1e-7)


def test_backup_restored_bit_for_bit_and_bn_untouched_by_perturbed_pass():
    torch.manual_seed(1)
    net = TinyNet()
    net.train()
    _, unlabeled = _batches(seed=1)
    loss_fn = FixMatchLoss(threshold=0.0)
    targets = loss_fn.targets(net, {}, unlabeled)
    theta = [p.detach().clone() for p in net.parameters()]
    entry = []

    def closure():
        entry.append((_bn_buffers(net), [p.detach().clone() for p in net.parameters()]))
        return loss_fn(net, targets)[0]

    result = GapPerturber(epsilon=0.5, alpha=1.0).step(closure, list(net.parameters()), modules=[net])
    assert result.perturbed and len(entry) == 2
    # the theta* pass ran at other weights...
    assert any(not torch.equal(a, b) for a, b in zip(entry[1][1], theta))
    # ...and theta is back exactly
    for p, t in zip(net.parameters(), theta):
        assert torch.equal(p, t)
    # the theta pass updated the running statistics, the theta* pass did not
    before_first, before_second, after = entry[0][0], entry[1][0], _bn_buffers(net)
    assert any(not torch.equal(before_first[k], before_second[k]) for k in before_first)
    for k in after:
        assert torch.equal(after[k], before_second[k]), k


def test_epsilon_zero_gives_one_plus_alpha_times_plain_fixmatch_gradient():
    torch.manual_seed(2)
    net = TinyNet()
    _, unlabeled = _batches(seed=2)
    loss_fn = FixMatchLoss(threshold=0.3)
    targets = loss_fn.targets(net, {}, unlabeled)
    params = list(net.parameters())
    plain = torch.autograd.grad(loss_fn(net, targets)[0], params)

    GapPerturber(epsilon=0.0, alpha=1.0).step(lambda: loss_fn(net, targets)[0], params, modules=[net])
    for p, g in zip(params, plain):
        assert torch.equal(p.grad, 2 * g)  # exact: theta* == theta and both passes are the same computation

    for p in params:
        p.grad = None
    GapPerturber(epsilon=0.0, alpha=0.5).step(lambda: loss_fn(net, targets)[0], params, modules=[net])
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, 1.5 * g, rtol=1e-6, atol=0)


def test_earlier_gradients_kept_and_not_in_direction():
    torch.manual_seed(3)
    net = TinyNet()
    _, unlabeled = _batches(seed=3)
    loss_fn = FixMatchLoss(threshold=0.0)
    targets = loss_fn.targets(net, {}, unlabeled)
    params = list(net.parameters())
    ref = GapPerturber(0.2, 1.0).step(lambda: loss_fn(net, targets)[0], params, modules=[net])
    clean = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 1000.0)  # would dominate the direction if it leaked into g1
    res = GapPerturber(0.2, 1.0).step(lambda: loss_fn(net, targets)[0], params, modules=[net])
    torch.testing.assert_close(res.grad_norm, ref.grad_norm)
    for p, c in zip(params, clean):
        torch.testing.assert_close(p.grad, c + 1000.0)


def test_direction_taken_from_synced_gradient():
    """Under torchrun every rank must perturb along the rank-averaged g1: the norm is taken after the sync."""
    torch.manual_seed(4)
    net = TinyNet()
    _, unlabeled = _batches(seed=4)
    loss_fn = FixMatchLoss(threshold=0.0)
    targets = loss_fn.targets(net, {}, unlabeled)
    params = list(net.parameters())
    theta = [p.detach().clone() for p in params]
    synced = [torch.randn_like(p) for p in params]

    def fake_all_reduce(ps):
        for p, s in zip(ps, synced):
            p.grad = s.clone()

    seen = []

    def closure():
        seen.append([p.detach().clone() for p in params])
        return loss_fn(net, targets)[0]

    engine = FakeEngine(net, None, sync=fake_all_reduce)
    GapPerturber(epsilon=0.7, alpha=1.0).step(closure, params, modules=[net], engine=engine)
    norm = torch.sqrt(sum((s ** 2).sum() for s in synced))
    for star, t, s in zip(seen[1], theta, synced):
        torch.testing.assert_close(star, t + 0.7 * s / norm)


def test_no_perturbation_without_direction():
    net = TinyNet()
    _, unlabeled = _batches()
    loss_fn = FixMatchLoss(threshold=1.0)  # softmax never reaches 1 here: empty mask, zero loss and gradient
    targets = loss_fn.targets(net, {}, unlabeled)
    assert targets["mask"].sum() == 0
    calls = []
    res = GapPerturber(0.05, 1.0).step(lambda: calls.append(1) or loss_fn(net, targets)[0], list(net.parameters()),
                                        modules=[net])
    assert not res.perturbed and len(calls) == 1 and float(res.loss) == 0.0


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits.expand(x.shape[0], *self.logits.shape[1:])


def test_pseudo_label_mask_respects_tau():
    # per-pixel logits over 2 classes: probabilities 0.5 (tie, exactly tau), ~0.62, ~0.38/0.62, ~0.98
    logits = torch.tensor([[0.0, 0.5, -0.5, 4.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 2, 1, 4)
    net = FixedLogits(logits)
    batch = {"image": torch.zeros(1, 1, 1, 4), "image_strong": torch.zeros(1, 1, 1, 4)}
    probs = torch.softmax(logits, dim=1)
    for tau in (0.0, 0.5, 0.6, 0.9, 0.99):
        t = FixMatchLoss(threshold=tau).targets(net, {}, batch)
        expected = (probs.max(dim=1).values >= tau).float()
        assert torch.equal(t["mask"], expected), tau
        assert torch.equal(t["pseudo_label"], probs.argmax(dim=1))
    assert FixMatchLoss(threshold=0.5).targets(net, {}, batch)["mask"].sum() == 4  # the tie counts as confident
    assert FixMatchLoss(threshold=0.9).targets(net, {}, batch)["mask"].tolist() == [[[0.0, 0.0, 0.0, 1.0]]]

    # unconfident pixels contribute nothing: their strong-view logits get zero gradient
    t = FixMatchLoss(threshold=0.9).targets(net, {}, batch)
    loss, _ = FixMatchLoss(threshold=0.9)(net, t)
    (grad,) = torch.autograd.grad(loss, net.logits)
    assert torch.all(grad[..., :3] == 0) and torch.any(grad[..., 3] != 0)


def test_masked_ce_dice_empty_mask_is_zero():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    loss, parts = masked_ce_dice(logits, target, torch.zeros(2, 4, 4))
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and torch.all(grad == 0)


@pytest.mark.parametrize("make", [
    lambda net: EntropyMinimisationLoss(),
    lambda net: PseudoLabelLoss(),
    lambda net: MixConsistencyLoss(net, mix="blend", beta_alpha=0.2, pairing="halves"),
    lambda net: MixConsistencyLoss(net, mix="blend", beta_alpha=1.0, pairing="permutation"),
    lambda net: MixConsistencyLoss(net, mix="box", beta_alpha=1.0, pairing="permutation"),
    lambda net: VATLoss(divergence="kl", epsilon=1.0, xi=10.0),
    lambda net: VATLoss(divergence="dice", epsilon=1.0, xi=10.0),
], ids=["em", "pseudo_label", "ict", "mixup", "cutmix", "vat_kl", "vat_dice"])
@pytest.mark.parametrize("gap", [False, True], ids=["base", "gap"])
def test_table2_losses_with_and_without_gap(make, gap):
    torch.manual_seed(5)
    net = TinyNet()
    labeled, unlabeled = _batches(seed=5, b=4)
    unsup = make(net)
    method = GapMatchMethod(_sup_loss(), unsup, gap=gap, epsilon=0.05, alpha=1.0, unsupervised_weight=0.5)
    opt = torch.optim.SGD(list(method.optimized_parameters(net)), lr=0.01)
    engine = FakeEngine(net, opt)
    theta = [p.detach().clone() for p in net.parameters()]
    out = method.train_step(engine, labeled, unlabeled)
    assert ("loss_unsup_perturbed" in out) == gap
    assert out["loss_unsup"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for p, t in zip(net.parameters(), theta):
        assert torch.equal(p, t) and p.grad is not None and torch.isfinite(p.grad).all()
    opt.step()
    method.after_step(engine)
    if isinstance(unsup, MixConsistencyLoss):
        assert int(unsup.teacher.num_updates) == 1
        assert all(not q.requires_grad for q in unsup.teacher.parameters())
        assert not any(q is p for q in opt.param_groups[0]["params"] for p in unsup.teacher.parameters())


def test_cutmix_box_covers_one_minus_lambda():
    torch.manual_seed(6)
    loss = MixConsistencyLoss(TinyNet(), mix="box", beta_alpha=1.0, pairing="permutation")
    m = loss._mask(torch.zeros(64, 1, 32, 32))
    assert m.shape == (64, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0.3 < float(m.mean()) < 0.7  # E[1 - lam] = 0.5 for Beta(1, 1)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="-0.1"):
        GapPerturber(epsilon=-0.1)
    with pytest.raises(ValueError, match="nan"):
        GapPerturber(alpha=float("nan"))
    with pytest.raises(ValueError, match="1.5"):
        FixMatchLoss(threshold=1.5)
    with pytest.raises(ValueError, match="'cut'"):
        MixConsistencyLoss(TinyNet(), mix="cut")
    with pytest.raises(TypeError, match="'yes'"):
        GapMatchMethod(_sup_loss(), FixMatchLoss(), gap="yes")
    with pytest.raises(KeyError, match="image_strong"):
        FixMatchLoss().targets(TinyNet(), {}, {"image": torch.zeros(1, 1, 4, 4)})


def test_bundle_2d_gapmatch_iteration(tmp_path):
    # tau 0 so that the mask is non-empty and the theta* pass runs in the bundle
    wf = run_training("gapmatch", tmp_path, iterations=2, val_interval=2, confidence_threshold=0.0)
    out = wf.parser.get_parsed_content("train#trainer").state.output
    assert float(out["gap_grad_norm"]) > 0 and float(out["loss_unsup_perturbed"]) > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "gapmatch" and summary["iterations"] == 2
    assert (tmp_path / "models" / "model.pt").is_file()


def test_bundle_3d_la_iteration(tmp_path):
    wf = run_training("gapmatch", tmp_path, configs=("train.json", "la.json"), tiny=TINY_3D, data_source="synthetic",
                      iterations=1, val_interval=1, confidence_threshold=0.0)
    out = wf.parser.get_parsed_content("train#trainer").state.output
    assert out["image"].dim() == 5 and float(out["gap_grad_norm"]) > 0


@pytest.mark.parametrize("overlay,name", [
    ("table2_entropy_min.json", "entropy_minimisation"),
    ("table2_pseudo_label.json", "pseudo_label"),
    ("table2_ict.json", "ict"),
    ("table2_mixup.json", "mixup"),
    ("table2_cutmix.json", "cutmix"),
    ("table2_vat.json", "vat"),
])
def test_bundle_table2_overlays(tmp_path, overlay, name):
    # the base method (default) and the same with GAP switched on from the command line
    base = run_training("gapmatch", tmp_path / "base", configs=("train.json", overlay), iterations=1, val_interval=1)
    out = base.parser.get_parsed_content("train#trainer").state.output
    assert "loss_unsup_perturbed" not in out and float(out["loss_unsup"]) > 0
    assert json.loads((tmp_path / "base" / "summary.json").read_text())["method"] == name
    gap = run_training("gapmatch", tmp_path / "gap", configs=("train.json", overlay), iterations=1, val_interval=1,
                       gap=True)
    out = gap.parser.get_parsed_content("train#trainer").state.output
    assert float(out["loss_unsup_perturbed"]) > 0 and float(out["gap_grad_norm"]) > 0
    assert json.loads((tmp_path / "gap" / "summary.json").read_text())["method"] == name + "+gap"


def test_bundle_rampup_variant(tmp_path):
    wf = run_training("gapmatch", tmp_path, configs=("train.json", "gapmatch_rampup.json"), iterations=1,
                      val_interval=1, confidence_threshold=0.0)
    out = wf.parser.get_parsed_content("train#trainer").state.output
    assert float(out["unsup_weight"]) == pytest.approx(float(torch.exp(torch.tensor(-5.0))), rel=1e-6)
    assert "loss_unsup_perturbed" in out


def test_default_is_the_swept_setting_and_algorithm1_stays_an_overlay(tmp_path):
    """Issue 13: the default trains with the sweep's best setting (ramp-up, alpha 0.5); ``algorithm1.json`` is
    Algorithm 1 as written (constant weight 1, alpha 1)."""
    default = run_training("gapmatch", tmp_path / "default", iterations=1, val_interval=1, confidence_threshold=0.0)
    method = default.parser.get_parsed_content("method")
    assert method.gap.alpha == 0.5 and method.gap.epsilon == 0.05
    assert method.weight(0) == pytest.approx(float(torch.exp(torch.tensor(-5.0))), rel=1e-6) and method.weight(199) == 1.0
    alg1 = run_training("gapmatch", tmp_path / "alg1", configs=("train.json", "algorithm1.json"), iterations=1,
                        val_interval=1, confidence_threshold=0.0)
    method = alg1.parser.get_parsed_content("method")
    assert method.gap.alpha == 1.0 and method.weight(0) == 1.0
    assert json.loads((tmp_path / "alg1" / "summary.json").read_text())["method"] == "gapmatch_algorithm1"
