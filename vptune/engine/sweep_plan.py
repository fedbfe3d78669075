"""``vptune sweep``: the VTAB-1k protocol, written once, for every method.

The protocol (VPT paper Sec. 4.1; REFERENCE.md "Training recipe", VTAB-1k protocol):

1. **Grid.** Every setting of the grid axes -- base lr x weight decay, optionally the method's declared sweep axes (VPT: prompt
   length ``num_tokens``) and data fraction (the paper's data-scale study) -- trains on ``train800`` and
   is scored on ``val200`` at its last epoch. Grid runs never open the test split.
2. **Selection** (:func:`select_best`), per task, method and fraction: the highest val top-1. Ties (equal
   when rounded to 6 decimals) go to the smaller lr (the paper's rule), then to the smaller weight decay, then to the
   shorter prompt. The last two are vptune's choice: among equally good settings, prefer the least
   regularised and cheapest one; any fixed order keeps the choice deterministic. The test split is never
   consulted.
3. **Final.** The chosen setting retrains on ``train800val200`` (1,000 images) once per seed (default 3)
   and reports last-epoch test top-1 (``vptune report`` aggregates it).

A sweep is data (YAML, see :func:`~vptune.engine.sweep_spec.parse_sweep` and ``configs/sweeps/``) and its
runs are idempotent by folder::

    <output>/<task>/<method>/grid/lr{lr}_wd{wd}[_p{num_tokens}...][_frac{fraction}]/   one grid run (one _{short}{value} per sweep axis)
    <output>/<task>/<method>/selection.json                                          every score, the choice
    <output>/<task>/<method>/final/seed{s}[_frac{fraction}]/                         one final run

A folder whose ``result.json`` holds the same config is finished and never trained again. Linear-probe
grids (and finals) train every head in one pass on cached frozen features (:mod:`vptune.engine.features`).
Runs execute through a backend (:data:`BACKENDS`; ``"local"``: sequentially in this process; ``"ray"``:
as Ray tasks over a cluster, :mod:`vptune.engine.ray_backend`). Jobs that fail after the backend's retries
are listed in ``<output>/failures.json`` and end the sweep with an error once their stage is over.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vptune.artifact import atomic_write_json
from vptune.backbones.base import Preprocessing
from vptune.data import DataConfig, open_split
from vptune.engine.config import config_diff, config_from_dict, config_to_dict, validate_config
from vptune.engine.features import is_head_only, one_pass_eligible
from vptune.engine.runfolder import CONFIG_FILE, read_result
from vptune.engine.sweep_spec import MethodSpec, SweepSpec, TaskSpec, _deep_merge
from vptune.errors import VptuneError

SELECTION_FILE = "selection.json"
SELECTION_RULE = ("highest val top-1 at the last epoch; ties (equal to 6 decimals) -> smaller lr, then smaller "
                  "weight decay, then smaller values of the method's sweep axes in its declared order (VPT: fewer "
                  "prompt tokens); the test split is never used")
DIVERGED = "diverged"  # result.json status of a run whose loss exploded: a failed grid point, never selected
TIE_DIGITS = 6  # val top-1 (percent) equal to 6 decimals is a tie


# ------------------------------------------------------------------------------------------------------
# the plan: one Run per folder
# ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One planned run: where it lives, its full train config and its place in the grid."""

    task: str
    method: str  # the method's label
    stage: str  # "grid" | "final"
    folder: Path
    config: dict[str, Any]
    lr: float
    wd: float
    axes: tuple[tuple[str, Any], ...]  # (option, value) of the method's sweep axes, in its declared order
    fraction: float
    seed: int
    one_pass: bool = False  # trained by the one-pass linear sweep


def fmt(v: float) -> str:
    """A number as it appears in folder names: 50, 2.5, 0.0001, 1e-05."""
    return format(float(v), "g") if not isinstance(v, int) else str(v)


