"""Cross-adversarial local distribution regularisation (Cross-ALD; Nguyen-Duc et al., MICCAI 2023, Eq. 4-7).

For two images ``x_i != x_j`` and their adversarial particles ``x'_i(1..N)``, ``x'_j(1..N)`` (from
:class:`~common.svgdf.SVGDFSampler`), with one ``gamma ~ Beta(alpha, alpha)``:

    R = E_{n,m} l_Dice( p(gamma x'_i(n) + (1 - gamma) x'_j(m)),  p(gamma x_i + (1 - gamma) x_j) )

i.e. a Dice consistency between the mixed particles and the mixed natural image (the relaxation Eq. 7 of the
negative entropy of the mixture ``gamma P(.|x_i) + (1 - gamma) P(.|x_j)``). The same ``gamma`` mixes the images and
the particles. Every image of the batch is paired with a partner from a random derangement of the batch.

:class:`CrossALDRegularizer` also covers the rows of the paper's ablation (Table 3) that change the particles or
drop the mixing: no sampler = the natural images themselves (random mixup), ``mix=False`` = Dice consistency of each
particle with its own image (the SVGD/SVGDF rows). ``common.methods.cross_ald.build_regularizer`` builds each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from common.losses.dice_vat import _logits, dice_divergence
from common.networks.batchnorm import frozen_bn_stats
from common.svgdf import SVGDFSampler

__all__ = ["CrossALDRegularizer", "CrossALDResult", "random_derangement", "mix_pairs"]

PAIRINGS = ("matched", "all")
TARGETS = ("prediction", "mixed_targets")


def random_derangement(n: int, device: Optional[torch.device] = None, max_tries: int = 100) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` without fixed points (``n >= 2``), by rejection (about
    e tries on average); after ``max_tries`` a random cyclic shift of a random order (still a derangement)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements (x_i != x_j), got a batch of {n}")
    idx = torch.arange(n)
    for _ in range(max_tries):
        perm = torch.randperm(n)
        if not bool((perm == idx).any()):
            return perm.to(device)
    order = torch.randperm(n)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm.to(device)


def mix_pairs(a: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """``gamma * a + (1 - gamma) * b`` (Eq. 7's mix of images and of particles); shapes must match."""
    if a.shape != b.shape:
        raise ValueError(f"mix_pairs needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return gamma * a + (1.0 - gamma) * b


@dataclass
class CrossALDResult:
    """``loss``: R (scalar, differentiable w.r.t. the weights only). The rest is detached, for logs and tests:
    ``gamma`` (scalar tensor, ``None`` without mixing), ``partner`` ``(B,)`` (the derangement ``pi``, ``None``
    without mixing), ``pairs`` ``(M, 2)`` particle indices ``(n, m)``, ``particles`` ``(N, B, *x)``,
    ``mixed_images`` ``(B, *x)``, ``mixed_particles`` ``(M, B, *x)``, ``target`` ``(B, C, *spatial)``, ``stats`` the
    sampler's (:class:`~common.svgdf.SVGDFResult`)."""

    loss: torch.Tensor
    gamma: Optional[torch.Tensor]
    partner: Optional[torch.Tensor]
    pairs: torch.Tensor
    particles: torch.Tensor
    mixed_images: torch.Tensor
    mixed_particles: torch.Tensor
    target: torch.Tensor
    stats: Optional[Dict[str, torch.Tensor]] = None


class CrossALDRegularizer(nn.Module):
    """R of Cross-ALD for a batch ``x`` ``(B, C_in, *spatial)`` (see the module docstring).

    One call:

    1. ``q = p(x)`` without gradient; particles ``x'`` ``(N, B, ...)`` from ``sampler`` (no sampler: ``x'(1) = x``);
    2. with ``mix``: ``pi`` = random derangement of the batch, one ``gamma ~ Beta(alpha, alpha)``,
       ``x~ = gamma x + (1 - gamma) x[pi]``; particle pairs ``(n, m)``: ``"matched"`` = ``(n, s(n))`` for a random
       permutation ``s`` of the N particles (N pairs), ``"all"`` = the N^2 pairs; ``x~'_nm = gamma x'(n) +
       (1 - gamma) x'(m)[pi]``; target ``q~ = p(x~)`` without gradient (``target="prediction"``) or
       ``gamma q + (1 - gamma) q[pi]`` (``"mixed_targets"``, the author's ALD+mixup code, and the only sensible
       target when the particles are the natural images);
       without ``mix``: ``x~'_n = x'(n)``, ``q~ = q``;
    3. ``R = mean over pairs of D(softmax(network(x~'_nm)), q~)``, D the SS-Net Dice of the dataset (batch sums), all
       pairs in one forward.

    Every pass runs with BatchNorm running statistics frozen and dropout as the mode sets it.

    Args:
        sampler: the particle sampler, or ``None`` for the natural images (random mixup).
        mix: mix pairs of images (Cross-ALD) or not (plain ALD consistency).
        alpha: Beta(alpha, alpha) of gamma (0.5, the author's ALD+mixup code; the paper gives none).
        pairing: ``"matched"`` or ``"all"`` particle pairs.
        target: ``"prediction"`` or ``"mixed_targets"``.
        squared_pred, joint_channels, smooth: the Dice divergence D (ACDC: squared, class mean, 1e-10; LA: linear,
            joint channels, 1e-8).
    """

    def __init__(
        self,
        sampler: Optional[SVGDFSampler] = None,
        mix: bool = True,
        alpha: float = 0.5,
        pairing: str = "matched",
        target: str = "prediction",
        squared_pred: bool = True,
        joint_channels: bool = False,
        smooth: float = 1e-10,
    ) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"Beta alpha must be > 0, got {alpha}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got '{pairing}'")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got '{target}'")
        if sampler is None and not (mix and target == "mixed_targets"):
            raise ValueError("without a sampler the particles are the natural images: only mix=True with "
                             "target='mixed_targets' gives a non-trivial consistency (random mixup)")
        self.sampler = sampler
        self.mix = bool(mix)
        self.alpha = float(alpha)
        self.pairing = pairing
        self.target_kind = target
        self.squared_pred = bool(squared_pred)
        self.joint_channels = bool(joint_channels)
        self.smooth = float(smooth)

    def extra_repr(self) -> str:
        return (f"mix={self.mix}, alpha={self.alpha}, pairing='{self.pairing}', target='{self.target_kind}', "
                f"squared_pred={self.squared_pred}, joint_channels={self.joint_channels}")

    def divergence(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """D(softmax(logits), target), SS-Net's batch-summed Dice; ``(B, C, *spatial)`` -> scalar."""
        return dice_divergence(torch.softmax(logits.float(), dim=1), target, self.squared_pred, self.joint_channels,
                               self.smooth)

    @torch.no_grad()
    def prediction(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``softmax(network(x))`` without gradient, BN running statistics frozen; ``(B, C, *spatial)``."""
        with frozen_bn_stats(network):
            return torch.softmax(_logits(network(x)).float(), dim=1)

    def draw_gamma(self, device: torch.device) -> torch.Tensor:
        """One ``gamma ~ Beta(alpha, alpha)`` (torch's global generator, so seeds and resumed RNG states replay)."""
        a = torch.tensor(self.alpha)
        return torch.distributions.Beta(a, a).sample().to(device)

    def particle_pairs(self, n: int, device: torch.device) -> torch.Tensor:
        """Particle index pairs ``(M, 2)``: matched ``(k, s(k))`` or all ``(n, m)``."""
        if self.pairing == "all":
            grid = torch.cartesian_prod(torch.arange(n), torch.arange(n))
            return grid.view(-1, 2).to(device)
        return torch.stack([torch.arange(n), torch.randperm(n)], dim=1).to(device)

    def compute(self, network: nn.Module, x: torch.Tensor) -> CrossALDResult:
        """R and the intermediate tensors (see the class docstring)."""
        if x.dim() < 3:
            raise ValueError(f"CrossALDRegularizer needs an input (B, C, *spatial), got shape {tuple(x.shape)}")
        x = x.detach()
        q = self.prediction(network, x)
        stats = {}
        if self.sampler is None:
            particles = x.unsqueeze(0)
        else:
            sampled = self.sampler(network, x, target=q)
            particles, stats = sampled.particles, sampled.stats or {}
        n = particles.shape[0]
        if self.mix:
            partner = random_derangement(x.shape[0], device=x.device)
            gamma = self.draw_gamma(x.device).to(x.dtype)
            pairs = self.particle_pairs(n, x.device)
            mixed_images = mix_pairs(x, x[partner], gamma)
            mixed_particles = mix_pairs(particles[pairs[:, 0]], particles[pairs[:, 1]][:, partner], gamma)
            if self.target_kind == "prediction":
                target = self.prediction(network, mixed_images)
            else:
                target = mix_pairs(q, q[partner], gamma.float())
        else:
            partner = gamma = None
            pairs = torch.arange(n, device=x.device).unsqueeze(1).repeat(1, 2)
            mixed_images, mixed_particles, target = x, particles, q
        m, b = mixed_particles.shape[:2]
        with frozen_bn_stats(network):
            logits = _logits(network(mixed_particles.reshape(m * b, *x.shape[1:])))
        logits = logits.view(m, b, *logits.shape[1:])
        loss = torch.stack([self.divergence(logits[k], target) for k in range(m)]).mean()
        return CrossALDResult(loss=loss, gamma=gamma, partner=partner, pairs=pairs, particles=particles.detach(),
                              mixed_images=mixed_images.detach(), mixed_particles=mixed_particles.detach(),
                              target=target.detach(), stats=stats)

    def forward(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """R (scalar); gradients reach the network weights only."""
        return self.compute(network, x).loss
