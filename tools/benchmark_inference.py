"""Inference load benchmark (not a test): seconds per ACDC volume and resident memory over repeated passes.

Converts the ``val.list`` volumes to NIfTI once, builds a bundle's ``inference.json`` workflow once, and runs it
over all volumes ``--passes`` times in one process, printing the resident set size after each pass. Memory
(measured after garbage collection and ``malloc_trim``, i.e. what the process still holds) must not grow by
more than 5% after the first pass (``benchmarks.md``: inference = seconds per ACDC volume,
slice-wise at 128x128 on CPU).

    python tools/benchmark_inference.py --bundle supervised --dataset_dir ../shared/data/ACDC --passes 5

``--fast_path_compare`` (issue 16) times the bundle's evaluation instead (``train.json`` + ``acdc_cpu_v1.json`` +
``evaluate.json`` with the shipped ``models/model.pt``: slice-wise 128x128 prediction, post-processing and the
per-case metrics included) on the first ``--volumes`` ``val.list`` volumes, in one process with one evaluator,
alternating per pass between the plain network (contiguous float32: what commit a3b7a66 runs), the fast path
(channels-last float32, this tree's default) and, on a CPU with bf16, channels-last under bf16 autocast (logits
cast back to float32 before post-processing and metrics). The order of the settings is reversed every pass so
machine noise hits them alike.

    python tools/benchmark_inference.py --fast_path_compare --bundle ssnet --volumes 10 --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def release_free_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc), so RSS shows what is still held."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def fast_path_compare(args) -> None:
    import torch
    from monai.bundle import ConfigWorkflow
    from torch import nn

    from common.engines import load_weights
    from common.engines.fast_path import FastPath, cpu_supports_bf16

    torch.set_num_threads(args.threads)
    root = REPO / "bundles" / args.bundle
    configs = [str(root / "configs" / c) for c in ("train.json", "acdc_cpu_v1.json", "evaluate.json")]
    wf = ConfigWorkflow(config_file=configs, meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="train", bundle_root=str(root), dataset_dir=args.dataset_dir,
                        output_dir=tempfile.mkdtemp(prefix="infer_fast_"), resume=False,
                        **{"validate#dataset#data": f"$@split.validation[:{int(args.volumes)}]"})
    wf.initialize()
    network = wf.parser.get_parsed_content("network")
    load_weights(network, str(root / "models" / "model.pt"), map_location="cpu")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    n_volumes = len(evaluator.data_loader.dataset)

    class _Autocast(nn.Module):
        def __init__(self, net: nn.Module, fast: FastPath) -> None:
            super().__init__()
            self.net, self.fast = net, fast

        def forward(self, x):
            with self.fast.autocast():
                out = self.net(x)
            return out.float()

    def plain():
        with torch.no_grad():
            for t in list(network.parameters()) + list(network.buffers()):
                t.data = t.data.contiguous()
        evaluator.network = network

    def fast_f32():
        FastPath(channels_last=True, reuse_freed_memory=False).prepare(network)
        evaluator.network = network

    def fast_bf16():
        fast = FastPath(channels_last=True, precision="bf16", reuse_freed_memory=False)
        fast.prepare(network)  # no hooks kept: float32 logits come from the wrapper
        evaluator.network = _Autocast(network, fast)

    settings = [("a3b7a66-equivalent: contiguous float32", plain), ("fast path: channels_last float32", fast_f32)]
    if cpu_supports_bf16() and not args.no_bf16:
        settings.append(("fast path: channels_last bf16 autocast", fast_bf16))
    times = {name: [] for name, _ in settings}
    dice = {}
    for p in range(args.passes + 1):  # pass 0 warms up
        for name, apply in (settings if p % 2 == 0 else settings[::-1]):
            apply()
            t0 = time.perf_counter()
            evaluator.run()
            elapsed = (time.perf_counter() - t0) / n_volumes
            dice[name] = float(evaluator.state.metrics.get("val_mean_dice", float("nan")))
            if p > 0:
                times[name].append(elapsed)
    base = sorted(times[settings[0][0]])[len(times[settings[0][0]]) // 2]
    for name, _ in settings:
        med = sorted(times[name])[len(times[name]) // 2]
        print(json.dumps({"bundle": args.bundle, "setting": name, "s_per_volume_median": round(med, 3),
                          "s_per_volume_all": [round(t, 3) for t in times[name]], "speedup_vs_plain": round(base / med, 3),
                          "val_mean_dice_subset": round(dice[name], 4), "volumes": n_volumes, "passes": args.passes,
                          "threads": args.threads, "compile": False,
                          "protocol": "ACDC val.list subset, slice-wise 128x128, metrics included, interleaved"}),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="supervised")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--fast_path_compare", action="store_true",
                        help="time evaluation (metrics included): plain vs fast path vs bf16, interleaved")
    parser.add_argument("--volumes", type=int, default=20, help="--fast_path_compare: first N val.list volumes")
    parser.add_argument("--no_bf16", action="store_true")
    args = parser.parse_args()
    if args.fast_path_compare:
        fast_path_compare(args)
        return

    import h5py
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="infer_bench_"))
    (work / "in").mkdir()
    names = [n.strip() for n in open(Path(args.dataset_dir) / "val.list") if n.strip()]
    for name in names:
        with h5py.File(Path(args.dataset_dir) / "data" / f"{name}.h5") as f:
            image = f["image"][()]
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), np.eye(4)), str(work / "in" / f"{name}.nii.gz"))

    root = REPO / "bundles" / args.bundle
    wf = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"), meta_file=str(root / "configs" / "metadata.json"),
                        logging_file=False, workflow_type="inference", bundle_root=str(root),
                        dataset_dir=str(work / "in"), output_dir=str(work / "out"))
    wf.initialize()
    evaluator = wf.parser.get_parsed_content("evaluator")
    rows = []
    for p in range(1, args.passes + 1):
        t0 = time.perf_counter()
        evaluator.run()
        elapsed = time.perf_counter() - t0
        raw = rss_mb()
        release_free_memory()
        rows.append({"pass": p, "s_per_volume": round(elapsed / len(names), 3), "rss_mb": round(rss_mb(), 1),
                     "rss_before_trim_mb": round(raw, 1)})
        print(json.dumps(rows[-1]), flush=True)
    first = rows[0]["rss_mb"]
    growth = max(r["rss_mb"] for r in rows[1:]) / first - 1.0 if len(rows) > 1 else 0.0
    print(json.dumps({"bundle": args.bundle, "volumes": len(names), "passes": args.passes, "threads": args.threads,
                      "rss_after_first_pass_mb": first, "max_growth_after_first_pass": round(growth, 4),
                      "within_5_percent": growth <= 0.05,
                      "median_s_per_volume": sorted(r["s_per_volume"] for r in rows)[len(rows) // 2]}), flush=True)


if __name__ == "__main__":
    main()
