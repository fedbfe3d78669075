"""The sweep as data: the YAML spec of ``vptune sweep`` (:func:`load_sweep`, :func:`parse_sweep`),
every key and option checked, and the paper's default grids (:mod:`vptune.engine.sweep` runs it)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vptune.engine.sweep_registry import check_backend
from vptune.errors import VptuneError, check_choice

# The paper's grids (REFERENCE.md "Training recipe"): base lr for SGD methods (prompts, linear, MLP,
# sidetune), base lr for AdamW methods (full, partial, bias, adapter), and weight decay.
PAPER_SGD_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
PAPER_ADAMW_LRS = (0.001, 0.0001, 0.0005, 0.005)
PAPER_WDS = (0.01, 0.001, 0.0001, 0.0)
DEFAULT_WDS = (0.0001, 0.01)  # vptune's recipe: the lr decides far more than the wd (recipe study)

TOP_KEYS = ("name", "base", "overrides", "output", "tasks", "methods", "grid", "seeds", "grid_seed", "splits",
            "backend", "feature_cache", "linear_one_pass")
GRID_AXES = ("lr", "wd", "num_tokens", "fraction")
TASKS_KEYS = ("root", "names", "data")
TASK_KEYS = ("name", "root", "data")
METHOD_KEYS = ("name", "label", "options", "grid", "config")
SPLIT_KEYS = ("fit", "select", "final", "test")


# ------------------------------------------------------------------------------------------------------
# the sweep as data
# ------------------------------------------------------------------------------------------------------


@dataclass
class GridSpec:
    """Grid axes; None: not given (a method's grid falls back to the sweep's, then to the paper's)."""

    lr: list[float] | None = None
    wd: list[float] | None = None
    num_tokens: list[int] | None = None
    fraction: list[float] | None = None

    def merged(self, over: GridSpec) -> GridSpec:
        return GridSpec(*(getattr(over, a) if getattr(over, a) is not None else getattr(self, a) for a in GRID_AXES))


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
    grid: GridSpec  # fully resolved: lr, wd, fraction set; num_tokens None or a list
    config: dict[str, Any] = field(default_factory=dict)  # train-config overrides for this method


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
    methods, grid (lr, wd, num_tokens, fraction), seeds (a count or a list), grid_seed, splits (fit,
    select, final, test), backend, feature_cache, linear_one_pass (auto | on | off)."""
    _check_keys("the sweep", data, TOP_KEYS)
    for key in ("base", "tasks", "methods"):
        if key not in data:
            raise VptuneError(f"the sweep has no {key!r}; required keys: base, tasks, methods")
    own = data.get("overrides") or []
    own = [str(o) for o in _as_list(own, "overrides")] if own else []
    base = _load_base(data["base"], Path(base_dir), own + list(overrides))
    grid = _parse_grid(data.get("grid") or {}, "grid")
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
    from vptune.engine.config import (
        config_from_dict,
        config_to_dict,
        load_config,
        parse_override,
        set_dotted,
        validate_config,
    )

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


def _parse_grid(data: Any, where: str) -> GridSpec:
    _check_keys(where, data, GRID_AXES)
    axes: dict[str, Any] = {}
    for axis, raw in data.items():
        values = []
        for v in _as_list(raw, f"{where}.{axis}"):
            if axis == "num_tokens":
                v = _int(v, f"{where}.num_tokens")
                ok = v >= 1
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    raise VptuneError(f"{where}.{axis} values must be numbers, got {v!r}")
                try:
                    v = float(v)
                except ValueError:
                    raise VptuneError(f"{where}.{axis} values must be numbers, got {v!r}") from None
                ok = {"lr": v > 0, "wd": v >= 0, "fraction": 0 < v <= 1}[axis] and math.isfinite(v)
            if not ok:
                rule = {"lr": "> 0", "wd": ">= 0", "fraction": "in (0, 1]", "num_tokens": ">= 1"}[axis]
                raise VptuneError(f"{where}.{axis} values must be {rule}, got {v!r}")
            if v not in values:
                values.append(v)
        axes[axis] = values
    return GridSpec(**axes)


def _parse_method(entry: Any, i: int, grid: GridSpec, base: dict[str, Any]) -> MethodSpec:
    from vptune.engine.config import config_from_dict
    from vptune.methods.base import parse_method_name, parse_options

    entry = {"name": entry} if isinstance(entry, str) else entry
    _check_keys(f"methods[{i}]", entry, METHOD_KEYS)
    if "name" not in entry:
        raise VptuneError(f"methods[{i}] has no name; valid methods: {', '.join(_methods())}")
    name = str(entry["name"])
    cls, implied = parse_method_name(name)
    inherited = base["method"]["options"] if base["method"]["name"] == name else {}
    options = {**inherited, **_check_keys(f"methods[{i}].options", entry.get("options") or {}, _option_names(cls))}
    mgrid = grid.merged(_parse_grid(entry.get("grid") or {}, f"methods[{i}].grid"))
    if mgrid.num_tokens and "num_tokens" not in _option_names(cls):
        raise VptuneError(f"grid axis num_tokens applies to methods with a num_tokens option "
                          f"({', '.join(_methods('num_tokens'))}), not {name!r}")
    for p in mgrid.num_tokens or [None]:
        parse_options(cls, {**options, **implied, **({"num_tokens": p} if p is not None else {})})
    config = entry.get("config") or {}
    merged = config_from_dict(_deep_merge(base, config))  # refuses unknown keys, listing the valid ones
    optimizer = {"auto": cls.optimizer, "paper": cls.paper_optimizer}.get(merged.optim.optimizer,
                                                                           merged.optim.optimizer)
    if merged.recipe == "reference":  # the paper's grids (REFERENCE.md "Training recipe")
        default_lrs, default_wds = PAPER_SGD_LRS if optimizer == "sgd" else PAPER_ADAMW_LRS, PAPER_WDS
    else:  # vptune's recipe: the method's grid for its optimiser, chosen by the recipe study
        default_lrs, default_wds = cls.lr_grid[optimizer], DEFAULT_WDS
    lrs = mgrid.lr or list(default_lrs)
    label = str(entry.get("label", name))
    if not label or "/" in label or label.startswith("."):
        raise VptuneError(f"methods[{i}].label {label!r} must be a plain folder name")
    resolved = GridSpec(lrs, mgrid.wd or list(default_wds), mgrid.num_tokens, mgrid.fraction or [1.0])
    return MethodSpec(name, label, options, resolved, config)


def _option_names(cls: type) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls.options_cls)]


def _methods(option: str | None = None) -> list[str]:
    """Registered method names; with ``option``: those whose options include it."""
    from vptune.methods.base import METHODS, list_methods

    if option is None:
        return list_methods()
    return sorted(n for n, cls in METHODS.items() if option in _option_names(cls))


def _parse_tasks(value: Any) -> list[TaskSpec]:
    from vptune.engine.config import DataCfg

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
