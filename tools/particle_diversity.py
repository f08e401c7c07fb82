"""Diversity and strength of adversarial particles: the Cross-ALD paper's Sect. 3.1 / Fig. 1 study on real ACDC slices.

Protocol (paper Sect. 3.1: a fixed network, three images, "the same radius ball constraint, updating step, etc." for
every sampler): the network of a ``model.pt`` in eval mode (deterministic; ``--network_mode train`` keeps dropout),
``--images`` unlabelled training slices (evenly spaced after the 7-patient labelled ones) resized to 128x128, and
for each particle count N three samplers that differ only in the kernel terms of Eq. 6, all with the same random
start (uniform noise projected on the eps-ball), ball, step size tau and number of steps L:

- ``vat``: "VAT with random initialization": the same update without the kernel terms (each particle moved by its
  own Dice score, ``SVGDFSampler(kernel="none")``);
- ``svgd``: vanilla SVGD, the RBF kernel on the images;
- ``svgdf``: SVGDF, the RBF kernel on the encoder features Phi (the bundle's sampler).

Per row: ``sse`` (mean over images of the mean over particle pairs of ``||x'_j - x'_n||^2``; higher = more diverse,
the paper's measure), ``adversarial_gain`` (the mean Dice divergence ``l_Dice(x + r_n, x)`` the particles reach,
divided by that of ``--random_directions`` uniform-noise directions with the same L2 norm as each particle; > 1 =
more adversarial than chance), ``repulsion_over_drive`` (mean over particles of ``||(1/N) sum_j grad k|| /
||(1/N) sum_j k s_j||`` at the last step; 0 without a kernel) and the two term norms.

    python tools/particle_diversity.py --dataset_dir ../shared/data/ACDC --json
    python tools/particle_diversity.py --weights bundles/ssnet/models/model.pt --steps 5

Raises ``SystemExit`` (argparse) naming the option when the weights file or the dataset folder is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.networks import UNet2D  # noqa: E402
from common.networks.batchnorm import frozen_bn_stats  # noqa: E402
from common.svgdf import SVGDFSampler, per_sample_dice_divergence  # noqa: E402

SAMPLERS = {"vat": {"kernel": "none"}, "svgd": {"features": "identity"}, "svgdf": {"features": "encoder"}}


def load_slices(dataset_dir: str, count: int, skip_labeled: int = 136, size: int = 128) -> torch.Tensor:
    """``count`` unlabelled slices (after the first ``skip_labeled`` names of ``train_slices.list``), evenly spaced,
    resized (bilinear) to ``size``; ``(count, 1, size, size)``."""
    names = [n.strip() for n in open(os.path.join(dataset_dir, "train_slices.list")) if n.strip()][skip_labeled:]
    picks = np.linspace(0, len(names) - 1, count).round().astype(int)
    images = []
    for i in picks:
        path = os.path.join(dataset_dir, "data", "slices", f"{names[i]}.h5")
        if not os.path.isfile(path):
            path = os.path.join(dataset_dir, "data", f"{names[i]}.h5")
        with h5py.File(path, "r") as f:
            images.append(torch.from_numpy(np.asarray(f["image"], dtype=np.float32)))
    return torch.stack([F.interpolate(im[None, None], size=(size, size), mode="bilinear", align_corners=False)[0]
                        for im in images])


def mean_pairwise_sse(perturbations: torch.Tensor) -> float:
    """Mean over images of the mean over particle pairs of ``||x'_j - x'_n||^2``; ``(N, B, ...)`` -> float
    (0.0 for N = 1)."""
    f = perturbations.detach().flatten(2).double()
    n = f.shape[0]
    if n < 2:
        return 0.0
    return float(torch.stack([(f[i] - f[j]).pow(2).sum(1) for i in range(n) for j in range(i + 1, n)]).mean())


@torch.no_grad()
def divergences(network: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``l_Dice(p(x + r_n), p(x))`` per particle and image, ``r`` ``(N, B, ...)`` -> ``(N, B)`` (the sampler's score
    divergence: per-image soft Dice, squared denominators, class mean)."""
    n, b = r.shape[:2]
    with frozen_bn_stats(network):
        logits = network((x.unsqueeze(0) + r).flatten(0, 1))
    logits = getattr(logits, "logits", logits)
    probs = torch.softmax(logits.float(), dim=1)
    return per_sample_dice_divergence(probs, target.repeat(n, *([1] * (target.dim() - 1)))).view(n, b)


