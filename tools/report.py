"""Results report: reads run folders and committed run records and writes ``docs/results.md`` with the comparison
table, learning curves and example segmentations.

For every bundle and labelled count it reads ``bundles/<b>/runs/<protocol>_<K>p[_<variant>]/``: ``summary.json``
(training time, best iteration), ``eval/summary.json`` (per-class metrics of the best model on the validation set,
from ``evaluate.json``) and ``models/validation.jsonl`` (learning curve). Run folders are git-ignored and do not
outlive the machine that trained them, so every evaluated run folder is also archived as a small committed record
``docs/runs/<b>/<run>.json`` (eval summary, training summary, validation history, sha256 of the run's best
``models/model.pt``; scheme in ``docs/runs/README.md``). The table is built from the records, a run folder replacing
the record of the same name when both exist, so a clean checkout regenerates the same rows. "(shipped)" marks the
run whose best model is the bundle's ``models/model.pt`` (same bytes; for a record, same sha256).

Speed rows come from a JSON-lines file written by ``tools/benchmark_speed.py --out``. The papers' numbers sit in
their own columns: they come from another protocol (256x256, 30k iterations, GPU) and are never mixed with ours.

    python tools/report.py --dataset_dir ../shared/data/ACDC   # archives the records, writes docs/results.md, PNGs
    python tools/report.py --archive                           # only writes/refreshes the docs/runs/ records
    python tools/report.py --no_archive --no_figures --out /tmp/r/results.md   # a look at the table only
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
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
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def records_dir() -> Path:
    """``docs/runs/``: one committed record per evaluated run, ``<bundle>/<run name>.json``."""
    return REPO / "docs" / "runs"


def _names(protocol: str, k: int, names: list[str]) -> list[str]:
    """The run names of ``names`` that belong to ``<protocol>_<k>p``: the default run and its ``_<variant>`` runs."""
    base = f"{protocol}_{k}p"
    return [n for n in names if n == base or n.startswith(base + "_")]


def _evaluated_run_folders(protocol: str) -> list[tuple[str, int, Path]]:
    out = []
    for bundle in BUNDLE_ORDER:
        runs = REPO / "bundles" / bundle / "runs"
        folders = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
        for k in LABELS:
            for name in _names(protocol, k, folders):
                if (runs / name / "eval" / "summary.json").is_file():
                    out.append((bundle, k, runs / name))
    return out


def _machine() -> dict:
    """CPU model and core count of this machine (the one that held the run folder when it was archived)."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count()}


def record_of_run(bundle: str, labeled: int, run: Path, protocol: str) -> dict:
    """The committed record of an evaluated run folder (see ``docs/runs/README.md``)."""
    base = f"{protocol}_{labeled}p"
    summary = _load_json(run / "summary.json") or {}
    summary.pop("best_model", None)  # an absolute path on the machine that trained it
    return {
        "record_version": 1,
        "run": run.name,
        "bundle": bundle,
        "protocol": protocol,
        "labeled": labeled,
        "variant": run.name[len(base) + 1:] or None,
        "source": f"archived by tools/report.py from the run folder bundles/{bundle}/runs/{run.name}/ (summary.json, "
                  "eval/summary.json, models/validation.jsonl, sha256 of models/model.pt)",
        "archived": {"date": datetime.date.today().isoformat(), **_machine()},
        "model_sha256": _sha256(run / "models" / "model.pt"),
        "eval": _load_json(run / "eval" / "summary.json"),
        "summary": summary,
        "history": _history(run),
    }


def _git_ignored(path: Path) -> bool:
    try:
        return subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def archive_runs(protocol: str, records: Path | None = None) -> list[Path]:
    """Write or refresh the record of every evaluated run folder of ``protocol``; returns the files written (a
    record whose content is unchanged apart from its ``archived`` date/machine is left alone)."""
    records = records or records_dir()
    written = []
    for bundle, k, run in _evaluated_run_folders(protocol):
        record = record_of_run(bundle, k, run, protocol)
        path = records / bundle / f"{run.name}.json"
        old = _load_json(path)
        if old is not None:
            if {**old, "archived": None} == {**record, "archived": None}:
                continue
            if old.get("model_sha256") != record["model_sha256"]:
                print(f"note: {path} described another run ({old.get('source')}); replaced by the record of the run "
                      f"folder {run} (the old record stays in git history; to keep its row, rename it first, see "
                      "docs/runs/README.md)")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        written.append(path)
    if written and _git_ignored(written[0]):
        print(f"WARNING: {written[0]} is git-ignored, so the records would not be committed: add `!docs/runs/` "
              "after `runs/` in .gitignore")
    return written


