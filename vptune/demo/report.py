"""The demo's outputs: the results table (markdown + JSON), the plot, and the mixed-batch check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vptune.artifact import atomic_write_bytes
from vptune.model import TunedModel
from vptune.multitask import MultiTaskModel

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep")
SHARED_METHODS = ("linear", "vpt-shallow", "vpt-deep")  # one backbone pass for all of them
LABEL_OFFSETS = {"linear": (9, 0), "full": (-60, 0), "vpt-shallow": (-14, -22), "vpt-deep": (9, 12)}
COLORS = {"linear": "#7f7f7f", "full": "#d62728", "vpt-shallow": "#1f77b4", "vpt-deep": "#2ca02c"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _range(values: list[int], fmt: Callable[[float], str]) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def results_table(results: list[dict[str, Any]], tasks: list[dict[str, Any]], methods: list[str]) -> str:
    """Markdown: task x method test top-1, the mean, then trainable parameters and bytes per task."""
    by = {(r["task"], r["method"]): r for r in results}
    head = "| task (stands in for) | classes | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for t in tasks:
        cells = []
        best = max(by[(t["name"], m)]["top1"] for m in methods if (t["name"], m) in by)
        for m in methods:
            r = by.get((t["name"], m))
            cells.append("-" if r is None else (f"**{r['top1']:.1f}**" if r["top1"] == best else f"{r['top1']:.1f}"))
        lines.append(f"| {t['name']} ({t['like']}) | {t['num_classes']} | " + " | ".join(cells) + " |")
    means = []
    for m in methods:
        vals = [by[(t["name"], m)]["top1"] for t in tasks if (t["name"], m) in by]
        means.append(f"{sum(vals) / len(vals):.1f}" if vals else "-")
    lines.append("| **mean test top-1 (%)** | | " + " | ".join(means) + " |")
    params, stored = [], []
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        params.append(_range([r["trainable_parameters"] for r in rs], lambda v: f"{int(v):,}") if rs else "-")
        stored.append(_range([r["stored_bytes"] for r in rs], human_bytes) if rs else "-")
    lines.append("| trainable parameters | | " + " | ".join(params) + " |")
    lines.append("| bytes stored per task | | " + " | ".join(stored) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, notes: list[str], table: str, mixed: dict[str, Any] | None) -> None:
    intro = "Test top-1 (%) of each method on each task (best in bold); chance = 100 / classes.\n"
    parts = [f"# {title}\n", *[f"- {n}" for n in notes], "", intro, table]
    if mixed:
        check = (f"\nAll {mixed['n_checked']} (image, task) pairs of the batch equal the per-task predictions: "
                 f"**{mixed['matches']}** (largest logit difference {mixed['max_abs_diff']:.2e}).\n")
        parts += ["\n## One mixed batch through one backbone\n", mixed["table"], check]
    atomic_write_bytes(path, "\n".join(parts).encode())


def plot(path: Path, results: list[dict[str, Any]], tasks: list[dict[str, Any]], methods: list[str],
         title: str) -> None:
    """Left: grouped bars of test top-1 per task (chance dashed). Right: mean top-1 against bytes
    stored per task (log x): VPT sits top-left, full fine-tuning far right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["task"], r["method"]): r for r in results}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        ys = [by[(t["name"], m)]["top1"] if (t["name"], m) in by else 0 for t in tasks]
        bars = ax.bar(xs, ys, width * 0.95, label=m, color=COLORS.get(m))
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    for i, t in enumerate(tasks):
        c = 100.0 / t["num_classes"]
        ax.plot([i - 0.45, i + 0.45], [c, c], "k--", lw=0.8, label="chance" if i == 0 else None)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t['name']}\n({t['like']})" for t in tasks], fontsize=9)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("accuracy per downstream task")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        acc = sum(r["top1"] for r in rs) / len(rs)
        size = sum(r["stored_bytes"] for r in rs) / len(rs)
        ax2.scatter([size], [acc], s=80, color=COLORS.get(m), zorder=3)
        dx, dy = LABEL_OFFSETS.get(m, (8, 6))
        ax2.annotate(f"{m}\n{human_bytes(size)}", (size, acc), textcoords="offset points", xytext=(dx, dy),
                     fontsize=8, va="center")
    ax2.set_xscale("log")
    ax2.set_xlabel("bytes stored per task (log scale)")
    ax2.set_ylabel("mean test top-1 (%)")
    lo = min((r["stored_bytes"] for r in results), default=1)
    hi = max((r["stored_bytes"] for r in results), default=10)
    ax2.set_xlim(lo / 3, hi * 8)
    ys = [r["top1"] for r in results]
    ax2.set_ylim(max(0, min(ys) - 10), min(100, max(ys) + 10))
    ax2.grid(True, which="major", alpha=0.3)
    ax2.set_title("accuracy vs storage per task")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mixed_batch(backbone: Any, task_dirs: dict[str, dict[str, Path]], samples: dict[str, tuple[torch.Tensor, torch.Tensor]],
                label_names: dict[str, list[str]], per_task: int = 3, show: str = "vpt-deep",
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load every prompt/linear task folder into one :class:`~vptune.multitask.MultiTaskModel` on the
    shared backbone, classify one batch that mixes images of several tasks (each image once per loaded
    method, all in one call), print the ``show`` method's rows, and compare every row with the task run
    alone (``TunedModel.from_pretrained``)."""
    mt = MultiTaskModel(backbone)
    entries = []  # (task, method, name)
    for task, dirs in task_dirs.items():
        for method, d in dirs.items():
            if method in SHARED_METHODS:
                name = f"{task}.{method}"
                mt.add_task(name, d)
                entries.append((task, method, name))
    # round-robin over tasks so that neighbours in the batch belong to different tasks
    order = [(t, i) for i in range(per_task) for t in samples if i < len(samples[t][0])]
    images = torch.stack([samples[t][0][i] for t, i in order])
    truth = [int(samples[t][1][i]) for t, i in order]
    methods = sorted({m for _, m, _ in entries}, key=SHARED_METHODS.index)
    rows, names = [], []
    for m in methods:
        for k, (t, _) in enumerate(order):
            if (t, m) in {(a, b) for a, b, _ in entries}:
                rows.append(k)
                names.append(f"{t}.{m}")
    with torch.inference_mode():
        logits = mt(images[rows], names)  # ONE call: every task and method in one mixed batch
    max_diff, matches = 0.0, True
    preds: dict[str, int] = {}
    for (task, method, name) in entries:
        alone = TunedModel.from_pretrained(task_dirs[task][method], backbone=backbone).eval()
        idx = [j for j, n in enumerate(names) if n == name]
        with torch.inference_mode():
            ref = alone(images[[rows[j] for j in idx]])
        got = torch.stack([logits[j] for j in idx])
        max_diff = max(max_diff, float((got - ref).abs().max()))
        matches &= bool(torch.equal(got.argmax(1), ref.argmax(1)))
        for j in idx:
            preds[f"{rows[j]}:{name}"] = int(logits[j].argmax())
    lines = ["| # | task | method | predicted | true | |", "|---|---|---|---|---|---|"]
    shown = []
    for k, (t, _) in enumerate(order):
        key = f"{k}:{t}.{show}"
        if key not in preds:
            continue
        p, y = preds[key], truth[k]
        names_t = label_names[t]
        lines.append(f"| {k} | {t} | {show} | {names_t[p]} | {names_t[y]} | {'ok' if p == y else 'x'} |")
        shown.append({"index": k, "task": t, "method": show, "predicted": names_t[p], "true": names_t[y]})
    table = "\n".join(lines) + "\n"
    return {"table": table, "rows": shown, "n_images": len(order), "n_checked": len(names),
            "tasks_loaded": [n for _, _, n in entries], "matches": matches and max_diff < 1e-3,
            "max_abs_diff": max_diff, "shared_passes_mix_prompts": bool(mt.mixes_prompts)}