def grid_folder(lr: float, wd: float, axes: dict[str, Any] | None = None, fraction: float = 1.0) -> str:
    """``lr{lr}_wd{wd}[_{short}{value}...][_frac{fraction}]``: ``axes`` maps each sweep axis's short name
    (the method's ``sweep_axis_names``; VPT's num_tokens is ``p``) to its value."""
    name = f"lr{fmt(lr)}_wd{fmt(wd)}"
    name += "".join(f"_{short}{fmt(v) if isinstance(v, float) else v}" for short, v in (axes or {}).items())
    return name + (f"_frac{fmt(fraction)}" if fraction != 1.0 else "")


def final_folder(seed: int, fraction: float = 1.0) -> str:
    return f"seed{seed}" + (f"_frac{fmt(fraction)}" if fraction != 1.0 else "")


def run_config(spec: SweepSpec, task: TaskSpec, method: MethodSpec, *, stage: str, lr: float, wd: float,
               axes: dict[str, Any], fraction: float, seed: int, folder: Path) -> dict[str, Any]:
    """The full train config of one run: base, the method's overrides, the task's data, the grid point
    and the stage's splits (grid: fit/select, no test; final: final/test, no validation)."""

    cfg = _deep_merge(spec.base, method.config)
    options = {**method.options, **axes}
    cfg["method"] = {"name": method.name, "options": options}
    cfg["data"].update(task.data)
    sp = spec.splits
    train, val, test = (sp.fit, sp.select, None) if stage == "grid" else (sp.final, None, sp.test)
    cfg["data"].update(root=task.root, fraction=fraction, train_split=train, val_split=val, test_split=test)
    cfg["optim"].update(base_lr=lr, weight_decay=wd)
    cfg["runtime"]["seed"] = seed
    cfg["output"] = str(folder)
    checked = config_from_dict(cfg)
    validate_config(checked)
    return config_to_dict(checked)


def _one_pass(spec: SweepSpec, method: MethodSpec, config: dict[str, Any]) -> bool:

    if not is_head_only(method.name) or spec.linear_one_pass == "off":
        return False
    why = one_pass_eligible(config_from_dict(config))
    if why and spec.linear_one_pass == "on":
        raise VptuneError(f"linear_one_pass is on, but {method.label} cannot use it: {why}")
    return why is None


def _make_run(spec: SweepSpec, task: TaskSpec, method: MethodSpec, stage: str, folder: Path, lr: float,
              wd: float, axes: tuple[tuple[str, Any], ...], frac: float, seed: int) -> Run:
    cfg = run_config(spec, task, method, stage=stage, lr=lr, wd=wd, axes=dict(axes), fraction=frac, seed=seed,
                     folder=folder)
    return Run(task.name, method.label, stage, folder, cfg, lr, wd, axes, frac, seed, _one_pass(spec, method, cfg))


def axis_points(method: MethodSpec) -> list[tuple[tuple[str, Any], ...]]:
    """Every setting of the method's sweep axes (one empty setting when it has none)."""
    names = list(method.grid.axes)
    return [tuple(zip(names, values)) for values in itertools.product(*(method.grid.axes[a] for a in names))]


def method_dir(spec: SweepSpec, task: str, method: str) -> Path:
    return Path(spec.output) / task / method


def plan_grid(spec: SweepSpec) -> list[Run]:
    """Every grid run of the sweep, task by task, method by method."""
    runs = []
    for task in spec.tasks:
        for m in spec.methods:
            for frac in m.grid.fraction or [1.0]:
                for axes in axis_points(m):
                    short = {m.axis_names.get(a, a): v for a, v in axes}
                    for lr in m.grid.lr or []:
                        for wd in m.grid.wd or []:
                            folder = method_dir(spec, task.name, m.label) / "grid" / grid_folder(lr, wd, short, frac)
                            runs.append(_make_run(spec, task, m, "grid", folder, lr, wd, axes, frac, spec.grid_seed))
    return runs


def plan_final(spec: SweepSpec, choices: dict[tuple[str, str, float], GridScore]) -> list[Run]:
    """The final runs: each (task, method, fraction)'s chosen setting, once per seed."""
    runs = []
    for task in spec.tasks:
        for m in spec.methods:
            for frac in m.grid.fraction or [1.0]:
                c = choices[(task.name, m.label, frac)]
                for seed in spec.seeds:
                    folder = method_dir(spec, task.name, m.label) / "final" / final_folder(seed, frac)
                    runs.append(_make_run(spec, task, m, "final", folder, c.lr, c.wd, c.axes, frac, seed))
    return runs


