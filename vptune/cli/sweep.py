"""``vptune sweep SWEEP.yaml`` (the VTAB-1k protocol: grid on train800/val200, finals with seeds) and
``vptune report RUNS`` (tables and plots of finished runs)."""

from __future__ import annotations

import argparse
import logging
import sys

from vptune.cli import add_overrides_arg
from vptune.engine import sweep as sweep_engine  # looked up at call time (tests replace sweep_engine.Env)
from vptune.engine.report import to_markdown, write_report
from vptune.errors import VptuneError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` and ``report`` commands."""
    s = sub.add_parser(
        "sweep", help="run a hyper-parameter sweep with the VTAB-1k protocol",
        description="Grid (lr x wd [x prompt length] [x data fraction]) trained on the fit split and scored on "
                    "the select split at the last epoch (ties -> smaller lr, then smaller wd, then fewer "
                    "tokens); the best setting retrained on the final split with each seed and tested. "
                    "Finished runs are skipped, so re-running resumes a sweep.")
    s.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    add_overrides_arg(s, "override a key of the base train config, e.g. --set optim.epochs=1 (repeatable)")
    s.add_argument("--output", default=None, help="output root (default: the sweep's 'output')")
    s.add_argument("--backend", default=None,
                   help="execution backend: local or ray (default: the sweep's, 'local')")
    s.add_argument("--address", default=None,
                   help="ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001); default: a private local "
                        "Ray instance for this sweep")
    s.add_argument("--gpus-per-run", type=float, default=None,
                   help="GPUs per run (ray: the task's resources; default 1 when the cluster has GPUs, else 0); "
                        "also the GPU-hours of the cost estimate")
    s.add_argument("--cpus-per-run", type=float, default=None, help="ray: CPUs per run (default 1)")
    s.add_argument("--max-retries", type=int, default=None, help="ray: retries of a failed run (default 1)")
    s.add_argument("--hours-per-run", type=float, default=None,
                   help="one run's hours, for the GPU-hours of the cost estimate (default: from finished runs)")
    s.add_argument("--dry-run", action="store_true", help="print the plan and its cost, train nothing")
    s.add_argument("--overwrite-stale", action="store_true",
                   help="retrain finished runs whose config differs from what the sweep now plans")
    s.add_argument("--quiet", action="store_true", help="no per-epoch logs or progress bars")
    s.set_defaults(func=_sweep)

    r = sub.add_parser("report", help="tables (markdown, CSV) and plots of finished runs",
                       description="Mean ± std over seeds per task x method, group means, both overall means "
                                   "(mean of tasks, mean of group means), parameters, total-params figure.")
    r.add_argument("runs", nargs="+", help="run folders or sweep output roots (searched for result.json)")
    r.add_argument("--out", default=None, help="where report.md, report.csv, summary.csv and the plots go "
                                               "(default: RUNS[0]/report)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.set_defaults(func=_report)


def _sweep(args: argparse.Namespace) -> int:
    spec = sweep_engine.load_sweep(args.sweep, overrides=args.overrides)
    if args.output:
        spec.output = args.output
    if args.quiet:
        spec.base["runtime"]["progress"] = False
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = {"address": args.address, "gpus_per_run": args.gpus_per_run, "cpus_per_run": args.cpus_per_run,
               "max_retries": args.max_retries}
    sweep_engine.run_sweep(spec, backend=args.backend, env=sweep_engine.Env(progress=not args.quiet), dry_run=args.dry_run,
              overwrite_stale=args.overwrite_stale, log=lambda msg: print(msg, flush=True),
              backend_options=options, hours_per_run=args.hours_per_run)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path


    out = args.out or str(Path(args.runs[0]) / "report")
    if Path(out).exists() and not Path(out).is_dir():
        raise VptuneError(f"report folder {out} is a file, not a folder; choose another --out")
    report, files = write_report(args.runs, out, plots=not args.no_plots)
    sys.stdout.write(to_markdown(report, args.runs))
    print("\nwrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)
    return 0
