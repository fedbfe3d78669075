"""Training configuration: nested dataclasses, loadable from YAML, with dotted overrides.

    cfg = load_config("configs/vpt_deep_vtab.yaml", ["optim.base_lr=0.5", "method.options.num_tokens=50"])

Every key is checked: an unknown key at any level raises :class:`VptuneError` listing the valid keys,
and every value is converted to its field's type (``"1e-4"`` -> float, ``"null"`` -> None) or refused.
Free-form mappings (``method.options``, ``backbone.config``) take any key; the method and the backbone
validate those themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vptune.checks import scalar
from vptune.engine.evaluate import PRECISIONS
from vptune.engine.recipes import with_recipe
from vptune.errors import VptuneError, check_choice
from vptune.methods.base import HEAD_INITS, HEAD_NORMS

OPTIMIZERS = ("auto", "paper", "sgd", "adamw")
LR_SCALINGS = ("none", "linear")
SCHEDULES = ("step", "epoch")
NORMALIZATIONS = ("backbone", "imagenet")



@dataclass
class BackboneCfg:
    """name: a registered backbone (``vptune.list_backbones()``); weights: checkpoint file or folder;
    source: checkpoint layout (auto, timm, jax, hf, mae, mocov3, ...); input_size: image side;
    config: backbone config overrides (e.g. ``{depth: 2}``) passed to ``create_backbone``."""

    name: str | None = None
    weights: str | None = None
    source: str = "auto"
    input_size: int | None = None
    config: dict = field(default_factory=dict)


@dataclass
class MethodCfg:
    """name: a method (``vptune.list_methods()``); options: that method's options.
    head_norm: none | batchnorm (a BatchNorm without affine before the head, for every method alike).
    head_init: small (trunc_normal 0.01, bias 0) | reference (kaiming-normal fan-out, bias -4.595)."""

    name: str = "vpt-deep"
    options: dict = field(default_factory=dict)
    head_norm: str = "none"
    head_init: str = "small"


@dataclass
class DataCfg:
    """Splits: VTAB-1k names (train800, val200, train800val200, test) or the format's own names.
    val_split: None = no validation (the final VTAB protocol trains on train800val200).
    normalize: backbone (the checkpoint's mean/std) | imagenet (the reference code's, for every backbone).
    antialias: False resizes as TensorFlow's bilinear resize does (no antialiasing), as the reference."""

    root: str = ""
    format: str = "auto"
    protocol: str = "vtab"
    train_split: str = "train800val200"
    val_split: str | None = None
    test_split: str | None = "test"
    num_workers: int = 2
    fraction: float = 1.0
    skip_corrupt: bool = False
    normalize: str = "backbone"
    antialias: bool = True


@dataclass
class OptimCfg:
    """optimizer: auto = the method's in vptune's recipe (AdamW for prompts, see vptune/engine/recipes.py),
    paper = the paper's (SGD for linear/mlp/sidetune/vpt, AdamW for full/partial/bias/adapter), or named.
    base_lr: None = the method's default for its optimiser. The peak lr is base_lr itself
    (lr_scaling: none) or base_lr * batch_size / 256 (lr_scaling: linear, the paper's rule).
    lr_scale: per-group factors on the peak lr ({prompts: 2.0, head: 0.5}; groups per method).
    schedule: step = linear warmup from lr * warmup_start_factor, then cosine to min_lr, every iteration;
    epoch = the reference code's staircase (stepped once per epoch, warmup from 0).
    divergence_factor: a loss whose moving average exceeds this times max(ln(classes), first loss)
    ends the run as diverged (0: only a non-finite loss does)."""

    optimizer: str = "auto"
    base_lr: float | None = None
    lr_scaling: str = "none"
    lr_scale: dict = field(default_factory=dict)
    schedule: str = "step"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 100
    warmup_epochs: int = 10
    warmup_start_factor: float = 0.01
    min_lr: float = 0.0
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    divergence_factor: float = 20.0


@dataclass
class RuntimeCfg:
    """precision: auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16 | fp16
    (autocast on GPU; bf16 also on CPU). eval_every: validate every
    N epochs (0: only at the end). max_steps: stop after this many steps (debugging)."""

    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 1
    progress: bool = True
    max_steps: int | None = None


@dataclass
class TrainConfig:
    """recipe: default (vptune's) | reference (the reference code's training, see recipes.py): a preset
    of values that the config's own keys override."""

    recipe: str = "default"
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    runtime: RuntimeCfg = field(default_factory=RuntimeCfg)
    output: str = "runs/default"


# Keys that never change what a run computes: ignored when comparing a run folder's config.
COSMETIC_KEYS = ("output", "runtime.progress", "data.num_workers")

_HINTS = {"optim.lr": "optim.base_lr (the lr for batch size 256; lr = base_lr * batch_size / 256)",
          "optim.wd": "optim.weight_decay", "runtime.precision.amp": "runtime.precision"}


# ------------------------------------------------------------------------------------------ public API

