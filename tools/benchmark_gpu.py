"""Every bundle's training step at the paper settings on a GPU, float32 and AMP (issue 16; benchmark, not a test).

For each bundle the network, method and optimizer come from the bundle's own configs (``train.json`` + ``acdc.json``
for 2D: 256x256, 12 + 12; + ``la.json`` for 3D: V-Net, 112x112x80, 2 + 2, CML 4 + 4), on synthetic data (MONAI's
``create_test_image_2d/3d`` circles/spheres with their label maps, made once and kept on the GPU: no data loading,
no ACDC/LA needed). One step is what :class:`~common.engines.SemiSupervisedTrainer` does per iteration (zero grad,
autocast, ``method.train_step``, backward, optimizer step, ``after_step``), through the same
:class:`~common.engines.fast_path.FastPath`. Per row: median s/iteration over ``--iterations`` timed steps after
``--warmup`` (``torch.cuda.synchronize`` around each), and ``torch.cuda.max_memory_allocated`` over the timed steps.

    python tools/benchmark_gpu.py --out docs/speed_gpu.jsonl                    # all bundles, 2D and 3D
    python tools/benchmark_gpu.py --device cpu --tiny --bundles ssnet           # test the code path on a CPU

Needs torch, monai, numpy, scipy (and h5py through MONAI): pytorch-ignite and tqdm are replaced by stubs when
absent (only the trainer's event plumbing uses them, which this script does not run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: overrides that make the timed steps each bundle's steady-state step (as tools/benchmark_speed.py)
EXTRA_OVERRIDES = {"gapmatch": {"confidence_threshold": 0.0}, "cml": {"pretrain_iterations": 0}}
BUNDLES = ["supervised", "ssnet", "cross_ald", "gapmatch", "cml", "vfd"]


def _stub_missing(names: list[str]) -> list[str]:
    """Install empty stand-ins for optional packages that are not installed; returns those stubbed."""
    stubbed = []

    class _Anything:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return self

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Anything()

        def __class_getitem__(cls, item):
            return cls

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        def getattr_(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Anything if attr[:1].isupper() or attr == "tqdm" else _Anything()

        mod.__getattr__ = getattr_
        mod.__path__ = []  # a package, so submodules can be stubbed too
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__version__ = "0.0.0"
        return mod

    roots: set = set()

    class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """Any submodule of a stubbed package (``tqdm.auto``) is a stub too."""

        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in roots and fullname not in sys.modules:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            return module(spec.name)

        def exec_module(self, mod):
            pass

    for name in names:
        try:
            if sys.modules.get(name.split(".")[0], True) is None:
                raise ImportError
            importlib.import_module(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sys.modules.get(sub) is None:
                    sys.modules[sub] = module(sub)
                    if i > 1:
                        setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
            stubbed.append(name)
            roots.add(parts[0])
    if roots:
        sys.meta_path.insert(0, _StubFinder())
    return stubbed


class _Engine:
    """What a method's ``train_step`` reads from the trainer: network, optimizer, step index, AMP-aware backward."""

    def __init__(self, network, optimizer, scaler) -> None:
        self.network, self.optimizer, self.scaler = network, optimizer, scaler
        self.state = types.SimpleNamespace(iteration=0, epoch=1, output={})

    @property
    def step_index(self) -> int:
        return max(0, self.state.iteration - 1)

    def backward(self, loss, **kwargs) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(**kwargs)

    def sync_gradients(self, params) -> None:
        pass


