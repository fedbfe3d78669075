"""``vptune sweep``: the driver that plans (:mod:`vptune.engine.sweep_plan`, whose docstring states the
VTAB-1k protocol and the run-folder layout), selects and executes (:mod:`vptune.engine.sweep_exec`) a sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vptune.artifact import atomic_write_json
from vptune.engine.config import config_diff
from vptune.engine.sweep_exec import Env, Job, LocalBackend, make_jobs  # noqa: F401
from vptune.engine.sweep_plan import *
from vptune.engine.sweep_plan import (  # noqa: F401
    TIE_DIGITS,
    CostEstimate,
    GridScore,
    Run,
    _make_run,
    _one_pass,
    estimate_cost,
    format_compute,
    format_estimate,
    format_summary,
    grid_score,
    method_dir,
    plan_final,
    plan_grid,
    run_state,
    select_all,
    select_best,
    selection_key,
)
from vptune.engine.sweep_registry import BACKENDS, backend_factory, check_backend, register_backend  # noqa: F401

# the spec half, re-exported: vptune.engine.sweep.<name> keeps working
from vptune.engine.sweep_spec import (  # noqa: F401
    GRID_AXES,
    METHOD_KEYS,
    PAPER_ADAMW_LRS,
    PAPER_SGD_LRS,
    PAPER_WDS,
    SPLIT_KEYS,
    TASK_KEYS,
    TASKS_KEYS,
    TOP_KEYS,
    GridSpec,
    MethodSpec,
    Splits,
    SweepSpec,
    TaskSpec,
    _deep_merge,
    load_sweep,
    parse_sweep,
)
from vptune.engine.trainer import read_result
from vptune.errors import VptuneError


@dataclass
class SweepOutcome:
    grid: list[Run]
    final: list[Run]
    choices: dict[tuple[str, str, float], GridScore]
    trained: list[str]  # folders trained by this call
    estimate: CostEstimate


def _check_stale(runs: Sequence[Run], states: dict[Path, str], overwrite: bool) -> None:
    stale = [r for r in runs if states[r.folder] == "stale"]
    if stale and not overwrite:
        diff = config_diff((read_result(stale[0].folder) or {}).get("config") or {}, stale[0].config)
        raise VptuneError(f"{len(stale)} finished run(s) hold another config than this sweep plans (e.g. "
                          f"{stale[0].folder}: {', '.join(diff[:6])} differ); pass --overwrite-stale to retrain "
                          "them, or choose another output")


def run_sweep(spec: SweepSpec, *, backend: str | None = None, env: Env | None = None, dry_run: bool = False,
              overwrite_stale: bool = False, log: Callable[[str], None] = print,
              backend_options: dict[str, Any] | None = None, hours_per_run: float | None = None) -> SweepOutcome:
    """Plan, print the cost, train the grid, select on val, train the finals; skip every finished run.

    ``backend_options`` go to the backend (ray: address, gpus_per_run, cpus_per_run, max_retries);
    ``hours_per_run`` (an estimate of one run's hours) makes the cost include GPU-hours before any run has
    finished. Jobs a backend reports failed (after its retries) are listed in ``<output>/failures.json``
    and in the log, and raise a VptuneError once their stage is over (re-running retries just them)."""
    name = backend or spec.backend
    options = {k: v for k, v in (backend_options or {}).items() if v is not None}
    check_backend(name)  # a dry run is refused the same settings as a real one
    _check_numbers(options, hours_per_run)
    if Path(spec.output).exists() and not Path(spec.output).is_dir():
        raise VptuneError(f"sweep output {spec.output} is a file, not a folder")
    grid = plan_grid(spec)
    states = {r.folder: run_state(r) for r in grid}
    _check_stale(grid, states, overwrite_stale or dry_run)
    est = estimate_cost(spec, grid, states)
    compute = format_compute(est, hours_per_run, _gpus_per_run(spec, name, options))
    log(format_estimate(spec, grid, est) + (f"\n{compute}" if compute else ""))
    env = env or Env()
    if dry_run:
        stale = sum(s == "stale" for s in states.values())
        if stale:
            log(f"{stale} finished grid run(s) hold another config (a real run needs --overwrite-stale)")
        return SweepOutcome(grid, [], {}, [], est)
    env.cache_dir = env.cache_dir or spec.cache_dir
    factory = backend_factory(name)
    if name == "local":  # gpus_per_run only informs the cost; the rest is for fan-out backends
        extra = sorted(set(options) - {"gpus_per_run"})
        if extra:
            raise VptuneError(f"{', '.join(extra)} appl{'ies' if len(extra) == 1 else 'y'} to a fan-out backend "
                              "(--backend ray), not to the local one")
        options = {}
    runner = factory(env, log, **options) if options else factory(env, log)
    try:
        failures = runner.run(make_jobs(grid, states)) or []
        if failures:
            raise _failed(spec, failures, log)
        choices = select_all(spec, grid)  # on the driver, whichever backend trained the grid
        final = plan_final(spec, choices)
        fstates = {r.folder: run_state(r) for r in final}
        _check_stale(final, fstates, overwrite_stale)
        failures = runner.run(make_jobs(final, fstates)) or []
    finally:
        if callable(getattr(runner, "close", None)):
            runner.close()
    log(format_summary(choices, final, grid))
    if failures:
        raise _failed(spec, failures, log)
    (Path(spec.output) / FAILURES_FILE).unlink(missing_ok=True)
    return SweepOutcome(grid, final, choices, list(env.trained), est)


FAILURES_FILE = "failures.json"


def _failed(spec: SweepSpec, failures: list[dict[str, Any]], log: Callable[[str], None]) -> VptuneError:
    """List failed jobs in ``<output>/failures.json`` and the log; the error that ends the sweep."""
    path = Path(spec.output) / FAILURES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"failures": failures, "note": "re-run the sweep to retry these; finished runs "
                                                           "are skipped"})
    log(f"{len(failures)} job(s) failed:")
    for f in failures:
        log(f"  FAILED {f.get('job')}: {f.get('error')}")
    return VptuneError(f"{len(failures)} sweep job(s) failed after retries (listed in {path}; first: "
                       f"{failures[0].get('job')}: {failures[0].get('error')}); re-run the sweep to retry them")


def _gpus_per_run(spec: SweepSpec, backend: str, options: dict[str, Any]) -> float:
    """GPUs one run uses, for the cost: as asked, else 0 on CPU, else 1 (ray: when the cluster has GPUs)."""
    if options.get("gpus_per_run") is not None:
        return float(options["gpus_per_run"])
    if str(spec.base["runtime"]["device"]) == "cpu":
        return 0.0
    if backend == "local":
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 1.0




def _check_numbers(options: dict[str, Any], hours_per_run: float | None) -> None:
    """Resources and retries are finite and not negative; one run's hours are finite and positive."""
    import math

    for key, value in options.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
            raise VptuneError(f"{key} must be a finite number >= 0, got {value}")
    if hours_per_run is not None and not 0 < hours_per_run < math.inf:
        raise VptuneError(f"hours_per_run must be a finite number > 0, got {hours_per_run}")
