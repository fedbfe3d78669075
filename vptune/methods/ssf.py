"""SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model
Tuning", Eq. 2): ``y <- gamma * y + beta`` after every Linear layer and LayerNorm of every block
(``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``, the paper's placement inside the blocks),
gamma ~ N(1, 0.02), beta ~ N(0, 0.02) (the authors' init). The patch embedding and the final norm, which
the paper's code also scales, are outside the block loop and are left untouched here.

Re-parameterisation (the paper's Eq. 4): the scale and shift fold into the preceding layer,
``W <- gamma W, b <- gamma b + beta`` (a LayerNorm's affine weight and bias alike), so inference costs
nothing extra: ``vptune.methods.ssf.merge(model) -> Backbone`` returns that plain backbone, and
``model.forward_head(merge(model)(images))`` equals ``model(images)`` up to float rounding.
Trainable: ``2 * sum over blocks of (7 d + hidden)`` (d the block width, hidden the MLP width) plus the head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from vptune.backbones.base import TAP_NAMES, Backbone, Taps
from vptune.methods.base import Method, SharedPass, register
from vptune.methods.lowrank import merge
from vptune.methods.taps import LayerUpdate, block_layer, key

__all__ = ["SSF", "merge"]


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else int(layer.normalized_shape[0])


class ScaleShift(nn.Module):
    """gamma, beta (out,) after one frozen layer; the tap ``y -> gamma * y + beta``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(width).normal_(1.0, 0.02))
        self.beta = nn.Parameter(torch.empty(width).normal_(0.0, 0.02))

    def forward(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return y * self.gamma + self.beta

    @torch.no_grad()
    def fold_into(self, layer: nn.Module) -> None:
        """W <- gamma W (rows), b <- gamma b + beta (a bias is created where the layer has none)."""
        weight = layer.weight
        weight.copy_(weight * (self.gamma[:, None] if weight.dim() == 2 else self.gamma))
        if layer.bias is None:
            layer.bias = nn.Parameter(self.beta.detach().clone(), requires_grad=False)
        else:
            layer.bias.copy_(layer.bias * self.gamma + self.beta)


@register
class SSF(Method):
    name = "ssf"
    optimizer = "adamw"
    paper_optimizer = "adamw"  # the paper trains SSF with AdamW (Sec. 4.1)
    default_lr: ClassVar[dict[str, float]] = {"sgd": 0.1, "adamw": 1e-3}
    # 1e-2 as well: at 10 epochs it beat 3e-3 on 7 of mini-VTAB's 8 val splits (BENCHMARKS.md, "Widening
    # the grids that were cut at their top"); default_lr not re-tuned: the default run is 100 epochs, untested
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"sgd": (0.05, 0.1, 0.5), "adamw": (3e-4, 1e-3, 3e-3, 1e-2)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"ssf": (r"^method\.layers\.",)}

    def __init__(self, backbone: Backbone, options: object) -> None:
        super().__init__(backbone, options)
        self.layers = nn.ModuleList(
            nn.ModuleDict({key(t): ScaleShift(_width(block_layer(backbone, i, t))) for t in TAP_NAMES})
            for i in range(backbone.num_blocks))
        self._taps = [{t: self.layers[i][key(t)] for t in TAP_NAMES} for i in range(backbone.num_blocks)]

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return [r"^method\.layers\."]

    def block_taps(self, i: int) -> Taps | None:
        return self._taps[i]

    def shared_pass(self, num_blocks: int) -> SharedPass | None:
        """Joins a mixed batch: per block and layer its scale and shift (eval values)."""
        taps = {i: {t: LayerUpdate(scale=self.layers[i][key(t)].gamma.detach(),
                                   shift=self.layers[i][key(t)].beta.detach()) for t in TAP_NAMES}
                for i in range(num_blocks)}
        return SharedPass([None] * num_blocks, taps=taps)

    def merge_into(self, backbone: Backbone) -> Backbone:
        """Fold every scale and shift into the preceding layer of ``backbone``, in place."""
        for i in range(backbone.num_blocks):
            for t in TAP_NAMES:
                self.layers[i][key(t)].fold_into(block_layer(backbone, i, t))
        return backbone
