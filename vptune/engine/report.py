"""``vptune report RUNS``: tables and plots of finished runs, in the paper's conventions.

For every (task, method): last-epoch test top-1 mean ± std over seeds (sample standard deviation, ddof=1;
one seed shows ± 0.00), the trainable parameters and the bytes stored per task, and the data format the
runs read (TFDS TFRecords vs the JPEG-folder export, which can differ by points: REFERENCE.md
"Benchmarks"). Per method: the mean of each task group, both overall means in use (REFERENCE.md: the mean
of the tasks -- all 19 or those present -- and the mean of the group means) and the paper's "total params"
figure (Table 1): ``(backbone + the stored parameters of every task) / backbone``, e.g. 1.01x. A method
whose tasks store the whole backbone (full fine-tuning) shares nothing, so its figure is
``sum(stored) / backbone`` (the paper's 24.02x for Full on 24 tasks).

Runs are found by their ``result.json``; the sweep layout ``<task>/<method>/final/seed{s}[_frac{f}]/``
names task, method and seed, any other run folder is read from its config (task = data folder name).
Grid runs (``.../grid/...``) and runs without a test result are left out.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vptune.data import detect_format, list_vtab_tasks
from vptune.data.tasks import canonical_task
from vptune.errors import VptuneError

OTHER = "Other"
GROUP_ORDER = ("Natural", "Specialized", "Structured", OTHER)
# Task names outside the 19 VTAB-1k tasks (mini-VTAB and friends) -> group, first match wins.
MINI_GROUPS: tuple[tuple[str, str], ...] = (
    ("dtd*", "Natural"), ("cifar*", "Natural"), ("mnist*", "Natural"), ("fashion*mnist*", "Natural"),
    ("caltech*", "Natural"), ("svhn*", "Natural"), ("*flowers*", "Natural"), ("*pet*", "Natural"),
    ("sun397*", "Natural"), ("eurosat*", "Specialized"), ("resisc*", "Specialized"),
    ("patch_camelyon*", "Specialized"), ("pcam*", "Specialized"), ("*retinopathy*", "Specialized"),
    ("dsprites*", "Structured"), ("clevr*", "Structured"), ("smallnorb*", "Structured"),
    ("dmlab*", "Structured"), ("kitti*", "Structured"),
)
FORMAT_NAMES = {"tfrecord": "TFDS (TFRecord)", "vtab": "JPEG folder (VTAB-1k export)", "class-folder": "image folder",
                "fgvc": "FGVC json + images", "idx": "idx arrays", "npz": "npz arrays"}
_FINAL_DIR = re.compile(r"^seed(?P<seed>-?\d+)(?:_frac(?P<frac>[0-9.e-]+))?$")


def task_group(name: str) -> str:
    """The VTAB group of a task: the 19-task table (aliases included), then :data:`MINI_GROUPS`, else Other."""
    key = canonical_task(name)
    if key is not None:
        return list_vtab_tasks()[key][1]
    low = name.lower()
    return next((g for pattern, g in MINI_GROUPS if fnmatch.fnmatch(low, pattern)), OTHER)


def _task_order(name: str) -> tuple[int, int, str]:
    order = list(list_vtab_tasks())
    key = canonical_task(name)
    return GROUP_ORDER.index(task_group(name)), order.index(key) if key else len(order), name


# the paper's column order (Table 1); methods it does not name follow, by name
METHOD_ORDER = ("full", "linear", "partial", "mlp", "sidetune", "bias", "adapter", "vpt-shallow", "vpt-deep")


def _method_order(label: str) -> tuple[int, str, int, str]:
    """Sort key of a method label like ``partial-1`` or ``vpt-deep (frac 0.5)``: paper order, then k."""
    base = label.split(" (")[0]
    found = re.fullmatch(r"(?P<family>.+?)-(?P<k>\d+)", base)
    family, k = (found["family"], int(found["k"])) if found and found["family"] in METHOD_ORDER else (base, 0)
    rank = METHOD_ORDER.index(family) if family in METHOD_ORDER else len(METHOD_ORDER)
    return rank, family, k, label


# ------------------------------------------------------------------------------------------------------
# reading runs
# ------------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One finished run with a test result."""

    task: str
    method: str
    seed: int
    test_top1: float
    trainable_parameters: int
    stored_bytes: int
    backbone_parameters: int
    data_format: str
    path: str


