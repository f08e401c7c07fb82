"""Cross-ALD: the SVGDF particle sampler, the mixed regulariser, the method (and its Table-3 rows), the bundle on
tiny synthetic 2D and 3D data."""

import copy
import importlib.util
import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from monai.losses import DiceLoss
from torch import nn

from common.losses.class_separation import ClassSeparation
from common.losses.cross_ald import CrossALDRegularizer, random_derangement
from common.losses.dice_vat import DiceVAT
from common.methods.cross_ald import TABLE3_ROWS, CrossALDMethod, build_regularizer
from common.methods.ssnet import SSNetMethod
from common.networks import UNet2D, VNet3D
from common.svgdf import SVGDFSampler, per_sample_dice_divergence, rbf_kernel
from helpers import REPO_ROOT, TINY_3D, run_training, workflow, assert_same_gradients

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
        res = SVGDFSampler(num_particles=1, steps=1, epsilon=6.0, xi=10.0, mode="vat_like", **kwargs)(net, x,
                                                                                                   target=target)
        torch.testing.assert_close(res.perturbations[0], r_vat, atol=1e-5, rtol=1e-4)


def _uniform_start(seed, n, x, epsilon, init_noise=0.5):
    """The sampler's random start, rebuilt by hand: ``torch.rand`` noise of half-width ``init_noise`` (drawn from the
    global generator right after ``torch.manual_seed(seed)``, as the sampler draws it), projected per particle onto
    the L2 ball of radius ``epsilon``; ``(N, *x.shape)`` in ``x``'s dtype."""
    torch.manual_seed(seed)
    noise = (torch.rand((n, *x.shape)) - 0.5) * (2 * init_noise)
    norms = noise.flatten(2).norm(dim=2)
    return (noise * (epsilon / norms).clamp(max=1.0).view(n, x.shape[0], *([1] * (x.dim() - 1)))).to(x.dtype)


@pytest.mark.parametrize("n,kwargs", [(1, {}), (1, {"kernel": "none"}), (1, {"repulsion": False}),
                                      (1, {"kernel": "none", "repulsion": False}), (3, {"kernel": "none"})])
