"""Full fine-tuning: every backbone parameter trains (the paper's 'Full', AdamW)."""

from __future__ import annotations

from vptune.backbones.base import Backbone
from vptune.methods.base import Method, register


@register
class Full(Method):
    name = "full"
    optimizer = "adamw"

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return [r"^backbone\."]