def run_state(run: Run) -> str:
    """``done`` (a result of this config), ``stale`` (a result of another config), ``partial`` (started,
    unfinished) or ``pending``."""
    result = read_result(run.folder)
    if result is not None and result.get("status") in ("done", "stopped", DIVERGED):
        return "stale" if config_diff(result.get("config") or {}, run.config) else "done"
    return "partial" if (run.folder / CONFIG_FILE).is_file() else "pending"


# ------------------------------------------------------------------------------------------------------
# selection on val only
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridScore:
    """One grid run's last-epoch val top-1 (the only number selection looks at)."""

    lr: float
    wd: float
    axes: tuple[tuple[str, Any], ...]  # (option, value) of the method's sweep axes, in its declared order
    fraction: float
    val_top1: float
    folder: str = ""

    def axis(self, name: str) -> Any:
        """The value of sweep axis ``name`` (None when the grid has no such axis)."""
        return dict(self.axes).get(name)

    def to_dict(self) -> dict[str, Any]:
        """lr, wd, one key per sweep axis (``num_tokens``), fraction, val_top1, folder."""
        return {"lr": self.lr, "wd": self.wd, **dict(self.axes), "fraction": self.fraction,
                "val_top1": self.val_top1, "folder": self.folder}


def selection_key(s: GridScore) -> tuple[Any, ...]:
    """Sort key, best first: highest val top-1 (to 6 decimals), then smaller lr, smaller weight decay,
    smaller sweep-axis values in the method's order (see the module docstring)."""
    return (-round(s.val_top1, TIE_DIGITS), s.lr, s.wd, *(v for _, v in s.axes))


def select_best(scores: Sequence[GridScore]) -> GridScore:
    """The chosen setting of one (task, method, fraction) grid (the module docstring gives the rule)."""
    if not scores:
        raise VptuneError("no grid results to select from")
    return min(scores, key=selection_key)


def grid_score(run: Run) -> GridScore:
    """The val top-1 of a finished grid run (its test numbers, if any, are ignored)."""

    result = read_result(run.folder) or {}
    val = result.get("val") or {}
    if "top1" not in val:
        raise VptuneError(f"grid run {run.folder} has no validation result; selection needs val top-1 "
                          "(is splits.select set?)")
    return GridScore(run.lr, run.wd, run.axes, run.fraction, float(val["top1"]), str(run.folder))


def select_all(spec: SweepSpec, grid: Sequence[Run]) -> dict[tuple[str, str, float], GridScore]:
    """Choose per (task, method, fraction) and write each ``<task>/<method>/selection.json``."""
    groups: dict[tuple[str, str], list[GridScore]] = {}
    diverged: dict[tuple[str, str], list[str]] = {}
    for run in grid:
        groups.setdefault((run.task, run.method), [])
        if (read_result(run.folder) or {}).get("status") == DIVERGED:
            diverged.setdefault((run.task, run.method), []).append(str(run.folder))
        else:
            groups[(run.task, run.method)].append(grid_score(run))
    choices: dict[tuple[str, str, float], GridScore] = {}
    for (task, method), scores in groups.items():
        if not scores:
            raise VptuneError(f"every grid run of {task}/{method} diverged ({len(diverged[(task, method)])} "
                              "runs, status 'diverged' in result.json): nothing to select; lower the lr grid")
        fractions = sorted({s.fraction for s in scores}, reverse=True)
        picked = [select_best([s for s in scores if s.fraction == f]) for f in fractions]
        choices.update({(task, method, c.fraction): c for c in picked})
        atomic_write_json(method_dir(spec, task, method) / SELECTION_FILE, {
            "task": task, "method": method, "rule": SELECTION_RULE, "fit_split": spec.splits.fit,
            "selected_on": spec.splits.select, "grid": [s.to_dict() for s in sorted(scores, key=selection_key)],
            "choice": picked[0].to_dict() if len(picked) == 1 else None,
            "choices": [c.to_dict() for c in picked],
            "diverged": sorted(diverged.get((task, method), []))})
    return choices


