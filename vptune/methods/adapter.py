"""Adapter (Pfeiffer et al. 2021 placement, as in the VPT paper): a bottleneck after every block's FFN.

    h = FFN(LN(x));  h <- h + up(GELU(down(h)));  x <- x + h

The reference code initialises both projections to zero, so at the first step only the up-projection
bias receives gradient and three of the four tensors cannot move. Here the adapter still starts as an
exact no-op, yet all four tensors receive gradient from the first step:

    down.weight = 0, down.bias = 1  ->  GELU(down(h)) = GELU(1) for every input (a constant a),
    up.weight ~ kaiming uniform,   up.bias = -up.weight @ a  ->  up(a) = 0.

Gradients: d up.weight = g a^T != 0, d up.bias = g, d down.bias = GELU'(1) * up.weight^T g != 0 and
d down.weight = (GELU'(1) * up.weight^T g) h^T != 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from vptune.backbones.base import Backbone
from vptune.errors import VptuneError
from vptune.methods.base import Method, register


@dataclass
class AdapterOptions:
    reduction: int = 8  # r: bottleneck width d // r (the paper: 8, 64, 256)

    def validate(self) -> None:
        if self.reduction < 1:
            raise VptuneError(f"adapter reduction must be >= 1, got {self.reduction}")


class Bottleneck(nn.Module):
    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.ones_(self.down.bias)
        with torch.no_grad():
            a = self.act(self.down.bias)  # (hidden,), the constant activation at init
            self.up.bias.copy_(-(self.up.weight @ a))

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.act(self.down(h)))  # (B, N, d); zero at init


@register
class Adapter(Method):
    name = "adapter"
    options_cls = AdapterOptions
    optimizer = "adamw"
    paper_optimizer = "adamw"
    default_lr: ClassVar[dict[str, float]] = {"adamw": 1e-3, "sgd": 0.01}
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"adamw": (3e-4, 1e-3), "sgd": (0.003, 0.01)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"adapters": (r"^method\.",)}

    def __init__(self, backbone: Backbone, options: AdapterOptions) -> None:
        super().__init__(backbone, options)
        self.adapters = nn.ModuleList(Bottleneck(b.dim, options.reduction) for b in backbone.block_infos())

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return [r"^method\.adapters\."]

    def block_adapter(self, i: int) -> nn.Module | None:
        return self.adapters[i]
