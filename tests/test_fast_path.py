"""The training fast path (issue 16): channels-last steps equal the plain eager step, bf16 keeps losses float32,
mistyped options are refused with their key, a failing compile falls back to eager with one warning."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.engines.utils import IterationEvents
from torch import nn

from common.engines.fast_path import FastPath, FastPathError, _LayoutFreeDropout, cpu_supports_bf16, to_channels_last
from tests.helpers import BUNDLES, TINY_2D, root_cause, workflow

METHODS = ["supervised", "ssnet", "cross_ald", "gapmatch", "cml", "vfd"]

#: tiny 2D settings: one iteration of 2 + 2 slices at 32x32, every pass of the method active
TINY = {**TINY_2D, "synthetic": {"num_labeled": 4, "num_unlabeled": 4, "num_validation": 1, "spatial_size": [32, 32]},
        "patch_size": [32, 32], "iterations": 1, "val_interval": 10 ** 6, "checkpoint_interval": 10 ** 6,
        "resume": False}
EXTRA = {"gapmatch": {"confidence_threshold": 0.0}, "cml": {"pretrain_iterations": 0}}


def _one_step(bundle: str, tmp_path, **options):
    """Run one training iteration of ``bundle``; return its logged losses and the gradients before the update."""
    wf = workflow(bundle, output_dir=str(tmp_path / "_".join(f"{k}{v}" for k, v in options.items())),
                  **TINY, **EXTRA.get(bundle, {}), **options)
    trainer = wf.parser.get_parsed_content("train#trainer")
    captured = {}

    def grab(engine):
        captured["grads"] = {
            i: (None if p.grad is None else p.grad.detach().clone().contiguous())
            for i, p in enumerate(engine._optimized)
        }

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, grab)
    wf.run()
    losses = {k: v for k, v in trainer.state.output.items()
              if torch.is_tensor(v) and v.numel() == 1 and v.is_floating_point()}
    return trainer, losses, captured["grads"]


@pytest.mark.parametrize("bundle", METHODS)
def test_channels_last_step_equals_the_plain_step(bundle, tmp_path):
    assert bundle in BUNDLES
    torch.manual_seed(0)
    plain, plain_losses, plain_grads = _one_step(bundle, tmp_path, channels_last=False)
    fast, fast_losses, fast_grads = _one_step(bundle, tmp_path, channels_last=True)
    assert fast.fast_path.channels_last and not plain.fast_path.channels_last
    conv = next(m for m in fast.network.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain_losses.keys() == fast_losses.keys() and "loss" in plain_losses
    for name, value in plain_losses.items():
        torch.testing.assert_close(fast_losses[name], value, rtol=1e-4, atol=1e-5, msg=f"{bundle} {name}")
    assert plain_grads.keys() == fast_grads.keys()
    # absolute tolerance relative to the largest gradient: a conv bias before BatchNorm has a gradient that is zero
    # in exact arithmetic, i.e. pure rounding noise that no relative tolerance can match
    scale = max(float(g.abs().max()) for g in plain_grads.values() if g is not None)
    # LeakyReLU/ReLU kinks: the two layouts sum in different orders, so a BatchNorm output within rounding of 0
    # (one of 32,768 in a measured U-Net step: 3.7e-6 in float64, -2.0e-7 in channels-last float32) can land on the
    # other side of the kink and take the other slope; that pixel's gradient then differs by (1 - 0.01) of itself
    # and every weight gradient below it by up to ~1e-3 of the largest gradient. Float rounding, not a layout
    # error (which would move the losses, compared above at rtol 1e-4, and the gradients by O(1)).
    atol = 2e-3 * scale
    for i, g in plain_grads.items():
        if g is None:
            assert fast_grads[i] is None or float(fast_grads[i].abs().max()) == 0
            continue
        torch.testing.assert_close(fast_grads[i], g, rtol=1e-3, atol=atol, msg=f"{bundle} parameter {i}")


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 support in oneDNN")
@pytest.mark.parametrize("bundle", METHODS)
def test_bf16_step_runs_and_keeps_losses_float32(bundle, tmp_path):
    trainer, losses, grads = _one_step(bundle, tmp_path, precision="bf16")
    assert trainer.fast_path.autocast_dtype is torch.bfloat16
    assert losses and all(v.dtype == torch.float32 for v in losses.values()), {k: v.dtype for k, v in losses.items()}
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    # weights stay float32 (autocast computes in bf16, the optimizer updates float32 weights)
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())


@pytest.mark.parametrize("key, value, message", [
    ("channels_last", "false", "'channels_last' must be true or false"),
    ("compile", 1, "'compile' must be true or false"),
    ("precision", "bf17", "'precision' must be one of"),
    ("precision", 16, "'precision' must be one of"),
    ("precision", "fp16", "'precision': fp16 mixed precision needs a CUDA device"),
])
def test_mistyped_options_are_refused_naming_the_key(key, value, message):
    with pytest.raises(FastPathError, match=message.replace("(", r"\(")):
        FastPath(**{key: value}, device="cpu")


def test_bundle_refuses_a_mistyped_precision(tmp_path):
    wf = workflow("supervised", output_dir=str(tmp_path), **TINY, precision="float31")
    with pytest.raises(Exception) as err:
        wf.parser.get_parsed_content("train#trainer")
    assert "'precision'" in str(root_cause(err.value))



@pytest.mark.parametrize("shape", [(3, 1, 8, 6), (16, 1, 3, 3), (2, 1, 4, 6, 5), (2, 3, 4, 5)])
def test_to_channels_last_writes_out_one_channel_strides(shape):
    t = torch.randn(shape)
    out = to_channels_last(t)
    assert torch.equal(out, t) and out.stride(1) == 1 and out.stride(0) == t[0].numel()
    assert to_channels_last(out) is out


def test_the_first_block_of_a_grey_level_batch_runs_channels_last():
    """A one-channel batch counts as channels-last with its standard strides, so ATen ran the U-Net's first conv,
    BatchNorm, activation and dropout in the standard layout and the next conv copied its input back (issue 16)."""
    from common.networks.unet2d import UNet2D

    net = UNet2D()
    fast = FastPath(channels_last=True)
    fast.prepare(net)
    batch = fast.batch({"image": torch.randn(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32)})
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
             for m in net.in_conv.block]
    net(batch["image"])
    for h in hooks:
        h.remove()
    assert layouts and all(layouts), layouts
    assert batch["label"].is_contiguous()  # labels are left alone



@pytest.mark.parametrize("channels_last", [False, True])
def test_up_block_without_concatenation_equals_conv_of_the_concatenation(channels_last):
    from common.networks.unet2d import _ConvBlock

    torch.manual_seed(0)
    block = _ConvBlock(12, 5, dropout=0.0)
    skip, up = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    if channels_last:
        FastPath(channels_last=True).prepare(block)
        skip, up = to_channels_last(skip), to_channels_last(up)
    results = []
    for concat in (True, False):
        parts = [skip.clone().requires_grad_(), up.clone().requires_grad_()]
        block.zero_grad()
        out = block(torch.cat(parts, dim=1)) if concat else block.forward_concat(*parts)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append([out] + [p.grad for p in parts] + [p.grad.clone() for p in block.parameters()])
    # absolute tolerance against the largest gradient: the bias of a conv before BatchNorm has a zero gradient in
    # exact arithmetic, so both versions give rounding noise there
    scale = max(float(t.abs().max()) for t in results[0][1:])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaNs in the same places and the same signs (signed zeros included)."""
    return (torch.equal(torch.nan_to_num(a, 7.0, 8.0, 9.0), torch.nan_to_num(b, 7.0, 8.0, 9.0))
            and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.signbit(), b.signbit()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("shape,channels_last", [((2, 8, 6, 6), True), ((2, 8, 6, 6), False), ((3, 5, 7), False),
                                                  ((2, 1, 5, 5), True), ((2, 4, 3, 3, 3), True)])
def test_fast_path_dropout_is_bit_identical_to_nn_dropout(p, shape, channels_last):
    """Same mask, same outputs and gradients (NaN, Inf and signed zeros included) and the same random state after,
    whatever the input's layout: a seeded fast-path run draws exactly what the plain step draws."""
    x = torch.randn(shape)
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    grad = torch.randn(shape)
    torch.manual_seed(3)
    x_plain = x.clone().requires_grad_()
    plain = nn.Dropout(p)(x_plain)
    plain.backward(grad)
    state_plain = torch.get_rng_state()

    fast_dropout = nn.Dropout(p)
    fast_dropout.__class__ = _LayoutFreeDropout
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim()) if channels_last else None
    x_fast = (x.contiguous(memory_format=fmt) if fmt else x).detach().clone(memory_format=torch.preserve_format)
    x_fast.requires_grad_()
    torch.manual_seed(3)
    fast = fast_dropout(x_fast)
    fast.backward(grad)
    assert _same_bits(plain, fast) and _same_bits(x_plain.grad, x_fast.grad)
    assert torch.equal(state_plain, torch.get_rng_state())
    if fmt is not None and shape[1] > 1:
        assert fast.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("inplace", [False, True])