def test_projected_single_particle_step_is_a_normalised_dice_ascent(n, kwargs):
    """The default mode (``projected``, ``l2`` step), L = 1, no kernel (N = 1, or ``kernel="none"``): every particle
    takes one projected, normalised gradient-ascent (VAT) step from its uniform start,
    r_n = Proj(r0_n + tau * g_n / ||g_n||), g_n = grad_r Dice(p(x + r0_n), p(x)), each image on its own. No
    ``repulsion=False`` is needed: without a kernel there is nothing to repel. (N = 3 is N independent VAT restarts;
    checked with the ``l2`` step only, where the scale of phi does not enter.)"""
    net, x = _net(mode="eval"), _images(b=2)
    sampler = SVGDFSampler(num_particles=n, steps=1, epsilon=3.0, step_size=2.0, **kwargs)
    assert (sampler.mode, sampler.step_normalization, sampler.init_noise) == ("projected", "l2", 0.5)
    torch.manual_seed(4)
    res = sampler(net, x)
    assert res.kernel is None and res.bandwidth is None and set(res.stats) == {"drive"}
    r0 = _uniform_start(4, n, x, 3.0)
    with torch.no_grad():
        q = torch.softmax(net(x), 1)
    for k in range(n):
        for i in range(x.shape[0]):  # one image at a time: the score of an image depends on that image only
            r = r0[k, i : i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(per_sample_dice_divergence(torch.softmax(net(x[i : i + 1] + r), 1),
                                                                  q[i : i + 1]).sum(), r)
            assert float(g.norm()) > 0
            step = r.detach() + 2.0 * g / g.norm()
            expected = step * min(1.0, 3.0 / float(step.norm()))
            torch.testing.assert_close(res.perturbations[k, i : i + 1], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.particles, x.unsqueeze(0) + res.perturbations)


def _tiny_double_net():
    """Conv-tanh-conv in float64, eval mode (no dropout, no BN): deterministic. The weights are scaled up so that
    the network is confident enough for its Dice score to be of the size of the repulsion (measured: mean
    ||drive|| ~ 0.31, ||repulsion|| ~ 0.58), so the comparison below checks both terms of phi."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.mul_(4.0)
        net[2].weight.mul_(10.0)
    return net


def _tiny_features():
    """A fixed random strided conv + tanh, flattened: Phi (M, 1, H, W) -> (M, 2 * H/2 * W/2). Non-linear, so that
    the partner's and the own Jacobian give different repulsions (for a linear Phi they coincide)."""
    w = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return lambda v: torch.tanh(torch.nn.functional.conv2d(v, w.to(v.dtype), stride=2)).flatten(1)


def _soft_dice_by_hand(p, q, smooth=1e-10):
    """Per-image soft Dice loss, squared denominators, mean over the classes: ``(B, C, ...)`` x2 -> ``(B,)``."""
    inter = (p * q).flatten(2).sum(2)
    den = p.pow(2).flatten(2).sum(2) + q.pow(2).flatten(2).sum(2)
    return (1 - (2 * inter + smooth) / (den + smooth)).mean(1)


def _eq6_step_by_hand(net, phi, x, r0, tau, epsilon, step_normalization, sigma):
    """One projected Stein step of Eq. 6, image by image and particle by particle, sharing no code with the sampler.

    s_j = grad_{r_j} Dice(p(x + r_j), p(x)) (one autograd call per particle on a fresh leaf); K[j, n] =
    exp(-||Phi(x + r_j) - Phi(x + r_n)||^2 / h), h = 2 sigma^2 or median_{j<n} ||.||^2 / log N;
    rep_n = sum_j grad_{r_j} k(Phi(x + r_j), stopgrad Phi(x + r_n)) (one autograd call per (j, n));
    phi_n = (sum_j K[j, n] s_j + rep_n) / N; r_n = Proj(r0_n + tau * step(phi_n)).

    Returns the new perturbations, K (B, N, N), h (B,), the mean norms of the two terms of phi, the mean of
    ||rep_n|| / ||drive_n|| and how many particles the projection shortened (of N * B)."""
    n, b = r0.shape[:2]
    with torch.no_grad():
        q = torch.softmax(net(x), 1)
    out = torch.empty_like(r0)
    kernels, bandwidths, drive_norms, rep_norms, ratios, projected = [], [], [], [], [], 0
    for i in range(b):
        xi, qi = x[i : i + 1], q[i : i + 1]
        scores = []
        for j in range(n):
            rj = r0[j, i : i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(_soft_dice_by_hand(torch.softmax(net(xi + rj), 1), qi).sum(), rj)
            scores.append(g)
        with torch.no_grad():
            feats = [phi(xi + r0[j, i : i + 1])[0] for j in range(n)]
        sq = [[float((feats[j] - feats[m]).pow(2).sum()) for m in range(n)] for j in range(n)]
        if sigma is None:
            h = statistics.median(sq[j][m] for j in range(n) for m in range(j + 1, n)) / math.log(n)
        else:
            h = 2.0 * sigma ** 2
        kmat = [[math.exp(-sq[j][m] / h) for m in range(n)] for j in range(n)]
        kernels.append(kmat)
        bandwidths.append(h)
        for m in range(n):
            drive = sum(kmat[j][m] * scores[j] for j in range(n))
            rep = torch.zeros_like(drive)
            partner = feats[m].detach()
            for j in range(n):
                rj = r0[j, i : i + 1].clone().requires_grad_(True)
                (g,) = torch.autograd.grad(torch.exp(-(phi(xi + rj)[0] - partner).pow(2).sum() / h), rj)
                rep = rep + g
            direction = (drive + rep) / n
            drive_norms.append(float(drive.norm()) / n)
            rep_norms.append(float(rep.norm()) / n)
            ratios.append(float(rep.norm() / drive.norm()))
            if step_normalization == "l2":
                direction = direction / direction.norm()
            r = r0[m, i : i + 1] + tau * direction
            if float(r.norm()) > epsilon:
                projected += 1
                r = r * (epsilon / r.norm())
            out[m, i] = r[0]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return (out, torch.tensor(kernels, dtype=x.dtype), torch.tensor(bandwidths, dtype=x.dtype),
            {"drive": mean(drive_norms), "repulsion": mean(rep_norms), "repulsion_over_drive": mean(ratios)},
            projected)


@pytest.mark.parametrize("bandwidth", [None, 0.8], ids=["median", "sigma"])
@pytest.mark.parametrize("step_normalization,tau", [("none", 0.5), ("l2", 0.5)])
def test_one_stein_step_equals_eq6_by_hand(step_normalization, tau, bandwidth):
    """The default sampler (``projected``, ``partner`` repulsion), N = 3, L = 1, a callable feature extractor, a
    float64 network: one step equals Eq. 6 computed by hand (:func:`_eq6_step_by_hand`), with the literal step
    ``tau * phi`` and the unit-L2 one, the median bandwidth and a fixed sigma. The start (init_noise 0.2: L2 norms
    0.87-0.98 on 8x8) lies inside the ball of radius 1.2; the step takes 2-4 of the 6 particles out of it (norms
    1.21-1.25 before the projection) and leaves the others in (1.12-1.20), so both branches of the projection are
    exercised. Measured ||rep|| / ||drive||: 2.9-4.0. The sampler computes its Dice, kernel and phi in float32
    (``.float()``), hence float32 tolerances."""
    net, phi = _tiny_double_net(), _tiny_features()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps, init = 1.2, 0.2
    kwargs = dict(num_particles=3, steps=1, epsilon=eps, step_size=tau, features=phi, bandwidth=bandwidth,
                  step_normalization=step_normalization, init_noise=init)
    torch.manual_seed(3)
    res = SVGDFSampler(**kwargs)(net, x)
    r0 = _uniform_start(3, 3, x, eps, init)
    expected, kmat, h, stats, projected = _eq6_step_by_hand(net, phi, x, r0, tau, eps, step_normalization, bandwidth)
    assert 0 < projected < 6, projected  # some particles were projected back onto the sphere, some not
    assert 0.2 < stats["repulsion_over_drive"] < 5, stats  # both terms of phi matter
    assert float((expected - r0).abs().max()) > 0.1  # the step moves the particles
    torch.testing.assert_close(res.perturbations, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.kernel.double(), kmat, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.bandwidth.double(), h, atol=1e-6, rtol=1e-5)
    for key, value in stats.items():
        assert float(res.stats[key]) == pytest.approx(value, rel=1e-4), key
    # the check tells the two Jacobians apart: the "own" form (0.1.x) is far from Eq. 6's printed one here
    torch.manual_seed(3)
    own = SVGDFSampler(repulsion_jacobian="own", **kwargs)(net, x).perturbations
    assert float((own - expected).abs().max()) > 1e-3


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


def _blobs(b, seed, size=32):
    """Synthetic ACDC-like images: nested discs of classes 1..3 at random centres, intensity = class / 3 + noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(b):
        c = (torch.rand(2, generator=g) * 0.4 + 0.3) * size
        d = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2).sqrt()
        label = torch.zeros(size, size, dtype=torch.long)
        label[d < 0.35 * size], label[d < 0.22 * size], label[d < 0.1 * size] = 1, 2, 3
        images.append(label.float() / 3 + 0.1 * torch.randn(size, size, generator=g))
        labels.append(label)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]


def _trained_unet(steps=20):
    """The bundle's UNet2D(1, 4), seeded, after ``steps`` SGD steps on two blob images (Dice loss on the held-out
    blobs: 0.79 untrained, 0.17 after 20 steps), eval mode. Untrained, its Dice score is ~1e-8 and the particles are
    no more adversarial than chance (measured: 0.93x random), so the test needs a network that segments."""
    torch.manual_seed(0)
    net = UNet2D(1, 4).train()
    x, y = _blobs(2, seed=1)
    loss_fn = DiceLoss(softmax=True, to_onehot_y=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        logits = net(x)
        (loss_fn(logits, y) + torch.nn.functional.cross_entropy(logits, y[:, 0])).backward()
        opt.step()
    return net.eval()


def test_default_particles_are_diverse_and_adversarial():
    """The default sampler (projected, partner repulsion, encoder features, median bandwidth, l2 step), N = 4,
    L = 2, eps = 3, on a fixed trained U-Net and two held-out 32x32 images:

    - the repulsion makes the particles more diverse: mean pairwise SSE of the perturbations 20.7 with it, 9.6
      without (``repulsion=False``, same seed and start): ratio 2.16, asserted > 1.5;
    - every particle (with the repulsion) is more adversarial than chance: its per-image Dice divergence exceeds
      the mean divergence of 8 uniform-noise directions with that particle's L2 norm by 13.5x at least (asserted
      > 3x), and the largest of the 8 by 7.2x at least (asserted > 1x).

    Measured on CPU, 1 thread (2 threads: 2.21, 13.2x, 8.6x): the particles' divergence >= 0.12, the random
    directions' mean <= 0.010, all particles on the sphere ||r|| = 3, repulsion / drive 5.2."""
    net, (x, _) = _trained_unet(), _blobs(2, seed=2)
    n = 4
    sse, results = {}, {}
    for repulsion in (True, False):
        torch.manual_seed(7)
        res = SVGDFSampler(num_particles=n, steps=2, epsilon=3.0, repulsion=repulsion)(net, x)
        f = res.perturbations.flatten(2).double()
        sse[repulsion] = torch.stack([(f[i] - f[j]).pow(2).sum(1) for i in range(n) for j in range(i + 1, n)]).mean()
        results[repulsion] = res
    assert float(sse[True]) > 1.5 * float(sse[False]), sse
    res = results[True]
    r, target = res.perturbations, res.target.repeat(n, 1, 1, 1)
    norms = r.flatten(2).norm(dim=2)  # (N, B)
    assert float(norms.max()) <= 3.0 * (1 + 1e-5) and float(norms.min()) > 1.0

    def divergence(perturbations):
        with torch.no_grad():
            probs = torch.softmax(net((x.unsqueeze(0) + perturbations).flatten(0, 1)), 1)
        return per_sample_dice_divergence(probs, target).view(n, -1)

    particle = divergence(r)
    g = torch.Generator().manual_seed(11)
    random = []
    for _ in range(8):
        u = torch.rand(r.shape, generator=g) - 0.5
        random.append(divergence(u * (norms / u.flatten(2).norm(dim=2)).view(n, -1, 1, 1, 1)))
    random = torch.stack(random)  # (8, N, B)
    assert bool((particle > 3 * random.mean(0)).all()), (particle, random.mean(0))
    assert bool((particle > random.amax(0)).all()), (particle, random.amax(0))


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
                         ({"norm": "l1"}, "norm"), ({"kernel": "imq"}, "kernel"),
                         ({"features": "bottleneck"}, "features"),
                         ({"epsilon": -1}, "epsilon"), ({"mode": "vat_like", "steps": 0}, "steps"),
                         ({"steps": -1}, "steps"), ({"bandwidth": 0.0}, "bandwidth"),
                         ({"repulsion_jacobian": "x"}, "repulsion_jacobian"), ({"step_size": 0.0}, "step_size"),
                         ({"step_normalization": "linf"}, "step_normalization"), ({"init_noise": 0.0}, "init_noise"),
                         ({"xi": 0.0}, "xi")]:
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
        2, 1, 6.0, "l2", "projected", "encoder", None)
    assert (s.repulsion_jacobian, s.step_normalization, s.init_noise, s.step_size) == ("partner", "l2", 0.5, 6.0)
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


