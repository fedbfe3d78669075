"""Bias tuning (BitFit, Ben Zaken et al. 2022): every bias of the backbone trains (the paper's 'Bias')."""

from __future__ import annotations

from typing import ClassVar

from vptune.backbones.base import Backbone
from vptune.methods.base import Method, register


@register
class Bias(Method):
    name = "bias"
    optimizer = "adamw"
    paper_optimizer = "adamw"
    default_lr: ClassVar[dict[str, float]] = {"adamw": 1e-3, "sgd": 0.01}
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"adamw": (3e-4, 1e-3), "sgd": (0.003, 0.01)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"backbone": (r"^backbone\.",)}

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return [r"^backbone\.(.*\.)?bias$"]
