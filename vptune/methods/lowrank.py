"""Low-rank updates of a block's frozen Linear layers, shared by LoRA (:mod:`vptune.methods.lora`) and
DoRA (:mod:`vptune.methods.dora`), and :func:`merge`, which folds a tap method into a plain backbone.

LoRA (Hu et al. 2021, Eq. 3): ``h = W x + (alpha / r) B A x`` with A (r, in) kaiming-uniform (as the
authors' ``loralib``: ``kaiming_uniform_(a=sqrt(5))``), B (out, r) zero, so the untrained model is the
backbone; dropout (``loralib``'s ``lora_dropout``) acts on the input of the low-rank branch only.

DoRA (Liu et al. 2024, Eq. 5): ``W' = m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||_c`` with the
vector-wise norm over each output channel's input weights (the paper's column norm of W in R^{d x k}) and
m initialised to ||W||_c, so the untrained model equals the backbone. As the paper suggests (Sec. 4.3),
the norm is treated as a constant in the backward pass (detached). The layer's bias is kept as it is.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vptune.backbones.base import LINEAR_TAPS, Backbone, Taps
from vptune.errors import VptuneError
from vptune.methods.base import Method, SharedPass
from vptune.methods.taps import LayerUpdate, block_layer, key, match_targets

DEFAULT_TARGETS = (r"^attn\.qkv$", r"^attn\.proj$")  # the attention qkv and output projection


@dataclass
class LowRankOptions:
    """r: rank; alpha: the update is scaled by alpha / r; dropout: on the low-rank branch's input;
    targets: anchored patterns over the block's Linear layers (attn.qkv, attn.proj, mlp.fc1, mlp.fc2),
    default the attention qkv and output projection (``("^attn\\.", "^mlp\\.")``: all four)."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def validate(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise VptuneError(f"rank r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise VptuneError(f"dropout must be in [0, 1), got {self.dropout}")
        match_targets(self.targets, LINEAR_TAPS)


class LowRankLayer(nn.Module):
    """A (r, in), B (out, r) for one frozen Linear; with ``magnitude`` (DoRA) also m (out,) = ||W||_c."""

    def __init__(self, layer: nn.Linear, r: int, alpha: float, dropout: float, magnitude: bool) -> None:
        super().__init__()
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, layer.in_features))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.magnitude = nn.Parameter(layer.weight.detach().norm(dim=1).clone()) if magnitude else None

    def delta(self, x: Tensor) -> Tensor:
        """(alpha / r) B A x for (..., in) inputs -> (..., out)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def dora_scale(self, layer: nn.Linear) -> Tensor:
        """m / ||W + dW||_c, (out,); the norm detached (DoRA Sec. 4.3)."""
        norm = (layer.weight + self.delta_weight()).norm(dim=1).detach()
        return self.magnitude / norm

    def forward(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The tap: y = W x + b -> the updated output."""
        if self.magnitude is None:
            return y + self.delta(x)
        bias = layer.bias
        g = self.dora_scale(layer)
        plain = y if bias is None else y - bias
        out = g * (plain + self.delta(x))
        return out if bias is None else out + bias

    def merged_weight(self, layer: nn.Linear) -> Tensor:
        w = layer.weight + self.delta_weight()
        return w if self.magnitude is None else w * self.dora_scale(layer)[:, None]

    def update(self, layer: nn.Linear) -> LayerUpdate:
        """This layer's update at inference (:class:`~vptune.methods.taps.LayerUpdate`), detached."""
        A, B = self.lora_A.detach(), (self.lora_B * self.scaling).detach()
        if self.magnitude is None:
            return LayerUpdate(A=A, B=B)
        g = self.dora_scale(layer).detach()
        shift = None if layer.bias is None else (layer.bias * (1 - g)).detach()
        return LayerUpdate(A=A, B=B, scale=g, shift=shift)


class LowRank(Method):
    """LoRA / DoRA on the target Linear layers of every block; see the module docstring."""

    options_cls = LowRankOptions
    optimizer = "adamw"
    paper_optimizer = "adamw"  # LoRA (Hu et al. 2021, Sec. 5) and DoRA (Liu et al. 2024) train with AdamW
    default_lr: ClassVar[dict[str, float]] = {"sgd": 0.1, "adamw": 1e-3}
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"sgd": (0.05, 0.1, 0.5), "adamw": (3e-4, 1e-3, 3e-3)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"lowrank": (r"^method\.layers\.",)}
    sweep_axes = ("r",)
    magnitude: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, options: LowRankOptions) -> None:
        super().__init__(backbone, options)
        self.targets = match_targets(options.targets, LINEAR_TAPS)
        self._backbone = [backbone]  # a list: not a submodule (the TunedModel owns the backbone)
        self.layers = nn.ModuleList(
            nn.ModuleDict({key(t): LowRankLayer(block_layer(backbone, i, t), options.r, options.alpha,
                                                options.dropout, self.magnitude) for t in self.targets})
            for i in range(backbone.num_blocks))
        self._taps = [{t: self.layers[i][key(t)] for t in self.targets} for i in range(backbone.num_blocks)]

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return [r"^method\.layers\."]

    def block_taps(self, i: int) -> Taps | None:
        return self._taps[i]

    def shared_pass(self, num_blocks: int) -> SharedPass | None:
        """Joins a mixed batch: per block and target its :class:`LayerUpdate` (eval values)."""
        bb = self._backbone[0]
        taps = {i: {t: self.layers[i][key(t)].update(block_layer(bb, i, t)) for t in self.targets}
                for i in range(num_blocks)}
        return SharedPass([None] * num_blocks, taps=taps)

    @torch.no_grad()
    def merge_into(self, backbone: Backbone) -> Backbone:
        """Fold every update into ``backbone``'s weights in place (W <- W + (alpha/r) B A, DoRA: the
        magnitude-scaled normalised weight)."""
        for i in range(backbone.num_blocks):
            for t in self.targets:
                layer = block_layer(backbone, i, t)
                layer.weight.copy_(self.layers[i][key(t)].merged_weight(layer))
        return backbone


def merge(model: Any) -> Backbone:
    """A plain backbone with a tap method's updates folded in (LoRA, DoRA, SSF): a deep copy of
    ``model.backbone``; ``model.forward_head(merge(model)(images))`` equals ``model(images)`` up to
    float rounding. The copy has its own fingerprint (its weights differ from the pretrained ones)."""
    merge_into = getattr(model.method, "merge_into", None)
    if merge_into is None:
        raise VptuneError(f"method {model.method_name!r} cannot be merged into the backbone; mergeable "
                          "methods: lora, dora, ssf")
    backbone = copy.deepcopy(model.backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    merged = merge_into(backbone)
    merged.reset_fingerprint()
    return merged.eval()