def data_format_of(result: dict[str, Any]) -> str:
    """Which data format a run read, from its config ("auto" resolved when the folder still exists)."""
    cfg_data = (result.get("config") or {}).get("data") or {}
    fmt = (result.get("data") or {}).get("format") or cfg_data.get("format") or "auto"
    root = (result.get("data") or {}).get("root") or cfg_data.get("root")
    if fmt == "auto" and root and Path(root).exists():
        try:
            fmt = detect_format(str(root))
        except VptuneError:
            pass
    return FORMAT_NAMES.get(fmt, "unknown (format auto, data folder gone)" if fmt == "auto" else fmt)


def _identify(path: Path, result: dict[str, Any]) -> tuple[str, str, int] | None:
    """(task, method label, seed) from the sweep layout, else from the run's config; None for grid runs."""
    parts = path.parts
    if "grid" in parts[-3:-1]:
        return None
    m = _FINAL_DIR.match(path.name)
    if m and len(parts) >= 4 and parts[-2] == "final":
        frac = float(m["frac"]) if m["frac"] else 1.0
        method = parts[-3] + (f" (frac {frac:g})" if frac != 1.0 else "")
        return parts[-4], method, int(m["seed"])
    cfg = result.get("config") or {}
    root = (cfg.get("data") or {}).get("root") or "?"
    frac = float((cfg.get("data") or {}).get("fraction", 1.0))
    method = str(result.get("method") or (cfg.get("method") or {}).get("name", "?"))
    method += f" (frac {frac:g})" if frac != 1.0 else ""
    return Path(root).name or "?", method, int((cfg.get("runtime") or {}).get("seed", 0))


def find_runs(paths: Sequence[str | Path]) -> list[RunRecord]:
    """Every finished run (``result.json`` with a test top-1) under ``paths``, grid runs left out."""
    records = []
    for base in paths:
        base = Path(base)
        if not base.exists():
            raise VptuneError(f"no such runs folder: {base}")
        files = [base] if base.is_file() else sorted(base.rglob("result.json"))
        for f in files:
            try:
                result = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            who = _identify(f.parent.resolve(), result) if isinstance(result, dict) else None
            test = (result.get("test") or {}).get("top1") if who else None
            if who is None or test is None:
                continue
            records.append(RunRecord(who[0], who[1], who[2], float(test), int(result.get("trainable_parameters") or 0),
                                     int(result.get("stored_bytes") or 0), int(result.get("backbone_parameters") or 0),
                                     data_format_of(result), str(f.parent)))
    return records


# ------------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (task, method): test top-1 over seeds."""

    task: str
    group: str
    method: str
    values: list[float]
    seeds: list[int]
    trainable_parameters: int
    stored_bytes: int
    formats: list[str]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


@dataclass
class MethodSummary:
    method: str
    tasks: int
    group_means: dict[str, float]
    mean_tasks: float  # mean over the tasks present
    mean_groups: float  # mean of the group means
    trainable_per_task: float
    stored_bytes_per_task: float
    total_params: float  # the paper's multiple of the backbone
    formats: list[str] = field(default_factory=list)


@dataclass
class Report:
    tasks: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell]
    summaries: dict[str, MethodSummary]
    all_vtab: bool  # the 19 VTAB-1k tasks are all present


def total_params_multiple(backbone: int, stored: Sequence[int]) -> float:
    """``(backbone + sum(stored)) / backbone``; a method whose task stores the whole backbone shares
    none: ``sum(stored) / backbone`` (paper Table 1, "Total params")."""
    if backbone <= 0:
        return math.nan
    shared = 0 if any(s >= backbone for s in stored) else backbone
    return (shared + sum(stored)) / backbone


