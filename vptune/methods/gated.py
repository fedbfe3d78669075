"""Gated prompt tuning (Yoo et al., "Improving Visual Prompt Tuning for Self-supervised Vision
Transformers", ICML 2023): learned gates on how much each block changes the prompt tokens, and adaptive
attention shaping (a learned softmax temperature per block).

The paper observes that for self-supervised ViTs (MAE, MoCo v3) VPT works better when prompts interact
with later blocks, and learns, instead of searching the insertion block, "a gate for each ViT block to
adjust its intervention into the prompt tokens". With f_i block i run on ``[CLS, P_i, patches]``:

    g_i = sigmoid(a_i),    P_{i+1} = g_i * f_i(P_i) + (1 - g_i) * P_i,    [CLS], patches: x_{i+1} = f_i(x_i)

P_0 are VPT-shallow's p prompts inserted before block 0; the backbone applies the gate in ``run_block``
(``BlockInput.prompt_gate``; on Swin to the prompts kept apart from the windows). g_i -> 1 everywhere is
VPT-shallow; g_i -> 0 for i < k lets the prompts reach block k untouched. Attention shaping
(``attention_shaping``, on by default as in the paper's runs): block i's attention is
``softmax(q k^T / (sqrt(d_h) tau_i))`` over all its tokens, tau_i learned, initialised to 1 and kept in
[0.01, 10] (projected before each training forward and clamped in every forward). On Swin tau_i divides
the relative-position bias too (the whole logit); the shift and padding masks stay hard.

Checked against the authors' MIT-licensed code (github.com/ryongithub/GatedPromptTuning, read, not
copied): the equation above (the gate acts on the whole block's prompt output), the gate logit
initialised to ``-GATE_INIT`` (their code's default 10, their README's example 5: vptune's ``gate_init``
is the logit itself, default -5, so the gates start nearly closed, g = 0.0067), the temperature's init and
range, SGD and weight decay 0 (``paper_optimizer``; gates and temperatures take no weight decay here).
Where vptune differs: their code gates the first N - 1 blocks only (the last block's gate matters only
when the pool reads the prompt tokens; vptune gates all N) and pools as MAE does (mean over every token
but [CLS], prompts included); vptune uses the backbone's pool (option ``pool``).
Trainable: p * d_0 prompts + N gates (+ N temperatures) + head.
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
    """gate_init: the initial gate logit a_i of every block (default -5: g = 0.0067, nearly closed, as the
    authors' example). attention_shaping: a learned attention temperature per block. Prompts are prepended."""

    gate_init: float = -5.0
    attention_shaping: bool = True

    def validate(self) -> None:
        super().validate()
        if self.location != "prepend":
            raise VptuneError("gated prompts gate prompt tokens: location must be 'prepend'")
        if self.num_tokens < 1:
            raise VptuneError(f"gated prompts need num_tokens >= 1, got {self.num_tokens}")


TEMPERATURE_RANGE = (0.01, 10.0)  # the authors' clamp of the attention temperatures


@register
class GatedPrompts(VPTShallow):
    """VPT-shallow prompts with a learned sigmoid gate per block on how much the block changes them, and
    (``attention_shaping``) a learned attention temperature per block."""

    name = "gated"
    options_cls = GatedOptions
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "prompts": (r"^method\.prompts\.", r"^method\.project\."), "gates": (r"^method\.gate_logits$",),
        "temperatures": (r"^method\.temperatures$",)}
    no_decay_patterns = (r"^method\.gate_logits$", r"^method\.temperatures$")

    def __init__(self, backbone: Backbone, options: GatedOptions) -> None:
        super().__init__(backbone, options)
        n = backbone.num_blocks
        self.gate_logits = nn.Parameter(torch.full((n,), float(options.gate_init)))
        self.temperatures = nn.Parameter(torch.ones(n)) if options.attention_shaping else None

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        shaping = [r"^method\.temperatures$"] if self.temperatures is not None else []
        return super().trainable_patterns(backbone) + [r"^method\.gate_logits$"] + shaping

    def gates(self) -> torch.Tensor:
        """(N,) g_i = sigmoid(a_i)."""
        return torch.sigmoid(self.gate_logits)

    def block_temperature(self, i: int) -> torch.Tensor | None:
        """tau_i in [0.01, 10] (the parameter is projected there before a training forward), or None."""
        if self.temperatures is None:
            return None
        if i == 0 and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.temperatures.clamp_(*TEMPERATURE_RANGE)
        return self.temperatures[i].clamp(*TEMPERATURE_RANGE)

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        tokens, given = super().block_input(i, tokens, batch)
        return tokens, BlockInput(prompts=given.prompts, location=given.location,
                                  prompt_outputs=given.prompt_outputs, prompt_gate=self.gates()[i],
                                  attn_temperature=self.block_temperature(i))

    def shared_pass(self, num_blocks: int) -> SharedPass | None:
        """Gates change the prompts inside every block: the task runs its own pass."""
        return None
