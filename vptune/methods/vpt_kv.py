"""Key-value prompts (the visual-prompt half of E2VPT: Han et al., "E^2VPT: An Effective and Efficient
Approach for Visual Prompt Tuning", ICCV 2023), written from the paper.

In every block's self-attention, L learned key tokens and L learned value tokens are concatenated to the
keys and values after their projection (the paper's MSA with K' = [K; P_K], V' = [V; P_V]):

    Attn(Q, K', V') = softmax(Q [K; P_K]^T / sqrt(d_h)) [V; P_V],   P_K, P_V in R^{L x d} (split over heads)

so they are attended to by every token but are never queries and produce no outputs. Optionally VPT-deep
input prompts (``num_tokens`` > 0, E2VPT's "visual prompts") are prepended too. On Swin the key-value
prompts join every window's attention with zero relative-position bias and are never shift-masked, as
VPT's prompts. Trainable: N * 2 * L * d_i key-value parameters plus the VPT-deep prompts and the head.

E2VPT's prompt pruning (Sec. 3.3) applies to the input prompts: ``keep_tokens`` lists, per prompted block,
the prompt slots that stay (token-wise pruning: only those are parameters, the others are masked out of
every attention, so no token attends to them, as if they were removed), and ``pruned_segments`` the segments (each prompt split into
``segments`` equal parts, index ``token * segments + r``) held at zero (segment-wise pruning). Both are
plain options, saved in ``task.json``; :mod:`vptune.engine.prune` (``vptune prune``) scores a trained run's
prompts, sets them, and retrains from the rewound initialisation. Dropout applies to the input prompts only.
Key-value prompts start as VPT's prompts (uniform, Xavier-style); with ``init="prototype"`` they start at
the keys and values the block computes for k-means prototypes of its input tokens (Self-Prompt Tuning's
rule carried to key/value space, see :mod:`vptune.methods.prototype`).
The paper trains with SGD on VPT's recipe (``paper_optimizer``); vptune's default is AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as dc_replace
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
    keep_tokens: tuple[tuple[int, ...], ...] | None = None
    segments: int = 1
    pruned_segments: tuple[tuple[int, ...], ...] | None = None

    def validate(self) -> None:
        super().validate()
        if self.kv_tokens < 1:
            raise VptuneError(f"kv_tokens must be >= 1, got {self.kv_tokens}")
        if self.segments < 1:
            raise VptuneError(f"segments must be >= 1 (1: prompts are not split), got {self.segments}")
        if (self.keep_tokens is not None or self.pruned_segments is not None) and (
                self.num_tokens == 0 or self.location != "prepend" or self.project_dim):
            raise VptuneError("keep_tokens and pruned_segments prune prepended input prompts in the token "
                              "space: they need num_tokens > 0, location='prepend' and project_dim=0")
        if self.keep_tokens is not None and self.init == "prototype":
            raise VptuneError("keep_tokens rewinds to the unpruned run's initial prompts, which "
                              "init='prototype' does not reproduce: prune a run with init 'uniform'")


def _pruning_masks(opts: VPTKVOptions, dims: list[int]) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Per prompted block: the (p,) bool mask of kept prompt slots and the (p, d) 0/1 mask of kept segments
    (None where nothing is pruned), from the options, checked against the prompt length and widths."""
    p, r, n = opts.num_tokens, opts.segments, len(dims)
    tokens: list[Tensor | None] = [None] * n
    segments: list[Tensor | None] = [None] * n
    for name, lists in (("keep_tokens", opts.keep_tokens), ("pruned_segments", opts.pruned_segments)):
        if lists is not None and len(lists) != n:
            raise VptuneError(f"{name} needs one list per prompted block ({n}), got {len(lists)}")
    for j, d in enumerate(dims):
        if opts.keep_tokens is not None:
            keep = opts.keep_tokens[j]
            if not keep or len(set(keep)) != len(keep) or not all(0 <= k < p for k in keep):
                raise VptuneError(f"keep_tokens[{j}] must list distinct prompt slots in 0..{p - 1} (at least "
                                  f"one), got {list(keep)}")
            mask = torch.zeros(p, dtype=torch.bool)
            mask[list(keep)] = True
            tokens[j] = None if bool(mask.all()) else mask
        if opts.pruned_segments is not None and opts.pruned_segments[j]:
            if d % r:
                raise VptuneError(f"segments={r} must divide the prompt width {d} of prompted block {j}")
            pruned = opts.pruned_segments[j]
            if not all(0 <= k < p * r for k in pruned):
                raise VptuneError(f"pruned_segments[{j}] must be in 0..{p * r - 1}, got {list(pruned)}")
            keep_seg = torch.ones(p * r)
            keep_seg[list(pruned)] = 0.0
            segments[j] = keep_seg.repeat_interleave(d // r).reshape(p, d)
    return tokens, segments


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

        keep, segments = _pruning_masks(options, [self.dims[i] for i in self.blocks])
        self.prune_masks = nn.Module()  # non-persistent buffers: the options are the record
        for j, (k, m) in enumerate(zip(keep, segments)):
            rows = None if k is None else k.nonzero().flatten()
            if rows is not None:  # only the kept tokens are parameters: drawn as unpruned, then selected
                self.prompts[j] = nn.Parameter(self.prompts[j].data[rows].clone())
            self.prune_masks.register_buffer(f"tokens{j}", k, persistent=False)
            self.prune_masks.register_buffer(f"rows{j}", rows, persistent=False)
            self.prune_masks.register_buffer(f"segments{j}", m, persistent=False)

    def kept_slots(self, j: int) -> list[int]:
        """The prompt slots that prompted block j's parameter rows fill (all of them when not pruned)."""
        rows = getattr(self.prune_masks, f"rows{j}")
        return list(range(self.options.num_tokens)) if rows is None else rows.tolist()

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return super().trainable_patterns(backbone) + [r"^method\.kv_prompts\."]

    def transform_prompts(self, i: int, prompts: Tensor) -> Tensor:
        """Block i's (p, d) prompts: the kept tokens' rows in their slots (zeros in the pruned ones, which
        are masked out of attention), with the pruned segments held at zero (no gradient reaches them)."""
        j = self.slot[i]
        rows, mask = getattr(self.prune_masks, f"rows{j}"), getattr(self.prune_masks, f"segments{j}")
        if rows is not None:
            prompts = prompts.new_zeros(self.options.num_tokens, prompts.shape[1]).index_copy(0, rows, prompts)
        return prompts if mask is None else prompts * mask.to(prompts.dtype)

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        tokens, given = super().block_input(i, tokens, batch)
        keep = getattr(self.prune_masks, f"tokens{self.slot[i]}", None) if i in self.slot else None
        if keep is not None:  # token-wise pruning: the pruned slots are keys nobody attends to
            tokens = dc_replace(tokens, prompt_mask=keep.expand(batch, -1))
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
