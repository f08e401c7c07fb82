"""Is each bundle's defining mechanism at work? A diagnostic on real ACDC batches (not a test).

For every bundle named, the bundle's own ``train.json`` + ``acdc_cpu_v1.json`` is built (network, method, loader;
nothing is trained or written) and fed a few real batches of the ACDC-CPU v1 protocol (4 labelled + 4 unlabelled
128x128 slices). One JSON object per bundle is printed on its own line:

- ``grad_share``: for each named loss term, ``||g_term|| / ||g_total||`` on the backbone parameters (the network that
  inference uses: U-Net, or both CML subnets), mean over the batches, ``"init"`` (freshly initialised weights, seed
  1337) and ``"shipped"`` (``models/model.pt``; method-only modules such as VFD's discriminator stay at their
  initialisation). ``g_term`` is the gradient of the step with every other term's weight set to 0, the random draws
  (dropout, voxel samples, masks, perturbations) replayed, so the shares are the terms' weighted contributions.
  Weights that follow a schedule are taken at ``--step`` (default: the last iteration, where ramps are full); CML is
  evaluated in its self-training stage.
- cml: ``cross_region_foreground_fraction``: over the unlabelled mixes, the mean fraction of the heterogeneous
  targets' foreground pixels that lie where a subnet learns from the *other* subnet's pseudo-label (``M = 1``), with
  the shipped weights' pseudo-labels (and ``..._labeled``: the same for the ground truth of the labelled mix).
- gapmatch: ``confident_fraction`` (unlabelled pixels with confidence >= tau) and ``g2_over_g1``
  (``||g2|| / ||g1||``, the perturbed over the plain unsupervised gradient), for both weight sets.

    python tools/mechanism_report.py --dataset_dir ../shared/data/ACDC --bundles cml vfd gapmatch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BUNDLES = ["supervised", "ssnet", "cross_ald", "gapmatch", "cml", "vfd"]


# -- building a bundle ----------------------------------------------------------------------------------------------
def build(bundle: str, dataset_dir: str, overrides: Dict[str, Any]):
    from monai.bundle import ConfigWorkflow

    root = REPO / "bundles" / bundle
    out = tempfile.mkdtemp(prefix=f"mechanism_{bundle}_")
    wf = ConfigWorkflow(
        config_file=[str(root / "configs" / "train.json"), str(root / "configs" / "acdc_cpu_v1.json")],
        meta_file=str(root / "configs" / "metadata.json"), logging_file=False, workflow_type="train",
        bundle_root=str(root), dataset_dir=dataset_dir, output_dir=out, num_workers=0, resume=False,
        device="$torch.device('cpu')", **overrides)
    wf.initialize()
    return wf


def batches(wf, count: int) -> List[dict]:
    loader = wf.parser.get_parsed_content("train#dataloader")
    out = []
    for batch in loader:
        out.append({k: ({kk: (vv.as_tensor() if hasattr(vv, "as_tensor") else vv) for kk, vv in v.items()}
                         if isinstance(v, dict) else v) for k, v in batch.items()})
        if len(out) == count:
            break
    return out


class _Engine(types.SimpleNamespace):
    """The parts of :class:`SemiSupervisedTrainer` a method's ``train_step`` uses."""

    @property
    def step_index(self) -> int:
        return self.step

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        loss.backward(**kwargs)

    def sync_gradients(self, params) -> None:
        pass


