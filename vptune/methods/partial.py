"""Partial-k: the last k blocks and the final norm train (the paper's 'Partial-k', AdamW)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vptune.backbones.base import Backbone
from vptune.errors import VptuneError
from vptune.methods.base import Method, prefix_pattern, register


@dataclass
class PartialOptions:
    k: int = 1

    def validate(self) -> None:
        if self.k < 1:
            raise VptuneError(f"partial-k needs k >= 1, got {self.k}")


@register
class Partial(Method):
    name = "partial"
    options_cls = PartialOptions
    suffix_option = "k"
    optimizer = "adamw"
    paper_optimizer = "adamw"
    default_lr: ClassVar[dict[str, float]] = {"adamw": 1e-4, "sgd": 1e-3}  # recipe study
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"adamw": (3e-5, 1e-4), "sgd": (1e-4, 1e-3)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"backbone": (r"^backbone\.",)}

    def __init__(self, backbone: Backbone, options: PartialOptions) -> None:
        super().__init__(backbone, options)
        if options.k > backbone.num_blocks:
            raise VptuneError(f"partial-{options.k} exceeds the backbone's {backbone.num_blocks} blocks")

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        n = backbone.num_blocks
        prefixes = [backbone.block_prefix(i) for i in range(n - self.options.k, n)]
        prefixes += backbone.final_norm_prefixes()
        return [prefix_pattern("backbone." + p) for p in prefixes]