# -- tools/particle_diversity.py -------------------------------------------------------------------------------
SHIPPED_WEIGHTS = REPO_ROOT / "bundles" / "cross_ald" / "models" / "model.pt"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"semiseg_tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_particle_diversity_tool_on_acdc(acdc_dir, capsys):
    """The Sect. 3.1 study on one real ACDC slice with the shipped weights: one JSON row per sampler, in the order
    vat, svgd, svgdf, with finite numbers; the kernel-free ``vat`` row has no repulsion, the other two have one."""
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip(f"shipped Cross-ALD weights not found at {SHIPPED_WEIGHTS}")
    tool = _load_tool("particle_diversity")
    code = tool.main(["--json", "--particles", "2", "--images", "1", "--random_directions", "2",
                      "--dataset_dir", str(acdc_dir), "--weights", str(SHIPPED_WEIGHTS)])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 3, lines
    rows = [json.loads(line) for line in lines]
    assert [row["sampler"] for row in rows] == ["vat", "svgd", "svgdf"]
    for row in rows:
        assert {"sampler", "n_particles", "sse", "adversarial_gain", "repulsion_over_drive"} <= set(row), row
        assert row["n_particles"] == 2 and row["images"] == 1
        for key in ("sse", "adversarial_gain", "repulsion_over_drive", "drive_norm", "divergence",
                    "random_divergence", "mean_particle_norm"):
            assert math.isfinite(row[key]), (row["sampler"], key, row[key])
        assert row["sse"] > 0 and row["adversarial_gain"] > 0 and row["drive_norm"] > 0, row
        assert 0 < row["mean_particle_norm"] <= 6.0 * (1 + 1e-4), row  # inside the eps = 6 ball
    assert rows[0]["repulsion_over_drive"] == 0 and rows[0]["repulsion_norm"] == 0
    assert rows[1]["repulsion_over_drive"] > 0 and rows[2]["repulsion_over_drive"] > 0


