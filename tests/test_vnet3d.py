"""Shape, parameter-count, state_dict and TorchScript checks for the paper backbones."""

from __future__ import annotations

import pytest
import torch

from common.networks import BackboneOutput, UNet2D, VNet3D


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts() -> None:
    n_vnet = _n_params(VNet3D(1, 2))
    n_unet = _n_params(UNet2D(1, 4))
    print(f"VNet3D(1, 2): {n_vnet} params; UNet2D(1, 4): {n_unet} params")
    assert n_vnet == pytest.approx(9.44e6, rel=0.02)
    assert n_unet == pytest.approx(1.81e6, rel=0.02)
    assert _n_params(VNet3D(1, 2, has_dropout=False)) == n_vnet


def test_vnet_shapes_on_la_patch() -> None:
    torch.manual_seed(0)
    model = VNet3D(1, 2).eval()
    assert model.embedding_channels == 16
    assert model.encoder_channels == [16, 32, 64, 128, 256]
    x = torch.randn(1, 1, 112, 112, 80)
    with torch.no_grad():
        out = model.forward_features(x)
        logits = model(x)
    assert isinstance(out, BackboneOutput)
    assert logits.shape == (1, 2, 112, 112, 80)
    assert out.logits.shape == (1, 2, 112, 112, 80)
    assert out.embedding.shape == (1, 16, 112, 112, 80)
    expected = [(16, 112, 112, 80), (32, 56, 56, 40), (64, 28, 28, 20), (128, 14, 14, 10), (256, 7, 7, 5)]
    assert [tuple(f.shape[1:]) for f in out.features] == expected
    assert torch.allclose(out.logits, logits)


def test_train_state_dict_loads_into_test_model() -> None:
    torch.manual_seed(0)
    train_model = VNet3D(1, 2, has_dropout=True).train()
    with torch.no_grad():
        train_model(torch.randn(2, 1, 16, 16, 16))  # update BN running stats
    test_model = VNet3D(1, 2, has_dropout=False)
    test_model.load_state_dict(train_model.state_dict(), strict=True)
    assert train_model.state_dict().keys() == test_model.state_dict().keys()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(train_model.eval()(x), test_model.eval()(x))


def test_dropout_only_when_requested() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32, 32)
    dropped = VNet3D(1, 2, has_dropout=True).train()
    plain = VNet3D(1, 2, has_dropout=False).train()
    plain.load_state_dict(dropped.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)
        a = plain(x)
        torch.manual_seed(2)
        assert torch.equal(a, plain(x))  # no randomness without dropout
        ref = plain.encode(x)[4]
        got = dropped.encode(x)[4]
    # Dropout3d(0.5): each (sample, channel) map is either zeroed or scaled by 2.
    zeroed = (got == 0).flatten(2).all(dim=2)
    scaled = torch.isclose(got, 2 * ref, atol=1e-5).flatten(2).all(dim=2)
    assert (zeroed | scaled).all()
    assert (zeroed & (ref != 0).flatten(2).any(dim=2)).any()


@pytest.mark.parametrize(
    "model, shape",
    [(VNet3D(1, 2), (1, 1, 32, 32, 32)), (UNet2D(1, 4), (2, 1, 32, 32))],
    ids=["vnet3d", "unet2d"],
)
def test_torchscript_matches_eager(model: torch.nn.Module, shape: tuple) -> None:
    torch.manual_seed(0)
    model = model.eval()
    scripted = torch.jit.script(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)


def test_frozen_bn_stats_keeps_running_statistics():
    from common.networks.batchnorm import frozen_bn_stats

    net = UNet2D().train()
    x = torch.rand(2, 1, 32, 32)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    with frozen_bn_stats(net):
        net(x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(x)
    assert not torch.equal(before["in_conv.block.1.running_mean"], net.state_dict()["in_conv.block.1.running_mean"])
