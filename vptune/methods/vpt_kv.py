"""Key-value prompts (the visual-prompt half of E2VPT: Han et al., "E^2VPT: An Effective and Efficient
Approach for Visual Prompt Tuning", ICCV 2023), written from the paper.

In every block's self-attention, L learned key tokens and L learned value tokens are concatenated to the
keys and values after their projection (the paper's MSA with K' = [K; P_K], V' = [V; P_V]):

    Attn(Q, K', V') = softmax(Q [K; P_K]^T / sqrt(d_h)) [V; P_V],   P_K, P_V in R^{L x d} (split over heads)

so they are attended to by every token but are never queries and produce no outputs. Optionally VPT-deep
input prompts (``num_tokens`` > 0, E2VPT's "visual prompts") are prepended too. On Swin the key-value
prompts join every window's attention with zero relative-position bias and are never shift-masked, as
VPT's prompts. Trainable: N * 2 * L * d_i key-value parameters plus the VPT-deep prompts and the head.

Not implemented: E2VPT's token-wise and segment-wise prompt pruning (the "efficient" half: rewinding
after pruning the least important prompts); dropout applies to the input prompts only.
Key-value prompts start as VPT's prompts (uniform, Xavier-style); with ``init="prototype"`` they start at
the keys and values the block computes for k-means prototypes of its input tokens (Self-Prompt Tuning's
rule carried to key/value space, see :mod:`vptune.methods.prototype`).
The paper trains with SGD on VPT's recipe (``paper_optimizer``); vptune's default is AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vptune.backbones.base import Backbone, Tokens
from vptune.errors import VptuneError
from vptune.methods.base import BlockInput, SharedPass, register
from vptune.methods.prototype import block_tokens, kmeans
from vptune.methods.vpt import VPTDeep, VPTOptions


@dataclass
class VPTKVOptions(VPTOptions):
    """kv_tokens: L, the learned key (and value) tokens per block. num_tokens: VPT-deep input prompts
    (0: key-value prompts only). The other options are VPT's and apply to the input prompts."""

    num_tokens: int = 0
    kv_tokens: int = 5

    def validate(self) -> None:
        super().validate()
        if self.kv_tokens < 1:
            raise VptuneError(f"kv_tokens must be >= 1, got {self.kv_tokens}")


@register
class VPTKV(VPTDeep):
    """Key-value prompts in every block (E2VPT), optionally with VPT-deep input prompts."""

    name = "vpt-kv"
    options_cls = VPTKVOptions
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "prompts": (r"^method\.prompts\.", r"^method\.project\."), "kv_prompts": (r"^method\.kv_prompts\.",)}
    sweep_axes = ("kv_tokens", "num_tokens")

    def __init__(self, backbone: Backbone, options: VPTKVOptions) -> None:
        super().__init__(backbone, options)
        ph, pw = backbone.patch_size
        # per block a (2, L, d_i) tensor: [0] keys, [1] values
        self.kv_prompts = nn.ParameterList(
            nn.Parameter(torch.stack([self._init_prompts(options.kv_tokens, b.dim, ph * pw).data for _ in "kv"]))
            for b in backbone.block_infos())

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return super().trainable_patterns(backbone) + [r"^method\.kv_prompts\."]

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        tokens, given = super().block_input(i, tokens, batch)
        kv = self.kv_prompts[i]
        return tokens, BlockInput(prompts=given.prompts, location=given.location,
                                  prompt_outputs=given.prompt_outputs, kv_prompts=(kv[0], kv[1]))

    def shared_pass(self, num_blocks: int) -> SharedPass | None:
        """Key-value prompts change every block's attention: the task runs its own pass."""
        return None

    @torch.no_grad()
    def init_from_data(self, backbone: Backbone, images: Tensor) -> None:
        """Input prompts as VPT's; block i's key-value prompts = the keys and values block i's frozen
        norm1 and qkv projection give k-means prototypes of its input tokens."""
        super().init_from_data(backbone, images)
        tokens = block_tokens(backbone, images, range(len(self.kv_prompts)))
        for i, kv in enumerate(self.kv_prompts):
            prefix = backbone.block_prefix(i)
            norm, qkv = backbone.get_submodule(prefix + "norm1"), backbone.get_submodule(prefix + "attn.qkv")
            proto = kmeans(tokens[i], kv.shape[1]).to(kv.device, kv.dtype)
            d = kv.shape[-1]
            w, b = qkv.weight[d:], None if qkv.bias is None else qkv.bias[d:]
            kv.copy_(F.linear(norm(proto), w, b).reshape(-1, 2, d).transpose(0, 1))  # (2, L, d)
