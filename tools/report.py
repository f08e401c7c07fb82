"""Results report: reads run folders and writes ``docs/results.md`` with the comparison table, learning curves and
example segmentations.

For every bundle and labelled count it reads ``bundles/<b>/runs/<protocol>_<K>p/``: ``summary.json`` (training
time, best iteration), ``eval/summary.json`` (per-class metrics of the best model on the validation set, from
``evaluate.json``) and ``models/validation.jsonl`` (learning curve). Speed rows come from a JSON-lines file
written by ``tools/benchmark_speed.py --out``. The papers' numbers sit in their own columns: they come from
another protocol (256x256, 30k iterations, GPU) and are never mixed with ours.

    python tools/report.py --dataset_dir ../shared/data/ACDC            # writes docs/results.md and docs/*.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLE_ORDER = ["supervised", "ssnet", "cross_ald", "gapmatch", "cml", "vfd"]
LABELS = {3: "3 patients (5%)", 7: "7 patients (10%)"}

#: ACDC numbers as published (Dice %, Jaccard %, 95HD voxels, ASD voxels; None = not reported), from methods/*.md.
PAPER_ACDC: dict[str, dict[int, tuple]] = {
    "supervised": {3: (47.83, 37.01, 31.16, 12.62), 7: (79.41, 68.11, 9.35, 2.70)},  # SS-Net paper's U-Net rows
    "ssnet": {3: (65.82, 55.38, 6.67, 2.28), 7: (86.78, 77.67, 6.07, 1.40)},
    "cross_ald": {3: (80.6, 69.08, 5.96, 1.9), 7: (87.52, 78.62, 4.81, 1.6)},
    "gapmatch": {3: (88.8, None, None, 0.64), 7: (90.1, None, None, 0.39)},
    "cml": {3: (88.53, None, 1.87, 0.57), 7: (89.42, None, 1.42, 0.52)},
    "vfd": {},  # the VFD paper has no ACDC experiment (LA and abdominal CT only)
}


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def _same_file(a: Path, b: Path) -> bool:
    import hashlib

    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def collect_runs(protocol: str) -> list[dict]:
    """One record per evaluated run of ``protocol``: the bundle's default run ``<protocol>_<K>p`` and its variants
    ``<protocol>_<K>p_<variant>`` (other overlays or options, e.g. a Table-2 base method). ``shipped`` marks the run
    whose best model is the bundle's ``models/model.pt``."""
    rows = []
    for bundle in BUNDLE_ORDER:
        shipped_weights = REPO / "bundles" / bundle / "models" / "model.pt"
        for k in LABELS:
            base = f"{protocol}_{k}p"
            runs = [REPO / "bundles" / bundle / "runs" / base]
            runs += sorted((REPO / "bundles" / bundle / "runs").glob(f"{base}_*"))
            for run in runs:
                evaluation = _load_json(run / "eval" / "summary.json")
                if evaluation is None:
                    continue
                variant = run.name[len(base) + 1:] or None
                summary = _load_json(run / "summary.json") or {}
                history_path = run / "models" / "validation.jsonl"
                history = [json.loads(l) for l in history_path.read_text().splitlines() if l.strip()] if history_path.is_file() else []
                shipped = _same_file(run / "models" / "model.pt", shipped_weights)
                label = bundle + (f" [{variant}]" if variant else "") + (" (shipped)" if shipped else "")
                rows.append({"bundle": bundle, "variant": variant, "label": label, "shipped": shipped, "labeled": k,
                             "run": run, "eval": evaluation, "summary": summary, "history": history})
    return rows


def _plotted(rows: list[dict], labeled: int) -> list[dict]:
    """Default runs and shipped variants: one curve / panel per method."""
    return [r for r in rows if r["labeled"] == labeled and (r["variant"] is None or r["shipped"])]


