"""The backbone protocol: ``embed -> run_block(i, tokens, prompts) -> pool``.

A backbone alone decides where prompts sit in its token sequence (after [CLS] for a ViT, inside every
local window for Swin) and how they travel between blocks and stages. Methods only hand it prompt
tensors (and, for adapters, a per-block module); they never slice token sequences.

Prompt rule (VPT paper, Sec. 3.2): the prompts given to ``run_block(i, ...)`` are inserted when the
sequence holds none yet, and *replace* the previous block's prompt outputs when it does (VPT-deep).
``prompts=None`` lets whatever prompts are there flow on (VPT-shallow after block 0).

Mixed batches (one pass for samples of many tasks, :mod:`vptune.multitask`): ``prompts`` is (B, p, d)
padded to the longest task's p, ``Tokens.prompt_mask`` (B, p) marks the real slots (the caller sets it
on the ``Tokens`` before ``run_block``; a False slot is never attended to), and the optional keyword
``prompt_replace`` (B,) bool says per sample whether the given prompts replace the prompt outputs the
sequence holds (True) or are ignored so that this sample's prompts flow on (False, a VPT-shallow sample
beside VPT-deep ones). When the sequence holds no prompts yet, every sample's prompts are inserted and
``prompt_replace`` is ignored. ``prompt_replace=None`` means all True (the single-task rule above).
With ``location='add'``, False leaves that sample's patch tokens unchanged.

Taps (LoRA, DoRA, SSF): ``run_block(..., taps={name: tap})`` lets a method change the output of a named
layer inside the block, ``y <- tap(module, x, y)`` (the signature of a torch forward hook), at the names
:data:`TAP_NAMES` (the same names in ViT and Swin blocks: ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2``). In a Swin block ``attn.qkv`` and ``attn.proj`` see the (B * nW, L, C) windows of the batch,
ordered (B, nW), so a per-sample tap views them as (B, nW * L, C). ``taps=None`` (or empty) is the
plain block, computed exactly as without taps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vptune.errors import VptuneError

if TYPE_CHECKING:
    from typing_extensions import Self

Tap = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (module, its input x, its output y) -> new y
Taps = Mapping[str, Tap]
LINEAR_TAPS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # the Linear layers of every block
NORM_TAPS = ("norm1", "norm2")  # the LayerNorms of every block
TAP_NAMES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")  # in forward order


def tapped(module: nn.Module, x: Tensor, taps: Taps | None, name: str) -> Tensor:
    """``module(x)``, then the tap named ``name`` if ``taps`` holds one (see the module docstring)."""
    y = module(x)
    if taps:
        tap = taps.get(name)
        if tap is not None:
            return tap(module, x, y)
    return y


class ConfigDict:
    """``to_dict``/``from_dict`` of a backbone config dataclass (tuples stored as lists, unknown keys
    refused naming the family: ``unknown <family_name> config keys ...``)."""

    family_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        items = asdict(self).items()  # type: ignore[call-overload]  (self is a dataclass)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        unknown = sorted(set(d) - known)
        if unknown:
            raise VptuneError(
                f"unknown {cls.family_name} config keys {unknown}; valid keys: {', '.join(sorted(known))}"
            )
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


@dataclass(frozen=True)
class BlockInfo:
    """What a method needs to know about block ``index`` to build per-block prompts or adapters."""

    index: int
    dim: int  # token width inside this block
    num_heads: int
    stage: int = 0  # Swin stage (0 for plain ViTs)


@dataclass
class Tokens:
    """The running state between blocks.

    x: (B, N, d) token sequence. ViT layout: ``[CLS, P_1..P_p, patches]``.
    num_prompts: p, how many prompt slots ``x`` (or ``prompts`` for Swin) currently holds.
    grid: (H, W) of the patch grid (Swin needs it; ViT keeps it for pooling and export).
    prompts: Swin keeps prompts apart from the window-partitioned image tokens, (B, p, C); None for ViT.
    prompt_mask: optional (B, p) bool, True for a real prompt, False for padding (prompts of
        different lengths in one mixed batch); None means every prompt is real.
    """

    x: Tensor
    num_prompts: int = 0
    grid: tuple[int, int] = (0, 0)
    prompts: Tensor | None = None
    prompt_mask: Tensor | None = None


@dataclass
class Preprocessing:
    """How images must be prepared for a backbone (stored in every task file)."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(d.get("input_size", 224)),
            mean=tuple(d.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(d.get("std", (0.5, 0.5, 0.5))),
            interpolation=str(d.get("interpolation", "bilinear")),
        )