def _summarise(method: str, cells: list[Cell], backbone: int) -> MethodSummary:
    groups: dict[str, list[float]] = {}
    for c in cells:
        groups.setdefault(c.group, []).append(c.mean)
    group_means = {g: statistics.fmean(groups[g]) for g in GROUP_ORDER if g in groups}
    stored = [c.trainable_parameters for c in cells]
    return MethodSummary(method, len(cells), group_means, statistics.fmean(c.mean for c in cells),
                         statistics.fmean(group_means.values()), statistics.fmean(stored),
                         statistics.fmean(c.stored_bytes for c in cells), total_params_multiple(backbone, stored),
                         sorted({f for c in cells for f in c.formats}))


def build_report(records: Sequence[RunRecord]) -> Report:
    """Cells per (task, method) and summaries per method (see the module docstring for the rules)."""
    if not records:
        raise VptuneError("no finished runs with a test result found (grid runs are not reported)")
    by_cell: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        by_cell.setdefault((r.task, r.method), []).append(r)
    cells = {}
    for (task, method), rs in by_cell.items():
        rs = sorted(rs, key=lambda r: r.seed)
        cells[(task, method)] = Cell(task, task_group(task), method, [r.test_top1 for r in rs], [r.seed for r in rs],
                                     round(statistics.fmean(r.trainable_parameters for r in rs)),
                                     round(statistics.fmean(r.stored_bytes for r in rs)), sorted({r.data_format for r in rs}))
    tasks = sorted({t for t, _ in cells}, key=_task_order)
    methods = sorted({m for _, m in cells}, key=_method_order)
    backbone = {m: max(r.backbone_parameters for r in records if r.method == m) for m in methods}
    summaries = {m: _summarise(m, [cells[(t, m)] for t in tasks if (t, m) in cells], backbone[m]) for m in methods}
    all_vtab = len({canonical_task(t) for t in tasks} - {None}) == 19
    return Report(tasks, methods, cells, summaries, all_vtab)


# ------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------


def _pm(c: Cell | None) -> str:
    return f"{c.mean:.2f} ± {c.std:.2f} ({c.n})" if c else "–"


def _mean_label(report: Report) -> str:
    return "Mean of the 19 tasks" if report.all_vtab else f"Mean of the tasks present ({len(report.tasks)})"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e4 else f"{n:,.0f}"


def to_markdown(report: Report, sources: Sequence[str] = ()) -> str:
    """The report as markdown: accuracy per task x method with group and overall means, then parameters."""
    ms = report.methods
    lines = ["# vptune report", ""]
    if sources:
        lines += [f"Runs from: {', '.join(str(s) for s in sources)}", ""]
    lines += ["Test top-1 (%) at the last epoch: mean ± sample std over seeds (number of seeds).", "",
              "| Group | Task | " + " | ".join(ms) + " |", "|---|---|" + "---|" * len(ms)]
    for t in report.tasks:
        lines.append(f"| {task_group(t)} | {t} | " + " | ".join(_pm(report.cells.get((t, m))) for m in ms) + " |")
    groups = [g for g in GROUP_ORDER if any(task_group(t) == g for t in report.tasks)]
    for g in groups:
        vals = [report.summaries[m].group_means.get(g) for m in ms]
        lines.append(f"| **{g}** | group mean | " + " | ".join(f"{v:.2f}" if v is not None else "–" for v in vals) + " |")
    lines.append(f"| **All** | {_mean_label(report)} | " + " | ".join(f"{report.summaries[m].mean_tasks:.2f}" for m in ms) + " |")
    lines.append(f"| **All** | Mean of the group means ({len(groups)}) | "
                 + " | ".join(f"{report.summaries[m].mean_groups:.2f}" for m in ms) + " |")
    lines += ["", "## Parameters and storage", "",
              "| Method | Tasks | Trainable params / task | Stored bytes / task | Total params | Data format |",
              "|---|---|---|---|---|---|"]
    for m in ms:
        s = report.summaries[m]
        lines.append(f"| {m} | {s.tasks} | {_count(s.trainable_per_task)} | {_count(s.stored_bytes_per_task)}B | "
                     f"{s.total_params:.2f}x | {', '.join(s.formats)} |")
    lines += ["", ("Total params: (backbone + every task's stored parameters) / backbone (paper Table 1); a method "
                   "whose tasks store the whole backbone counts no shared copy.")]
    return "\n".join(lines) + "\n"