def load_records(protocol: str, records: Path | None = None) -> dict[tuple[str, str], dict]:
    """``(bundle, run name) -> record`` of every record of ``protocol`` under ``records``."""
    records = records or records_dir()
    out = {}
    for bundle in BUNDLE_ORDER:
        folder = records / bundle
        names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        for k in LABELS:
            for name in _names(protocol, k, names):
                record = json.loads((folder / f"{name}.json").read_text())
                if record.get("run") != name or record.get("bundle") != bundle:
                    raise ValueError(f"{folder / name}.json holds run {record.get('run')!r} of bundle "
                                     f"{record.get('bundle')!r}: a record's file is docs/runs/<bundle>/<run>.json")
                out[(bundle, name)] = record
    return out


def _history(run: Path) -> list[dict]:
    path = run / "models" / "validation.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _row_of_folder(run: Path, shipped_weights: Path) -> dict:
    weights = run / "models" / "model.pt"
    return {"run": run, "record": None, "source": None, "superseded": False, "original_run": run.name,
            "eval": _load_json(run / "eval" / "summary.json"), "summary": _load_json(run / "summary.json") or {},
            "history": _history(run), "shipped": _same_file(weights, shipped_weights),
            "weights": weights if weights.is_file() else None,
            "machine": _machine()}  # the run folder is on this machine


def _row_of_record(record: dict, shipped_weights: Path, shipped_sha: str | None) -> dict:
    shipped = record.get("model_sha256") is not None and record.get("model_sha256") == shipped_sha
    archived = record.get("archived") or {}
    return {"run": None, "record": record, "source": record.get("source"),
            "superseded": bool(record.get("superseded")), "original_run": record.get("original_run", record["run"]),
            "eval": record.get("eval") or {}, "summary": record.get("summary") or {},
            "history": record.get("history") or [], "shipped": shipped,
            # a record has no weights of its own: the shipped row's are the bundle's (same sha256)
            "weights": shipped_weights if shipped else None,
            "machine": {key: archived.get(key) for key in ("cpu", "cores")}}


def collect_runs(protocol: str, records: Path | None = None) -> list[dict]:
    """One row per evaluated run of ``protocol``: the bundle's default run ``<protocol>_<K>p`` and its variants
    ``<protocol>_<K>p_<variant>`` (other overlays or options, e.g. a Table-2 base method), from the run folder
    when it is here, else from its committed record. ``shipped`` marks the run whose best model is the bundle's
    ``models/model.pt``; ``method_row`` the row that carries the method's speed and paper columns (the default run,
    or while there is none, the superseded record of an earlier default run)."""
    stored = load_records(protocol, records)
    folders = {(bundle, run.name): run for bundle, _, run in _evaluated_run_folders(protocol)}
    rows = []
    for bundle in BUNDLE_ORDER:
        shipped_weights = REPO / "bundles" / bundle / "models" / "model.pt"
        shipped_sha = _sha256(shipped_weights) if any(b == bundle for b, _ in stored) else None
        known = sorted({name for b, name in [*stored, *folders] if b == bundle})
        for k in LABELS:
            base = f"{protocol}_{k}p"
            bundle_rows = []
            for name in _names(protocol, k, known):
                if (bundle, name) in folders:  # the run folder wins over its record
                    row = _row_of_folder(folders[(bundle, name)], shipped_weights)
                else:
                    row = _row_of_record(stored[(bundle, name)], shipped_weights, shipped_sha)
                variant = name[len(base) + 1:] or None
                label = bundle + (f" [{variant}]" if variant else "") + (" (shipped)" if row["shipped"] else "")
                row.update({"bundle": bundle, "variant": variant, "labeled": k, "name": name, "label": label})
                bundle_rows.append(row)
            # the default run first, then the variants by name; a superseded record right after its original name's run
            bundle_rows.sort(key=lambda r: (r["original_run"] != base, r["original_run"], r["superseded"], r["name"]))
            has_default = any(r["variant"] is None for r in bundle_rows)
            for r in bundle_rows:
                r["method_row"] = r["variant"] is None or (not has_default and r["superseded"]
                                                           and r["original_run"] == base)
            rows += bundle_rows
    return rows