def test_particle_diversity_tool_names_a_missing_weights_file(tmp_path, capsys):
    tool = _load_tool("particle_diversity")
    missing = tmp_path / "no_such_model.pt"
    with pytest.raises(SystemExit) as exc:
        tool.main(["--json", "--weights", str(missing), "--dataset_dir", str(tmp_path)])
    assert exc.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage first, then "prog: error: ..."
    assert "error" in error and "--weights" in error and str(missing) in error, error


@pytest.mark.parametrize("kwargs,word", [
    ({"mode": "vat_like", "step_normalization": "none"}, "step_normalization"),
    ({"mode": "vat_like", "init_noise": 2.0}, "init_noise"),
    ({"mode": "vat_like", "step_size": 1.0}, "step_size"),
    ({"mode": "projected", "xi": 5.0}, "xi"),
    ({"init_noise": float("nan")}, "init_noise"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"bandwidth": float("nan")}, "bandwidth"),
])
def test_settings_the_mode_would_ignore_or_nan_are_refused(kwargs, word):
    """A setting of the other particle mode (it would be silently ignored) or a NaN is refused, naming it."""
    with pytest.raises(ValueError, match=word):
        SVGDFSampler(**kwargs)


def _acdc_list_dir(tmp_path, names):
    (tmp_path / "train_slices.list").write_text("".join(f"case_{i}\n" for i in range(names)))
    return tmp_path


