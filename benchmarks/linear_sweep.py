"""One-pass linear-probe sweep vs separate runs, side by side in one process (issue 5: "Linear-probe sweeps
compute frozen features once and train every (lr, wd) head in one pass: at least 10x faster than training
each head separately").

    VPTUNE_ASSETS=/path/to/assets python benchmarks/linear_sweep.py             # ViT-Ti, 112 px, dtd10
    python benchmarks/linear_sweep.py --separate-runs 3 --epochs 5 --out benchmarks/results/linear_sweep.json

The grid is the paper's linear grid, 10 base lrs x 4 weight decays = 40 heads (REFERENCE.md "Training
recipe"), on the train800 -> val200 grid stage of one mini-VTAB task, with the same recipe everywhere
(SGD momentum 0.9, batch 64, ``--epochs`` with ``--warmup-epochs`` warmup then cosine, per iteration).

(a) **one pass, end to end**: :func:`vptune.engine.features.train_linear_runs` on the 40 configs with an
    empty feature cache -- it extracts the frozen features of train800 and val200 once, trains the 40
    heads together, scores each on val200 and writes the 40 run folders (what ``vptune sweep`` does).
(b) **separate runs**: :func:`vptune.engine.trainer.run_training` on ``--separate-runs`` of the 40 configs
    (the frozen backbone runs on every image of every epoch, then on val200). Their mean time x 40 is the
    extrapolated cost of the grid trained separately (stated as such in the output). They run after (a),
    so the image files are in the OS cache for them (this favours the separate runs, if anything). Their
    val top-1 is compared with the one-pass heads of the same (lr, wd): the same recipe, seed, init and
    minibatch order, so they should agree up to float rounding.
(c) **cached features only** (the lower bound of the speed-up): the 40 heads in one
    :func:`~vptune.engine.features.train_linear_heads` call vs 40 calls of one head each, on the features
    extracted in (a); all 40 are timed, nothing extrapolated.

The backbone is the real ViT-Ti/16 (``$VPTUNE_ASSETS/weights/...``) at ``--input-size`` (112: the 14x14
position embedding interpolated to 7x7) or, without assets, a randomly initialised ViT-Ti (speed does not
depend on the weights). The task is ``--data/--task`` (mini-VTAB), built from the assets when missing, or
a synthetic 800/200 task when there are no assets. Absolute times on a shared machine are noisy; the
ratios, measured in one process, are what to quote. Writes ``--out`` (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks._provenance import git_commit, machine_info

WEIGHTS_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"
PAPER_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
PAPER_WDS = (0.01, 0.001, 0.0001, 0.0)


def synthetic_task(root: Path, classes: int = 10, sizes: dict[str, int] | None = None) -> Path:
    """A VTAB-1k style task of coloured-noise images (train800 / val200 / train800val200 / test)."""
    import numpy as np
    from PIL import Image

    sizes = sizes or {"train800": 800, "val200": 200, "test": 200}
    rng = np.random.default_rng(0)
    lists: dict[str, list[str]] = {}
    for split, n in sizes.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            y = i % classes
            tint = np.array([25 * y, 255 - 25 * y, (70 * y) % 256])[None, None, :]
            arr = rng.integers(0, 90, (64, 64, 3)) + 0.6 * tint
            rel = f"images/{split}/{i}.png"
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / rel)
            lines.append(f"{rel} {y}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def resolve_task(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    folder = Path(args.data) / args.task
    if (folder / "train800.txt").is_file():
        return folder, f"mini-VTAB {args.task} ({folder})"
    if args.assets:
        from vptune.data.mini_vtab import build_mini_vtab

        build_mini_vtab(args.assets, str(args.data), tasks=[args.task], progress=False)
        return folder, f"mini-VTAB {args.task} (built into {args.data})"
    return synthetic_task(tmp / "synthetic"), "synthetic 10-class 800/200 task (no assets)"


def base_config(args: argparse.Namespace, root: Path, weights: str | None) -> dict[str, Any]:
    backbone: dict[str, Any] = {"name": "vit_tiny_patch16_224", "weights": weights, "input_size": args.input_size}
    return {"backbone": backbone, "method": {"name": "linear", "options": {}},
            "data": {"root": str(root), "train_split": "train800", "val_split": "val200", "test_split": None,
                     "num_workers": args.num_workers},
            "optim": {"batch_size": args.batch_size, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs},
            "runtime": {"device": "cpu", "eval_every": 0, "progress": False, "seed": 0}}


def configs(base: dict[str, Any], out: Path, grid: list[tuple[float, float]]) -> list[Any]:
    from vptune.engine.config import config_from_dict

    cfgs = []
    for lr, wd in grid:
        d = json.loads(json.dumps(base))
        d["optim"].update(base_lr=lr, weight_decay=wd)
        d["output"] = str(out / f"lr{lr:g}_wd{wd:g}")
        cfgs.append(config_from_dict(d))
    return cfgs


def fmt_s(s: float) -> str:
    return f"{s:,.1f} s" if s >= 1 else f"{s * 1e3:,.1f} ms"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("VPTUNE_ASSETS"))
    p.add_argument("--data", default=str(ROOT / "benchmarks" / "runs" / "data" / "mini_vtab"))
    p.add_argument("--task", default="dtd10", help="mini-VTAB task (default: %(default)s)")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1, help="data-loader workers, both paths (default 1)")
    p.add_argument("--separate-runs", type=int, default=2,
                   help="separate run_training runs actually timed; x40 is extrapolated (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "linear_sweep.json"))
    return p.parse_args(argv)


def time_separate_runs(cfgs: list[Any], backbone: Any, val_one: dict[tuple[float, float], float]
                       ) -> tuple[list[float], list[float]]:
    """(b): each config trained by ``run_training``; (seconds, val top-1) per run."""
    from vptune.engine.trainer import run_training

    sep_times, sep_val = [], []
    for c in cfgs:
        t0 = time.perf_counter()
        r = run_training(c, overwrite=True, backbone=backbone)
        sep_times.append(time.perf_counter() - t0)
        sep_val.append(r["val"]["top1"])
        print(f"(b) separate run lr {c.optim.base_lr:g} wd {c.optim.weight_decay:g}: {fmt_s(sep_times[-1])}, "
              f"val top-1 {r['val']['top1']:.2f} (one pass: {val_one[(c.optim.base_lr, c.optim.weight_decay)]:.2f})",
              flush=True)
    return sep_times, sep_val


def time_cached_heads(args: argparse.Namespace, root: Path, backbone: Any, cache: Path, optim: Any,
                      grid: list[tuple[float, float]]) -> tuple[Any, float, float]:
    """(c): the features cached by (a); the heads in one call vs one call each: (features, t_one, t_sep)."""
    from vptune.data import DataConfig
    from vptune.engine.features import HeadRecipe, HeadSpec, load_features, train_linear_heads

    data = DataConfig(root=str(root), input_size=args.input_size, num_workers=args.num_workers)
    fs = load_features(backbone, data, "train800", cache)  # from the cache written in (a)
    recipe = HeadRecipe.from_optim(vars(optim))
    specs = [HeadSpec(lr, wd, 0) for lr, wd in grid]
    t0 = time.perf_counter()
    train_linear_heads(fs.features, fs.labels, fs.num_classes, specs, recipe)
    t_c_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in specs:
        train_linear_heads(fs.features, fs.labels, fs.num_classes, [s], recipe)
    return fs, t_c_one, time.perf_counter() - t0


def measure(args: argparse.Namespace, weights: str | None, grid: list[tuple[float, float]],
            picks: list[tuple[float, float]]) -> dict[str, Any]:
    """Paths (a), (b) and (c) in one temporary folder; their timings and val top-1s."""
    from vptune.engine.config import config_from_dict
    from vptune.engine.features import train_linear_runs
    from vptune.engine.trainer import build_backbone

    with tempfile.TemporaryDirectory(prefix="vptune_linear_sweep_") as tmp_s:
        tmp = Path(tmp_s)
        root, task_note = resolve_task(args, tmp)
        base = base_config(args, root, weights)
        backbone = build_backbone(config_from_dict(base))
        backbone_note = ("ViT-Ti/16, AugReg IN-21k -> IN-1k, further fine-tuned on Tiny-ImageNet (real weights)"
                         if weights else "ViT-Ti/16, random init (no VPTUNE_ASSETS)")
        print(f"backbone: {backbone_note}, input {args.input_size}; task: {task_note}; "
              f"{args.epochs} epochs ({args.warmup_epochs} warmup), batch {args.batch_size}", flush=True)
        # (a) one pass, end to end, empty cache
        cfgs = configs(base, tmp / "one_pass", grid)
        t0 = time.perf_counter()
        one = train_linear_runs(cfgs, backbone, tmp / "features")
        t_one = time.perf_counter() - t0
        val_one = {(c.optim.base_lr, c.optim.weight_decay): r["val"]["top1"] for c, r in zip(cfgs, one)}
        print(f"(a) one pass, 40 heads incl. feature extraction: {fmt_s(t_one)}", flush=True)
        # (b) separate trainer runs
        sep_cfgs = configs(base, tmp / "separate", picks)
        sep_times, sep_val = time_separate_runs(sep_cfgs, backbone, val_one)
        # (c) cached features only
        fs, t_c_one, t_c_sep = time_cached_heads(args, root, backbone, tmp / "features", cfgs[0].optim, grid)
    return {"task_note": task_note, "backbone_note": backbone_note, "t_one": t_one, "val_one": val_one,
            "sep_cfgs": sep_cfgs, "sep_times": sep_times, "sep_val": sep_val, "fs": fs,
            "t_c_one": t_c_one, "t_c_sep": t_c_sep, "t_sep40": statistics.fmean(sep_times) * len(grid)}


def build_result(args: argparse.Namespace, m: dict[str, Any], grid: list[tuple[float, float]], k: int,
                 t_all: float) -> dict[str, Any]:
    """The JSON report of one benchmark run."""
    val_one, sep_cfgs, sep_val, fs = m["val_one"], m["sep_cfgs"], m["sep_val"], m["fs"]
    t_one, t_sep40, t_c_one, t_c_sep = m["t_one"], m["t_sep40"], m["t_c_one"], m["t_c_sep"]
    agree = [abs(v - val_one[(c.optim.base_lr, c.optim.weight_decay)]) for c, v in zip(sep_cfgs, sep_val)]
    return {
        "schema": 1,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "setup": {"backbone": m["backbone_note"], "input_size": args.input_size, "task": m["task_note"],
                  "n_train": len(fs.labels), "num_classes": fs.num_classes, "epochs": args.epochs,
                  "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size, "num_workers": args.num_workers,
                  "grid": {"lr": list(PAPER_LRS), "wd": list(PAPER_WDS), "heads": len(grid)},
                  "stage": "grid: train on train800, score on val200"},
        "timings_s": {
            "a_one_pass_40_heads_with_feature_extraction": round(t_one, 3),
            "b_separate_run_each": [round(t, 3) for t in m["sep_times"]],
            "b_separate_runs_timed": k,
            "b_separate_40_extrapolated": round(t_sep40, 3),
            "c_cached_one_pass_40_heads": round(t_c_one, 4),
            "c_cached_separate_40_heads": round(t_c_sep, 4),
        },
        "ratios": {
            "end_to_end_separate_over_one_pass": round(t_sep40 / t_one, 2),
            "cached_features_separate_over_one_pass": round(t_c_sep / t_c_one, 2),
        },
        "check": {"separate_runs": [{"lr": c.optim.base_lr, "wd": c.optim.weight_decay, "val_top1_separate": v,
                                     "val_top1_one_pass": val_one[(c.optim.base_lr, c.optim.weight_decay)]}
                                    for c, v in zip(sep_cfgs, sep_val)],
                  "max_abs_val_top1_diff": round(max(agree), 4)},
        "notes": [f"(b) times {k} separate run_training runs and multiplies their mean by 40 (extrapolated)",
                  "(a) runs first with an empty feature cache; (b) then finds the images in the OS file cache",
                  "shared machine: absolute times are noisy, ratios are measured in one process"],
        "wall_s": round(time.time() - t_all, 1),
    }


def markdown(args: argparse.Namespace, m: dict[str, Any], result: dict[str, Any], k: int, out: Path) -> str:
    """The printed table of one benchmark run."""
    r = result["ratios"]
    return "\n".join([
        (f"Linear-probe grid, 40 heads (10 lr x 4 wd), {m['backbone_note']}, {args.input_size} px, "
         f"{m['task_note']}, {args.epochs} epochs, batch {args.batch_size}; {machine_info()['cpu']}, "
         f"{os.cpu_count()} cores."), "",
        "| path | 40 heads | ratio (separate / one pass) |", "|---|---|---|",
        f"| (a) one pass incl. feature extraction (train800 + val200 once) | {fmt_s(m['t_one'])} | |",
        (f"| (b) separate `run_training` runs (mean of {k} timed x 40, extrapolated) | {fmt_s(m['t_sep40'])} | "
         f"**{r['end_to_end_separate_over_one_pass']:.1f}x** |"),
        f"| (c) cached features: one pass | {fmt_s(m['t_c_one'])} | |",
        (f"| (c) cached features: 40 separate single-head passes | {fmt_s(m['t_c_sep'])} | "
         f"**{r['cached_features_separate_over_one_pass']:.1f}x** |"), "",
        (f"Separate runs vs one-pass heads of the same (lr, wd): max |val top-1 difference| = "
         f"{result['check']['max_abs_val_top1_diff']:.2f} points over {k} run(s)."),
        f"Wrote {out}.",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t_all = time.time()
    weights = str(Path(args.assets) / "weights" / WEIGHTS_NAME) if args.assets else None
    grid = [(lr, wd) for lr in PAPER_LRS for wd in PAPER_WDS]
    k = max(1, min(args.separate_runs, len(grid)))
    # separate runs: spread over the lr range (one per lr, in the grid's order), wd 1e-4
    picks = [grid[i * len(grid) // k + 2] for i in range(k)]
    m = measure(args, weights, grid, picks)
    result = build_result(args, m, grid, k, t_all)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(args, m, result, k, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
