"""mini-VTAB benchmark: the nine methods on the eight mini-VTAB tasks with the real ViT-Ti (issue 5, item 2).

    VPTUNE_ASSETS=/path/to/assets python benchmarks/mini_vtab.py                  # everything (hours on CPU)
    python benchmarks/mini_vtab.py --tasks dtd10 --methods linear,vpt-deep --epochs 1 --grid 1x1 --seeds 1 \
        --out benchmarks/runs/mini_vtab_smoke --results /tmp/smoke.json --budget-minutes 10   # a smoke test
    python benchmarks/mini_vtab.py --report-only                                   # tables from finished runs

What it does, in order:

1. builds mini-VTAB (``vptune data mini-vtab``) into ``--data`` from ``$VPTUNE_ASSETS/datasets`` when a task
   is missing (finished tasks are kept);
2. loads the sweep ``--config`` (default ``configs/sweeps/mini_vtab.yaml``: ViT-Ti/16 at 112 px with
   interpolated position embeddings, 3 epochs with 1 warmup, batch 32, 2 lrs x 1 wd per method -- the
   paper's full 10 x 4 grid for the one-pass linear probe --, seeds 42 and 44: sized to finish in about
   two hours on 2 CPU cores, see the config's header), applies the flags,
   points it at ``--data`` and at the ViT-Ti weights in ``$VPTUNE_ASSETS/weights/``;
3. prints the plan, the sweep's cost estimate and a time estimate (from finished runs when there are
   some, else from a per-method calibration, see ``--calibrate``);
4. runs the sweep (the VTAB-1k protocol of ``vptune sweep``: grid on train800 scored on val200, the best
   setting retrained on train800val200 per seed and tested). Every run lives in its own folder under
   ``--out`` and a finished folder is never retrained, so an interrupted benchmark resumes where it
   stopped when the same command runs again. Each finished run's ``result.json`` is also mirrored into a
   tracked ledger (``--ledger``, default ``benchmarks/results/<sweep name>_runs/``, see
   ``benchmarks/_ledger.py``) and restored from it before planning, so a fresh checkout resumes too:
   commit the ledger with the results. ``--budget-minutes`` stops cleanly between two runs;
5. writes ``--results`` (default ``benchmarks/results/mini_vtab.json``: per task x method mean/std over
   seeds, group means, both overall means, trainable parameters, stored bytes, the selected settings,
   the per-run times) and, via ``vptune.engine.report.write_report``, ``report.md``, CSVs and PNG plots
   into ``<results stem>_report/``; prints the markdown.

Changing ``--epochs``, ``--input-size`` or the grid changes every run's config: use another ``--out``
(or ``--overwrite-stale`` to retrain the runs in place).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _ledger
from benchmarks._provenance import git_commit, machine_info
from vptune.errors import VptuneError

WEIGHTS_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"
BACKBONE_NOTE = "ViT-Ti/16, AugReg IN-21k -> IN-1k, further fine-tuned on Tiny-ImageNet"
DEFAULT_CONFIG = ROOT / "configs" / "sweeps" / "mini_vtab.yaml"
DEFAULT_DATA = ROOT / "benchmarks" / "runs" / "data" / "mini_vtab"
DEFAULT_OUT = ROOT / "benchmarks" / "runs" / "mini_vtab"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "mini_vtab.json"
DEFAULT_TIMING = ROOT / "benchmarks" / "results" / "mini_vtab_timing.json"


# ------------------------------------------------------------------------------------------------------
# machine and provenance
# ------------------------------------------------------------------------------------------------------


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------------
# the sweep, configured from the flags
# ------------------------------------------------------------------------------------------------------


def _names(value: str | None, valid: list[str], what: str) -> list[str] | None:
    if not value:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in valid]
    if bad:
        raise VptuneError(f"unknown {what}(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    return names


def _grid_shape(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        a, b = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise VptuneError(f"--grid must look like 3x2 (lrs x wds), got {value!r}") from None
    if a < 1 or b < 1:
        raise VptuneError(f"--grid needs at least one lr and one wd, got {value!r}")
    return a, b


def _seeds(value: str | None) -> list[int] | None:
    if not value:
        return None
    parts = [p for p in value.split(",") if p.strip()]
    if len(parts) == 1 and "," not in value:  # a count: the first N of the reference seeds
        n = int(parts[0])
        ref = [42, 44, 82, 100, 800]
        return ref[:n] if n <= len(ref) else ref + list(range(n - len(ref)))
    return [int(p) for p in parts]


def weights_path(args: argparse.Namespace) -> str | None:
    if args.weights:
        return args.weights
    if args.assets:
        return str(Path(args.assets) / "weights" / WEIGHTS_NAME)
    return None


def load_spec(args: argparse.Namespace) -> Any:
    """The sweep of ``--config`` with the flags applied (see the module docstring)."""
    import yaml

    from vptune.engine.sweep import load_sweep

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    base_optim = (raw.get("base") or {}).get("optim") or {} if isinstance(raw.get("base"), dict) else {}
    overrides: list[str] = []
    w = weights_path(args)
    if w is None:
        raise VptuneError("no backbone weights: set VPTUNE_ASSETS (or pass --assets / --weights)")
    if not Path(w).exists():
        raise VptuneError(f"backbone weights {w} do not exist")
    overrides.append(f"backbone.weights={w}")
    if args.epochs is not None:
        overrides.append(f"optim.epochs={args.epochs}")
        warm = args.warmup_epochs
        if warm is None:  # keep the config's warmup fraction (1 of 3), below the epoch count
            e0, w0 = int(base_optim.get("epochs", 10)), float(base_optim.get("warmup_epochs", 0))
            warm = min(round(args.epochs * w0 / max(e0, 1)), args.epochs - 1)
        overrides.append(f"optim.warmup_epochs={max(0, warm)}")
    elif args.warmup_epochs is not None:
        overrides.append(f"optim.warmup_epochs={args.warmup_epochs}")
    if args.input_size is not None:
        overrides.append(f"backbone.input_size={args.input_size}")
    if args.device is not None:
        overrides.append(f"runtime.device={args.device}")
    if args.batch_size is not None:
        overrides.append(f"optim.batch_size={args.batch_size}")
    overrides += args.set
    spec = load_sweep(args.config, overrides=overrides)
    spec.output = str(args.out)
    if args.quiet:
        spec.base["runtime"]["progress"] = False
    tasks = _names(args.tasks, [t.name for t in spec.tasks], "task")
    methods = _names(args.methods, [m.label for m in spec.methods], "method")
    spec.tasks = [t for t in spec.tasks if tasks is None or t.name in tasks]
    spec.methods = [m for m in spec.methods if methods is None or m.label in methods]
    for t in spec.tasks:
        t.root = str(Path(args.data) / t.name)
    shape = _grid_shape(args.grid)
    if shape:
        for m in spec.methods:
            m.grid.lr, m.grid.wd = m.grid.lr[:shape[0]], m.grid.wd[:shape[1]]
    seeds = _seeds(args.seeds)
    if seeds:
        spec.seeds = seeds
    return spec


def ensure_data(args: argparse.Namespace, tasks: list[str]) -> None:
    """Build the missing mini-VTAB tasks into ``--data`` (finished ones are skipped)."""
    from vptune.data.mini_vtab import build_mini_vtab
    from vptune.data.vtab import read_marker

    missing = [t for t in tasks if not read_marker(str(Path(args.data) / t))]
    if not missing:
        return
    print(f"building mini-VTAB task(s) {', '.join(missing)} into {args.data} ...", flush=True)
    build_mini_vtab(args.assets, str(args.data), seed=args.data_seed, tasks=missing, workers=args.workers,
                    progress=not args.quiet)


# ------------------------------------------------------------------------------------------------------
# time: calibration, estimate, budget
# ------------------------------------------------------------------------------------------------------


def calibrate(spec: Any, args: argparse.Namespace, steps: int = 3) -> dict[str, Any]:
    """Seconds per training image and per evaluated image of every method of ``spec`` at its input size
    and batch size, on this machine: ``steps`` timed training steps (forward, loss, backward, the method's
    optimiser) on random images after one untimed step, the same for evaluation forwards, plus the
    data pipeline's seconds per image (decode + resize of real task images). Rough: a loaded machine
    gives a slower, noisier figure."""
    import torch

    import vptune
    from vptune.data import DataConfig, open_split
    from vptune.engine.config import config_from_dict
    from vptune.engine.trainer import build_backbone, task_preprocessing

    cfg = config_from_dict(spec.base)
    backbone = build_backbone(cfg)
    prep = task_preprocessing(backbone, cfg.backbone.input_size)
    size, bs = prep.input_size, cfg.optim.batch_size
    device = torch.device("cuda" if cfg.runtime.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"input_size": size, "batch_size": bs, "device": device.type, "steps": steps,
                           "date": now_utc(), "machine": machine_info(), "methods": {}}
    task = spec.tasks[0]
    ds = open_split(DataConfig(root=task.root, input_size=size, num_workers=0), "train800", prep, train=True)
    n = min(len(ds), 2 * bs)
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    out["data_s_per_img"] = (time.perf_counter() - t0) / n
    x = torch.randn(bs, 3, size, size, device=device)
    y = torch.randint(0, 10, (bs,), device=device)
    for m in spec.methods:
        model = vptune.create_model(backbone, m.name, 10, **m.options).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.SGD(params, lr=1e-3, momentum=0.9) if model.method.optimizer == "sgd"
               else torch.optim.AdamW(params, lr=1e-5))
        model.train()
        times = []
        for k in range(steps + 1):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        model.eval()
        inf = []
        with torch.inference_mode():
            for k in range(2):
                t0 = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                inf.append(time.perf_counter() - t0)
        out["methods"][m.label] = {"train_s_per_img": statistics.median(times[1:]) / bs,
                                   "eval_s_per_img": min(inf) / bs}
        print(f"calibrated {m.label}: {out['methods'][m.label]['train_s_per_img'] * 1e3:.1f} ms/img train, "
              f"{out['methods'][m.label]['eval_s_per_img'] * 1e3:.1f} ms/img eval", flush=True)
        del model, opt
    return out


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for ln in path.read_text().splitlines() if ln.strip())
    except OSError:
        return 0


def estimate_seconds(spec: Any, grid: list[Any], states: dict[Path, str], timing: dict[str, Any] | None
                     ) -> tuple[float | None, str]:
    """Seconds left: separate runs to train (grid pending + finals not yet done), each costing
    epochs x train images x (train + data s/img) + its evaluation split x eval s/img, from ``timing``
    (a calibration). One-pass linear probes are counted as one feature pass per task."""
    if not timing or not timing.get("methods"):
        return None, "no calibration (run with --calibrate once to get a time estimate before any run finishes)"
    from vptune.engine.trainer import read_result

    meth, data = timing["methods"], float(timing.get("data_s_per_img", 0.0))
    fallback = max((v["train_s_per_img"] for v in meth.values()), default=0.0)
    seconds, sp = 0.0, spec.splits
    feature_tasks = set()
    for task in spec.tasks:
        n = {s: _count_lines(Path(task.root) / f"{s}.txt") for s in (sp.fit, sp.select, sp.final, sp.test)}
        for m in spec.methods:
            rate = meth.get(m.label, {"train_s_per_img": fallback, "eval_s_per_img": fallback / 3})
            runs = [r for r in grid if r.task == task.name and r.method == m.label]
            if runs and runs[0].one_pass:
                if any(states[r.folder] != "done" for r in runs):
                    feature_tasks.add(task.name)
                continue
            epochs = int(runs[0].config["optim"]["epochs"]) if runs else 0
            pending = sum(states[r.folder] != "done" for r in runs)
            seconds += pending * (epochs * n[sp.fit] * (rate["train_s_per_img"] + data)
                                  + n[sp.select] * (rate["eval_s_per_img"] + data))
            final_dir = Path(spec.output) / task.name / m.label / "final"
            finals = sum(read_result(final_dir / f"seed{s}") is None for s in spec.seeds)
            seconds += finals * (epochs * n[sp.final] * (rate["train_s_per_img"] + data)
                                 + n[sp.test] * (rate["eval_s_per_img"] + data))
    lin = meth.get("linear", {"eval_s_per_img": fallback / 3})["eval_s_per_img"]
    for task_name in feature_tasks:
        root = Path(next(t.root for t in spec.tasks if t.name == task_name))
        imgs = sum(_count_lines(root / f"{s}.txt") for s in (sp.fit, sp.select, sp.final, sp.test))
        seconds += imgs * (lin + data)
    return seconds, (f"calibration of {timing.get('date', '?')} at {timing.get('input_size')} px, batch "
                     f"{timing.get('batch_size')}, on {timing.get('device')}")


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


class BudgetReached(Exception):
    """Raised between two runs once the time budget is spent."""


def budget_env(deadline: float | None, quiet: bool, after_job: Any = None) -> Any:
    """A sweep :class:`~vptune.engine.sweep.Env` that refuses to start a job after ``deadline``
    (``time.time()``) or when the last job of the same method would not fit before it, and calls
    ``after_job()`` (the ledger export) after each job."""
    from vptune.engine.sweep import Env

    class BudgetEnv(Env):
        def __init__(self) -> None:
            super().__init__(progress=not quiet)
            self.last: dict[str, float] = {}

        def execute(self, job: Any) -> None:
            label = job.runs[0].method
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0 or self.last.get(label, 0.0) > left:
                    raise BudgetReached(job.describe())
            t0 = time.time()
            super().execute(job)
            self.last[label] = time.time() - t0
            if after_job is not None:
                after_job()

    return BudgetEnv()


# ------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------


def _finite(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), 4)


def _selections_and_runs(spec: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each (task, method)'s chosen setting (its ``selection.json``), and per method and stage the run
    times and how many runs ran on each CPU (``result.json``'s ``host``)."""
    from vptune.engine.trainer import read_result

    selection, run_times = [], {}
    for t in spec.tasks:
        for m in spec.methods:
            mdir = Path(spec.output) / t.name / m.label
            try:
                sel = json.loads((mdir / "selection.json").read_text())
            except (OSError, json.JSONDecodeError):
                sel = None
            if sel and sel.get("choice"):
                c = sel["choice"]
                selection.append({"task": t.name, "method": m.label, "lr": c["lr"], "wd": c["wd"],
                                  "num_tokens": c.get("num_tokens"), "val_top1": c["val_top1"],
                                  "grid_size": len(sel.get("grid") or [])})
            for stage in ("grid", "final"):
                for rdir in sorted((mdir / stage).glob("*")) if (mdir / stage).is_dir() else []:
                    r = read_result(rdir)
                    if r and r.get("wall_s") is not None:
                        key = f"{m.label}/{stage}" + ("/one-pass" if r.get("one_pass") else "")
                        cpu = (r.get("host") or {}).get("cpu", "not recorded")  # runs before 2026-12-04
                        run_times.setdefault(key, []).append((float(r["wall_s"]), cpu))
    times = {k: {"runs": len(v), "mean_s": round(statistics.fmean(w for w, _ in v), 2),
                 "total_s": round(sum(w for w, _ in v), 1), "hosts": dict(collections.Counter(c for _, c in v))}
             for k, v in sorted(run_times.items())}
    return selection, times