# ------------------------------------------------------------------------------------------------------
# cost estimate
# ------------------------------------------------------------------------------------------------------


@dataclass
class CostEstimate:
    runs: int  # grid + final runs of the sweep
    done: int  # already finished
    work: list[tuple[str, int, int]]  # (method label, epochs, training images) of each separate run to train
    feature_images: int  # one-pass linear: images whose features are extracted (once)
    seconds: float | None  # from the timing of finished runs, when there are any
    timed_runs: int = 0

    @property
    def image_epochs(self) -> int:
        return sum(e * n for _, e, n in self.work)


def _split_size(cache: dict[tuple, int], data: dict[str, Any], split: str, fraction: float, seed: int) -> int:
    """Images in ``split`` of a task (lazy: labels only), at ``fraction`` for ``seed``."""
    key = (data["root"], data["format"], split, fraction, seed)
    if key not in cache:
        dc = DataConfig(root=data["root"], format=data["format"], fraction=fraction, num_workers=0)
        cache[key] = len(open_split(dc, split, Preprocessing(), train=False, seed=seed))
    return cache[key]


def _rate(results: Sequence[tuple[str, dict[str, Any]]]) -> tuple[dict[str, float], int]:
    """Seconds per image-epoch by method label (key "" = all), from finished separate runs."""
    sums: dict[str, list[float]] = {}
    n = 0
    for label, r in results:
        work = (r.get("epochs") or 0) * ((r.get("data") or {}).get("n_train") or 0)
        if r.get("one_pass") or not work or not r.get("wall_s"):
            continue
        n += 1
        for key in (label, ""):
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + float(r["wall_s"]), acc[1] + work
    return {k: s / w for k, (s, w) in sums.items()}, n


def _final_slots(spec: SweepSpec, grid: Sequence[Run]) -> list[tuple[Run, int, Path]]:
    """(a grid run of the (task, method, fraction), seed, final folder) for every final run."""
    firsts = {(g.task, g.method, g.fraction): g for g in reversed(grid)}.values()
    return [(r, seed, method_dir(spec, r.task, r.method) / "final" / final_folder(seed, r.fraction))
            for r in firsts for seed in spec.seeds]


def estimate_cost(spec: SweepSpec, grid: Sequence[Run], states: dict[Path, str]) -> CostEstimate:
    """Runs, the (epochs, images) of every separate run still to train, the feature images of one-pass
    linear sweeps and, when finished runs give a timing, the seconds left. Final runs are counted with the
    final split before selection; one counts as done when its folder holds a result."""

    sizes: dict[tuple, int] = {}
    work: list[tuple[str, int, int]] = []
    finished: list[tuple[str, dict[str, Any]]] = []
    features: set[tuple[str, str]] = set()
    todo = [(r, r.seed, r.config["data"]["train_split"], None if states[r.folder] != "done" else r.folder)
            for r in grid]
    todo += [(r, seed, spec.splits.final, folder if read_result(folder) else None)
             for r, seed, folder in _final_slots(spec, grid)]
    for r, seed, split, done_folder in todo:
        d = r.config["data"]
        if done_folder is not None:
            finished.append((r.method, read_result(done_folder) or {}))
        elif r.one_pass:
            features.add((d["root"], d["format"]))
        else:
            work.append((r.method, r.config["optim"]["epochs"], _split_size(sizes, d, split, r.fraction, seed)))
    splits = (spec.splits.fit, spec.splits.select, spec.splits.final, spec.splits.test)
    feature_images = sum(_split_size(sizes, {"root": root, "format": f}, s, 1.0, 0) for root, f in features
                         for s in splits)
    rates, timed = _rate(finished)
    seconds = sum(e * n * rates.get(m, rates[""]) for m, e, n in work) if rates else None
    return CostEstimate(len(todo), len(finished), work, feature_images, seconds, timed)


