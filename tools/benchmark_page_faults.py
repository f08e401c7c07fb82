"""Page faults and kernel time per training iteration (benchmark, not a test; issue 16, ``reuse_freed_memory``).

Runs a bundle's training workflow (``train.json`` + ``acdc_cpu_v1.json``: 4 + 4 slices at 128x128, no validation or
checkpoints) in this process and reads ``resource.getrusage`` at the end of every iteration: minor page faults,
kernel (sys) and user CPU seconds per iteration, medians over the iterations after ``--warmup``, and the peak RSS.

    python tools/benchmark_page_faults.py --bundle supervised --reuse_freed_memory false
    python tools/benchmark_page_faults.py --bundle supervised --reuse_freed_memory true

The setting is process-wide and cannot be undone, so each setting needs its own process (one command each).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="supervised")
    parser.add_argument("--reuse_freed_memory", choices=["true", "false"], required=True)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", choices=["acdc", "synthetic"], default="synthetic")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    args = parser.parse_args()

    import torch
    from ignite.engine import Events

    import benchmark_speed
    from common.engines.run_summary import peak_rss_mb

    torch.set_num_threads(args.threads)
    wf_args = argparse.Namespace(data=args.data, dataset_dir=args.dataset_dir, num_workers=0)
    wf = benchmark_speed._workflow(args.bundle, REPO, wf_args, args.iterations,
                                   {"reuse_freed_memory": args.reuse_freed_memory == "true"})
    trainer = wf.parser.get_parsed_content("train#trainer")
    marks: list[tuple[float, int, float, float]] = []

    def mark(_engine) -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        marks.append((time.perf_counter(), r.ru_minflt, r.ru_stime, r.ru_utime))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark)
    wf.run()
    steps = [tuple(b[i] - a[i] for i in range(4)) for a, b in zip(marks[:-1], marks[1:])][args.warmup:]
    row = {
        "bundle": args.bundle, "reuse_freed_memory": args.reuse_freed_memory == "true",
        "applied": trainer.fast_path.describe()["reuse_freed_memory"],
        "s_per_iteration_median": round(statistics.median(s[0] for s in steps), 4),
        "minor_faults_per_iteration_median": int(statistics.median(s[1] for s in steps)),
        "sys_s_per_iteration_median": round(statistics.median(s[2] for s in steps), 4),
        "user_s_per_iteration_median": round(statistics.median(s[3] for s in steps), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1), "iterations_measured": len(steps), "threads": args.threads,
        "data": args.data, "loader_workers": 0,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
