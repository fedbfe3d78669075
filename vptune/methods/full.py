"""Full fine-tuning: every backbone parameter trains (the paper's 'Full', AdamW)."""

from __future__ import annotations

from typing import ClassVar

from vptune.backbones.base import Backbone
from vptune.methods.base import Method, register


@register
class Full(Method):
    name = "full"
    optimizer = "adamw"
    paper_optimizer = "adamw"
    default_lr: ClassVar[dict[str, float]] = {"adamw": 1e-4, "sgd": 1e-3}  # recipe study
    # 3e-4 as well: at 10 epochs it beat 1e-4 on 7 of mini-VTAB's 8 val splits (BENCHMARKS.md,
    # "Widening the grids that were cut at their top"); default_lr stays the (3-epoch) recipe study's
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"adamw": (3e-5, 1e-4, 3e-4), "sgd": (1e-4, 1e-3)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"backbone": (r"^backbone\.",)}

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return [r"^backbone\."]
