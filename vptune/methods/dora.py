"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", Eq. 5):
``W' = m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||_c`` on chosen Linear layers of every block,
m (one per output channel) initialised to ||W||_c so that the untrained model equals the backbone; the
norm is detached in the backward pass (the paper's Sec. 4.3). The layer's bias stays as it is.

Options as LoRA (:class:`~vptune.methods.lowrank.LowRankOptions`: ``r``, ``alpha``, ``dropout``,
``targets``). Trainable: ``sum over blocks and targets of r * (in + out) + out`` plus the head.
``vptune.methods.dora.merge(model) -> Backbone`` folds W' into a plain backbone (see
:mod:`vptune.methods.lora`).
"""

from __future__ import annotations

from vptune.methods.base import register
from vptune.methods.lowrank import LowRank, LowRankOptions, merge

__all__ = ["DoRA", "LowRankOptions", "merge"]


@register
class DoRA(LowRank):
    name = "dora"
    magnitude = True