def speed_rows(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "error" not in row:
                    out[row["bundle"]] = row  # the last measurement of a bundle wins
    return out


def results_table(rows: list[dict], speed: dict[str, dict]) -> str:
    head = ("| method | labelled | Dice % | Jaccard % | 95HD | ASD | RV / MYO / LV Dice % | best it. | train time | "
            "s/it | ratio to supervised | paper Dice % | paper Jaccard % | paper 95HD | paper ASD |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        mean = r["eval"].get("mean", {})
        per_class = " / ".join(_fmt(r["eval"].get(c, {}).get("dice"), 100, 1) for c in ("RV", "MYO", "LV"))
        wall = r["summary"].get("wall_time_s")
        done, this_session = r["summary"].get("iterations"), r["summary"].get("iterations_this_session")
        # a run resumed from a checkpoint without the summary's state knows only its last session's time
        partial = f" (last {this_session} it.)" if wall and this_session and done and this_session < done and \
            r["summary"].get("wall_time_this_session_s", wall) == wall else ""
        # a variant may change the step (another base method): the bundle's speed row describes the default step
        sp = speed.get(r["bundle"], {}) if r["variant"] is None else {}
        paper = PAPER_ACDC.get(r["bundle"], {}).get(r["labeled"], (None,) * 4) if r["variant"] is None else (None,) * 4
        lines.append(
            f"| {r['label']} | {LABELS[r['labeled']]} | {_fmt(mean.get('dice'), 100)} | {_fmt(mean.get('jaccard'), 100)} | "
            f"{_fmt(mean.get('hd95'))} | {_fmt(mean.get('asd'))} | {per_class} | {r['summary'].get('best_iteration', '-')} | "
            f"{_fmt(wall / 60.0 if wall else None, 1, 1)} min{partial} | {_fmt(sp.get('s_per_iteration_median'), 1, 3)} | "
            + (f"{_fmt(sp.get('ratio_to_supervised'), 1, 2)} (pass count {sp.get('pass_count', '-')}) | " if sp else "- | ")
            + " | ".join(_fmt(v) for v in paper) + " |")
    return "\n".join(lines)


def plot_learning_curves(rows: list[dict], out: Path, labeled: int) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in _plotted(rows, labeled) if r["history"]]
    if not chosen:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in chosen:
        its = [h["iteration"] for h in r["history"]]
        dice = [100 * h["val_mean_dice"] for h in r["history"]]
        ax.plot(its, dice, marker="o", label=r["label"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation mean Dice (%)")
    ax.set_title(f"ACDC-CPU v1, {LABELS[labeled]}: validation Dice during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _bundle_network(bundle: str, weights: Path):
    import torch
    from monai.bundle import ConfigParser

    from common.engines import load_weights

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    network = parser.get_parsed_content("network_def")
    load_weights(network, str(weights), map_location="cpu")
    return network.eval(), parser.get_parsed_content("patch_size")


def plot_examples(rows: list[dict], out: Path, dataset_dir: Path, case: str, labeled: int) -> Path | None:
    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from common.evaluation import ResizeToPatch

    chosen = [r for r in _plotted(rows, labeled) if (r["run"] / "models" / "model.pt").is_file()]
    path = dataset_dir / "data" / f"{case}.h5"
    if not chosen or not path.is_file():
        return None
    with h5py.File(path) as f:
        image, label = f["image"][()], f["label"][()]
    k = int(np.argmax([(s > 0).sum() for s in label]))  # the slice with the most foreground
    x = torch.as_tensor(image[k], dtype=torch.float32)[None, None]
    panels = [("image", None), ("ground truth", label[k])]
    for r in chosen:
        net, patch = _bundle_network(r["bundle"], r["run"] / "models" / "model.pt")
        with torch.no_grad():
            pred = ResizeToPatch(net, patch)(x).argmax(1)[0].numpy()
        panels.append((r["label"].replace(" (shipped)", ""), pred))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    cmap = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.55), (0.2, 0.8, 0.2, 0.55), (0.2, 0.4, 1.0, 0.55)])
    for ax, (title, seg) in zip(axes, panels):
        ax.imshow(image[k], cmap="gray")
        if seg is not None:
            ax.imshow(seg, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case}, slice {k} (RV red, MYO green, LV blue); ACDC-CPU v1, {LABELS[labeled]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="acdc_cpu_v1", help="run-name prefix of the runs to report")
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "data" / "ACDC"))
    parser.add_argument("--speed", default=str(REPO / "docs" / "speed_acdc_cpu_v1.jsonl"))
    parser.add_argument("--case", default="patient002_frame01", help="validation volume for the example figure")
    parser.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--extra", default=str(REPO / "docs" / "results_notes.md"),
                        help="markdown appended verbatim (machine, commands, caveats)")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(args.protocol)
    speed = speed_rows(Path(args.speed))
    figures = []
    for k in LABELS:
        curve = plot_learning_curves(rows, out.parent / f"learning_curves_{k}p.png", k)
        example = plot_examples(rows, out.parent / f"examples_{k}p.png", Path(args.dataset_dir), args.case, k)
        figures += [(f"Validation Dice during training, {LABELS[k]}", curve), (f"Example segmentations, {LABELS[k]}", example)]
    text = [
        "# Results",
        "",
        f"Generated by `python tools/report.py --dataset_dir {args.dataset_dir}` from the run folders "
        f"`bundles/<bundle>/runs/{args.protocol}_<K>p/` (validation-set evaluation of each run's best checkpoint by "
        "`evaluate.json`) and the speed rows of `tools/benchmark_speed.py`.",
        "",
        "Protocol: ACDC-CPU v1 (`benchmarks.md`): 128x128 slices, 4 labelled + 4 unlabelled per iteration "
        "(supervised: 4 labelled), 1500 iterations, seed 1337, best of the validations every 250 iterations, "
        "metrics on the 20 `val.list` volumes (mean over RV, MYO, LV; 95HD and ASD in voxels, medpy semantics). "
        "The paper columns are the published ACDC results (256x256, 30k iterations, GPU, test set): another "
        "protocol, shown for reference only.",
        "",
        results_table(rows, speed) if rows else "_No evaluated runs found._",
        "",
    ]
    for title, path in figures:
        if path is not None:
            text += [f"**{title}**", "", f"![{title}]({path.name})", ""]
    extra = Path(args.extra)
    if extra.is_file():
        text += [extra.read_text().strip(), ""]
    out.write_text("\n".join(text))
    print(f"wrote {out} ({len(rows)} runs, {sum(p is not None for _, p in figures)} figures)")


if __name__ == "__main__":
    main()
