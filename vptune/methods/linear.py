"""Linear probing: a linear head on the frozen backbone's final [CLS] (the paper's 'Linear')."""

from __future__ import annotations

from typing import ClassVar

from vptune.methods.base import Method, register


@register
class Linear(Method):
    name = "linear"
    optimizer = "adamw"  # the recipe study (BENCHMARKS.md): AdamW 1e-2 needs no feature-scale tuning
    paper_optimizer = "sgd"
    default_lr: ClassVar[dict[str, float]] = {"adamw": 1e-2, "sgd": 0.1}
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"adamw": (3e-3, 1e-2), "sgd": (0.03, 0.1, 0.3)}
    head_only = True
