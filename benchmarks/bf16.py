"""bf16 autocast against fp32 on this CPU: training-step speed per method and a val top-1 parity check.

Speed: every method's training step on the real ViT-Ti/16 (random weights of the same shape when the assets
are missing), batch 32, at 112 and 224 px, fp32 and bf16 steps interleaved round by round (so both see the
same machine load); the median of ``--steps`` rounds after one untimed round. Parity: VPT-deep with the
default recipe on two mini-VTAB tasks, train800 -> val200 (never test), three seeds in each precision.

    VPTUNE_ASSETS=/path/to/assets python benchmarks/bf16.py                  # speed + parity
    python benchmarks/bf16.py --skip-parity --sizes 112                        # speed only

Writes ``benchmarks/results/bf16_cpu.json`` and prints markdown tables. ``precision: auto`` picks bf16 only
where the CPU computes it natively (``avx512_bf16``/``amx_bf16``; the record says which).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._provenance import git_commit, machine_info

METHODS = ("linear", "full", "partial-1", "mlp-3", "sidetune", "bias", "adapter", "vpt-shallow", "vpt-deep")
WEIGHTS_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"
PARITY_TASKS = ("dtd10", "dsprites_loc")
RESULTS = ROOT / "benchmarks/results/bf16_cpu.json"


def _backbone(assets: str | None, size: int) -> Any:
    import vptune

    if assets:
        return vptune.create_backbone(weights=str(Path(assets) / "weights" / WEIGHTS_NAME), input_size=size)
    return vptune.create_backbone("vit_tiny_patch16_224", input_size=size)


def _step(model: Any, opt: Any, x: Any, y: Any, bf16: bool) -> float:
    import torch

    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median training-step seconds per (method, size) in fp32 and bf16, interleaved."""
    import torch

    import vptune

    rows = []
    for size in args.sizes:
        bb = _backbone(args.assets, size)
        x, y = torch.randn(args.batch_size, 3, size, size), torch.randint(0, 10, (args.batch_size,))
        for method in args.methods:
            torch.manual_seed(0)
            model = vptune.create_model(bb, method, num_classes=10)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            times: dict[str, list[float]] = {"fp32": [], "bf16": []}
            for r in range(args.steps + 1):
                for prec in ("fp32", "bf16"):
                    s = _step(model, opt, x, y, prec == "bf16")
                    if r:
                        times[prec].append(s)
            med = {p: statistics.median(v) for p, v in times.items()}
            rows.append({"method": method, "input_size": size, "batch_size": args.batch_size,
                         "fp32_s_per_step": med["fp32"], "bf16_s_per_step": med["bf16"],
                         "speedup": med["fp32"] / med["bf16"]})
            print(f"{method:12s} {size:4d}px  fp32 {med['fp32']:.3f}s  bf16 {med['bf16']:.3f}s  "
                  f"x{rows[-1]['speedup']:.2f}", flush=True)
    return rows


def parity(args: argparse.Namespace) -> list[dict[str, Any]]:
    """VPT-deep (default recipe) val top-1 in fp32 and bf16, three seeds, two tasks, val only."""
    from vptune.engine.config import config_from_dict
    from vptune.engine.trainer import run_training

    rows = []
    for task in PARITY_TASKS:
        for prec in ("fp32", "bf16"):
            for seed in args.seeds:
                d = {"backbone": {"name": "vit_tiny_patch16_224", "input_size": 112,
                                  "weights": str(Path(args.assets) / "weights" / WEIGHTS_NAME)},
                     "method": {"name": "vpt-deep", "options": {"num_tokens": 10, "dropout": 0.1}},
                     "data": {"root": str(Path(args.data) / task), "train_split": "train800",
                              "val_split": "val200", "test_split": None, "num_workers": 1},
                     "optim": {"batch_size": 32, "epochs": args.epochs, "warmup_epochs": 1},
                     "runtime": {"seed": seed, "precision": prec, "eval_every": 0, "progress": False},
                     "output": str(ROOT / f"benchmarks/runs/bf16_parity/{task}/{prec}_seed{seed}")}
                r = run_training(config_from_dict(d), resume=True)
                rows.append({"task": task, "precision": prec, "seed": seed, "status": r["status"],
                             "val_top1": (r.get("val") or {}).get("top1"), "wall_s": r.get("wall_s")})
                print(rows[-1], flush=True)
    return rows


def tables(speed_rows: list[dict], parity_rows: list[dict]) -> str:
    lines = ["| method | px | fp32 s/step | bf16 s/step | fp32/bf16 |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['input_size']} | {r['fp32_s_per_step']:.3f} | {r['bf16_s_per_step']:.3f} | "
              f"{r['speedup']:.2f}x |" for r in speed_rows]
    if parity_rows:
        lines += ["", "| task | fp32 val top-1 (seeds) | mean | bf16 val top-1 (seeds) | mean |", "|---|---|---|---|---|"]
        for task in PARITY_TASKS:
            cells = []
            for prec in ("fp32", "bf16"):
                v = [r["val_top1"] for r in parity_rows if r["task"] == task and r["precision"] == prec
                     and r["val_top1"] is not None]
                cells += [", ".join(f"{x:.1f}" for x in v), f"{statistics.mean(v):.1f}" if v else "-"]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("VPTUNE_ASSETS"))
    p.add_argument("--data", default=str(ROOT / "benchmarks/runs/data/mini_vtab"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sizes", default="112,224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-parity", action="store_true")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if not args.skip_parity and not args.assets:
        p.error("the parity check needs VPTUNE_ASSETS (real weights and mini-VTAB data)")
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    speed_rows = old.get("speed", []) if args.skip_speed else speed(args)
    parity_rows = old.get("parity", []) if args.skip_parity else parity(args)
    out = {"what": __doc__.splitlines()[0], "command": "python benchmarks/bf16.py " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
           "machine": machine_info(), "speed": speed_rows, "parity": parity_rows,
           "parity_protocol": {"method": "vpt-deep", "recipe": "default", "fit": "train800", "scored_on": "val200",
                               "epochs": args.epochs, "batch_size": 32, "input_size": 112}}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(tables(speed_rows, parity_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
