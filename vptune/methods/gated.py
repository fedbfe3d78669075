"""Gated prompt tuning (Yoo et al., "Improving Visual Prompt Tuning for Self-supervised Vision
Transformers", ICML 2023), written from the paper's text.

The paper observes that for self-supervised ViTs (MAE, MoCo v3) VPT works better when prompts interact
with later blocks, and learns, instead of searching the insertion block, "a gate for each ViT block to
adjust its intervention into the prompt tokens". vptune implements that gate as a learnable scalar per
block, squashed by a sigmoid, mixing block i's prompt outputs with its prompt inputs:

    g_i = sigmoid(a_i),    P_{i+1} = g_i * f_i(P_i) + (1 - g_i) * P_i,    [CLS], patches: x_{i+1} = f_i(x_i)

where f_i is block i run on ``[CLS, P_i, patches]`` (the image tokens are computed as in VPT-shallow, the
gate changes only what the prompts carry on), P_0 are VPT-shallow's p prompts inserted before block 0,
and the backbone applies the gate in ``run_block`` (``BlockInput.prompt_gate``; on Swin to the prompts
kept apart from the windows). g_i -> 1 everywhere is VPT-shallow; g_i = 0 for i < k lets the prompts reach
block k untouched (inserting them at block k).

Not verified against the paper: we could not read the paper's exact equation, its gate initialisation
(here a_i = ``gate_init``, default 0: g_i = 0.5) nor whether the gate acts on the whole block or on its
attention branch only (here: the whole block). The paper's second component, adaptive attention
shaping (a per-block temperature on the prompts' attention), is not implemented. The optimiser of the
paper's recipe is recorded as SGD (VPT's), also unverified. Trainable: p * d_0 prompts + N gates + head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vptune.backbones.base import Backbone, Tokens
from vptune.errors import VptuneError
from vptune.methods.base import BlockInput, SharedPass, register
from vptune.methods.vpt import VPTOptions, VPTShallow


@dataclass
class GatedOptions(VPTOptions):
    """gate_init: the initial gate logit a_i of every block (sigmoid(0) = 0.5). Prompts are prepended."""

    gate_init: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.location != "prepend":
            raise VptuneError("gated prompts gate prompt tokens: location must be 'prepend'")
        if self.num_tokens < 1:
            raise VptuneError(f"gated prompts need num_tokens >= 1, got {self.num_tokens}")


@register
class GatedPrompts(VPTShallow):
    """VPT-shallow prompts with a learned sigmoid gate per block on how much the block changes them."""

    name = "gated"
    options_cls = GatedOptions
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "prompts": (r"^method\.prompts\.", r"^method\.project\."), "gates": (r"^method\.gate_logits$",)}
    no_decay_patterns = (r"^method\.gate_logits$",)

    def __init__(self, backbone: Backbone, options: GatedOptions) -> None:
        super().__init__(backbone, options)
        self.gate_logits = nn.Parameter(torch.full((backbone.num_blocks,), float(options.gate_init)))

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return super().trainable_patterns(backbone) + [r"^method\.gate_logits$"]

    def gates(self) -> torch.Tensor:
        """(N,) g_i = sigmoid(a_i)."""
        return torch.sigmoid(self.gate_logits)

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        tokens, given = super().block_input(i, tokens, batch)
        return tokens, BlockInput(prompts=given.prompts, location=given.location,
                                  prompt_outputs=given.prompt_outputs, prompt_gate=self.gates()[i])

    def shared_pass(self, num_blocks: int) -> SharedPass | None:
        """Gates change the prompts inside every block: the task runs its own pass."""
        return None