def _batches(spatial: list[int], n_l: int, n_u: int, num_classes: int, device, channels_last_fn):
    import numpy as np
    import torch
    from monai.data import create_test_image_2d, create_test_image_3d

    rng = np.random.RandomState(0)
    rad_max = max(6, min(spatial) // 6)
    rad_min = max(2, rad_max // 3)

    def make(n: int):
        images, labels = [], []
        for _ in range(n):
            if len(spatial) == 2:
                img, seg = create_test_image_2d(*spatial, num_objs=6, rad_max=rad_max, rad_min=rad_min,
                                                num_seg_classes=num_classes - 1, noise_max=0.3, random_state=rng)
            else:
                img, seg = create_test_image_3d(*spatial, num_objs=4, rad_max=rad_max, rad_min=rad_min,
                                                num_seg_classes=num_classes - 1, noise_max=0.3, random_state=rng)
            images.append(img[None])
            labels.append(np.minimum(seg, num_classes - 1)[None])
        return (torch.as_tensor(np.stack(images), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(labels), dtype=torch.float32, device=device))

    x_l, y_l = make(n_l)
    x_u, _ = make(n_u)
    labeled = {"image": x_l, "label": y_l}
    unlabeled = {"image": x_u, "image_strong": (x_u + 0.1 * torch.randn_like(x_u)).clamp(0, 1)}
    return channels_last_fn(labeled), channels_last_fn(unlabeled)


def run_one(bundle: str, dims: int, precision: str, args) -> dict:
    import torch
    from monai.bundle import ConfigParser

    from common.engines.fast_path import FastPath

    root = REPO / "bundles" / bundle / "configs"
    overlay = root / ("acdc.json" if dims == 2 else "la.json")
    parser = ConfigParser()
    parser.read_config([str(root / "train.json"), str(overlay)])
    device = torch.device(args.device)
    parser["device"] = f"$torch.device('{device}')"
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    parser["output_dir"] = "/tmp/benchmark_gpu"
    for key, value in EXTRA_OVERRIDES.get(bundle, {}).items():
        if key in parser.get():
            parser[key] = value
    if args.tiny:
        parser["patch_size"] = [32, 32] if dims == 2 else [32, 32, 32]
        parser["labeled_batch_size"] = parser["unlabeled_batch_size"] = 2
    spatial = [int(v) for v in parser.get_parsed_content("patch_size")]
    n_l = int(parser.get_parsed_content("labeled_batch_size"))
    n_u = int(parser.get_parsed_content("unlabeled_batch_size"))
    num_classes = int(parser.get_parsed_content("num_classes"))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network")
    method = parser.get_parsed_content("method").to(device)
    optimizer = parser.get_parsed_content("optimizer")
    fast = FastPath(channels_last=not args.no_channels_last, compile=False, precision=precision, device=device)
    fast.prepare(network, method)
    scaler = torch.amp.GradScaler("cuda") if fast.needs_grad_scaler else None
    engine = _Engine(network, optimizer, scaler)
    labeled, unlabeled = _batches(spatial, n_l, n_u, num_classes, device, fast.batch)
    if not method.requires_unlabeled:
        unlabeled = None
    cuda = device.type == "cuda"

    def step() -> None:
        engine.state.iteration += 1
        network.train()
        method.train()
        optimizer.zero_grad(set_to_none=True)
        with fast.autocast():
            losses = method.train_step(engine, labeled, unlabeled)
        losses = fast.float32_losses(losses)
        if losses["loss"].requires_grad:
            engine.backward(losses["loss"])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        method.after_step(engine)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "bundle": bundle, "dims": dims, "precision": precision,
        "memory_format": fast.describe()["memory_format"], "compile": False,
        "s_per_iteration_median": round(times[len(times) // 2], 4), "s_per_iteration_min": round(times[0], 4),
        "timed_iterations": len(times), "warmup": args.warmup,
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "batch": f"{n_l}+{n_u if method.requires_unlabeled else 0} at {'x'.join(map(str, spatial))}",
        "network": type(network).__name__, "data": "synthetic (monai create_test_image), on the device",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "settings": "paper" if not args.tiny else "tiny (code-path check)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="*", default=BUNDLES)
    parser.add_argument("--dims", nargs="*", type=int, default=[2, 3], choices=[2, 3])
    parser.add_argument("--precisions", nargs="*", default=None,
                        help="default: float32 and AMP (fp16 with a gradient scaler on CUDA; bf16 on CPU); "
                             "add bf16 on CUDA with --precisions float32 fp16 bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="32-pixel patches, 2 + 2 (checks the code path on a CPU)")
    parser.add_argument("--no_channels_last", action="store_true")
    parser.add_argument("--time_budget", type=float, default=280.0,
                        help="seconds; configurations not started by then are reported as skipped")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    stubbed = _stub_missing(["ignite", "ignite.engine", "ignite.metrics", "ignite.handlers", "tqdm"])

    import torch

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device visible (use --device cpu --tiny to check the code path)")
        torch.backends.cudnn.benchmark = True
    precisions = args.precisions or (["float32", "fp16"] if args.device.startswith("cuda") else ["float32", "bf16"])
    start = time.perf_counter()
    for dims in args.dims:
        for bundle in args.bundles:
            for precision in precisions:
                if time.perf_counter() - start > args.time_budget:
                    row = {"bundle": bundle, "dims": dims, "precision": precision, "skipped": "time budget"}
                else:
                    t0 = time.perf_counter()
                    try:
                        row = run_one(bundle, dims, precision, args)
                    except Exception as err:  # noqa: BLE001 - report and go on with the other bundles
                        cause = err
                        while cause.__cause__ is not None:  # MONAI wraps errors in config expressions
                            cause = cause.__cause__
                        row = {"bundle": bundle, "dims": dims, "precision": precision,
                               "error": f"{type(cause).__name__}: {cause}"[:1000]}
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    if stubbed:
                        row["stubbed_packages"] = stubbed
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(json.dumps({"total_wall_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