def test_fast_path_dropout_matches_nn_dropout_on_overflowing_gradients_and_in_place(inplace):
    """Dropped elements get a zero gradient even where ``grad / keep`` overflows (a float mask, as nn.Dropout's), and
    ``inplace=True`` multiplies the input itself."""
    x = torch.randn(2, 3, 4, 4)
    grad = torch.full_like(x, 3e38)
    outputs = []
    for fast in (False, True):
        dropout = nn.Dropout(0.5, inplace=inplace)
        if fast:
            dropout.__class__ = _LayoutFreeDropout
        leaf = x.clone(memory_format=torch.channels_last if fast else torch.contiguous_format).requires_grad_()
        source = leaf * 1.0  # in-place dropout needs a non-leaf input
        torch.manual_seed(5)
        out = dropout(source)
        out.backward(grad)
        assert (out is source) == inplace
        outputs.append((out.detach(), leaf.grad))
    (plain, plain_grad), (fast, fast_grad) = outputs
    assert _same_bits(plain, fast) and _same_bits(plain_grad, fast_grad)
    assert not fast_grad.isnan().any()


@pytest.mark.parametrize("matches", [True, False])
def test_keep_mask_equals_bernoulli_also_where_random_draws_differ(monkeypatch, matches):
    """Where int64 ``random_()`` does not reproduce ``bernoulli_`` (PyTorch's MKL path on Intel CPUs), the mask
    falls back to ``bernoulli_`` itself; here both branches are checked against it."""
    from common.engines import dropout_mask

    dropout_mask.draws_match_bernoulli()  # the once-per-process check runs first; the branch is then forced
    monkeypatch.setattr(dropout_mask, "_matches", matches)
    for keep in (0.95, 0.7, 1 / 3):
        torch.manual_seed(11)
        reference = torch.empty(3, 6, 9, 10).bernoulli_(keep).bool()
        after = torch.get_rng_state()
        torch.manual_seed(11)
        mask = dropout_mask.keep_mask((3, 6, 9, 10), keep, torch.channels_last)
        assert mask.dtype == torch.bool and mask.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(mask, reference) and torch.equal(torch.get_rng_state(), after)
    with pytest.raises(ValueError, match="keep probability"):
        dropout_mask.keep_mask((2, 2), 1.0)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(caplog):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    fast = FastPath(channels_last=True, compile=True, device="cpu")
    fast.prepare(net)  # torch.compile is lazy: nothing is compiled before the first call
    assert fast.describe()["compile"] is True and net._fast_path_guard

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    # simulate a compiler failure inside the guarded block
    net._fast_path_guard = False
    net._compiled_call_impl = broken
    fast._install_fallback()
    x = torch.randn(2, 1, 8, 8)
    with caplog.at_level(logging.WARNING, logger="common.engines.fast_path"):
        y1 = net(x)
        y2 = net(x)
    torch.testing.assert_close(y1, y2)
    assert y1.shape == (2, 4, 8, 8)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "inductor exploded" in warnings[0].getMessage()
    assert fast.describe()["compile"] is False and net._compiled_call_impl is None
