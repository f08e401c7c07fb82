"""DiceVAT (common/losses/dice_vat.py): adversarial direction, divergences, what is detached, BN statistics."""

import pytest
import torch
from torch import nn

from common.losses.dice_vat import DiceVAT, dice_divergence, kl_divergence, l2_normalize_per_sample
from common.networks import UNet2D, VNet3D


def _small_net(dims: int = 2, classes: int = 3) -> nn.Module:
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    torch.manual_seed(0)
    return nn.Sequential(conv(1, 8, 3, padding=1), bn(8), nn.Tanh(), conv(8, 8, 3, padding=1), nn.Tanh(),
                         conv(8, classes, 1))


class _Constant(nn.Module):
    """Logits that do not depend on the input."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.3, -1.0, 2.0][:classes]))

    def forward(self, x):
        return self.bias.view(1, -1, *([1] * (x.dim() - 2))).expand(x.shape[0], -1, *x.shape[2:])


def test_l2_normalize_per_sample():
    d = torch.randn(3, 2, 5, 5) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1, 1)
    n = l2_normalize_per_sample(d).flatten(1).norm(dim=1)
    torch.testing.assert_close(n, torch.ones(3), atol=1e-5, rtol=0)


def test_dice_divergence_matches_the_papers_formulas():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(2, 4, 6, 6), 1)
    q = torch.softmax(torch.randn(2, 4, 6, 6), 1)
    # SS-Net 2D: per class 1 - (2 sum pq + s) / (sum p^2 + sum q^2 + s), batch sums, class mean
    ref = sum(1 - (2 * (p[:, c] * q[:, c]).sum() + 1e-10) / ((p[:, c] ** 2).sum() + (q[:, c] ** 2).sum() + 1e-10)
              for c in range(4)) / 4
    torch.testing.assert_close(dice_divergence(p, q), ref, atol=1e-6, rtol=0)
    # SS-Net 3D: the binary formula on all channels together, linear denominators
    ref3 = 1 - (2 * (p * q).sum() + 1e-8) / (p.sum() + q.sum() + 1e-8)
    torch.testing.assert_close(dice_divergence(p, q, squared_pred=False, joint_channels=True, smooth=1e-8), ref3,
                               atol=1e-6, rtol=0)
    assert float(dice_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        dice_divergence(p, q[:, :3])


def test_kl_divergence_is_zero_at_the_target_and_positive_elsewhere():
    logits = torch.randn(2, 3, 4, 4)
    assert float(kl_divergence(logits, torch.softmax(logits, 1))) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence(logits, torch.softmax(-logits, 1))) > 0.1


@pytest.mark.parametrize("divergence", ["dice", "kl"])
def test_r_adv_has_norm_eps_and_beats_random_directions(divergence):
    net = _small_net().eval()  # eval: no dropout / batch-stat noise, so the comparison is deterministic
    torch.manual_seed(2)
    x = torch.rand(3, 1, 16, 16)
    vat = DiceVAT(epsilon=6.0, xi=10.0, divergence=divergence)  # the ACDC values
    target = vat.target(net, x)
    r_adv = vat.perturbation(net, x, target)
    assert r_adv.shape == x.shape and not r_adv.requires_grad
    torch.testing.assert_close(r_adv.flatten(1).norm(dim=1), torch.full((3,), 6.0), atol=1e-3, rtol=0)
    with torch.no_grad():
        adv = float(vat.divergence(net(x + r_adv), target))
        random = [float(vat.divergence(net(x + 6.0 * l2_normalize_per_sample(torch.randn_like(x))), target))
                  for _ in range(10)]
    assert adv > 1.3 * max(random), (adv, random)


def test_lds_is_zero_for_a_constant_network():
    net = _Constant()
    x = torch.rand(2, 1, 8, 8)
    for vat in (DiceVAT(epsilon=6.0), DiceVAT(divergence="kl")):
        result = vat.compute(net, x)
        assert float(result.loss.detach()) == pytest.approx(0.0, abs=1e-6)
        assert float(result.r_adv.abs().max()) == 0.0  # no direction changes a constant output


def test_only_the_weights_get_gradients_and_the_direction_pass_leaves_none():
    net = _small_net().train()
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    target = torch.softmax(torch.randn(2, 3, 16, 16), 1).requires_grad_(True)
    vat = DiceVAT(epsilon=6.0)
    r_adv = vat.perturbation(net, x, target)
    assert all(p.grad is None for p in net.parameters()), "the direction pass must not leave parameter gradients"
    assert not r_adv.requires_grad
    loss = vat(net, x, target)
    loss.backward()
    assert x.grad is None and target.grad is None  # input, target and r_adv are constants of L_lds
    assert all(p.grad is not None for p in net.parameters())


def test_bn_running_stats_change_only_in_the_target_pass():
    net = _small_net().train()
    x = torch.rand(4, 1, 16, 16)
    reference = _small_net().train()
    reference.load_state_dict(net.state_dict())
    with torch.no_grad():
        reference(x)  # one normal train-mode forward: what the target pass does to the statistics
    DiceVAT(epsilon=6.0)(net, x).backward()
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"buffer {name}")
    # with a given target, no pass touches the statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    DiceVAT(epsilon=6.0)(net, x, target=torch.softmax(torch.randn(4, 3, 16, 16), 1))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=f"buffer {k}")


@pytest.mark.parametrize("dims", [2, 3])
def test_paper_backbones_2d_and_3d(dims):
    torch.manual_seed(3)
    if dims == 2:
        net, x, vat = UNet2D(1, 4).train(), torch.rand(2, 1, 32, 32), DiceVAT(epsilon=6.0)
    else:
        net, x = VNet3D(1, 2, n_filters=4).train(), torch.rand(2, 1, 16, 16, 16)
        vat = DiceVAT(epsilon=10.0, squared_pred=False, joint_channels=True, smooth=1e-8)
    result = vat.compute(net, x)
    assert torch.isfinite(result.loss) and result.loss.requires_grad
    torch.testing.assert_close(result.r_adv.flatten(1).norm(dim=1), torch.full((2,), vat.epsilon), atol=1e-3, rtol=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="divergence"):
        DiceVAT(divergence="js")
    with pytest.raises(ValueError, match="epsilon"):
        DiceVAT(epsilon=-1)
    with pytest.raises(ValueError, match="iterations"):
        DiceVAT(iterations=0)
    with pytest.raises(ValueError, match="shape"):
        DiceVAT()(_small_net(), torch.rand(4, 16))
