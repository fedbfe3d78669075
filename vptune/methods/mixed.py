"""Block-loop hooks for one pass over samples of many prompt tasks (the one place of mixed-batch masking).

:class:`vptune.multitask.MultiTaskModel` and the ONNX graph of :mod:`vptune.export` both run
:meth:`vptune.model.TunedModel.forward_features` with these hooks. Per sample b (of task t):

* ``prompts[i][b]``: block i's prompts of task t, padded to the longest task's P slots;
* ``replace[i][b]``: task t places prompts at block i (True), or its prompts flow on (False: a
  VPT-shallow sample beside VPT-deep ones, see :mod:`vptune.backbones.base`);
* ``prompt_len[b]``: how many of the P slots are real for task t.

A slot is attended to only once its sample has had prompts placed and only if it is one of its first
``prompt_len`` slots, so every sample gets exactly the features of its task run alone (up to float
rounding). The hooks follow the backbone's own prompt state between blocks: Swin may drop prompts at a
patch merge, for every sample or, in a mixed batch, for samples whose prompts were to flow on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace as dc_replace

import torch
from torch import Tensor

from vptune.backbones.base import Backbone, Tokens
from vptune.methods.base import BlockInput


class MixedPrompts:
    """Hooks (see :class:`vptune.methods.base.BlockHooks`) for one mixed batch; one instance per pass.

    ``traced=True`` (ONNX export) takes no data-dependent shortcut: the mask and the per-sample replace
    flags go to every block. Otherwise an all-True mask or replace vector is left out (the backbone's
    faster unmasked path). ``pool`` returns the features of every mode in ``pool_modes``, in order."""

    def __init__(self, prompts: Sequence[Tensor | None], replace: Sequence[Tensor], prompt_len: Tensor,
                 pool_modes: Sequence[str | None], *, traced: bool = False) -> None:
        self.prompts, self.replace, self.pool_modes, self.traced = list(prompts), list(replace), \
            tuple(pool_modes), traced
        P = next((t.shape[1] for t in self.prompts if t is not None), 0)  # one P for all (padded); no int():
        # the ONNX trace keeps the slot count dynamic
        self.valid = torch.arange(P, device=prompt_len.device)[None] < prompt_len[:, None]  # (B, P)
        self.active = torch.zeros(prompt_len.shape[0], dtype=torch.bool, device=prompt_len.device)

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        if i > 0:
            self._follow(tokens)
        if self.prompts[i] is None:
            return tokens, BlockInput()
        replace_i = self.replace[i]  # (B,)
        self.active = self.active | replace_i
        mask = self.valid & self.active[:, None]
        all_replace = not self.traced and bool(replace_i.all())
        if not self.traced and bool(mask.all()):
            mask = None
        return dc_replace(tokens, prompt_mask=mask), BlockInput(
            prompts=self.prompts[i], prompt_replace=None if all_replace else replace_i)

    def _follow(self, tokens: Tokens) -> None:
        """Which samples hold prompts after the previous block (the backbone's own state)."""
        if tokens.num_prompts == 0:
            self.active = torch.zeros_like(self.active)
        elif tokens.prompt_mask is not None:
            self.active = tokens.prompt_mask.any(dim=1)
        else:
            self.active = torch.ones_like(self.active)

    def pool(self, backbone: Backbone, tokens: Tokens) -> tuple[Tensor, ...]:
        return tuple(backbone.pool(tokens, m) for m in self.pool_modes)

    def fuse(self, features: tuple[Tensor, ...], images: Tensor) -> tuple[Tensor, ...]:
        return features
