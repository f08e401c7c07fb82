"""Adversarial particles by Stein variational gradient descent, with the kernel on semantic features (SVGDF).

Cross-ALD (Nguyen-Duc et al., MICCAI 2023, Sect. 2.4, Eq. 6) approximates the adversarial local distribution

    P(x' | x) ~ exp(l_Dice(p(x'), p(x)))   on the ball  C_eps(x) = {x' : ||x' - x||_p <= eps}

with N particles per image, moved L times by the Stein variational direction

    phi(x'_n) = (1/N) sum_j [ k(Phi(x'_j), Phi(x'_n)) grad_{x'_j} log P(x'_j | x)  +  grad k(Phi(x'_j), Phi(x'_n)) ],

``k`` an RBF kernel. The score ``grad log P`` is the gradient of the Dice divergence (the normaliser does not depend
on ``x'``). The first term pulls every particle toward high-divergence (adversarial) regions, the kernel-weighted
average of all particles' scores; the second term pushes the particles apart. SVGDF computes the kernel on features
``Phi`` of the network's encoder ("semantic" distances); vanilla SVGD (Liu & Wang, 2016) on the raw images.

The score ``grad_{x'} log P(x' | x) = grad_{x'} l_Dice(x', x)`` is taken per image (the normaliser Z does not depend on
``x'``). :class:`SVGDFSampler` has two update rules (``mode``):

``"projected"`` (default; Eq. 6 as printed)
    ``r_n`` = uniform(-init_noise, init_noise) noise projected onto the eps-ball (Sect. 2.4: "initialized by adding
    uniform noises, then projected onto the ball"); then ``L`` times ``r_n <- Proj(r_n + tau * step(phi_n))``, with
    the score, the kernel and its gradient evaluated at the particles ``x + r_n``. ``step`` is the identity
    (``step_normalization="none"``: Eq. 6 literally, tau in the units of phi) or, by default (``"l2"``),
    ``phi_n / ||phi_n||_2`` per particle: the paper gives no tau, and the Dice score's norm changes by orders of
    magnitude over training (1e-8 at initialisation, ~1 for a trained U-Net), so an unnormalised tau that moves
    the particles at one time freezes or overshoots them at another. The normalisation keeps the ratio of the two
    terms of phi, which is what decides between "adversarial" and "diverse". ``linf``: ``sign(phi_n)``.
``"vat_like"`` (the bundle's 0.1/0.2 default, kept for comparison)
    directions ``d_n`` = unit-L2 uniform noise; probes ``x + xi d_n``; score ``s_n = grad_{d_n} Dice``;
    ``phi_n = (1/N) (sum_j K_jn s_j + rep_n)``; ``L - 1`` further steps re-probe at ``x + xi phi_n/||phi_n||``
    (power iterations, as VAT's); finally ``r_n = eps * phi_n / ||phi_n||_2`` (L2) or ``eps * sign(phi_n)`` (Linf).
    Reduces to SS-Net's Dice-VAT when N = 1; the probes sit at ``xi = 10`` from ``x`` where a trained network's
    Dice barely moves, so the score fades over training and the particles collapse (measured, bundle docs).

The repulsion is Eq. 6's ``rep_n = sum_j grad_{x'_j} k(Phi(x'_j), stopgrad Phi(x'_n))`` (``repulsion_jacobian=
"partner"``, default: N backward passes, one per n, each carrying the kernel gradient back through particle j's
own feature Jacobian) or ``-grad_{x'_n} sum_j k(Phi(x'_n), stopgrad Phi(x'_j))`` (``"own"``: one backward pass,
each particle pushed away from the others through its own Jacobian; the 0.1/0.2 default). With
``features="identity"`` (vanilla SVGD) the two are equal.

The bandwidth is Liu & Wang's median rule per image, ``2 sigma^2 = median_{j<n} ||Phi_j - Phi_n||^2 / log N``,
recomputed at every step: it follows the feature distances as the network trains, so the repulsion does not vanish
(kernel -> 0) or flatten (kernel -> 1) as the features grow or shrink. For N = 2 it fixes the off-diagonal kernel at
0.5. A fixed ``bandwidth`` (sigma) is a setting. Measured term norms (``stats``) are logged every iteration.

All passes run with BatchNorm running statistics frozen (:func:`~common.networks.batchnorm.frozen_bn_stats`),
dropout as the network's mode sets it (active in train mode), and gradients taken w.r.t. the perturbations only
(``torch.autograd.grad``), so generating particles never touches a weight's ``.grad``. The particles are returned
detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from monai.losses import DiceLoss
from torch import nn

from common.losses.dice_vat import _logits, l2_normalize_per_sample
from common.networks.batchnorm import frozen_bn_stats

__all__ = [
    "SVGDFSampler",
    "SVGDFResult",
    "per_sample_dice_divergence",
    "rbf_kernel",
    "median_bandwidth",
    "project_to_ball",
    "encoder_bottleneck",
    "unit_l2",
]

FeatureSpec = Union[str, Callable[[torch.Tensor], torch.Tensor]]

MODES = ("projected", "vat_like")
STEP_NORMALIZATIONS = ("l2", "none")
DEFAULT_XI = 10.0  # SS-Net's VAT probe scale
DEFAULT_INIT_NOISE = 0.5
NORMS = ("l2", "linf")
KERNELS = ("rbf", "none")
FEATURES = ("encoder", "decoder", "identity")
JACOBIANS = ("own", "partner")


def per_sample_dice_divergence(
    probs: torch.Tensor, target: torch.Tensor, squared_pred: bool = True, joint_channels: bool = False,
    smooth: float = 1e-10,
) -> torch.Tensor:
    """Soft Dice loss of every image separately, ``(B, C, *spatial)`` x2 -> ``(B,)``.

    The score of one particle must depend on its own image only (the spec: per-image Dice, summed over images
    before the gradient), unlike SS-Net's batch-summed Dice. ``joint_channels=False``: per-class Dice averaged over
    the C classes (SS-Net 2D); ``True``: one Dice over all channels of the image (SS-Net 3D's binary formula).
    """
    if probs.shape != target.shape:
        raise ValueError(f"per_sample_dice_divergence needs probs and target of one shape, got "
                         f"{tuple(probs.shape)} and {tuple(target.shape)}")
    loss = DiceLoss(include_background=True, squared_pred=squared_pred, batch=False, reduction="none",
                    smooth_nr=smooth, smooth_dr=smooth)
    if joint_channels:
        probs, target = probs.reshape(probs.shape[0], 1, -1), target.reshape(target.shape[0], 1, -1)
    return loss(probs, target).flatten(1).mean(dim=1)


def median_bandwidth(sq_dist: torch.Tensor) -> torch.Tensor:
    """``h = 2 sigma^2 = median_{j < n} ||F_j - F_n||^2 / log N`` per group (Liu & Wang's heuristic, which makes
    ``sum_j k(F_j, F_n) ~ 1 + N exp(-log N) = 2``); ``sq_dist`` ``(G, N, N)`` -> ``(G,)``, detached.
    N = 1 has no pair: ``h = 1`` (the kernel is then the constant 1 anyway)."""
    groups, n = sq_dist.shape[0], sq_dist.shape[-1]
    if n < 2:
        return sq_dist.new_ones(groups)
    iu = torch.triu_indices(n, n, offset=1, device=sq_dist.device)
    pairs = sq_dist.detach()[:, iu[0], iu[1]]
    med = torch.quantile(pairs.float(), 0.5, dim=1).to(sq_dist.dtype)
    # identical particles (med = 0) would divide by zero; any positive h gives k = 1 and zero repulsion there
    return (med / math.log(n)).clamp_min(1e-12)


def rbf_kernel(
    features: torch.Tensor, reference: Optional[torch.Tensor] = None, bandwidth: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RBF kernel matrices ``K[g, j, n] = exp(-||a_gj - b_gn||^2 / h_g)`` within each group.

    Args:
        features: ``a``, ``(G, N, D)``: G groups (images) of N particles with D features.
        reference: ``b``, ``(G, N, D)`` (default ``features``); pass ``features.detach()`` for a one-sided gradient.
        bandwidth: ``sigma``; ``h = 2 sigma^2``. ``None``: :func:`median_bandwidth` per group.

    Returns:
        ``(K (G, N, N), h (G,))``; ``h`` is detached (the bandwidth is a constant of each step, as in SVGD).
    """
    if features.dim() != 3:
        raise ValueError(f"rbf_kernel expects features (groups, particles, dims), got {tuple(features.shape)}")
    b = features if reference is None else reference
    # (a - b)^2 summed directly: the expanded |a|^2 + |b|^2 - 2ab form cancels badly for close particles
    sq = (features.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)
    if bandwidth is None:
        h = median_bandwidth(sq)
    else:
        if bandwidth <= 0:
            raise ValueError(f"kernel bandwidth (sigma) must be > 0, got {bandwidth}")
        h = sq.new_full((sq.shape[0],), 2.0 * float(bandwidth) ** 2)
    return torch.exp(-sq / h.view(-1, 1, 1)), h


def project_to_ball(r: torch.Tensor, epsilon: float, norm: str = "l2") -> torch.Tensor:
    """Projection onto ``{r : ||r||_p <= epsilon}`` per sample (all dims but the first); shape kept."""
    if norm == "linf":
        return r.clamp(-epsilon, epsilon)
    if norm != "l2":
        raise ValueError(f"norm must be one of {NORMS}, got '{norm}'")
    n = r.flatten(1).norm(dim=1).view(-1, *([1] * (r.dim() - 1)))
    return r * (epsilon / n.clamp_min(1e-12)).clamp(max=1.0)


def _mean_norm(v: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the particles ``(N, B, ...)``, detached scalar."""
    return v.detach().flatten(2).norm(dim=2).mean()


def _mean_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over particles ``(N, B, ...)`` of ``||a_nb|| / ||b_nb||``, detached scalar (a zero ``b`` counts as tiny)."""
    na, nb = a.detach().flatten(2).norm(dim=2), b.detach().flatten(2).norm(dim=2)
    return (na / nb.clamp_min(torch.finfo(nb.dtype).tiny)).mean()


def unit_l2(v: torch.Tensor) -> torch.Tensor:
    """``v / ||v||_2`` per sample (all dims but the first); zero stays zero. Scaled by the max first: Dice gradients
    of a confident network can be ~1e-8 per pixel, where VAT's ``v / (||v|| + 1e-8)`` would shrink the step."""
    peak = v.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(v.dtype).tiny).view(-1, *([1] * (v.dim() - 1)))
    u = v / peak
    return u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def encoder_bottleneck(output: Any) -> torch.Tensor:
    """The deepest encoder map of a :class:`~common.networks.BackboneOutput` (UNet2D x4, VNet3D x5)."""
    feats = getattr(output, "features", None)
    if not feats:
        raise TypeError("features='encoder' needs a network whose forward_features returns encoder maps "
                        f"(BackboneOutput.features); got {type(output).__name__}")
    return feats[-1]


@dataclass
class SVGDFResult:
    """``particles`` ``(N, B, *x.shape[1:])`` = ``x + perturbations``, detached; ``perturbations`` the same shape;
    ``target`` the detached ``p(x)`` ``(B, C, *spatial)``; ``kernel`` ``(B, N, N)`` and ``bandwidth`` ``(B,)`` of the
    last step (``None`` without a kernel); ``stats``: mean L2 norm per particle of the last step's driving term
    ``(1/N) sum_j K_jn s_j`` (``"drive"``) and repulsion ``(1/N) rep_n`` (``"repulsion"``), and the mean over
    particles of ``||rep_n|| / ||drive_n||`` (``"repulsion_over_drive"``), detached (the last two only with a kernel
    and the repulsion on)."""

    particles: torch.Tensor
    perturbations: torch.Tensor
    target: torch.Tensor
    kernel: Optional[torch.Tensor] = None
    bandwidth: Optional[torch.Tensor] = None
    stats: Optional[Dict[str, torch.Tensor]] = None


class SVGDFSampler(nn.Module):
    """N adversarial particles per image in the eps-ball, by SVGD with an RBF kernel on features (see module doc).

    Args:
        num_particles: N per image (Cross-ALD: 2). N = 1 with ``kernel="none"`` (or no repulsion) is VAT.
        steps: L Stein updates (1; the author's ALD code uses one). ``mode="projected"`` with ``steps=0`` returns
            the random initial particles.
        epsilon: radius of the ball (L2: SS-Net's VAT norms, 6 on ACDC and 10 on LA).
        step_size: tau of the ``projected`` update (default ``epsilon``: one step can cross the ball).
        step_normalization: ``"l2"`` (default: tau times the unit direction of phi per particle) or ``"none"``
            (``tau * phi``, Eq. 6 literally); ``projected`` only.
        init_noise: half-width of the uniform initial noise of the ``projected`` mode, before the projection
            (0.5: on a 128x128 slice its L2 norm, ~37, exceeds eps = 6, so the start lies on the sphere).
        norm: ``"l2"`` or ``"linf"`` ball (and matching step: normalised direction or its sign).
        mode: ``"projected"`` (default, Eq. 6 as printed) or ``"vat_like"`` (0.1/0.2).
        features: Phi for the kernel: ``"encoder"`` (SVGDF: the bottleneck of the network's own encoder from the
            same probe pass, i.e. the current weights frozen for the search), ``"decoder"`` (the last decoder map,
            the paper's Sect. 3.1 wording; its kernel gradient runs back through the whole network),
            ``"identity"`` (vanilla SVGD on the images) or a callable ``Phi(x (M, C, *spatial)) -> (M, ...)`` (e.g. a frozen copy of an encoder).
        kernel: ``"rbf"`` or ``"none"`` (K = identity, no repulsion: N independent VAT restarts).
        bandwidth: RBF sigma; ``None`` = median heuristic per image (2 sigma^2 = median sq. distance / log N).
        repulsion: add the kernel-gradient term (``False``: kernel-weighted scores only, for ablations/tests).
        repulsion_jacobian: ``"partner"`` (default, Eq. 6's printed form, N backwards) or ``"own"`` (one backward).
        xi: probe scale of the ``vat_like`` mode (SS-Net's 10).
        squared_pred, joint_channels, smooth: the Dice divergence of the score (dataset's SS-Net Dice:
            ACDC squared denominators and class mean; LA linear and joint channels, smooth 1e-8).

    ``forward(network, x, target=None) -> SVGDFResult``: ``network(x)`` gives logits ``(B, C, *spatial)`` (or a
    ``BackboneOutput``); ``features="encoder"`` needs ``network.forward_features``. 2D and 3D inputs alike.
    """

    def __init__(
        self,
        num_particles: int = 2,
        steps: int = 1,
        epsilon: float = 6.0,
        step_size: Optional[float] = None,
        norm: str = "l2",
        mode: str = "projected",
        features: FeatureSpec = "encoder",
        kernel: str = "rbf",
        bandwidth: Optional[float] = None,
        repulsion: bool = True,
        repulsion_jacobian: str = "partner",
        xi: float = DEFAULT_XI,
        squared_pred: bool = True,
        joint_channels: bool = False,
        smooth: float = 1e-10,
        step_normalization: str = "l2",
        init_noise: float = DEFAULT_INIT_NOISE,
    ) -> None:
        super().__init__()
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
        if int(steps) < (0 if mode == "projected" else 1):
            raise ValueError(f"steps must be >= 1 ('vat_like') or >= 0 ('projected'), got {steps}")
        if not epsilon >= 0:  # `not >=` also refuses NaN
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size (tau) must be > 0, got {step_size}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got '{norm}'")
        if not callable(features) and features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES} or a callable, got '{features}'")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got '{kernel}'")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth (sigma) must be > 0 or None, got {bandwidth}")
        if repulsion_jacobian not in JACOBIANS:
            raise ValueError(f"repulsion_jacobian must be one of {JACOBIANS}, got '{repulsion_jacobian}'")
        if not xi > 0:
            raise ValueError(f"xi must be > 0, got {xi}")
        if step_normalization not in STEP_NORMALIZATIONS:
            raise ValueError(f"step_normalization must be one of {STEP_NORMALIZATIONS}, got '{step_normalization}'")
        if not init_noise > 0:
            raise ValueError(f"init_noise must be > 0, got {init_noise}")
        # a setting of the other mode would be silently ignored: refuse it (defaults pass)
        if mode == "vat_like":
            ignored = {"step_size": step_size is not None, "step_normalization": step_normalization != "l2",
                       "init_noise": init_noise != DEFAULT_INIT_NOISE}
        else:
            ignored = {"xi": xi != DEFAULT_XI}
        if any(ignored.values()):
            names = ", ".join(k for k, v in ignored.items() if v)
            raise ValueError(f"{names} has no effect with mode='{mode}' (step_size, step_normalization and init_noise "
                             f"belong to 'projected', xi to 'vat_like'); remove it or change the mode")
        self.num_particles = int(num_particles)
        self.steps = int(steps)
        self.epsilon = float(epsilon)
        self.step_size = float(epsilon if step_size is None else step_size)
        self.norm = norm
        self.mode = mode
        self.features = features
        self.kernel = kernel
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.repulsion = bool(repulsion)
        self.repulsion_jacobian = repulsion_jacobian
        self.xi = float(xi)
        self.squared_pred = bool(squared_pred)
        self.joint_channels = bool(joint_channels)
        self.smooth = float(smooth)
        self.step_normalization = step_normalization
        self.init_noise = float(init_noise)

    def extra_repr(self) -> str:
        feats = self.features if isinstance(self.features, str) else getattr(self.features, "__name__", "callable")
        return (f"num_particles={self.num_particles}, steps={self.steps}, epsilon={self.epsilon}, "
                f"step_size={self.step_size}, norm='{self.norm}', mode='{self.mode}', features='{feats}', "
                f"kernel='{self.kernel}', bandwidth={self.bandwidth}, repulsion={self.repulsion}, "
                f"repulsion_jacobian='{self.repulsion_jacobian}', xi={self.xi}, "
                f"step_normalization='{self.step_normalization}', init_noise={self.init_noise}")

    # -- pieces ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def target(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``p(x) = softmax(network(x))`` ``(B, C, *spatial)`` without gradient, BN running stats frozen."""
        with frozen_bn_stats(network):
            return torch.softmax(_logits(network(x)).float(), dim=1)

    @property
    def uses_kernel(self) -> bool:
        return self.kernel == "rbf" and self.num_particles > 1

    def _forward(self, network: nn.Module, probes: torch.Tensor):
        """Logits of the probes and, when a kernel is needed, their features ``(M, D)`` (from the same pass for
        ``features="encoder"``)."""
        feats = None
        if self.uses_kernel and self.features in ("encoder", "decoder"):
            out = network.forward_features(probes)
            logits = out.logits
            feats = encoder_bottleneck(out) if self.features == "encoder" else out.embedding
        else:
            logits = _logits(network(probes))
            if self.uses_kernel:
                feats = probes if self.features == "identity" else self.features(probes)
        return logits, (None if feats is None else feats.flatten(1).float())

    def _direction(self, network: nn.Module, x: torch.Tensor, target: torch.Tensor, delta: torch.Tensor,
                   scale_of_delta: float):
        """phi for all particles at ``x + scale_of_delta * delta``; ``delta`` ``(N, B, *x.shape[1:])``.

        Returns ``(phi, K, h, stats)`` (``stats``: mean L2 norms of the two terms of phi, for logs); gradients are w.r.t. ``delta`` (a constant factor ``scale_of_delta`` on the score
        and the repulsion alike, which the normalisation that follows removes)."""
        n, b = delta.shape[:2]
        delta = delta.detach().requires_grad_(True)
        probes = (x.unsqueeze(0) + scale_of_delta * delta).reshape(n * b, *x.shape[1:])
        # Under CUDA autocast small input gradients underflow in half precision; both terms are scaled alike.
        amp = 1024.0 if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") else 1.0
        with torch.enable_grad():
            logits, feats = self._forward(network, probes)
            probs = torch.softmax(logits.float(), dim=1)
            score_target = target.unsqueeze(0).expand(n, *target.shape).reshape(n * b, *target.shape[1:])
            divergence = per_sample_dice_divergence(probs, score_target, self.squared_pred, self.joint_channels,
                                                    self.smooth).sum()
            need_rep = feats is not None and self.repulsion
            (score,) = torch.autograd.grad(divergence * amp, delta, retain_graph=need_rep, allow_unused=True)
            score = torch.zeros_like(delta) if score is None else score.float() / amp
            if feats is None:  # no kernel: K = I, phi_n = (1/N) s_n (Eq. 6 without the kernel terms)
                return score / n, None, None, {"drive": _mean_norm(score / n)}
            f = feats.view(n, b, -1).transpose(0, 1)  # (B, N, D): one kernel per image
            kmat, h = rbf_kernel(f.detach(), bandwidth=self.bandwidth)
            # sum_j K[j, n] s_j for every n: the kernel-weighted average of the scores (the 1/N comes below)
            drive = torch.einsum("bjn,jb...->nb...", kmat.to(score.dtype), score)
            if not need_rep:
                return drive / n, kmat, h, {"drive": _mean_norm(drive / n)}
            rep = self._repulsion(f, h, delta, amp)
        return (drive + rep) / n, kmat, h, {"drive": _mean_norm(drive / n), "repulsion": _mean_norm(rep / n),
                                            "repulsion_over_drive": _mean_ratio(rep, drive)}

    def _repulsion(self, f: torch.Tensor, h: torch.Tensor, delta: torch.Tensor, amp: float) -> torch.Tensor:
        """``rep[n, b]``, the kernel-gradient term of phi, ``(N, B, ...)`` like ``delta``; ``f`` ``(B, N, D)``."""
        n = delta.shape[0]
        if self.repulsion_jacobian == "own":
            # -grad_{x_n} sum_j k(F_n, sg F_j): each particle moved away from the others by its own Jacobian
            kmat = torch.exp(-(f.unsqueeze(2) - f.detach().unsqueeze(1)).pow(2).sum(-1) / h.view(-1, 1, 1))
            (g,) = torch.autograd.grad(kmat.sum() * amp, delta, allow_unused=True)
            return torch.zeros_like(delta) if g is None else -g.float() / amp
        # Eq. 6 as printed: rep_n = sum_j grad_{x_j} k(F_j, sg F_n) (one backward per n)
        reps: List[torch.Tensor] = []
        for m in range(n):
            k_m = torch.exp(-(f - f[:, m : m + 1].detach()).pow(2).sum(-1) / h.view(-1, 1))  # (B, N): k(F_j, F_m)
            (g,) = torch.autograd.grad(k_m.sum() * amp, delta, retain_graph=m < n - 1, allow_unused=True)
            reps.append(torch.zeros_like(delta[0]) if g is None else g.float().sum(0) / amp)
        return torch.stack(reps)

    def _unit(self, phi: torch.Tensor) -> torch.Tensor:
        """The step of each particle before tau: phi itself (``step_normalization="none"``), else its unit L2
        direction (``l2``) or its sign (``linf``); ``(N, B, ...)``."""
        if self.step_normalization == "none":
            return phi
        if self.norm == "linf":
            return torch.sign(phi)
        return unit_l2(phi.flatten(0, 1)).view_as(phi)

    # -- main --------------------------------------------------------------------------------------------------
    def forward(self, network: nn.Module, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> SVGDFResult:
        """Particles for every image of ``x`` ``(B, C_in, *spatial)`` (see the class docstring)."""
        if x.dim() < 3:
            raise ValueError(f"SVGDFSampler needs an input (B, C, *spatial), got shape {tuple(x.shape)}")
        x = x.detach()
        target = self.target(network, x) if target is None else target.detach().float()
        n, b = self.num_particles, x.shape[0]
        noise = (torch.rand((n, *x.shape), device=x.device, dtype=torch.float32) - 0.5) * (2.0 * self.init_noise)
        kmat = h = None
        stats: Dict[str, torch.Tensor] = {}
        with frozen_bn_stats(network):
            if self.mode == "vat_like":
                d = l2_normalize_per_sample(noise.flatten(0, 1)).view_as(noise)
                for _ in range(self.steps):
                    phi, kmat, h, stats = self._direction(network, x, target, d.to(x.dtype), self.xi)
                    d = unit_l2(phi.flatten(0, 1)).view_as(phi)
                r = self.epsilon * (torch.sign(phi) if self.norm == "linf" else d)
            else:
                r = project_to_ball(noise.flatten(0, 1), self.epsilon, self.norm).view_as(noise)
                for _ in range(self.steps):
                    phi, kmat, h, stats = self._direction(network, x, target, r.to(x.dtype), 1.0)
                    r = r + self.step_size * self._unit(phi)
                    r = project_to_ball(r.flatten(0, 1), self.epsilon, self.norm).view_as(r)
        r = r.detach().to(x.dtype)
        return SVGDFResult(particles=x.unsqueeze(0) + r, perturbations=r, target=target, kernel=kmat, bandwidth=h,
                           stats=stats)
