"""Inference load benchmark (not a test): seconds per ACDC volume and resident memory over repeated passes.

Converts the ``val.list`` volumes to NIfTI once, builds a bundle's ``inference.json`` workflow once, and runs it
over all volumes ``--passes`` times in one process, printing the resident set size after each pass. Memory
(measured after garbage collection and ``malloc_trim``, i.e. what the process still holds) must not grow by
more than 5% after the first pass (``benchmarks.md``: inference = seconds per ACDC volume,
slice-wise at 128x128 on CPU).

    python tools/benchmark_inference.py --bundle supervised --dataset_dir ../shared/data/ACDC --passes 5
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="supervised")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

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
