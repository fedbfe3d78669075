"""Recipe study: which optimiser, head norm and lr make VPT learn on a backbone with large features?

Validation only (the held-apart rule: no test split is opened): every run trains on train800 and is scored
on val200 (last epoch) of four mini-VTAB tasks, two Natural (caltech101, dtd10) and two Structured
(dsprites_loc, clevr_count), with the real ViT-Ti/16 at 112 px, batch 32, seed 0. Arms per method:
optimiser (SGD momentum 0.9 with the paper's linear lr scaling, or AdamW with the peak lr given as is) x
head norm (none, or a BatchNorm without affine before the head) x one or two lrs. The defaults of
``recipe: default`` (each method's ``optimizer``/``default_lr``, ``method.head_norm``) and the mini-VTAB
grids are chosen from this table (BENCHMARKS.md, "Recipe study").

    VPTUNE_ASSETS=/path/to/assets python benchmarks/recipe_study.py            # resumes finished runs
    python benchmarks/recipe_study.py --report-only                              # table of what finished

Writes ``benchmarks/results/recipe_study.json`` (every run: config arm, val top-1, final train loss,
status, wall time, machine, commit) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._provenance import add_asset_args, git_commit, machine_info

TASKS = {"caltech101": "Natural", "dtd10": "Natural", "dsprites_loc": "Structured", "clevr_count": "Structured"}
WEIGHTS_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"
DATA = ROOT / "benchmarks/runs/data/mini_vtab"
OUT = ROOT / "benchmarks/runs/recipe_study"
RESULTS = ROOT / "benchmarks/results/recipe_study.json"
VPT = {"num_tokens": 10, "dropout": 0.1}
# (method, options, optimizer, lr_scaling, head_norm, lrs). SGD lrs are the paper's base lrs (scaled by
# batch/256); AdamW lrs are peak lrs. SGD/none for VPT is the old recipe (0.02 was the best that learned).
ARMS: list[tuple[str, dict, str, str, str, tuple[float, ...]]] = [
    ("vpt-deep", VPT, "sgd", "linear", "none", (0.02,)),
    ("vpt-deep", VPT, "adamw", "none", "none", (1e-2, 3e-3)),
    ("vpt-deep", VPT, "adamw", "none", "batchnorm", (1e-2, 3e-3)),
    ("vpt-deep", VPT, "sgd", "linear", "batchnorm", (2.5,)),
    ("linear", {}, "sgd", "linear", "none", (2.5,)),
    ("linear", {}, "sgd", "linear", "batchnorm", (2.5,)),
    ("linear", {}, "adamw", "none", "none", (1e-2,)),
    ("linear", {}, "adamw", "none", "batchnorm", (1e-2,)),
    ("full", {}, "adamw", "none", "none", (1e-4,)),
    ("full", {}, "adamw", "none", "batchnorm", (1e-4,)),
]


def arm_label(method: str, opt: str, norm: str, lr: float) -> str:
    return f"{method}_{opt}_{norm}_lr{lr:g}"


def run_config(task: str, method: str, options: dict, opt: str, scaling: str, norm: str, lr: float,
               args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backbone": {"name": "vit_tiny_patch16_224", "weights": args.weights, "input_size": 112},
        "method": {"name": method, "options": dict(options), "head_norm": norm},
        "data": {"root": str(Path(args.data) / task), "protocol": "vtab", "train_split": "train800",
                 "val_split": "val200", "test_split": None, "num_workers": 1},
        "optim": {"optimizer": opt, "lr_scaling": scaling, "base_lr": lr, "weight_decay": 1e-4,
                  "batch_size": 32, "epochs": args.epochs, "warmup_epochs": max(1, args.epochs // 10)},
        "runtime": {"seed": 0, "eval_every": 0, "progress": False, "precision": args.precision},
        "output": str(Path(args.out) / task / arm_label(method, opt, norm, lr)),
    }


def row_of(task: str, arm: tuple, lr: float, summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    method, _, opt, scaling, norm, _ = arm
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (folder / "metrics.jsonl").is_file() else []
    val = summary.get("val") or {}
    return {"task": task, "group": TASKS[task], "method": method, "optimizer": opt, "lr_scaling": scaling,
            "head_norm": norm, "lr": lr, "peak_lr": summary.get("lr"), "status": summary.get("status"),
            "val_top1": val.get("top1"), "final_train_loss": metrics[-1]["train_loss"] if metrics else None,
            "steps": summary.get("steps"), "precision": summary.get("precision"), "wall_s": summary.get("wall_s")}


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    from vptune.engine.config import config_from_dict
    from vptune.engine.trainer import read_result, run_training

    rows = []
    for arm in ARMS:
        method, options, opt, scaling, norm, lrs = arm
        if args.methods and method not in args.methods:
            continue
        for lr in lrs:
            for task in TASKS:
                d = run_config(task, method, options, opt, scaling, norm, lr, args)
                folder = Path(d["output"])
                if args.report_only:
                    summary = read_result(folder)
                    if summary is None:
                        continue
                else:
                    t = time.time()
                    summary = run_training(config_from_dict(d), resume=True)
                    print(f"{task:13s} {arm_label(method, opt, norm, lr):34s} {summary['status']:8s} val "
                          f"{(summary.get('val') or {}).get('top1', float('nan')):6.2f}  {time.time() - t:6.1f}s",
                          flush=True)
                rows.append(row_of(task, arm, lr, summary, folder))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (method, optimiser, head norm, lr), val top-1 per task and the mean."""
    arms: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        arms.setdefault((r["method"], r["optimizer"], r["head_norm"], r["lr"]), {})[r["task"]] = r
    head = "| method | optimiser | head norm | lr | " + " | ".join(TASKS) + " | mean |"
    lines = [head, "|" + "---|" * (5 + len(TASKS))]
    for (m, o, n, lr), by_task in arms.items():
        vals = [by_task.get(t, {}).get("val_top1") for t in TASKS]
        cells = ["div." if by_task.get(t, {}).get("status") == "diverged" else
                 ("-" if v is None else f"{v:.1f}") for t, v in zip(TASKS, vals)]
        done = [v if v is not None else 0.0 for v in vals]  # a diverged run counts as 0
        mean = f"{sum(done) / len(done):.1f}" if all(t in by_task for t in TASKS) else "-"
        lines.append(f"| {m} | {o} | {n} | {lr:g} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_asset_args(p, DATA, OUT)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--methods", default=None, help="comma list (default: all arms)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",") if args.methods else None
    if not args.assets and not args.report_only:
        p.error("set VPTUNE_ASSETS or pass --assets (the real ViT-Ti weights)")
    args.weights = str(Path(args.assets or ".") / "weights" / WEIGHTS_NAME)
    t0 = time.time()
    rows = run_all(args)
    writes = not args.report_only
    if args.methods:  # the results file holds every finished arm, not only those run now
        args.report_only, args.methods = True, None
        rows = run_all(args)
    out = {"what": __doc__.splitlines()[0], "fit": "train800", "scored_on": "val200 (last epoch)",
           "epochs": args.epochs, "batch_size": 32, "input_size": 112, "seed": 0,
           "command": "python benchmarks/recipe_study.py " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
           "machine": machine_info(), "wall_s": round(time.time() - t0, 1), "runs": rows}
    if writes:
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
