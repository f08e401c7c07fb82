"""ClassSeparation (common/losses/class_separation.py): memory refresh, L_cs values, gradients, options."""

import pytest
import torch
import torch.nn.functional as F

from common.losses.class_separation import ClassSeparation


def _module(**kw) -> ClassSeparation:
    torch.manual_seed(0)
    return ClassSeparation(num_classes=3, in_channels=4, feature_dim=8, memory_size=5, **kw)


def _brute_force(cs: ClassSeparation, f: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Eq. 4 literally: the N x M matrix of weighted cosine distances per class, mean, / C."""
    total = 0.0
    for c in range(cs.num_classes):
        z = cs.prototypes(c)
        fc = f[classes == c]
        if z.shape[0] <= 1 or fc.shape[0] <= 1:
            continue
        w_f = torch.sigmoid(cs.feature_selectors[c](fc.detach())).squeeze(1)
        w_f = w_f * len(w_f) / w_f.sum()
        if cs.memory_weights == "normalized":
            w_z = torch.sigmoid(cs.memory_selectors[c](F.normalize(z, dim=1))).squeeze(1)
            w_z = w_z * len(w_z) / w_z.sum()
        else:
            w_z = torch.ones(len(z))
        d = 1 - F.normalize(fc, dim=1) @ F.normalize(z, dim=1).T
        total = total + (w_f[:, None] * w_z[None, :] * d).mean()
    return total / cs.num_classes


def _fill_memory(cs: ClassSeparation, rows: dict) -> None:
    for c, z in rows.items():
        cs.memory[c, : len(z)] = z
        cs.memory_count[c] = len(z)


@pytest.mark.parametrize("memory_weights", ["normalized", "uniform"])
def test_loss_equals_the_pairwise_formula(memory_weights):
    cs = _module(memory_weights=memory_weights).train()
    torch.manual_seed(1)
    _fill_memory(cs, {1: torch.randn(5, 8), 2: torch.randn(3, 8)})
    f = torch.randn(40, 8)
    classes = torch.randint(0, 3, (40,))
    torch.testing.assert_close(cs.separation_loss(f, classes), _brute_force(cs, f, classes), atol=1e-5, rtol=1e-5)


def test_loss_is_zero_when_features_equal_their_prototype_and_positive_otherwise():
    cs = _module().train()
    v1, v2 = torch.randn(8), torch.randn(8)
    _fill_memory(cs, {1: v1.repeat(4, 1), 2: v2.repeat(5, 1)})
    classes = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    f = torch.stack([torch.randn(8), torch.randn(8)] + [v1] * 3 + [v2] * 4)
    assert float(cs.separation_loss(f, classes).detach()) == pytest.approx(0.0, abs=1e-6)  # background has no prototypes
    f_off = f.clone()
    f_off[2] = -v1
    assert float(cs.separation_loss(f_off, classes).detach()) > 0.01
    f_off = f.clone()
    f_off[6] = v1  # a class-2 feature at the class-1 prototype
    assert float(cs.separation_loss(f_off, classes).detach()) > 0.0


def test_empty_memory_and_singletons_give_zero_without_error():
    cs = _module().train()
    f = torch.randn(10, 8)
    assert float(cs.separation_loss(f, torch.ones(10, dtype=torch.long)).detach()) == 0.0
    _fill_memory(cs, {1: torch.randn(1, 8)})  # one prototype: skipped like the official code
    assert float(cs.separation_loss(f, torch.ones(10, dtype=torch.long)).detach()) == 0.0


def _batch():
    torch.manual_seed(3)
    emb = torch.randn(2, 4, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8)).float()
    pred = label[:, 0].long().clone()
    pred[:, :2] = 0  # some wrong predictions
    return emb, pred, label


@pytest.mark.parametrize("selection", ["highest", "lowest"])
@pytest.mark.parametrize("ranking", ["memory", "feature"])
def test_update_memory_keeps_ranked_correct_foreground(selection, ranking):
    cs = _module(prototype_selection=selection, ranking_selector=ranking).train()
    emb, pred, label = _batch()
    bn = cs.projection[1]
    running = bn.running_mean.clone()
    cs.update_memory(emb, pred, label)
    torch.testing.assert_close(bn.running_mean, running)  # projection ran in eval mode
    assert cs.projection.training
    assert cs.memory_count[0] == 0  # background never stored
    gt = label[:, 0].long()
    for c in (1, 2):
        mask = (pred == gt) & (gt == c)
        vectors = emb.movedim(1, -1)[mask]
        assert int(mask.sum()) > 5 and int(cs.memory_count[c]) == 5
        with torch.no_grad():
            cs.projection.eval()
            z = cs.projection(vectors)
            cs.projection.train()
            # the ranking pass ran in train mode: its BN used these candidates' batch statistics, as here
            sel = cs.memory_selectors[c] if ranking == "memory" else cs.feature_selectors[c]
            score = sel(F.normalize(z, dim=1) if ranking == "memory" else z).squeeze(1)
        stored = cs.prototypes(c)
        dist = (stored[:, None] - z[None]).norm(dim=-1)
        assert dist.min(dim=1).values.max() < 1e-5  # every stored row is a candidate of class c
        kept = set(dist.argmin(dim=1).tolist())
        rest = torch.tensor([i for i in range(len(z)) if i not in kept])
        kept = torch.tensor(sorted(kept))
        if selection == "highest":
            assert score[kept].min() >= score[rest].max()
        else:
            assert score[kept].max() <= score[rest].min()


def test_absent_class_keeps_its_slot():
    cs = _module().train()
    emb, pred, label = _batch()
    cs.update_memory(emb, pred, label)
    kept = cs.prototypes(2).clone()
    only1 = torch.where(label == 2, torch.zeros_like(label), label)
    cs.update_memory(emb, only1[:, 0].long(), only1)
    torch.testing.assert_close(cs.prototypes(2), kept)


def test_gradients_reach_features_and_attention_but_not_the_selector_input_or_memory():
    for memory_weights in ("normalized", "uniform"):
        cs = _module(memory_weights=memory_weights).train()
        emb, pred, label = _batch()
        emb.requires_grad_(True)
        cs.update_memory(emb, pred, label)
        assert not cs.memory.requires_grad
        seen = []
        hooks = [s.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].requires_grad))
                 for s in cs.feature_selectors]
        loss = cs(emb, label)
        for h in hooks:
            h.remove()
        assert seen and not any(seen), "the feature-side attention must see detached features"
        loss.backward()
        assert emb.grad is not None and float(emb.grad.abs().sum()) > 0
        assert cs.feature_selectors[1][0].weight.grad is not None
        mem_grad = cs.memory_selectors[1][0].weight.grad
        if memory_weights == "normalized":
            assert mem_grad is not None and float(mem_grad.abs().sum()) > 0
        else:
            assert mem_grad is None  # the official code's prototype weights are all 1


def test_3d_embedding_and_bad_inputs():
    cs = _module().train()
    emb = torch.randn(1, 4, 6, 6, 4)
    label = torch.randint(0, 3, (1, 6, 6, 4))
    cs.update_memory(emb, label, label)
    assert torch.isfinite(cs(emb, label))
    with pytest.raises(ValueError, match="embedding"):
        cs(torch.randn(1, 5, 6, 6, 4), label)
    with pytest.raises(ValueError, match="class map"):
        cs(emb, label[:, :3])
    with pytest.raises(ValueError, match="prototype_selection"):
        ClassSeparation(3, prototype_selection="top")
    with pytest.raises(ValueError, match="memory_weights"):
        ClassSeparation(3, memory_weights="l1")


def test_memory_is_saved_with_the_state_dict():
    cs = _module()
    emb, pred, label = _batch()
    cs.update_memory(emb, pred, label)
    other = _module()
    other.load_state_dict(cs.state_dict())
    torch.testing.assert_close(other.memory, cs.memory)
    assert other.memory_count.tolist() == cs.memory_count.tolist()
