"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3):
``h = W x + (alpha / r) B A x`` on chosen Linear layers of every block, W frozen, A kaiming-uniform,
B zero (the untrained model is the backbone).

Options (:class:`~vptune.methods.lowrank.LowRankOptions`): ``r`` (8), ``alpha`` (8), ``dropout`` (0) and
``targets``, anchored patterns over ``attn.qkv, attn.proj, mlp.fc1, mlp.fc2`` (default the attention qkv
and output projection; ``targets=["^attn\\.", "^mlp\\."]`` adds the MLP). Works on ViT and Swin (the same
names inside Swin blocks). Trainable: ``sum over blocks and targets of r * (in + out)`` plus the head.

A trained task can be folded into a plain backbone::

    from vptune.methods.lora import merge
    plain = merge(model)                        # a deep copy with W + (alpha/r) B A
    logits = model.forward_head(plain(images))  # equals model(images) (up to float rounding)
"""

from __future__ import annotations

from vptune.methods.base import register
from vptune.methods.lowrank import LowRank, LowRankOptions, merge

__all__ = ["LoRA", "LowRankOptions", "merge"]


@register
class LoRA(LowRank):
    name = "lora"
    magnitude = False
