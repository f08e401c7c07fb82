"""Training speed per method (benchmark, not a test): s/iteration, ratio to the supervised step, peak RSS.

Follows ``benchmarks.md`` "Speed": s/iteration is the median over iterations 5..25 after warm-up, data loading
included (time between consecutive iteration ends), the same batch and input size for every method (the
bundle's ``acdc_cpu_v1.json`` overlay: 4 labelled + 4 unlabelled 128x128 slices), ``torch.set_num_threads`` =
cores. Each method runs in its own process so its peak RSS is its own. The ratio to the supervised step is
printed next to the method's pass count from ``methods/`` (backbone forward+backward passes per iteration,
in units of a labelled-half supervised step).

    python tools/benchmark_speed.py --dataset_dir ../shared/data/ACDC            # every bundle
    python tools/benchmark_speed.py --bundles supervised ssnet --data synthetic   # no data needed

``--compare REV`` times the working tree against commit ``REV`` in the same run (issue 16): ``REV`` is checked
out with ``git worktree add`` under the system temp folder and run in its own processes with ``PYTHONPATH``
pointing there. For each bundle one process per arm (``REV`` float32; this tree float32 with its defaults, i.e. its
fast path; this tree ``--precision bf16`` unless ``--no_bf16``; this tree with ``compile=true`` with
``--compile_arm``) builds the bundle's training workflow, runs ``--warmup`` untimed iterations, then the arms take
turns: ``--rounds`` rounds of ``--block`` iterations each, the order of the arms reversed every round, the other
arms paused (blocked before fetching their next batch). Noise from other work on the machine hits every arm alike;
the ratio ``REV / this tree`` of the median s/iteration is the speed-up. Prints a markdown table and JSON lines
(``--out`` appends them to a file). Each arm loads its batches with its own bundle default of ``num_workers`` (rows
record it; this tree's default depends on the device and the free cores, ``common.data.default_num_workers``);
``--num_workers N`` imposes N on every arm.

    python tools/benchmark_speed.py --compare a3b7a66 --dataset_dir ../shared/data/ACDC --out docs/speed_compare.jsonl
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
    from common.engines.run_summary import peak_rss_mb

    torch.set_num_threads(args.threads)
    total = args.iterations + 1
    wf = _workflow(bundle, REPO, args, total, {})
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
        "batch": f"{wf.parser['labeled_batch_size']}+{wf.parser['unlabeled_batch_size']} at 128x128",
        "data": args.data,
        "threads": args.threads,
        "num_workers": wf.parser.get_parsed_content("num_workers"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
    }


def _workflow(bundle: str, repo: Path, args: argparse.Namespace, total: int, extra: dict):
    """The bundle's training workflow in ``repo`` (ACDC-CPU v1 overlay, no validation, no checkpoints)."""
    from monai.bundle import ConfigWorkflow

    root = repo / "bundles" / bundle
    configs = [str(root / "configs" / "train.json")]
    if (root / "configs" / "acdc_cpu_v1.json").is_file():
        configs.append(str(root / "configs" / "acdc_cpu_v1.json"))
    override = {
        "bundle_root": str(root), "output_dir": tempfile.mkdtemp(prefix=f"speed_{bundle}_"), "iterations": total,
        "val_interval": 10 ** 9, "checkpoint_interval": 10 ** 9, "resume": False,
        **({} if args.num_workers is None else {"num_workers": args.num_workers}),
        **EXTRA_OVERRIDES.get(bundle, {}), **extra,
    }
    if args.data == "acdc":
        override.update({"data_source": "acdc", "dataset_dir": args.dataset_dir})
    else:
        override.update({"data_source": "synthetic", "synthetic": {"num_labeled": 16, "num_unlabeled": 32,
                                                                 "num_validation": 1, "spatial_size": [128, 128]}})
    wf = ConfigWorkflow(config_file=configs, meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="train", **override)
    wf.initialize()
    return wf


