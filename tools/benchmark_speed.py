"""Training speed per method (benchmark, not a test): s/iteration, ratio to the supervised step, peak RSS.

Follows ``benchmarks.md`` "Speed": s/iteration is the median over iterations 5..25 after warm-up, data loading
included (time between consecutive iteration ends), the same batch and input size for every method (the
bundle's ``acdc_cpu_v1.json`` overlay: 4 labelled + 4 unlabelled 128x128 slices), ``torch.set_num_threads`` =
cores. Each method runs in its own process so its peak RSS is its own. The ratio to the supervised step is
printed next to the method's pass count from ``methods/`` (backbone forward+backward passes per iteration,
in units of a labelled-half supervised step).

    python tools/benchmark_speed.py --dataset_dir ../shared/data/ACDC            # every bundle
    python tools/benchmark_speed.py --bundles supervised ssnet --data synthetic   # no data needed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: backbone passes per iteration relative to a labelled-half supervised step (methods/base.md section 7)
PASS_COUNTS = {
    "supervised": 1.0,
    "ssnet": 6.7,
    # base.md counts ~6 U (12x) with the particles on the whole batch; the bundle's default regularises the
    # unlabelled half only (paper, Eq. 8), which halves every particle term: 1 U (main) + ~2.6 U = ~3.6 U (7.2x)
    "cross_ald": 7.2,
    "gapmatch": 3.3,
    "cml": 2.7,
    "vfd": 3.75,
}

#: overrides a bundle needs so that the timed iterations are its steady-state step
EXTRA_OVERRIDES: dict[str, dict] = {
    # an untrained network is rarely 95% confident, so GapMatch could skip its theta* pass (empty mask, no
    # direction) in the timed iterations 5..25; tau = 0 times the steady-state step with every pass
    "gapmatch": {"confidence_threshold": 0.0},
    # CML's pass count is that of its self-training step; its cheaper labelled-only pre-training is skipped
    "cml": {"pretrain_iterations": 0},
}


def _bundles() -> list[str]:
    found = [p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file()]
    return sorted(found, key=lambda b: (b != "supervised", b))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_single(bundle: str, args: argparse.Namespace) -> dict:
    """Time ``bundle``'s training step in this process and return its row."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from common.engines.run_summary import peak_rss_mb

    torch.set_num_threads(args.threads)
    root = REPO / "bundles" / bundle
    configs = [str(root / "configs" / "train.json")]
    if (root / "configs" / "acdc_cpu_v1.json").is_file():
        configs.append(str(root / "configs" / "acdc_cpu_v1.json"))
    total = args.iterations + 1
    override = {
        "bundle_root": str(root), "output_dir": tempfile.mkdtemp(prefix=f"speed_{bundle}_"), "iterations": total,
        "val_interval": 10 ** 9, "checkpoint_interval": 10 ** 9, "num_workers": args.num_workers, "resume": False,
        **EXTRA_OVERRIDES.get(bundle, {}),
    }
    if args.data == "acdc":
        override.update({"data_source": "acdc", "dataset_dir": args.dataset_dir})
    else:
        override.update({"data_source": "synthetic", "synthetic": {"num_labeled": 16, "num_unlabeled": 32,
                                                                 "num_validation": 1, "spatial_size": [128, 128]}})
    wf = ConfigWorkflow(config_file=configs, meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="train", **override)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    marks: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: marks.append(time.perf_counter()))
    trainer.add_event_handler(Events.STARTED, lambda e: marks.append(time.perf_counter()))
    wf.run()
    steps = [b - a for a, b in zip(marks[:-1], marks[1:])]  # steps[i] = iteration i+1, data loading included
    timed = steps[args.warmup:args.iterations]
    timed_sorted = sorted(timed)
    return {
        "bundle": bundle,
        "s_per_iteration_median": round(timed_sorted[len(timed) // 2], 4),
        "s_per_iteration_min": round(timed_sorted[0], 4),
        "s_per_iteration_max": round(timed_sorted[-1], 4),
        "timed_iterations": f"{args.warmup + 1}..{args.iterations}",
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "pass_count": PASS_COUNTS.get(bundle),
        "batch": f"{override.get('labeled_batch_size', 4)}+{override.get('unlabeled_batch_size', 4)} at 128x128",
        "data": args.data,
        "threads": args.threads,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="*", default=None, help="bundles to time (default: all)")
    parser.add_argument("--data", choices=["acdc", "synthetic"], default="acdc")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    parser.add_argument("--iterations", type=int, default=25, help="last timed iteration")
    parser.add_argument("--warmup", type=int, default=4, help="iterations excluded at the start (timing from 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="also append the rows to this JSON-lines file")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.bundles or []) - set(_bundles()))
    if unknown:
        parser.error(f"--bundles: unknown bundle(s) {unknown}; available: {_bundles()}")

    if args.single:
        print("ROW " + json.dumps(run_single(args.single, args)), flush=True)
        return

    bundles = args.bundles or _bundles()
    if "supervised" not in bundles:
        bundles = ["supervised"] + bundles
    rows = []
    for bundle in bundles:
        cmd = [sys.executable, __file__, "--single", bundle, "--data", args.data, "--dataset_dir", args.dataset_dir,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--num_workers", str(args.num_workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        row_lines = [l for l in proc.stdout.splitlines() if l.startswith("ROW ")]
        if proc.returncode != 0 or not row_lines:
            print(json.dumps({"bundle": bundle, "error": (proc.stderr or proc.stdout)[-2000:]}), flush=True)
            continue
        rows.append(json.loads(row_lines[-1][4:]))
    base = next((r["s_per_iteration_median"] for r in rows if r["bundle"] == "supervised"), None)
    for row in rows:
        if base:
            row["ratio_to_supervised"] = round(row["s_per_iteration_median"] / base, 2)
            if row.get("pass_count"):
                row["ratio_over_pass_count"] = round(row["ratio_to_supervised"] / row["pass_count"], 3)
        row["protocol"] = "ACDC-CPU v1 speed" if args.data == "acdc" else "synthetic 128x128, ACDC-CPU v1 batch"
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
