"""Why is VPT-deep weak on mini-VTAB's Structured tasks at the CPU budget: the step count or the lr?

Reruns the mini-VTAB grid run of VPT-deep on dsprites_loc (train800 -> val200, seed 0; never test) with a
higher lr or more epochs, plus full fine-tuning at 10 epochs for reference, and writes
``benchmarks/results/mini_vtab_diagnostic.json``. Needs the finished benchmark's grid-run config:

    VPTUNE_ASSETS=/path/to/assets OMP_NUM_THREADS=1 python benchmarks/mini_vtab_diagnostic.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._provenance import git_commit, machine_info
from vptune.engine.config import config_from_dict
from vptune.engine.trainer import run_training

BASE = ROOT / "benchmarks/runs/mini_vtab/dsprites_loc/vpt-deep/grid/lr0.02_wd0.0001/config.yaml"
OUT = ROOT / "benchmarks/runs/diag"
RUNS = [("vpt-deep", 0.1, 3, 1), ("vpt-deep", 0.5, 3, 1), ("vpt-deep", 0.02, 10, 2), ("full", 0.001, 10, 2)]


def main() -> None:
    base = yaml.safe_load(BASE.read_text())
    rows = []
    for method, lr, epochs, warm in RUNS:
        d = json.loads(json.dumps(base))
        d["method"] = {"name": method, "options": {"num_tokens": 10, "dropout": 0.1} if method == "vpt-deep" else {}}
        d["optim"].update(base_lr=lr, epochs=epochs, warmup_epochs=warm)
        d["output"] = str(OUT / f"{method}_lr{lr}_ep{epochs}")
        t = time.time()
        r = run_training(config_from_dict(d), resume=True)
        m = [json.loads(x) for x in (Path(d["output"]) / "metrics.jsonl").read_text().splitlines()]
        rows.append({"method": method, "base_lr": lr, "epochs": epochs, "steps": m[-1]["step"],
                     "val_top1": r["val"]["top1"], "final_train_loss": m[-1]["train_loss"],
                     "wall_s": r.get("wall_s", round(time.time() - t, 1))})
        print(rows[-1], flush=True)
    out = {"what": __doc__.splitlines()[0], "task": "dsprites_loc", "fit": "train800", "scored_on": "val200",
           "commit": git_commit(), "machine": machine_info(), "runs": rows}
    path = ROOT / "benchmarks/results/mini_vtab_diagnostic.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