def run_worker(args: argparse.Namespace) -> None:
    """One arm of ``--compare``: runs the bundle's training, pausing before every block of ``--block`` iterations
    until the controller writes a line; after each block prints ``BLOCK [seconds per iteration, ...]``."""
    import torch
    from ignite.engine import Events

    torch.set_num_threads(args.threads)
    repo = Path(args.worker_repo)
    total = args.warmup + args.rounds * args.block
    wf = _workflow(args.worker, repo, args, total, json.loads(args.worker_overrides))
    trainer = wf.parser.get_parsed_content("train#trainer")
    fast = getattr(trainer, "fast_path", None)
    info = fast.describe() if fast is not None else {"precision": "float32", "memory_format": "contiguous",
                                                    "compile": False}
    state = {"mark": 0.0, "times": []}

    def before_batch(engine) -> None:
        done = engine.state.iteration  # iterations completed so far
        if done == args.warmup or (done > args.warmup and (done - args.warmup) % args.block == 0):
            if done > args.warmup:
                print("BLOCK " + json.dumps(state["times"]), flush=True)
                state["times"] = []
            print("READY", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(0)
            state["mark"] = time.perf_counter()
        elif done < args.warmup:
            state["mark"] = time.perf_counter()

    def after_iteration(engine) -> None:
        now = time.perf_counter()
        if engine.state.iteration > args.warmup:
            state["times"].append(now - state["mark"])
        state["mark"] = now

    trainer.add_event_handler(Events.GET_BATCH_STARTED, before_batch)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, after_iteration)
    info["num_workers"] = wf.parser.get_parsed_content("num_workers")
    print("INFO " + json.dumps(info), flush=True)
    wf.run()
    print("BLOCK " + json.dumps(state["times"]), flush=True)
    from common.engines.run_summary import peak_rss_mb

    print("DONE " + json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)


class _Arm:
    def __init__(self, name: str, repo: Path, overrides: dict, bundle: str, args: argparse.Namespace) -> None:
        self.name, self.repo, self.times, self.info, self.done = name, repo, [], {}, {}
        self.block_means: list[float] = []
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", bundle, "--worker_repo", str(repo),
               "--worker_overrides", json.dumps(overrides), "--data", args.data, "--dataset_dir", args.dataset_dir,
               "--warmup", str(args.warmup), "--rounds", str(args.rounds), "--block", str(args.block),
               "--threads", str(args.threads)] + _workers_arg(args)
        env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"speed_{bundle}_{name}_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=str(repo), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)

    def _read_until(self, tag: str) -> None:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.flush()
                self.log.seek(0)
                raise RuntimeError(f"arm '{self.name}' ended early:\n{self.log.read()[-3000:]}")
            if line.startswith("INFO "):
                self.info = json.loads(line[5:])
            elif line.startswith("BLOCK "):
                block = json.loads(line[6:])
                self.times.extend(block)
                if block:
                    self.block_means.append(sum(block) / len(block))
            elif line.startswith("DONE "):
                self.done = json.loads(line[5:])
            if line.startswith(tag):
                return

    def wait_ready(self) -> None:
        self._read_until("READY")

    def run_block(self, last: bool) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self._read_until("DONE" if last else "READY")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.log.name)


def _workers_arg(args: argparse.Namespace) -> list[str]:
    return [] if args.num_workers is None else ["--num_workers", str(args.num_workers)]


