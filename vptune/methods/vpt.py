"""Visual Prompt Tuning (Jia et al., ECCV 2022): VPT-shallow and VPT-deep.

Only the prompts (and the head) train. Shallow (Eq. 1-3): p prompts enter block 0 and flow on. Deep
(Eq. 4-6): before every block i the prompt slots are replaced by that block's own p prompts, N*p*d
parameters in all. Prompt values start uniform in +-sqrt(6 / (3 * patch_h * patch_w + prompt_dim))
(the reference code's Xavier-style rule); dropout applies to the prompts each time they are inserted
(the paper uses 0.1 for deep).

``init="prototype"`` (Self-Prompt Tuning, Wang et al., ICML 2024) starts block i's prompts at k-means
prototypes of the tokens block i sees on training images (:mod:`vptune.methods.prototype`); the
prompts are built uniform and :meth:`_VPT.init_from_data` overwrites them (the trainer calls it once
before training; a script calls ``model.method.init_from_data(model.backbone, images)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from vptune.backbones.base import Backbone, Tokens
from vptune.errors import VptuneError, check_choice
from vptune.methods.base import BlockInput, Method, SharedPass, register
from vptune.methods.prototype import block_tokens, kmeans

INITS = ("uniform", "normal", "zeros", "prototype")
LOCATIONS = ("prepend", "add")
MAX_TOKENS = 10_000  # a sanity bound (the paper's sweep tops out at 200, Fig. 7): more is a typo


@dataclass
class VPTOptions:
    """num_tokens: prompt length p (ignored for location='add', which needs one prompt per patch).
    dropout: dropout on the prompt vectors. init: 'uniform' (paper), 'normal' (std 0.02), 'zeros' or
        'prototype' (k-means prototypes of the tokens each block sees on training images, Self-Prompt
        Tuning; needs ``init_from_data`` before training, which ``vptune train`` does).
    project_dim: > 0 keeps prompts in that smaller space, mapped to the token width by one shared
        Linear (kaiming normal, fan_out), as the reference code's ``PROJECT``.
    deep_layers: deep only; k > 0 puts prompts in the first k blocks, k < 0 in the last |k| blocks,
        0 in all (the paper's depth ablation, Fig. 7).
    location: 'prepend' ([CLS, P, patches]) or 'add' (added to the patch tokens, Sec. 4.4).
    pool: the head's input: 'cls', 'image_mean' or 'prompt_mean' (None: the backbone's default)."""

    num_tokens: int = 10
    dropout: float = 0.0
    init: str = "uniform"
    project_dim: int = 0
    deep_layers: int = 0
    location: str = "prepend"
    pool: str | None = None

    def validate(self) -> None:
        check_choice("prompt init", self.init, INITS)
        check_choice("prompt location", self.location, LOCATIONS)
        if not 0 <= self.num_tokens <= MAX_TOKENS:
            raise VptuneError(f"num_tokens must be in 0..{MAX_TOKENS} (0: no prompts), got {self.num_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise VptuneError(f"prompt dropout must be in [0, 1), got {self.dropout}")
        if self.project_dim < 0:
            raise VptuneError(f"project_dim must be >= 0 (0: no projection), got {self.project_dim}")
        if self.init == "prototype" and (self.project_dim or self.location != "prepend"):
            raise VptuneError("init='prototype' needs prepended prompts in the token space "
                              "(location='prepend', project_dim=0)")


class _VPT(Method):
    options_cls = VPTOptions
    optimizer = "adamw"
    paper_optimizer = "sgd"
    default_lr: ClassVar[dict[str, float]] = {"adamw": 1e-2, "sgd": 0.02}  # recipe study
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"adamw": (3e-3, 1e-2), "sgd": (0.005, 0.02)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"prompts": (r"^method\.prompts\.", r"^method\.project\.")}
    sweep_axes = ("num_tokens",)  # the paper's prompt-length search (Sec. 4.1)
    sweep_axis_names: ClassVar[dict[str, str]] = {"num_tokens": "p"}  # grid folders lr{lr}_wd{wd}_p{num_tokens}
    deep: bool = False

    def __init__(self, backbone: Backbone, options: VPTOptions) -> None:
        super().__init__(backbone, options)
        infos = backbone.block_infos()
        self.location = options.location
        if options.pool is not None:
            check_choice("pool mode", options.pool, backbone.pool_modes)
        self.pool_mode = options.pool
        self.num_blocks = len(infos)
        self.blocks = self._prompted_blocks(len(infos))
        p = backbone.num_patches() if options.location == "add" else options.num_tokens
        ph, pw = backbone.patch_size
        dims = {i: infos[i].dim for i in self.blocks}
        self.prompts = nn.ParameterList(self._init_prompts(p, options.project_dim or dims[i], ph * pw)
                                        for i in self.blocks)
        self.slot = {i: j for j, i in enumerate(self.blocks)}  # block index -> position in self.prompts
        self.project = nn.ModuleDict()
        if options.project_dim:
            for d in sorted(set(dims.values())):
                proj = nn.Linear(options.project_dim, d)
                nn.init.kaiming_normal_(proj.weight, a=0, mode="fan_out")
                nn.init.zeros_(proj.bias)
                self.project[str(d)] = proj
        self.dims = dims
        self.dropout = nn.Dropout(options.dropout)

    def _prompted_blocks(self, n: int) -> list[int]:
        if self.options.num_tokens == 0 and self.options.location == "prepend":
            return []  # no prompts at all: exactly the plain backbone
        if not self.deep:
            return [0]
        k = self.options.deep_layers
        if abs(k) > n:
            raise VptuneError(f"deep_layers={k} exceeds the backbone's {n} blocks")
        return list(range(n)) if k == 0 else list(range(k)) if k > 0 else list(range(n + k, n))

    def _init_prompts(self, p: int, dim: int, patch_area: int) -> nn.Parameter:
        t = torch.empty(p, dim)
        if self.options.init in ("uniform", "prototype"):  # prototype: overwritten by init_from_data
            v = math.sqrt(6.0 / float(3 * patch_area + dim))
            nn.init.uniform_(t, -v, v)
        elif self.options.init == "normal":
            nn.init.normal_(t, std=0.02)
        else:
            nn.init.zeros_(t)
        return nn.Parameter(t)

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        pats = [r"^method\.prompts\."] if self.blocks else []
        return pats + ([r"^method\.project\."] if self.options.project_dim else [])

    def block_prompts(self, i: int, batch: int) -> Tensor | None:
        j = self.slot.get(i)
        if j is None:
            return None
        prompts = self.prompts[j]  # (p, d) or (p, project_dim)
        if self.options.project_dim:
            prompts = self.project[str(self.dims[i])](prompts)
        prompts = self.transform_prompts(i, prompts)
        if self.dropout.p > 0 and self.training:  # a dropout mask per sample, as the reference code
            prompts = prompts.expand(batch, -1, -1)  # (B, p, d)
        return self.dropout(prompts)  # (p, d) or (B, p, d)

    def transform_prompts(self, i: int, prompts: Tensor) -> Tensor:
        """Block i's (p, d) prompt values before dropout and insertion (identity; VFPT overrides)."""
        return prompts

    @property
    def needs_data_init(self) -> bool:
        """Whether :meth:`init_from_data` should run before training (``init="prototype"``)."""
        return self.options.init == "prototype"

    @torch.no_grad()
    def init_from_data(self, backbone: Backbone, images: Tensor) -> None:
        """Set block i's prompts to k-means prototypes of the tokens block i sees on ``images`` with the
        frozen plain backbone (Self-Prompt Tuning, Wang et al., ICML 2024); no global RNG is drawn."""
        if not self.blocks:
            return
        tokens = block_tokens(backbone, images, self.blocks)
        for j, i in enumerate(self.blocks):
            self.prompts[j].copy_(kmeans(tokens[i], self.prompts[j].shape[0]))

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        """Block i's own prompts (Eq. 5: deep replaces the previous block's prompt outputs), at this
        method's location; the backbone may skip prompt outputs nobody reads."""
        return tokens, BlockInput(prompts=self.block_prompts(i, batch), location=self.location,
                                  prompt_outputs=self.prompt_outputs_needed(i, self.num_blocks))

    def pool(self, backbone: Backbone, tokens: Tokens) -> Tensor:
        return backbone.pool(tokens, self.pool_mode)

    def shared_pass(self, num_blocks: int) -> SharedPass | None:
        """Prepended prompts join a mixed batch (each block's (p, d_i) prompts, eval values); 'add'
        prompts change every patch token and run their own pass."""
        if self.location != "prepend":
            return None
        prompts = [self.block_prompts(i, 1) for i in range(num_blocks)]
        return SharedPass([None if t is None else (t[0] if t.dim() == 3 else t).detach() for t in prompts],
                          self.pool_mode)

    def prompt_outputs_needed(self, i: int, num_blocks: int) -> bool:
        """Deep prompts in every block, read through [CLS] or image tokens: block i's prompt outputs are
        replaced before block i+1 and ignored by pooling, so the backbone may skip computing them."""
        every_block = self.deep and len(self.blocks) == num_blocks
        return not (every_block and self.location == "prepend" and self.pool_mode != "prompt_mean")


@register
class VPTShallow(_VPT):
    """VPT-shallow: p prompts before block 0 only (p*d prompt parameters)."""

    name = "vpt-shallow"
    deep = False


@register
class VPTDeep(_VPT):
    """VPT-deep: each block's own p prompts replace the previous ones (N*p*d prompt parameters)."""

    name = "vpt-deep"
    deep = True