class Backbone(nn.Module):
    """Base class of every backbone. Subclasses set ``config`` (a dataclass with ``to_dict()``),
    ``num_features``, ``patch_size`` and ``preprocessing``."""

    arch: str = ""
    num_features: int
    patch_size: tuple[int, int]
    preprocessing: Preprocessing
    pool_modes: tuple[str, ...] = ("cls",)
    num_prefix_tokens: ClassVar[int] = 0  # tokens before the prompt slots ([CLS] for a ViT)
    exports_onnx: ClassVar[bool] = False  # vptune.export can trace it into the shared prompt graph
    supports_mixed_batches: ClassVar[bool] = True  # run_block honours prompt_mask and prompt_replace

    def embed(self, images: Tensor) -> Tokens:
        """(B, 3, H, W) images -> token state before block 0 (no prompts yet)."""
        raise NotImplementedError

    def run_block(
        self,
        i: int,
        tokens: Tokens,
        prompts: Tensor | None = None,
        *,
        location: str = "prepend",
        ffn_adapter: nn.Module | None = None,
        prompt_replace: Tensor | None = None,
        prompt_outputs: bool = True,
        taps: Taps | None = None,
        kv_prompts: tuple[Tensor, Tensor] | None = None,
        prompt_gate: Tensor | None = None,
        attn_temperature: Tensor | None = None,
    ) -> Tokens:
        """Run block ``i``. ``prompts`` is (p, d) or (B, p, d); see the module docstring for the rule.
        ``location='add'`` adds (p == number of patches) prompts to the patch tokens instead.
        ``ffn_adapter`` (Pfeiffer placement) maps the FFN output h to h + adapter(h).
        ``prompt_replace`` (B,) bool: per-sample replace (True) or flow on (False); see the module
        docstring (mixed batches).
        ``prompt_outputs=False`` tells the backbone that nobody reads this block's prompt outputs (the
        next block replaces them and pooling ignores them), so it may skip computing them; the [CLS]
        and patch outputs must be the same either way.
        ``taps``: name -> tap, applied to the outputs of the named layers of this block (see the module
        docstring; a backbone that offers none refuses them).
        ``kv_prompts``: learned (keys, values), each (L, d_i) or (B, L, d_i), concatenated to K and V inside
        the block's attention after the projection (E2VPT's key-value prompts): never queries, no outputs;
        Swin puts them into every window with zero relative-position bias, as its prompts.
        ``prompt_gate``: a scalar g in [0, 1] (gated prompt tuning): the prompt tokens leave the block as
        ``g * block(P) + (1 - g) * P`` (P as they entered it); image tokens are unaffected.
        ``attn_temperature``: a scalar tau > 0 (gated prompt tuning's adaptive attention shaping): the
        block's attention is ``softmax(logits / tau)`` for every query and key (on Swin the relative-
        position bias is divided too; the shift and padding masks stay hard)."""
        raise NotImplementedError

    def pool(self, tokens: Tokens, mode: str | None = None) -> Tensor:
        """Final norm and pooling -> (B, num_features). ``mode`` in ``pool_modes`` (None: the default)."""
        raise NotImplementedError

    def block_infos(self) -> list[BlockInfo]:
        raise NotImplementedError

    def block_prefix(self, i: int) -> str:
        """Parameter-name prefix of block ``i`` (``"blocks.3."``; Swin ``"layers.1.blocks.0."``)."""
        raise NotImplementedError

    def final_norm_prefixes(self) -> list[str]:
        """Parameter-name prefixes of the norm(s) between the last block and the head (Partial-k)."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.block_infos())

    def num_patches(self, input_size: int | None = None) -> int:
        size = input_size or self.preprocessing.input_size
        return (size // self.patch_size[0]) * (size // self.patch_size[1])

    def forward_features(self, images: Tensor) -> Tensor:
        """The plain (unprompted) backbone: embed, every block, pool."""
        tokens = self.embed(images)
        for i in range(self.num_blocks):
            tokens = self.run_block(i, tokens)
        return self.pool(tokens)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)

    def identity(self) -> dict[str, Any]:
        """Backbone identity stamped into task files: arch, config and sha256 of the weights."""
        return {"arch": self.arch, "config": self.config.to_dict(), "sha256": self.fingerprint()}

    def fingerprint(self) -> str:
        """sha256 over every parameter and buffer (name, shape, bytes), cached.

        Cached at first call, so a copy made for a weight-changing method keeps the identity of the
        pretrained weights it started from. ``load_state_dict`` through vptune's loaders resets it.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256()
            for name, t in sorted(self.state_dict().items()):
                t = t.detach().to("cpu").contiguous()
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            cached = h.hexdigest()
            self._fingerprint = cached
        return cached

    def reset_fingerprint(self) -> None:
        self._fingerprint = None


def expand_prompts(prompts: Tensor, batch: int) -> Tensor:
    """(p, d) or (B, p, d) -> (B, p, d) without copying when shared."""
    if prompts.dim() == 2:
        return prompts.unsqueeze(0).expand(batch, -1, -1)
    return prompts