def write_csv(report: Report, cells_path: str | Path, summary_path: str | Path) -> None:
    """``cells_path``: one row per (task, method); ``summary_path``: one row per method."""
    with open(cells_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "group", "method", "n_seeds", "mean_top1", "std_top1", "values", "seeds",
                    "trainable_parameters", "stored_bytes", "data_format"])
        for t in report.tasks:
            for m in report.methods:
                c = report.cells.get((t, m))
                if c:
                    w.writerow([t, c.group, m, c.n, f"{c.mean:.4f}", f"{c.std:.4f}", ";".join(f"{v:g}" for v in c.values),
                                ";".join(map(str, c.seeds)), c.trainable_parameters, c.stored_bytes, "; ".join(c.formats)])
    with open(summary_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "tasks", *(f"mean_{g.lower()}" for g in GROUP_ORDER), "mean_tasks",
                    "mean_group_means", "trainable_per_task", "stored_bytes_per_task", "total_params_x", "data_format"])
        for m in report.methods:
            s = report.summaries[m]
            gm = [f"{s.group_means[g]:.4f}" if g in s.group_means else "" for g in GROUP_ORDER]
            w.writerow([m, s.tasks, *gm, f"{s.mean_tasks:.4f}", f"{s.mean_groups:.4f}", f"{s.trainable_per_task:.0f}",
                        f"{s.stored_bytes_per_task:.0f}", f"{s.total_params:.4f}", "; ".join(s.formats)])


# ------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_params(report: Report, path: str | Path) -> Path:
    """Mean test top-1 over tasks against trainable parameters per task (log x), one point per method."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [max(report.summaries[m].trainable_per_task, 1.0) for m in report.methods]
    for m, x in zip(report.methods, xs):
        y = report.summaries[m].mean_tasks
        ax.scatter([x], [y], s=40)
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 3, max(xs) * 3)  # at least one decade shown
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("trainable parameters per task (log scale)")
    ax.set_ylabel("mean test top-1 (%)")
    ax.set_title(_mean_label(report), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_per_task(report: Report, path: str | Path) -> Path:
    """Grouped bars: test top-1 per task, one bar per method, error bars = std over seeds."""
    plt = _pyplot()
    n_t, n_m = len(report.tasks), len(report.methods)
    width = 0.8 / max(n_m, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * n_t * max(n_m, 1) ** 0.5 + 2), 4))
    for j, m in enumerate(report.methods):
        cells = [report.cells.get((t, m)) for t in report.tasks]
        xs = [i + (j - (n_m - 1) / 2) * width for i in range(n_t)]
        ax.bar(xs, [c.mean if c else 0.0 for c in cells], width, yerr=[c.std if c else 0.0 for c in cells],
               label=m, capsize=2)
    ax.set_xticks(range(n_t))
    ax.set_xticklabels(report.tasks, rotation=45, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(paths: Sequence[str | Path], out: str | Path, *, plots: bool = True) -> tuple[Report, dict[str, Path]]:
    """Find the runs under ``paths`` and write ``report.md``, ``report.csv``, ``summary.csv`` and (with
    ``plots``) ``accuracy_vs_params.png`` and ``per_task.png`` into ``out``."""
    report = build_report(find_runs(paths))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "summary": out / "summary.csv"}
    files["markdown"].write_text(to_markdown(report, [str(p) for p in paths]))
    write_csv(report, files["csv"], files["summary"])
    if plots:
        files["accuracy_vs_params"] = plot_accuracy_vs_params(report, out / "accuracy_vs_params.png")
        files["per_task"] = plot_per_task(report, out / "per_task.png")
    return report, files