@pytest.mark.parametrize("args,word", [(["--epsilon", "nan"], "--epsilon"), (["--step_size", "-1"], "--step_size"),
                                       (["--images", "3"], "--dataset_dir")])
def test_particle_diversity_tool_refuses_bad_values_by_name(tmp_path, capsys, args, word):
    """NaN radius, negative step, a dataset list too short for the requested slices (137 names = 1 unlabelled slice
    after the 136 labelled ones, 3 asked): argparse errors naming the option, before any image is read."""
    tool = _load_tool("particle_diversity")
    weights = REPO_ROOT / "bundles" / "cross_ald" / "models" / "model.pt"
    data = _acdc_list_dir(tmp_path, 137)  # 1 unlabelled slice after the 136 labelled ones
    with pytest.raises(SystemExit) as exc:
        tool.main(["--json", "--weights", str(weights), "--dataset_dir", str(data), *args])
    assert exc.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error" in error and word in error, error


def test_particle_diversity_tool_names_weights_that_are_not_a_unet(tmp_path, capsys):
    tool = _load_tool("particle_diversity")
    bad = tmp_path / "checkpoint.pt"
    torch.save({"network": {}, "optimizer": {}}, bad)
    data = _acdc_list_dir(tmp_path, 140)
    with pytest.raises(SystemExit):
        tool.main(["--json", "--weights", str(bad), "--dataset_dir", str(data), "--images", "1"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--weights" in error and "not a state_dict" in error, error