def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or the defaults when ``path`` is None) plus
    ``"a.b=value"`` overrides (values parsed as YAML scalars), checked and validated."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg = config_from_dict(data)
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A plain nested dict (YAML/JSON-safe) of ``cfg``."""
    return copy.deepcopy(dataclasses.asdict(cfg))


def config_from_dict(d: dict[str, Any] | None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict; unknown keys and bad types raise VptuneError."""
    return _build(TrainConfig, with_recipe(d or {}), "")


def dump_config(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML text (what a run folder's ``config.yaml`` holds)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.base_lr=0.5"`` -> ("optim.base_lr", 0.5); the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise VptuneError(f"override {item!r} must look like key=value, e.g. optim.base_lr=0.5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise VptuneError(f"override {item!r} has an empty key; use dotted keys such as optim.epochs=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key = "a.b"``, creating nested dicts as needed."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise VptuneError(f"cannot set {key!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def config_diff(a: dict[str, Any], b: dict[str, Any],
                ignore: typing.Iterable[str] = COSMETIC_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``ignore``d keys left out)."""
    out: list[str] = []
    _diff(a, b, "", out)
    skip = set(ignore)
    return [k for k in out if k not in skip]


def validate_config(cfg: TrainConfig) -> None:
    """Check values that types alone do not catch (choices, ranges), with the valid choices listed."""
    o, r = cfg.optim, cfg.runtime
    check_choice("optimizer", o.optimizer, OPTIMIZERS)
    check_choice("precision", r.precision, PRECISIONS)
    check_choice("optim.lr_scaling", o.lr_scaling, LR_SCALINGS)
    check_choice("optim.schedule", o.schedule, SCHEDULES)
    check_choice("data.normalize", cfg.data.normalize, NORMALIZATIONS)
    check_choice("method.head_norm", cfg.method.head_norm, HEAD_NORMS)
    check_choice("method.head_init", cfg.method.head_init, HEAD_INITS)
    _check_lr_scale(o.lr_scale)
    positive = {"optim.batch_size": o.batch_size, "optim.epochs": o.epochs}
    for key, value in positive.items():
        if not 1 <= value < 2**31:
            raise VptuneError(f"{key} must be an integer in 1..{2**31 - 1}, got {value}")
    nonneg = {"optim.base_lr": o.base_lr if o.base_lr is not None else 0.0,
              "optim.divergence_factor": o.divergence_factor,
              "optim.weight_decay": o.weight_decay, "optim.min_lr": o.min_lr,
              "optim.warmup_epochs": o.warmup_epochs, "runtime.eval_every": r.eval_every,
              "data.num_workers": cfg.data.num_workers}
    for key, value in nonneg.items():
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise VptuneError(f"{key} must be >= 0, got {value}")
    if not 0.0 < o.warmup_start_factor <= 1.0 and not (o.schedule == "epoch" and o.warmup_start_factor == 0):
        raise VptuneError(f"optim.warmup_start_factor must be in (0, 1] (a first step at lr 0 changes nothing; "
                          f"0 only with optim.schedule=epoch, the reference code's), got {o.warmup_start_factor}")
    if not 0.0 <= o.label_smoothing < 1.0:
        raise VptuneError(f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    if not 0.0 <= o.momentum < 1.0:
        raise VptuneError(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise VptuneError(f"optim.grad_clip must be > 0 or null, got {o.grad_clip}")
    if r.max_steps is not None and r.max_steps < 1:
        raise VptuneError(f"runtime.max_steps must be >= 1 or null, got {r.max_steps}")
    if not 0 <= r.seed < 2**32:  # the data order seeds a generator with seed * 1_000_003 + epoch
        raise VptuneError(f"runtime.seed must be an integer in 0..{2**32 - 1}, got {r.seed}")
    if not 0.0 < cfg.data.fraction <= 1.0:
        raise VptuneError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")


# ------------------------------------------------------------------------------------------ internals

def _check_lr_scale(scales: dict) -> None:
    for group, factor in scales.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor < 0:
            raise VptuneError(f"optim.lr_scale.{group} must be a number >= 0, got {factor!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VptuneError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VptuneError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VptuneError(f"config file {path} must hold a mapping of sections (backbone, method, data, "
                          f"optim, runtime, output), got {type(data).__name__}")
    return data


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise VptuneError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hint = "".join(f" ({prefix}{k}: did you mean {_HINTS[prefix + k]}?)"
                       for k in unknown if prefix + k in _HINTS)
        raise VptuneError(f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)} in {where}; "
                          f"valid keys: {', '.join(fields)}{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` (str, int, float, bool, dict, X | None)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise VptuneError(f"{key} must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    return _scalar(value, tp, key)


def _scalar(value: Any, tp: type, key: str) -> Any:
    """``checks.scalar`` (whole-number ints, finite floats, yes/no bools), except that a config string field
    also takes a YAML number or bool as its text (``--set data.train_split=800`` means the split "800")."""
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    return scalar(value, tp, key)


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}{k}.", out)
    elif a != b:
        out.append(prefix.rstrip("."))


_MISSING = object()