def format_estimate(spec: SweepSpec, grid: Sequence[Run], est: CostEstimate) -> str:
    """What the sweep will cost, printed before anything trains."""
    lines = [(f"sweep {spec.name or spec.output}: {len(spec.tasks)} task(s) x {len(spec.methods)} method(s), "
              f"{len(grid)} grid run(s) + {est.runs - len(grid)} final run(s) ({len(spec.seeds)} seed(s)); "
              f"{est.done} already done, {est.runs - est.done} to train")]
    if est.work:
        epochs = sorted({e for _, e, _ in est.work})
        images = sorted({n for _, _, n in est.work})
        span = lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"
        lines.append(f"cost: {len(est.work)} run(s) x {span(epochs)} epoch(s) x {span(images)} training images "
                     f"= {est.image_epochs:,} image-epochs")
    if est.feature_images:
        lines.append(f"      + one-pass linear probe: features of {est.feature_images:,} images, computed once "
                     "(then every head of a grid trains in one pass)")
    if est.seconds is not None:
        t = f"{est.seconds / 3600:.2f} h" if est.seconds >= 3600 else f"{est.seconds / 60:.1f} min"
        lines.append(f"estimated time: {t} (from the timing of {est.timed_runs} finished run(s))")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# execution: jobs, an environment per worker, backends
# ------------------------------------------------------------------------------------------------------



def format_compute(est: CostEstimate, hours_per_run: float | None, gpus_per_run: float) -> str | None:
    """The compute line of the cost: run-hours and GPU-hours of the separate runs still to train, from
    ``hours_per_run`` when given, else from the timing of finished runs (None when nothing is left)."""
    if not est.work:
        return None
    if hours_per_run is not None:
        if not hours_per_run > 0:
            raise VptuneError(f"--hours-per-run must be > 0, got {hours_per_run}")
        hours, source = hours_per_run * len(est.work), f"--hours-per-run {hours_per_run:g} x {len(est.work)} run(s)"
    elif est.seconds is not None:
        hours, source = est.seconds / 3600, f"the timing of {est.timed_runs} finished run(s)"
    else:
        return ("GPU-hours: unknown until a run has finished (pass --hours-per-run H, one run's hours, "
                "for an estimate now)")
    if gpus_per_run > 0:
        return (f"compute: {hours:.2f} run-hours x {gpus_per_run:g} GPU(s) per run = "
                f"{hours * gpus_per_run:.2f} GPU-hours (from {source})")
    return f"compute: {hours:.2f} run-hours on CPU, 0 GPU-hours (from {source})"


def format_summary(choices: dict[tuple[str, str, float], GridScore], final: Sequence[Run],
                   grid: Sequence[Run] = ()) -> str:
    """One line per (task, method, fraction): the choice, its val top-1 and the final test top-1; then the
    grid runs of ``grid`` that diverged (listed, never selected), each with its reason."""

    lines = [f"{'task':<20} {'method':<14} {'frac':>5} {'lr':>7} {'wd':>7} {'axes':>14} {'val':>7}  test top-1"]
    for (task, method, frac), c in choices.items():
        tests = [float(((read_result(r.folder) or {}).get("test") or {}).get("top1", math.nan)) for r in final
                 if (r.task, r.method, r.fraction) == (task, method, frac)]
        tests = [t for t in tests if not math.isnan(t)]
        sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
        shown = f"{statistics.mean(tests):.2f} ± {sd:.2f} (n={len(tests)})" if tests else "-"
        lines.append(f"{task:<20} {method:<14} {fmt(frac):>5} {fmt(c.lr):>7} {fmt(c.wd):>7} "
                     f"{' '.join(f'{a}={v}' for a, v in c.axes) or '-':>14} {c.val_top1:>7.2f}  {shown}")
    return "\n".join(lines + diverged_lines(grid))


def diverged_lines(grid: Sequence[Run]) -> list[str]:
    """The summary's list of diverged grid runs (``status: diverged`` in their result.json)."""
    diverged = [(r, res) for r in grid if (res := read_result(r.folder) or {}).get("status") == DIVERGED]
    if not diverged:
        return []
    lines = [f"{len(diverged)} grid run(s) diverged (status 'diverged' in result.json; never selected):"]
    return lines + [f"  {r.task}/{r.method}/grid/{r.folder.name}: {res.get('diverged') or 'loss exploded'}"
                    for r, res in diverged]
