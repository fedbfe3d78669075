"""The training engine: config, optimisation recipe, training loop, evaluation and run checkpoints.

    from vptune.engine import load_config, run_training
    cfg = load_config("configs/vpt_deep_vtab.yaml", ["data.root=vtab-1k/dtd", "optim.base_lr=0.5"])
    summary = run_training(cfg)          # writes cfg.output/{config.yaml, metrics.jsonl, tb/, checkpoint.pt,
                                         #                    task/, result.json}
"""

from vptune.engine import distributed as _distributed  # noqa: F401  (registers the torchrun launcher)
from vptune.engine.config import (
    BackboneCfg,
    DataCfg,
    MethodCfg,
    OptimCfg,
    RuntimeCfg,
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from vptune.engine.evaluate import compute_metrics, evaluate, resolve_device
from vptune.engine.optim import build_optimizer, build_scheduler, param_groups, scaled_lr
from vptune.engine.trainer import build_backbone, read_result, run_training

__all__ = [
    "BackboneCfg", "DataCfg", "MethodCfg", "OptimCfg", "RuntimeCfg", "TrainConfig", "build_backbone",
    "build_optimizer", "build_scheduler", "compute_metrics", "config_diff", "config_from_dict",
    "config_to_dict",
    "dump_config", "evaluate", "load_config", "param_groups", "read_result", "resolve_device", "run_training",
    "scaled_lr",
]
