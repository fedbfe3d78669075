"""The sweep as data: the YAML spec of ``vptune sweep`` (:func:`load_sweep`, :func:`parse_sweep`),
every key and option checked, and the paper's default grids (:mod:`vptune.engine.sweep` runs it)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vptune.engine.config import (
    DataCfg,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    set_dotted,
    validate_config,
)
from vptune.engine.optim import method_optimizer
from vptune.engine.sweep_registry import check_backend
from vptune.errors import VptuneError, check_choice
from vptune.methods.base import METHODS, list_methods, parse_method_name, parse_options

# The paper's grids (REFERENCE.md "Training recipe"): base lr for SGD methods (prompts, linear, MLP,
# sidetune), base lr for AdamW methods (full, partial, bias, adapter), and weight decay.
PAPER_SGD_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
PAPER_ADAMW_LRS = (0.001, 0.0001, 0.0005, 0.005)
PAPER_WDS = (0.01, 0.001, 0.0001, 0.0)
DEFAULT_WDS = (0.0001, 0.01)  # vptune's recipe: the lr decides far more than the wd (recipe study)

TOP_KEYS = ("name", "base", "overrides", "output", "tasks", "methods", "grid", "seeds", "grid_seed", "splits",
            "backend", "feature_cache", "linear_one_pass")
# the grid axes of every method; a method adds the options it declares as ``sweep_axes`` (VPT: num_tokens)
GRID_AXES = ("lr", "wd", "fraction")
TASKS_KEYS = ("root", "names", "data")
TASK_KEYS = ("name", "root", "data")
METHOD_KEYS = ("name", "label", "options", "grid", "config")
SPLIT_KEYS = ("fit", "select", "final", "test")


# ------------------------------------------------------------------------------------------------------
# the sweep as data
# ------------------------------------------------------------------------------------------------------


@dataclass
class GridSpec:
    """Grid axes; None: not given (a method's grid falls back to the sweep's, then to the paper's).
    ``axes``: values of the method's own sweep axes (options it declares in ``sweep_axes``), by option name."""

    lr: list[float] | None = None
    wd: list[float] | None = None
    fraction: list[float] | None = None
    axes: dict[str, list[Any]] = field(default_factory=dict)

    def merged(self, over: GridSpec) -> GridSpec:
        pick = [getattr(over, a) if getattr(over, a) is not None else getattr(self, a) for a in GRID_AXES]
        return GridSpec(*pick, axes={**self.axes, **over.axes})


@dataclass
class TaskSpec:
    name: str
    root: str
    data: dict[str, Any] = field(default_factory=dict)  # data-section overrides (format, protocol, ...)


@dataclass
class MethodSpec:
    name: str  # a registered method (vptune.list_methods())
    label: str  # its folder name in the sweep
    options: dict[str, Any]
    grid: GridSpec  # fully resolved: lr, wd, fraction set; axes: the method's sweep axes given, in its order
    config: dict[str, Any] = field(default_factory=dict)  # train-config overrides for this method
    axis_names: dict[str, str] = field(default_factory=dict)  # sweep axis -> its short name in folder names


@dataclass
class Splits:
    fit: str = "train800"  # grid runs train here
    select: str = "val200"  # ... and are scored here
    final: str = "train800val200"  # final runs train here
    test: str = "test"  # ... and are tested here


@dataclass
class SweepSpec:
    base: dict[str, Any]  # the base train config, resolved (config_to_dict form)
    tasks: list[TaskSpec]
    methods: list[MethodSpec]
    output: str = "runs/sweep"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    grid_seed: int = 0
    splits: Splits = field(default_factory=Splits)
    backend: str = "local"
    feature_cache: str | None = None  # default <output>/features
    linear_one_pass: str = "auto"  # "auto" | "on" | "off"
    name: str = ""

    @property
    def cache_dir(self) -> Path:
        return Path(self.feature_cache) if self.feature_cache else Path(self.output) / "features"


def _check_keys(where: str, data: Any, valid: Sequence[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise VptuneError(f"{where} must be a mapping with keys {', '.join(valid)}; got {data!r}")
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise VptuneError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(valid)}")
    return data


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep YAML file; ``overrides`` (``"optim.epochs=1"``) apply to its base train config."""
    path = Path(path)
    if not path.is_file():
        raise VptuneError(f"sweep file {str(path)!r} " + ("is a folder, not a file" if path.is_dir()
                                                          else "does not exist"))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise VptuneError(f"sweep file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise VptuneError(f"sweep file {path} is not a text (YAML) file") from None
    spec = parse_sweep(data or {}, base_dir=path.parent, overrides=overrides)
    spec.name = spec.name or path.stem
    return spec


def parse_sweep(data: dict[str, Any], base_dir: str | Path = ".", overrides: Sequence[str] = ()) -> SweepSpec:
    """Build a :class:`SweepSpec`: every key checked, every method and option validated (VptuneError
    listing the valid choices). Keys: base (train config: a path -- relative to the sweep file or the
    working folder -- or an inline mapping), overrides (``a.b=value`` for the base), output, tasks,
    methods, grid (lr, wd, fraction and the methods' sweep axes, e.g. num_tokens), seeds (a count or a list), grid_seed, splits (fit,
    select, final, test), backend, feature_cache, linear_one_pass (auto | on | off)."""
    _check_keys("the sweep", data, TOP_KEYS)
    for key in ("base", "tasks", "methods"):
        if key not in data:
            raise VptuneError(f"the sweep has no {key!r}; required keys: base, tasks, methods")
    own = data.get("overrides") or []
    own = [str(o) for o in _as_list(own, "overrides")] if own else []
    base = _load_base(data["base"], Path(base_dir), own + list(overrides))
    grid = _parse_grid(data.get("grid") or {}, "grid", _all_sweep_axes())
    methods = [_parse_method(m, i, grid, base) for i, m in enumerate(_as_list(data["methods"], "methods"))]
    _unique([m.label for m in methods], "method label")
    tasks = _parse_tasks(data["tasks"])
    splits = Splits(**{k: str(v) for k, v in _check_keys("splits", data.get("splits") or {}, SPLIT_KEYS).items()})
    raw = data.get("linear_one_pass", "auto")
    one_pass = {True: "on", False: "off"}.get(raw, raw) if isinstance(raw, (bool, str)) else raw
    check_choice("linear_one_pass", one_pass, ("auto", "on", "off"))
    backend = str(data.get("backend", "local"))
    check_backend(backend)
    return SweepSpec(base=base, tasks=tasks, methods=methods, output=str(data.get("output", "runs/sweep")),
                     seeds=_parse_seeds(data.get("seeds", 3)), splits=splits, backend=backend,
                     grid_seed=_int(data.get("grid_seed", base["runtime"]["seed"]), "grid_seed"),
                     feature_cache=data.get("feature_cache"), linear_one_pass=one_pass, name=str(data.get("name", "")))


def _load_base(value: Any, base_dir: Path, overrides: list[str]) -> dict[str, Any]:
    if isinstance(value, str):
        path = base_dir / value if (base_dir / value).is_file() else Path(value)
        return config_to_dict(load_config(path, overrides))
    if not isinstance(value, dict):
        raise VptuneError(f"base must be a train-config path or mapping, got {value!r}")
    data = json.loads(json.dumps(value))
    for item in overrides:
        set_dotted(data, *parse_override(item))
    cfg = config_from_dict(data)
    validate_config(cfg)
    return config_to_dict(cfg)


def _as_list(value: Any, where: str) -> list[Any]:
    if isinstance(value, (str, int, float, dict)):
        return [value]
    if not isinstance(value, list) or not value:
        raise VptuneError(f"{where} must be a value or a non-empty list, got {value!r}")
    return value


def _unique(names: list[str], what: str) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VptuneError(f"duplicate {what}(s) {', '.join(dup)}; give each a distinct name (label)")


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise VptuneError(f"{where} must be an integer, got {v!r}")
    return int(v)


def _parse_grid(data: Any, where: str, axes: Sequence[str]) -> GridSpec:
    """lr, wd and fraction (numbers, checked here) and the sweep axes ``axes`` (values checked by the
    method's options when the grid meets its method)."""
    _check_keys(where, data, ("lr", "wd", *axes, "fraction"))
    out: dict[str, Any] = {"axes": {}}
    for axis, raw in data.items():
        values = []
        for v in _as_list(raw, f"{where}.{axis}"):
            v = _grid_number(v, axis, where) if axis in GRID_AXES else _grid_option(v, axis, where)
            if v not in values:
                values.append(v)
        if axis in GRID_AXES:
            out[axis] = values
        else:
            out["axes"][axis] = values
    return GridSpec(**out)


def _grid_number(v: Any, axis: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise VptuneError(f"{where}.{axis} values must be numbers, got {v!r}")
    try:
        v = float(v)
    except ValueError:
        raise VptuneError(f"{where}.{axis} values must be numbers, got {v!r}") from None
    if not ({"lr": v > 0, "wd": v >= 0, "fraction": 0 < v <= 1}[axis] and math.isfinite(v)):
        rule = {"lr": "> 0", "wd": ">= 0", "fraction": "in (0, 1]"}[axis]
        raise VptuneError(f"{where}.{axis} values must be {rule}, got {v!r}")
    return v


def _grid_option(v: Any, axis: str, where: str) -> Any:
    if not isinstance(v, (bool, int, float, str)):
        raise VptuneError(f"{where}.{axis} values must be numbers or strings (option values), got {v!r}")
    return v


def _all_sweep_axes() -> list[str]:
    """Every registered method's sweep axes, each once (the keys a sweep-wide grid may give)."""
    out: list[str] = []
    for cls in METHODS.values():
        out += [a for a in cls.sweep_axes if a not in out]
    return out


def _check_axes(mgrid: GridSpec, cls: type, name: str, options: dict[str, Any], implied: dict[str, Any]) -> None:
    """Only the method's declared sweep axes, and every combination of their values a valid option set."""
    for axis in mgrid.axes:
        if axis not in cls.sweep_axes:
            others = sorted(n for n, c in METHODS.items() if axis in c.sweep_axes)
            raise VptuneError(f"grid axis {axis} is not a sweep axis of method {name!r} (its grid axes: lr, wd, "
                              f"{''.join(a + ', ' for a in cls.sweep_axes)}fraction); methods with a {axis} "
                              f"axis: {', '.join(others) or 'none'}")
    names = list(mgrid.axes)
    for values in itertools.product(*(mgrid.axes[a] for a in names)):
        parse_options(cls, {**options, **implied, **dict(zip(names, values))})


def _parse_method(entry: Any, i: int, grid: GridSpec, base: dict[str, Any]) -> MethodSpec:
    entry = {"name": entry} if isinstance(entry, str) else entry
    _check_keys(f"methods[{i}]", entry, METHOD_KEYS)
    if "name" not in entry:
        raise VptuneError(f"methods[{i}] has no name; valid methods: {', '.join(list_methods())}")
    name = str(entry["name"])
    cls, implied = parse_method_name(name)
    inherited = base["method"]["options"] if base["method"]["name"] == name else {}
    options = {**inherited, **_check_keys(f"methods[{i}].options", entry.get("options") or {}, _option_names(cls))}
    mgrid = grid.merged(_parse_grid(entry.get("grid") or {}, f"methods[{i}].grid", _all_sweep_axes()))
    _check_axes(mgrid, cls, name, options, implied)
    config = entry.get("config") or {}
    merged = config_from_dict(_deep_merge(base, config))  # refuses unknown keys, listing the valid ones
    optimizer = method_optimizer(cls, merged.optim.optimizer)
    if merged.recipe == "reference":  # the paper's grids (REFERENCE.md "Training recipe")
        default_lrs, default_wds = PAPER_SGD_LRS if optimizer == "sgd" else PAPER_ADAMW_LRS, PAPER_WDS
    else:  # vptune's recipe: the method's grid for its optimiser, chosen by the recipe study
        default_lrs, default_wds = cls.lr_grid[optimizer], DEFAULT_WDS
    lrs = mgrid.lr or list(default_lrs)
    label = str(entry.get("label", name))
    if not label or "/" in label or label.startswith("."):
        raise VptuneError(f"methods[{i}].label {label!r} must be a plain folder name")
    axes = {a: mgrid.axes[a] for a in cls.sweep_axes if a in mgrid.axes}  # in the method's declared order
    resolved = GridSpec(lrs, mgrid.wd or list(default_wds), mgrid.fraction or [1.0], axes)
    axis_names = {a: cls.sweep_axis_names.get(a, a) for a in axes}
    return MethodSpec(name, label, options, resolved, config, axis_names)


def _option_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls.options_cls)]


def _parse_tasks(value: Any) -> list[TaskSpec]:
    data_keys = [k for k in DataCfg.__dataclass_fields__ if k != "root"]
    if isinstance(value, dict):
        _check_keys("tasks", value, TASKS_KEYS)
        if "root" not in value:
            raise VptuneError("tasks needs a root (the folder holding one sub-folder per task) with optional names")
        root = Path(str(value["root"]))
        names = value.get("names")
        if names is None:
            if not root.is_dir():
                raise VptuneError(f"tasks root {str(root)!r} does not exist")
            names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        common = _check_keys("tasks.data", value.get("data") or {}, data_keys)
        tasks = [TaskSpec(str(n), str(root / str(n)), dict(common)) for n in _as_list(names, "tasks.names")]
    else:
        tasks = []
        for i, t in enumerate(_as_list(value, "tasks")):
            t = {"root": t} if isinstance(t, str) else _check_keys(f"tasks[{i}]", t, TASK_KEYS)
            if "root" not in t:
                raise VptuneError(f"tasks[{i}] has no root (the task's data folder)")
            name = str(t.get("name") or Path(str(t["root"])).name)
            tasks.append(TaskSpec(name, str(t["root"]), dict(_check_keys(f"tasks[{i}].data", t.get("data") or {},
                                                                          data_keys))))
    if not tasks:
        raise VptuneError("the sweep has no tasks")
    _unique([t.name for t in tasks], "task name")
    return tasks


def _parse_seeds(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise VptuneError(f"seeds must be >= 1 (a count) or a list of seeds, got {value}")
        return list(range(value))
    seeds = [_int(s, "seeds") for s in _as_list(value, "seeds")]
    _unique([str(s) for s in seeds], "seed")
    return seeds


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(a))
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
