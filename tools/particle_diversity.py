"""Diversity of adversarial particles (the Cross-ALD paper's Fig. 1 study) on real ACDC slices.

For a fixed network (weights from a ``model.pt``), a few unlabelled training slices resized to 128x128, and each
particle count N, generates N particles per image with

- ``vat``: N independent VAT restarts (``SVGDFSampler(kernel="none")``: each particle moved by its own Dice score),
- ``svgd``: vanilla SVGD (RBF kernel on the images),
- ``svgdf``: SVGDF (RBF kernel on the encoder bottleneck),

all with the same ball, update rule and random starts, and prints the mean sum-of-squared-errors between the
particles of one image (averaged over pairs and images; higher = more diverse, the paper's measure) and the mean
L2 norms of the two terms of the Stein direction (kernel-weighted score vs repulsion).

    python tools/particle_diversity.py --weights bundles/cross_ald/models/model.pt --dataset_dir ../shared/data/ACDC
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from common.networks import UNet2D
from common.svgdf import SVGDFSampler

REPO = Path(__file__).resolve().parents[1]
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
    """Mean over images and particle pairs of ``||x'_j - x'_n||^2``; ``(N, B, ...)``."""
    f = perturbations.flatten(2)
    n = f.shape[0]
    return float(torch.stack([(f[i] - f[j]).pow(2).sum(1) for i in range(n) for j in range(i + 1, n)]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="state_dict of the 2D U-Net (models/model.pt)")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--particles", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--epsilon", type=float, default=6.0)
    parser.add_argument("--mode", choices=["vat_like", "projected"], default="vat_like")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--network_mode", choices=["train", "eval"], default="train",
                        help="train: dropout and batch statistics as in training (seeded); eval: deterministic")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    if not Path(args.weights).is_file():
        parser.error(f"--weights: no file at {args.weights}")
    if not (Path(args.dataset_dir) / "train_slices.list").is_file():
        parser.error(f"--dataset_dir: {args.dataset_dir} has no train_slices.list (SSL4MIS ACDC layout expected)")

    net = UNet2D(1, 4)
    net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    net.train(args.network_mode == "train")
    x = load_slices(args.dataset_dir, args.images)
    for n in args.particles:
        row = {"particles": n, "epsilon": args.epsilon, "mode": args.mode, "steps": args.steps,
               "network_mode": args.network_mode, "images": args.images}
        for name, kwargs in SAMPLERS.items():
            torch.manual_seed(args.seed)
            res = SVGDFSampler(num_particles=n, steps=args.steps, epsilon=args.epsilon, mode=args.mode, **kwargs)(net, x)
            row[f"{name}_sse"] = round(mean_pairwise_sse(res.perturbations), 3)
            for term, value in (res.stats or {}).items():
                row[f"{name}_{term}_norm"] = float(f"{float(value):.3g}")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