def _worktree(rev: str) -> Path:
    """A detached checkout of ``rev`` under the temp folder (reused when it is already there)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                         text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--compare: '{rev}' is not a commit of {REPO}: {sha.stderr.strip()}")
    sha_s = sha.stdout.strip()
    path = Path(tempfile.gettempdir()) / f"semiseg_{sha_s[:7]}"
    if not (path / "common").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), sha_s], check=True,
                       capture_output=True)
    return path


def _git(*argv: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _tree_commit() -> str:
    """The working tree's commit, with ``+changes`` when tracked files differ from it (rows name what was timed)."""
    dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    return _git("rev-parse", "--short=7", "HEAD") + ("+changes" if dirty else "")


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def compare(args: argparse.Namespace) -> None:
    base = _worktree(args.compare)
    arms_spec = [(f"{args.compare} float32", base, {}), ("this tree float32", REPO, {"precision": "float32"})]
    if args.compile_arm:
        arms_spec.append(("this tree float32 compile", REPO, {"precision": "float32", "compile": True}))
    if not args.no_bf16:
        arms_spec.append(("this tree bf16", REPO, {"precision": "bf16"}))
    rows = []
    stamp = {"measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "tree_commit": _tree_commit(),
             "base_commit": _git("rev-parse", f"{args.compare}^{{commit}}")[:7]}
    for bundle in (args.bundles or _bundles()):
        arms = [_Arm(name, repo, over, bundle, args) for name, repo, over in arms_spec]
        try:
            for arm in arms:
                arm.wait_ready()  # built and warmed up, paused
            for r in range(args.rounds):
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    arm.run_block(last=r == args.rounds - 1)
        except RuntimeError as err:
            print(json.dumps({"bundle": bundle, "error": str(err)[-2000:]}), flush=True)
            continue
        finally:
            for arm in arms:
                arm.close()
        ref = _median(arms[0].times)
        ref_blocks = arms[0].block_means
        for arm in arms:
            med = _median(arm.times)
            paired = [a / b for a, b in zip(ref_blocks, arm.block_means)]
            row = {
                "bundle": bundle, "arm": arm.name, "tree": "working tree" if arm.repo == REPO else args.compare,
                "s_per_iteration_median": round(med, 4), "s_per_iteration_min": round(min(arm.times), 4),
                "timed_iterations": len(arm.times), "speedup_vs_base": round(ref / med, 3),
                "speedup_median_of_paired_blocks": round(_median(paired), 3) if paired else None,
                **arm.info, "peak_rss_mb": arm.done.get("peak_rss_mb"),
                "batch": "4+4 at 128x128", "data": args.data, "threads": args.threads, "cpu": _cpu_name(),
                "cores": os.cpu_count(), "num_workers_imposed": args.num_workers,
                "schedule": f"{args.warmup} warm-up, then {args.rounds} rounds x {args.block} iterations per arm, "
                            "arm order reversed each round; data loading included",
                "protocol": "interleaved A/B, ACDC-CPU v1 batch", **stamp,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    names = [a[0] for a in arms_spec]
    print("\n| bundle | " + " | ".join(f"{n} s/it" for n in names) + " | " +
          " | ".join(f"speed-up {n}" for n in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        by = {r["arm"]: r for r in rows if r["bundle"] == bundle}
        if len(by) != len(names):
            continue
        cells = [f"{by[n]['s_per_iteration_median']:.3f}" for n in names]
        cells += [f"{by[n]['speedup_vs_base']:.2f}x (paired {by[n]['speedup_median_of_paired_blocks']:.2f}x)"
                  for n in names[1:]]
        print(f"| {bundle} | " + " | ".join(cells) + " |")
    print(f"\nmedian s/iteration over {args.rounds * args.block} timed iterations per arm; float32 arms: "
          f"{names[0]} = that commit's default (contiguous, eager), this tree = its defaults "
          f"({rows[1]['memory_format'] if len(rows) > 1 else '?'}, compile={rows[1]['compile'] if len(rows) > 1 else '?'}); "
          "arms interleaved so machine noise hits all alike; threads="
          f"{args.threads}, {_cpu_name()}, {os.cpu_count()} cores; loader workers per stream: "
          + ", ".join(f"{r['arm']} {r.get('num_workers')}" for r in rows[:len(names)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="*", default=None, help="bundles to time (default: all)")
    parser.add_argument("--data", choices=["acdc", "synthetic"], default="acdc")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    parser.add_argument("--iterations", type=int, default=25, help="last timed iteration")
    parser.add_argument("--warmup", type=int, default=4, help="iterations excluded at the start (timing from 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--num_workers", type=int, default=None,
                        help="loader workers per stream in every run/arm (default: each tree's bundle default)")
    parser.add_argument("--out", default=None, help="also append the rows to this JSON-lines file")
    parser.add_argument("--compare", default=None, metavar="REV",
                        help="time this working tree against commit REV, interleaved in one run")
    parser.add_argument("--rounds", type=int, default=10, help="--compare: rounds of alternating blocks")
    parser.add_argument("--block", type=int, default=2, help="--compare: iterations per arm and round")
    parser.add_argument("--no_bf16", action="store_true", help="--compare: leave out the bf16 arm")
    parser.add_argument("--compile_arm", action="store_true", help="--compare: add an arm with compile=true")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_repo", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.bundles or []) - set(_bundles()))
    if unknown:
        parser.error(f"--bundles: unknown bundle(s) {unknown}; available: {_bundles()}")

    if args.single:
        print("ROW " + json.dumps(run_single(args.single, args)), flush=True)
        return
    if args.worker:
        run_worker(args)
        return
    if args.compare:
        compare(args)
        return

    bundles = args.bundles or _bundles()
    if "supervised" not in bundles:
        bundles = ["supervised"] + bundles
    rows = []
    for bundle in bundles:
        cmd = [sys.executable, __file__, "--single", bundle, "--data", args.data, "--dataset_dir", args.dataset_dir,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads),
               ] + _workers_arg(args)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        row_lines = [l for l in proc.stdout.splitlines() if l.startswith("ROW ")]
        if proc.returncode != 0 or not row_lines:
            print(json.dumps({"bundle": bundle, "error": (proc.stderr or proc.stdout)[-2000:]}), flush=True)
            continue
        rows.append(json.loads(row_lines[-1][4:]))
    base = next((r["s_per_iteration_median"] for r in rows if r["bundle"] == "supervised"), None)
    stamp = {"measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "tree_commit": _tree_commit()}
    for row in rows:
        if base:
            row["ratio_to_supervised"] = round(row["s_per_iteration_median"] / base, 2)
            if row.get("pass_count"):
                row["ratio_over_pass_count"] = round(row["ratio_to_supervised"] / row["pass_count"], 3)
        row["protocol"] = "ACDC-CPU v1 speed" if args.data == "acdc" else "synthetic 128x128, ACDC-CPU v1 batch"
        row.update(stamp)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