def collect_results(spec: Any, args: argparse.Namespace, report: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON of ``--results``."""
    base = spec.base
    cells = []
    if report is not None:
        for (task, method), c in sorted(report.cells.items()):
            cells.append({"task": task, "group": c.group, "method": method, "mean_top1": _finite(c.mean),
                          "std_top1": _finite(c.std), "n_seeds": c.n, "values": c.values, "seeds": c.seeds,
                          "trainable_parameters": c.trainable_parameters, "stored_bytes": c.stored_bytes,
                          "data_format": c.formats})
    methods = {}
    if report is not None:
        for m, s in report.summaries.items():
            methods[m] = {"tasks": s.tasks, "group_means": {g: _finite(v) for g, v in s.group_means.items()},
                          "mean_of_tasks": _finite(s.mean_tasks), "mean_of_group_means": _finite(s.mean_groups),
                          "trainable_parameters_per_task": _finite(s.trainable_per_task),
                          "stored_bytes_per_task": _finite(s.stored_bytes_per_task),
                          "total_params_x": _finite(s.total_params)}
    selection, times = _selections_and_runs(spec)
    return {
        "schema": 1, "benchmark": "mini-VTAB (8 tasks) x 9 methods, VTAB-1k protocol",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": now_utc(), "commit": git_commit(), "machine": machine_info(),
        "settings": {
            "backbone": BACKBONE_NOTE, "weights": base["backbone"]["weights"],
            "input_size": base["backbone"]["input_size"], "position_embedding": "interpolated (bicubic) from 14x14",
            "epochs": base["optim"]["epochs"], "warmup_epochs": base["optim"]["warmup_epochs"],
            "batch_size": base["optim"]["batch_size"], "device": base["runtime"]["device"],
            "seeds": spec.seeds, "grid_seed": spec.grid_seed, "data": str(args.data),
            "tasks": [t.name for t in spec.tasks],
            "methods": {m.label: {"name": m.name, "options": m.options, "lr": m.grid.lr, "wd": m.grid.wd}
                        for m in spec.methods},
            "protocol": "grid on train800, selection on val200 (last epoch; ties -> smaller lr, then smaller wd), "
                        "finals on train800val200 per seed, last-epoch test top-1",
        },
        "cells": cells, "methods": methods, "selection": selection, "run_times": times, **extra,
    }


def write_outputs(spec: Any, args: argparse.Namespace, extra: dict[str, Any]) -> str:
    """Report (markdown, CSV, PNG) and ``--results`` JSON; returns the markdown ('' when nothing to report)."""
    from vptune.engine.report import to_markdown, write_report

    results = Path(args.results)
    report_dir = results.parent / f"{results.stem}_report"
    report, files, md = None, {}, ""
    if Path(spec.output).is_dir():
        try:
            report, files = write_report([spec.output], report_dir, plots=not args.no_plots)
            md = to_markdown(report, [spec.output])
        except VptuneError as e:
            print(f"no report yet: {e}", flush=True)
    data = collect_results(spec, args, report, {**extra, "report_files": {k: str(v) for k, v in files.items()}})
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, results)
    print(f"wrote {results}" + (f" and {', '.join(str(p) for p in files.values())}" if files else ""), flush=True)
    return md


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: %(default)s)")
    p.add_argument("--assets", default=os.environ.get("VPTUNE_ASSETS"),
                   help="assets folder with datasets/ and weights/ (default: $VPTUNE_ASSETS)")
    p.add_argument("--weights", default=None, help=f"backbone weights (default: ASSETS/weights/{WEIGHTS_NAME})")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="mini-VTAB folder, built when a task is missing "
                                                             "(default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the mini-VTAB splits (default 0)")
    p.add_argument("--workers", type=int, default=2, help="processes for rendering the procedural tasks")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="run folders (default: %(default)s; keep it gitignored)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="results JSON; the report goes next to it in <stem>_report/ (default: %(default)s)")
    p.add_argument("--tasks", default=None, help="comma list of tasks (default: all eight)")
    p.add_argument("--methods", default=None, help="comma list of method labels (default: all nine)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the config's, 3)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="warmup epochs (default: the config's; with --epochs, its warmup fraction)")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the config's, 112)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the config's, 32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's, auto)")
    p.add_argument("--grid", default=None, metavar="AxB",
                   help="keep the first A lrs and first B wds of every method's grid (e.g. 1x1 for a smoke test)")
    p.add_argument("--seeds", default=None, help="final seeds: a count (first N of 42,44,82,100,800) or a list "
                                                 "like 42,44 (default: the config's, 42,44)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base train config (repeatable)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="stop cleanly between runs once this many minutes have passed (or when the next run "
                        "would not fit, judged by the last run of its method); re-run to resume")
    p.add_argument("--report-only", action="store_true", help="write the results and report of finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimates, train nothing")
    p.add_argument("--calibrate", action="store_true",
                   help="time a few training steps of every method first and store them in --timing "
                        "(used for the time estimate)")
    p.add_argument("--timing", default=str(DEFAULT_TIMING), help="calibration file (default: %(default)s)")
    p.add_argument("--overwrite-stale", action="store_true", help="retrain finished runs of another config")
    p.add_argument("--ledger", default=None,
                   help="tracked folder mirroring every finished run's result.json, restored into --out "
                        "before planning so the benchmark resumes in a fresh checkout (default: "
                        "benchmarks/results/<sweep name>_runs)")
    p.add_argument("--no-ledger", action="store_true", help="neither restore nor export the ledger")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-epoch logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    try:
        spec = load_spec(args)
        ledger = sync_ledger(spec, args)
        if args.report_only:
            md = write_outputs(spec, args, {"status": "report-only"})
            sys.stdout.write(md)
            return 0
        ensure_data(args, [t.name for t in spec.tasks])
        return run(spec, args, t_start, ledger)
    except VptuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def ledger_path(spec: Any, args: argparse.Namespace) -> Path | None:
    if args.no_ledger:
        return None
    return Path(args.ledger) if args.ledger else ROOT / "benchmarks" / "results" / f"{spec.name}_runs"


def sync_ledger(spec: Any, args: argparse.Namespace) -> Path | None:
    """Restore the ledger into ``--out`` and export ``--out``'s finished runs into it
    (``benchmarks/_ledger.py``); returns the ledger folder, None with ``--no-ledger``."""
    ledger = ledger_path(spec, args)
    if ledger is None:
        return None
    n = _ledger.restore(ledger, Path(spec.output))
    if n:
        print(f"restored {n} finished run(s) from {ledger}", flush=True)
    if not args.dry_run:
        _ledger.export(Path(spec.output), ledger)
        _ledger.reselect(spec)
    return ledger


def run(spec: Any, args: argparse.Namespace, t_start: float, ledger: Path | None = None) -> int:
    import logging

    from vptune.engine.sweep import plan_grid, run_state, run_sweep

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    b, o = spec.base["backbone"], spec.base["optim"]
    print(f"mini-VTAB: {len(spec.tasks)} task(s) x {len(spec.methods)} method(s); {BACKBONE_NOTE} at "
          f"{b['input_size'] or 224} px; {o['epochs']} epochs ({o['warmup_epochs']} warmup), batch {o['batch_size']}; "
          f"seeds {spec.seeds}; runs in {spec.output}", flush=True)
    timing = None
    if args.calibrate:
        timing = calibrate(spec, args)
        Path(args.timing).parent.mkdir(parents=True, exist_ok=True)
        Path(args.timing).write_text(json.dumps(timing, indent=1) + "\n")
    elif Path(args.timing).is_file():
        timing = json.loads(Path(args.timing).read_text())
        if timing.get("input_size") != (b["input_size"] or 224) or timing.get("batch_size") != o["batch_size"]:
            timing = None  # another setting: not comparable
    grid = plan_grid(spec)
    states = {r.folder: run_state(r) for r in grid}
    secs, how = estimate_seconds(spec, grid, states, timing)
    if secs is not None:
        print(f"estimated time left (before the sweep's own estimate from finished runs): {_hours(secs)} "
              f"({how})", flush=True)
    else:
        print(f"estimated time left: unknown, {how}", flush=True)
    extra: dict[str, Any] = {"estimate_s_at_start": _finite(secs)}
    deadline = t_start + 60 * args.budget_minutes if args.budget_minutes is not None else None
    env = budget_env(deadline, args.quiet,
                     None if ledger is None else lambda: _ledger.export(Path(spec.output), ledger))
    status = "complete"
    try:
        run_sweep(spec, env=env, dry_run=args.dry_run, overwrite_stale=args.overwrite_stale,
                  log=lambda msg: print(msg, flush=True))
        if args.dry_run:
            return 0
    except BudgetReached as e:
        status = "stopped: budget"
        print(f"budget of {args.budget_minutes:g} min reached before {e}; {len(env.trained)} run(s) trained "
              "in this call. Run the same command again to resume.", flush=True)
    extra.update(status=status, wall_s_this_call=round(time.time() - t_start, 1), trained_this_call=len(env.trained))
    md = write_outputs(spec, args, extra)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