def _plotted(rows: list[dict], labeled: int) -> list[dict]:
    """Default runs and shipped variants: one curve / panel per method."""
    return [r for r in rows if r["labeled"] == labeled and (r["method_row"] or r["shipped"])]


def speed_rows(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "error" not in row:
                    out[row["bundle"]] = row  # the last measurement of a bundle wins
    return out


def speed_machine(speed: dict[str, dict]) -> str:
    """Where the speed rows were measured, from their ``cpu`` / ``cores`` / ``threads`` fields."""
    machines: dict[str, list[str]] = {}
    for bundle, row in speed.items():
        if row.get("cpu"):
            what = f"{row['cpu']}" + (f", {row['cores']} cores" if row.get("cores") else "") + \
                (f", {row['threads']} torch threads" if row.get("threads") else "")
        else:
            what = "machine not recorded"
        machines.setdefault(what, []).append(bundle)
    if len(machines) == 1:
        return next(iter(machines))
    return "; ".join(f"{', '.join(bundles)}: {what}" for what, bundles in machines.items())


def _wall_minutes(summary: dict) -> float | None:
    if summary.get("wall_time_s"):
        return summary["wall_time_s"] / 60.0
    return summary.get("wall_time_min")  # a record carried over from a printed table: minutes as printed


def results_table(rows: list[dict], speed: dict[str, dict]) -> str:
    head = ("| method | labelled | Dice % | Jaccard % | 95HD | ASD | RV / MYO / LV Dice % | best it. | train time | "
            "s/it | ratio to supervised | paper Dice % | paper Jaccard % | paper 95HD | paper ASD |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        mean = r["eval"].get("mean", {})
        per_class = " / ".join(_fmt(r["eval"].get(c, {}).get("dice"), 100, 1) for c in ("RV", "MYO", "LV"))
        s = r["summary"]
        wall = s.get("wall_time_s")
        done, this_session = s.get("iterations"), s.get("iterations_this_session")
        # a run resumed from a checkpoint without the summary's state knows only its last session's time
        last_session_only = s.get("wall_time_last_session_only")
        if last_session_only is None:
            last_session_only = bool(wall and this_session and done and this_session < done and
                                     s.get("wall_time_this_session_s", wall) == wall)
        partial = f" (last {this_session} it.)" if last_session_only and this_session else ""
        # a variant may change the step (another base method): the bundle's speed row describes the default step
        method_row = r.get("method_row", r["variant"] is None)
        sp = speed.get(r["bundle"], {}) if method_row else {}
        paper = PAPER_ACDC.get(r["bundle"], {}).get(r["labeled"], (None,) * 4) if method_row else (None,) * 4
        lines.append(
            f"| {r['label']} | {LABELS[r['labeled']]} | {_fmt(mean.get('dice'), 100)} | {_fmt(mean.get('jaccard'), 100)} | "
            f"{_fmt(mean.get('hd95'))} | {_fmt(mean.get('asd'))} | {per_class} | {s.get('best_iteration', '-')} | "
            f"{_fmt(_wall_minutes(s), 1, 1)} min{partial} | {_fmt(sp.get('s_per_iteration_median'), 1, 3)} | "
            + (f"{_fmt(sp.get('ratio_to_supervised'), 1, 2)} (pass count {sp.get('pass_count', '-')}) | " if sp else "- | ")
            + " | ".join(_fmt(v) for v in paper) + " |")
    return "\n".join(lines)


def provenance(rows: list[dict], speed: dict[str, dict], speed_path: Path) -> str:
    """The lines under the table: where the speed rows were measured, and which rows come from records."""
    try:
        shown = speed_path.resolve().relative_to(REPO)
    except ValueError:
        shown = speed_path
    text = []
    if speed:
        text.append(f"The s/it and ratio columns were measured by `tools/benchmark_speed.py` (`{shown}`) on: "
                    f"{speed_machine(speed)}; not necessarily the machine of the accuracy runs.")
    by_machine: dict[str, list[str]] = {}
    for r in rows:
        m = r.get("machine") or {}
        if m.get("cpu"):
            what = m["cpu"] + (f", {m['cores']} cores" if m.get("cores") else "")
            by_machine.setdefault(what, []).append(f"{r['label']}, {r['labeled']}p")
    if by_machine:
        text.append("Machine that held the run folder (where it was trained and evaluated, or archived): "
                    + "; ".join(f"{what} ({'; '.join(labels)})" for what, labels in by_machine.items())
                    + (". Other rows: machine not recorded (see the notes below)." if
                       sum(map(len, by_machine.values())) < len(rows) else "."))
    by_source: dict[str, list[str]] = {}
    for r in rows:
        if r["record"] is not None:
            by_source.setdefault(r["source"] or "no source given", []).append(f"{r['label']}, {r['labeled']}p")
    if by_source:
        text.append("Rows whose run folder was not on the machine that generated this page come from their "
                    "committed records `docs/runs/<bundle>/<run>.json`:\n\n"
                    + "\n".join(f"- {'; '.join(labels)}: {source}." for source, labels in by_source.items()))
    return "\n\n".join(text)


def compare_rows(path: Path) -> list[dict]:
    """The rows of the newest ``tools/benchmark_speed.py --compare`` run in ``path`` (JSON lines).

    A run is the set of rows sharing ``measured_at``; rows written before that field existed count as one older
    run each per bundle and arm (the last one wins). Runs that imposed one loader worker count on every arm
    (``num_workers_imposed``) are left out when a run with each arm's own default exists: the table compares the
    trees as users run them."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "error" not in r and "arm" in r]
    stamped = [r for r in rows if r.get("measured_at")]
    if stamped:
        defaults = [r for r in stamped if r.get("num_workers_imposed") is None]
        stamped = defaults or stamped
        newest = max(r["measured_at"] for r in stamped)
        return [r for r in stamped if r["measured_at"] == newest]
    last: dict[tuple[str, str], dict] = {}
    for r in rows:
        last[(r["bundle"], r["arm"])] = r
    return list(last.values())


def compare_table(rows: list[dict], shown: Path) -> str:
    """Per bundle: s/iteration of every arm and the speed-up of each against the first (the older commit)."""
    if not rows:
        return ""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    base = arms[0]
    head = ("| bundle | " + " | ".join(f"{a} s/it" for a in arms) + " | "
            + " | ".join(f"speed-up {a}" for a in arms[1:]) + " |")
    lines = [head, "|---" * (1 + 2 * len(arms) - 1) + "|"]
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        by = {r["arm"]: r for r in rows if r["bundle"] == bundle}
        if base not in by:
            continue
        cells = [_fmt(by[a]["s_per_iteration_median"], 1, 3) if a in by else "-" for a in arms]
        cells += [(f"{by[a]['speedup_vs_base']:.2f}x (paired {by[a]['speedup_median_of_paired_blocks']:.2f}x)"
                   if a in by else "-") for a in arms[1:]]
        lines.append(f"| {bundle} | " + " | ".join(cells) + " |")
    r0 = rows[0]
    where = f"{r0.get('cpu', 'machine not recorded')}, {r0.get('cores', '?')} cores, torch threads: {r0.get('threads', '?')}"
    when = f", measured {r0['measured_at']} on commit {r0.get('tree_commit', '?')}" if r0.get("measured_at") else ""
    workers = {r["arm"]: r.get("num_workers") for r in rows if r["bundle"] == r0["bundle"]}
    loader = ("; loader workers per stream: " + ", ".join(f"{a} {w}" for a, w in workers.items())
              if all(w is not None for w in workers.values()) else "")
    return "\n".join([
        "## Training step against the commit before the fast path (issue 16)",
        "",
        f"`tools/benchmark_speed.py --compare` (`{shown}`, newest run{when}): each arm in its own process on {where}; "
        f"{r0.get('batch', '')} ACDC-CPU v1 batches; {r0.get('schedule', '')}{loader}. Speed-up = "
        "median s/it of the first arm over the arm's; paired = median over rounds of the per-round ratio. Details, "
        "the GPU rows and what was tried: `docs/speed_fast_path.md`.",
        "",
        *lines,
    ])


README_START = "<!-- results-table: written by tools/report.py -->"
README_END = "<!-- /results-table -->"


def readme_table(rows: list[dict], speed: dict[str, dict]) -> str:
    """The README's compact table: the columns of :func:`results_table` a reader compares first."""
    lines = ["| method | labelled | Dice % | Jaccard % | 95HD | ASD | s/it | ratio to supervised |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mean = r["eval"].get("mean", {})
        sp = speed.get(r["bundle"], {}) if r["variant"] is None else {}
        lines.append(
            f"| {r['label']} | {LABELS[r['labeled']]} | {_fmt(mean.get('dice'), 100)} | {_fmt(mean.get('jaccard'), 100)} | "
            f"{_fmt(mean.get('hd95'))} | {_fmt(mean.get('asd'))} | {_fmt(sp.get('s_per_iteration_median'), 1, 3)} | "
            + (f"{_fmt(sp.get('ratio_to_supervised'), 1, 2)} (pass count {sp.get('pass_count', '-')}) |" if sp else "- |"))
    return "\n".join(lines)


def write_readme_table(readme: Path, table: str) -> bool:
    """Replace the block between the README's results-table markers; False (and nothing written) without them."""
    text = readme.read_text() if readme.is_file() else ""
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{table}\n{README_END}{tail}")
    return True


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

    # a record has no weights of its own; the shipped row's are the bundle's models/model.pt (same sha256)
    chosen = [r for r in _plotted(rows, labeled) if r["weights"] is not None and r["weights"].is_file()]
    path = dataset_dir / "data" / f"{case}.h5"
    if not chosen or not path.is_file():
        return None
    with h5py.File(path) as f:
        image, label = f["image"][()], f["label"][()]
    k = int(np.argmax([(s > 0).sum() for s in label]))  # the slice with the most foreground
    x = torch.as_tensor(image[k], dtype=torch.float32)[None, None]
    panels = [("image", None), ("ground truth", label[k])]
    for r in chosen:
        net, patch = _bundle_network(r["bundle"], r["weights"])
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
    parser.add_argument("--speed_compare", default=str(REPO / "docs" / "speed_compare_issue16.jsonl"),
                        help="JSON lines of tools/benchmark_speed.py --compare (the newest run is tabulated)")
    parser.add_argument("--case", default="patient002_frame01", help="validation volume for the example figure")
    parser.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--extra", default=str(REPO / "docs" / "results_notes.md"),
                        help="markdown appended verbatim (machine, commands, caveats)")
    parser.add_argument("--records", default=None, help="folder of the run records (default: docs/runs)")
    parser.add_argument("--archive", action="store_true",
                        help="only write/refresh the records of the evaluated run folders here, no report")
    parser.add_argument("--no_archive", action="store_true",
                        help="do not write records (by default every report run archives the run folders first)")
    parser.add_argument("--no_figures", action="store_true", help="table only: no PNGs (no matplotlib/torch needed)")
    args = parser.parse_args()
    if args.archive and args.no_archive:
        parser.error("--archive and --no_archive exclude each other")
    records = Path(args.records) if args.records else None

    if not args.no_archive:
        written = archive_runs(args.protocol, records)
        print(f"archived {len(written)} run record(s)" + "".join(f"\n  {p}" for p in written))
        if args.archive:
            return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(args.protocol, records)
    speed = speed_rows(Path(args.speed))
    figures = []
    for k in LABELS if not args.no_figures else []:
        curve = plot_learning_curves(rows, out.parent / f"learning_curves_{k}p.png", k)
        example = plot_examples(rows, out.parent / f"examples_{k}p.png", Path(args.dataset_dir), args.case, k)
        figures += [(f"Validation Dice during training, {LABELS[k]}", curve), (f"Example segmentations, {LABELS[k]}", example)]
    text = [
        "# Results",
        "",
        f"Generated by `python tools/report.py --dataset_dir {args.dataset_dir}` from the run folders "
        f"`bundles/<bundle>/runs/{args.protocol}_<K>p/` (validation-set evaluation of each run's best checkpoint by "
        "`evaluate.json`) or, where a run folder is not here, its committed record `docs/runs/<bundle>/<run>.json`, "
        "and the speed rows of `tools/benchmark_speed.py`.",
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
    notes = provenance(rows, speed, Path(args.speed))
    if notes:
        text += [notes, ""]
    compare_path = Path(args.speed_compare)
    try:
        compare_shown = compare_path.resolve().relative_to(REPO)
    except ValueError:
        compare_shown = compare_path
    compared = compare_table(compare_rows(compare_path), compare_shown)
    if compared:
        text += [compared, ""]
    for title, path in figures:
        if path is not None:
            text += [f"**{title}**", "", f"![{title}]({path.name})", ""]
    extra = Path(args.extra)
    if extra.is_file():
        text += [extra.read_text().strip(), ""]
    out.write_text("\n".join(text))
    print(f"wrote {out} ({len(rows)} runs, {sum(p is not None for _, p in figures)} figures)")
    if rows and out.resolve() == (REPO / "docs" / "results.md").resolve():
        if write_readme_table(REPO / "README.md", readme_table(rows, speed)):
            print(f"wrote the results table of {REPO / 'README.md'}")


if __name__ == "__main__":
    main()