# -- the terms of each method, each as a context that scales it -------------------------------------------------------
@contextlib.contextmanager
def _scaled_attr(obj: Any, name: str, factor: float) -> Iterator[None]:
    """Multiply ``obj.name`` (a weight, a schedule or a loss module) by ``factor`` while the context is open."""
    old = getattr(obj, name)
    if isinstance(old, torch.nn.Module):
        new: Any = _ScaledLoss(old, factor)
    elif callable(old):
        new = lambda *a, **k: factor * old(*a, **k)  # noqa: E731
    else:
        new = factor * old
    setattr(obj, name, new)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _ScaledLoss(torch.nn.Module):
    def __init__(self, loss: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.loss, self.factor = loss, factor

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.factor * self.loss(*args, **kwargs)


def term_knobs(bundle: str, method: Any) -> Dict[str, Callable[[float], Any]]:
    """For each named loss term, ``factor -> context manager`` that multiplies that term's weight by ``factor``."""
    knob = lambda name: (lambda f: _scaled_attr(method, name, f))  # noqa: E731
    if bundle == "supervised":
        return {"loss_seg": knob("loss_function")}
    if bundle in ("ssnet", "cross_ald"):
        return {"loss_seg": knob("loss_function"), method.regularizer_loss_name: knob("lds_weight"),
                "loss_cs": knob("cs_weight")}
    if bundle == "gapmatch":
        return {"loss_sup": knob("loss_function"), "loss_unsup": knob("unsupervised_weight")}
    if bundle == "cml":
        return {"loss_sup_l": knob("lambda_labeled"), "loss_sup_u": knob("lambda_unlabeled"),
                "loss_dis": knob("lambda_discrepancy")}
    if bundle == "vfd":
        return {"loss_seg": knob("loss_function"), "loss_consistency": knob("consistency"),
                "loss_adv": knob("adv_weight"), "loss_feature": knob("feature_weight")}
    raise ValueError(bundle)


def _backbone_grad(network: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in network.parameters()])


def step_gradient(engine: _Engine, method: Any, batch: dict, rng: torch.Tensor,
                  contexts: List[contextlib.AbstractContextManager]) -> torch.Tensor:
    """The backbone gradient of one training step (as the trainer computes it, without the update)."""
    network = engine.network
    torch.set_rng_state(rng)
    network.train()
    method.train()
    engine.optimizer.zero_grad(set_to_none=True)
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        losses = method.train_step(engine, batch["labeled"], batch.get("unlabeled"))
        if losses["loss"].requires_grad:
            losses["loss"].backward()
    if hasattr(method, "_cache"):
        method._cache = None  # VFD: no discriminator step here
    return _backbone_grad(network)


def grad_shares(bundle: str, engine: _Engine, method: Any, data: List[dict]) -> Dict[str, float]:
    knobs = term_knobs(bundle, method)
    shares = {name: 0.0 for name in knobs}
    for batch in data:
        rng = torch.get_rng_state()
        total = step_gradient(engine, method, batch, rng, [])
        norm = float(total.norm())
        for name in knobs:
            others = [knobs[o](0.0) for o in knobs if o != name]
            g = step_gradient(engine, method, batch, rng, others)
            shares[name] += float(g.norm()) / max(norm, 1e-30) / len(data)
        torch.set_rng_state(rng)
        torch.rand(1)  # next batch: new draws
    return {k: round(v, 6) for k, v in shares.items()}