def random_like_norms(r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform-noise directions with the L2 norm of each particle of ``r`` ``(N, B, ...)``."""
    u = torch.rand(r.shape, generator=generator, dtype=r.dtype) - 0.5
    scale = r.flatten(2).norm(dim=2) / u.flatten(2).norm(dim=2).clamp_min(1e-12)
    return u * scale.view(*scale.shape, *([1] * (r.dim() - 2)))


def evaluate_sampler(network, x, name: str, n: int, args) -> Dict[str, object]:
    """One row of the table for sampler ``name`` with ``n`` particles (seeded: every sampler starts alike)."""
    torch.manual_seed(args.seed)
    sampler = SVGDFSampler(num_particles=n, steps=args.steps, epsilon=args.epsilon, step_size=args.step_size,
                           mode="projected", step_normalization=args.step_normalization,
                           repulsion_jacobian=args.repulsion_jacobian, **SAMPLERS[name])
    res = sampler(network, x)
    gen = torch.Generator().manual_seed(args.seed + 1)
    particle_div = divergences(network, x, res.target, res.perturbations).mean()
    random_div = torch.stack([divergences(network, x, res.target, random_like_norms(res.perturbations, gen)).mean()
                              for _ in range(args.random_directions)]).mean()
    stats = {k: float(v) for k, v in (res.stats or {}).items()}
    return {
        "sampler": name, "n_particles": n, "sse": round(mean_pairwise_sse(res.perturbations), 4),
        "adversarial_gain": round(float(particle_div / random_div.clamp_min(1e-12)), 4),
        "repulsion_over_drive": float(f"{stats.get('repulsion_over_drive', 0.0):.4g}"),
        "drive_norm": float(f"{stats.get('drive', 0.0):.4g}"),
        "repulsion_norm": float(f"{stats.get('repulsion', 0.0):.4g}"),
        "divergence": round(float(particle_div), 5), "random_divergence": round(float(random_div), 5),
        "mean_particle_norm": round(float(res.perturbations.flatten(2).norm(dim=2).mean()), 4),
        "epsilon": args.epsilon, "step_size": sampler.step_size, "steps": args.steps, "images": args.images,
        "network_mode": args.network_mode, "weights": args.weights_label,
    }


def markdown(rows: List[Dict[str, object]]) -> str:
    lines = ["| N | sampler | SSE | adversarial gain | repulsion / drive | divergence (random) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_particles']} | {r['sampler']} | {r['sse']:.2f} | {r['adversarial_gain']:.3f} | "
                     f"{r['repulsion_over_drive']:.3g} | {r['divergence']:.4f} ({r['random_divergence']:.4f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(REPO / "bundles" / "cross_ald" / "models" / "model.pt"),
                        help="state_dict of the 2D U-Net (default: the shipped Cross-ALD model)")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    parser.add_argument("--images", type=int, default=3, help="slices (the paper: three images)")
    parser.add_argument("--particles", type=int, nargs="+", default=[2, 4, 8], help="N values")
    parser.add_argument("--epsilon", type=float, default=6.0, help="L2 radius of the ball (the bundle's 6)")
    parser.add_argument("--step_size", type=float, default=None, help="tau (default: epsilon, the bundle's)")
    parser.add_argument("--steps", type=int, default=1, help="L Stein steps (the bundle's 1)")
    parser.add_argument("--step_normalization", choices=["l2", "none"], default="l2")
    parser.add_argument("--repulsion_jacobian", choices=["partner", "own"], default="partner")
    parser.add_argument("--network_mode", choices=["eval", "train"], default="eval",
                        help="eval: the fixed network of Sect. 3.1 (deterministic); train: dropout on (seeded)")
    parser.add_argument("--random_directions", type=int, default=8, help="random directions per particle")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = parser.parse_args(argv)
    if not Path(args.weights).is_file():
        parser.error(f"--weights: no file at {args.weights}")
    if not (Path(args.dataset_dir) / "train_slices.list").is_file():
        parser.error(f"--dataset_dir: {args.dataset_dir} has no train_slices.list (SSL4MIS ACDC layout expected)")
    for key in ("images", "random_directions"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if min(args.particles) < 1 or args.steps < 0 or not args.epsilon > 0:  # `not >` also refuses NaN
        parser.error(f"--particles must be >= 1, --steps >= 0 and --epsilon > 0 "
                     f"(got {args.particles}, {args.steps}, {args.epsilon})")
    if args.step_size is not None and not args.step_size > 0:
        parser.error(f"--step_size must be > 0, got {args.step_size}")
    with open(Path(args.dataset_dir) / "train_slices.list") as f:
        available = sum(1 for line in f if line.strip()) - 136
    if available < args.images:
        parser.error(f"--dataset_dir: {args.dataset_dir}/train_slices.list has {max(available, 0)} unlabelled slices "
                     f"after the 136 labelled ones (7 patients); --images asks for {args.images}")
    try:
        args.weights_label = str(Path(args.weights).resolve().relative_to(REPO))
    except ValueError:
        args.weights_label = str(args.weights)

    net = UNet2D(1, 4)
    try:
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    except Exception as err:  # a training checkpoint.pt, another network, not a torch file
        parser.error(f"--weights: {args.weights} is not a state_dict of the 2D U-Net (UNet2D(1, 4); pass a "
                     f"models/model.pt, not a run's checkpoint.pt): {type(err).__name__}: {str(err).splitlines()[0]}")
    net.train(args.network_mode == "train")
    x = load_slices(args.dataset_dir, args.images)
    rows = []
    for n in args.particles:
        for name in SAMPLERS:
            row = evaluate_sampler(net, x, name, n, args)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(f"weights {args.weights_label}, {args.images} image(s), eps {args.epsilon}, tau "
              f"{rows[0]['step_size']}, L {args.steps}, network {args.network_mode}")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
