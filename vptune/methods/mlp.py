"""MLP-k: a k-layer MLP head on frozen features (the paper's 'MLP-k').

As the reference code: k-1 hidden layers of the feature width d, each Linear -> BatchNorm1d -> ReLU ->
Dropout, then the output Linear. MLP-1 is the linear probe.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vptune.errors import VptuneError
from vptune.methods.base import Method, SharedPass, linear_head, register


@dataclass
class MLPOptions:
    k: int = 3
    dropout: float = 0.1
    hidden_dim: int = 0  # 0: the feature width d

    def validate(self) -> None:
        if self.k < 1:
            raise VptuneError(f"mlp-k needs k >= 1, got {self.k}")
        if not 0.0 <= self.dropout < 1.0:
            raise VptuneError(f"mlp dropout must be in [0, 1), got {self.dropout}")


@register
class MLP(Method):
    name = "mlp"
    options_cls = MLPOptions
    suffix_option = "k"
    optimizer = "sgd"
    paper_optimizer = "sgd"

    def shared_pass(self, num_blocks: int) -> SharedPass:
        """Only the head trains (not a linear one, so not ``head_only``): it joins mixed batches promptless."""
        return SharedPass([None] * num_blocks)

    def build_head(self, in_dim: int, num_classes: int) -> nn.Module:
        hidden = self.options.hidden_dim or in_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(self.options.k - 1):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                       nn.Dropout(self.options.dropout)]
            width = hidden
        layers.append(linear_head(width, num_classes))
        return nn.Sequential(*layers)
