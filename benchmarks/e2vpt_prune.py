"""E2VPT's pruning and rewinding on real mini-VTAB tasks, validation only (no test split is opened).

Per task: vpt-kv with 10 input prompts and 5 key-value prompts per block trains on train800 and is scored
on val200 (last epoch; ViT-Ti/16 at 112 px, batch 32, 10 epochs, AdamW at vpt-kv's default lr, seed 0);
then ``vptune.engine.prune.prune_run`` prunes half of each block's prompt tokens and a quarter of the
remaining segments (4 per token) and retrains from the rewound initialisation; then a second round prunes
half of what is left. Finished runs are reused, so a rerun resumes.

    VPTUNE_ASSETS=/path/to/assets python benchmarks/e2vpt_prune.py [--tasks dtd10,dsprites_loc]

Writes ``benchmarks/results/e2vpt_prune.json`` (every stage: prompt tokens kept, segments pruned, val top-1,
wall time; machine, date, commit) and prints a markdown table.
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

WEIGHTS_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"
DATA = ROOT / "benchmarks/runs/data/mini_vtab"
OUT = ROOT / "benchmarks/runs/e2vpt_prune"
RESULTS = ROOT / "benchmarks/results/e2vpt_prune.json"
ROUNDS = [(0.5, 0.25), (0.5, 0.25)]  # (token fraction, segment fraction) per pruning round


def base_config(task: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backbone": {"name": "vit_tiny_patch16_224", "weights": args.weights, "input_size": 112},
        "method": {"name": "vpt-kv", "options": {"num_tokens": 10, "kv_tokens": 5, "dropout": 0.1}},
        "data": {"root": str(Path(args.data) / task), "protocol": "vtab", "train_split": "train800",
                 "val_split": "val200", "test_split": None, "num_workers": 1},
        "optim": {"batch_size": 32, "epochs": args.epochs, "warmup_epochs": 1},
        "runtime": {"seed": 0, "eval_every": 0, "progress": False, "precision": "auto"},
        "output": str(Path(args.out) / task / "round0"),
    }


def run_task(task: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from vptune.engine.config import config_from_dict
    from vptune.engine.prune import PRUNE_FILE, prune_run
    from vptune.engine.trainer import run_training

    t = time.time()
    summary = run_training(config_from_dict(base_config(task, args)), resume=True)
    rows = [_row(task, 0, summary, None, time.time() - t)]
    previous = Path(args.out) / task / "round0"
    for k, (tokens, seg_fraction) in enumerate(ROUNDS, start=1):
        out = Path(args.out) / task / f"round{k}"
        t = time.time()
        summary = prune_run(previous, out, tokens=tokens, segments=4, segment_fraction=seg_fraction,
                            resume=True, progress=False)
        rows.append(_row(task, k, summary, json.loads((out / PRUNE_FILE).read_text()), time.time() - t))
        previous = out
    for r in rows:
        print(f"{task:13s} round {r['round']}: {r['prompt_tokens_kept']}/{r['prompt_tokens']} tokens, "
              f"{r['segments_pruned']} segments pruned, val {r['val_top1']:.2f}", flush=True)
    return rows


def _row(task: str, k: int, summary: dict[str, Any], record: dict | None, wall: float) -> dict[str, Any]:
    n_blocks = 12  # ViT-Ti
    return {"task": task, "round": k, "val_top1": (summary.get("val") or {}).get("top1"),
            "status": summary.get("status"), "trainable_parameters": summary.get("trainable_parameters"),
            "prompt_tokens": record["prompt_tokens"] if record else 10 * n_blocks,
            "prompt_tokens_kept": record["prompt_tokens_kept"] if record else 10 * n_blocks,
            "segments_pruned": record["segments_pruned"] if record else 0, "wall_s": round(wall, 1),
            "precision": summary.get("precision")}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | round | prompt tokens kept | segments pruned | val top-1 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['round']} | {r['prompt_tokens_kept']} / {r['prompt_tokens']} | "
              f"{r['segments_pruned']} | {r['val_top1']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_asset_args(p, DATA, OUT)
    p.add_argument("--tasks", default="dtd10,dsprites_loc")
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args(argv)
    if not args.assets:
        print("set VPTUNE_ASSETS (or --assets) to the shared assets folder", file=sys.stderr)
        return 2
    args.weights = str(Path(args.assets) / "weights" / WEIGHTS_NAME)
    rows = [r for task in args.tasks.split(",") for r in run_task(task.strip(), args)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "machine": machine_info(), "commit": git_commit(),
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "command": " ".join(["python", *sys.argv])}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