# -- method-specific figures ----------------------------------------------------------------------------------------
def cml_cross_region(method: Any, network: torch.nn.Module, data: List[dict], draws: int = 5) -> Dict[str, float]:
    from common.methods.cml import heterogeneous_targets
    from common.mixing import cutmix

    fractions, labeled = [], []
    network.train()  # as the method: pseudo-labels in train mode
    with torch.no_grad():
        for batch in data:
            x_u = batch["unlabeled"]["image"]
            pseudo = [method.pseudo_labeler(o.logits).float() for o in network.forward_branches(x_u)]
            y_a, y_b = method._halves(batch["labeled"]["label"], "labeled")
            for _ in range(draws):
                mask = method._mask(x_u[: x_u.shape[0] // 2])
                for target in heterogeneous_targets(pseudo[0], pseudo[1], mask):
                    fg = (target > 0).float()
                    inside = (fg * mask).flatten(1).sum(1)
                    total = fg.flatten(1).sum(1)
                    fractions += [float(i / t) for i, t in zip(inside, total) if t > 0]
                mask_l = method._mask(y_a)
                fg = (cutmix(y_a, y_b, mask_l) > 0).float()
                total = fg.flatten(1).sum(1)
                labeled += [float(i / t) for i, t in zip((fg * mask_l).flatten(1).sum(1), total) if t > 0]
    mean = lambda v: round(sum(v) / len(v), 4) if v else None  # noqa: E731
    return {"cross_region_foreground_fraction": mean(fractions),
            "cross_region_foreground_fraction_labeled": mean(labeled), "mask_position": method.mask_position}


def gapmatch_figures(engine: _Engine, method: Any, data: List[dict]) -> Dict[str, float]:
    network = engine.network
    confident, ratios = [], []
    for batch in data:
        network.train()
        targets = method.unsupervised_loss.targets(network, batch["labeled"], batch["unlabeled"])
        if "mask" in targets:
            confident.append(float(targets["mask"].mean()))
        w = method.weight(engine.step)

        def closure() -> torch.Tensor:
            return w * method.unsupervised_loss(network, targets)[0]

        rng = torch.get_rng_state()
        engine.optimizer.zero_grad(set_to_none=True)
        closure().backward()
        g1 = _backbone_grad(network)
        if method.gap is not None and method.gap.alpha > 0:
            torch.set_rng_state(rng)
            engine.optimizer.zero_grad(set_to_none=True)
            params = [p for g in engine.optimizer.param_groups for p in g["params"]]
            method.gap.step(closure, params, modules=(network, method), engine=engine)
            g2 = (_backbone_grad(network) - g1) / method.gap.alpha
            ratios.append(float(g2.norm() / g1.norm().clamp_min(1e-30)))
    mean = lambda v: float(f"{sum(v) / len(v):.4g}") if v else None  # noqa: E731
    return {"confident_fraction": mean(confident), "g2_over_g1": mean(ratios),
            "tau": getattr(method.unsupervised_loss, "threshold", None)}


# -- one bundle -----------------------------------------------------------------------------------------------------
def report(bundle: str, dataset_dir: str, num_batches: int, step: int | None,
           overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    overrides = dict(overrides or {})
    record: Dict[str, Any] = {"bundle": bundle, "protocol": "ACDC-CPU v1 batches (4 + 4, 128x128)",
                              "batches": num_batches}
    if overrides:
        record["overrides"] = overrides
    for weights in ("init", "shipped"):
        torch.manual_seed(1337)
        wf = build(bundle, dataset_dir, overrides)
        network = wf.parser.get_parsed_content("network")
        if weights == "shipped":
            state = torch.load(REPO / "bundles" / bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
            network.load_state_dict(state)
        method = wf.parser.get_parsed_content("method")
        optimizer = wf.parser.get_parsed_content("optimizer")
        iterations = int(wf.parser.get_parsed_content("iterations"))
        t = iterations - 1 if step is None else int(step)
        if bundle == "cml":
            t = max(t, method.pretrain_iterations)
            method.switched_at = 0  # evaluate the self-training stage without its snapshot bookkeeping
        engine = _Engine(network=network, optimizer=optimizer, step=t, state=types.SimpleNamespace(iteration=t + 1))
        torch.manual_seed(1337)
        data = batches(wf, num_batches)
        record.setdefault("step_index", t)
        record.setdefault("grad_share", {})[weights] = grad_shares(bundle, engine, method, data)
        if bundle == "cml" and weights == "shipped":
            torch.manual_seed(1337)
            record.update(cml_cross_region(method, network, data))
        if bundle == "gapmatch":
            torch.manual_seed(1337)
            record.setdefault("gapmatch", {})[weights] = gapmatch_figures(engine, method, data)
    if bundle == "gapmatch":
        record["confident_fraction"] = {k: v["confident_fraction"] for k, v in record["gapmatch"].items()}
        record["g2_over_g1"] = {k: v["g2_over_g1"] for k, v in record["gapmatch"].items()}
        record["tau"] = record.pop("gapmatch")["shipped"]["tau"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="SSL4MIS ACDC folder (train_slices.list, val.list, data/)")
    parser.add_argument("--bundles", nargs="+", default=BUNDLES, help=f"any of {BUNDLES}")
    parser.add_argument("--batches", type=int, default=4, help="real batches averaged (default 4)")
    parser.add_argument("--step", type=int, default=None,
                        help="0-based iteration at which scheduled weights are taken (default: the last one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="config overrides, e.g. mask_position='\"centre\"' (values are JSON)")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=JSON, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {key}: {value!r} is not JSON (strings need quotes, e.g. {key}='\"centre\"')")
    unknown = [b for b in args.bundles if b not in BUNDLES]
    if unknown:
        parser.error(f"unknown bundle(s) {unknown}; choose from {BUNDLES}")
    if not os.path.isfile(os.path.join(args.dataset_dir, "train_slices.list")):
        parser.error(f"--dataset_dir {args.dataset_dir!r} has no train_slices.list (expected the SSL4MIS ACDC layout)")
    if args.batches < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for bundle in args.bundles:
        print(json.dumps(report(bundle, args.dataset_dir, args.batches, args.step, overrides)), flush=True)


if __name__ == "__main__":
    main()
