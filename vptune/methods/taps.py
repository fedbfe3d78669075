"""Shared pieces of the methods that change the outputs of a block's layers through taps (LoRA, DoRA,
SSF; see :mod:`vptune.backbones.base` for the tap protocol), and their mixed-batch form.

Every such task's change to one layer at inference is one :class:`LayerUpdate`,

    y' = scale * (y + B (A x)) + shift,

with y the frozen layer's output for input x: LoRA is (A, B) with alpha/r folded into B; DoRA adds
scale = m / ||W + (alpha/r) B A||_c and shift = bias * (1 - scale); SSF is (scale, shift) alone.
:class:`MixedTaps` runs a mixed batch of many tasks in one backbone pass: per layer the tasks'
updates are stacked into tables (rank padded with zeros, identity for tasks without one), gathered per
sample and applied with batched matmuls, as multi-LoRA servers do (Punica's gathered BGMV, Chen et
al. 2023), so every sample gets its own task's update.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

import torch
from torch import Tensor, nn

from vptune.backbones.base import LINEAR_TAPS, TAP_NAMES, Backbone, Taps, Tokens
from vptune.errors import VptuneError
from vptune.methods.base import BlockHooks, BlockInput


def block_layer(backbone: Backbone, i: int, name: str) -> nn.Module:
    """The module behind tap ``name`` (one of :data:`TAP_NAMES`) in block ``i``."""
    return backbone.get_submodule(backbone.block_prefix(i) + name)


def key(name: str) -> str:
    """A tap name as a module key (``attn.qkv`` -> ``attn_qkv``)."""
    return name.replace(".", "_")


def match_targets(patterns: Sequence[str], choices: Sequence[str] = LINEAR_TAPS) -> list[str]:
    """The tap names (in forward order) that the anchored ``patterns`` select; every pattern must be
    anchored with ``^`` and match at least one of ``choices``, else VptuneError with the choices."""
    if not patterns:
        raise VptuneError(f"targets must name at least one layer; valid layers: {', '.join(choices)}")
    chosen: set[str] = set()
    for p in patterns:
        if not isinstance(p, str) or not p.startswith("^"):
            raise VptuneError(f"target pattern {p!r} must be anchored with '^'; valid layers: {', '.join(choices)}")
        try:
            hits = [c for c in choices if re.match(p, c)]
        except re.error as e:
            raise VptuneError(f"target pattern {p!r} is not a regular expression: {e}") from None
        if not hits:
            raise VptuneError(f"target pattern {p!r} matches no layer; valid layers: {', '.join(choices)}")
        chosen.update(hits)
    return [c for c in TAP_NAMES if c in chosen]


@dataclass
class LayerUpdate:
    """One task's update of one layer: ``y' = scale * (y + B (A x)) + shift``; None parts are absent.
    A (r, in), B (out, r) with any scaling folded in, scale and shift (out,)."""

    A: Tensor | None = None
    B: Tensor | None = None
    scale: Tensor | None = None
    shift: Tensor | None = None


class BatchedTap:
    """Per-sample :class:`LayerUpdate`: A (n, r, in), B (n, out, r), scale/shift (n, out), row b for sample
    b. The layer's (n * w, L, C) input (Swin windows, ordered (n, nW)) is viewed as (n, w * L, C)."""

    def __init__(self, A: Tensor | None, B: Tensor | None, scale: Tensor | None, shift: Tensor | None) -> None:
        self.A, self.B, self.scale, self.shift = A, B, scale, shift

    def __call__(self, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        shape = y.shape
        ref = self.A if self.A is not None else self.scale if self.scale is not None else self.shift
        n = ref.shape[0]
        out = y.reshape(n, -1, shape[-1])  # (n, M, out)
        if self.A is not None:
            xs = x.reshape(n, -1, x.shape[-1])  # (n, M, in)
            out = out + torch.bmm(torch.bmm(xs, self.A.transpose(1, 2)), self.B.transpose(1, 2))
        if self.scale is not None:
            out = out * self.scale[:, None]
        if self.shift is not None:
            out = out + self.shift[:, None]
        return out.reshape(shape)


def _table(parts: list[Tensor | None], fill: float, shape: tuple[int, ...], ref: Tensor) -> Tensor:
    """(T, *shape) stack, ``fill`` where a task has none; low-rank parts are zero-padded to the rank."""
    t = torch.full((len(parts), *shape), fill, dtype=ref.dtype, device=ref.device)
    for j, p in enumerate(parts):
        if p is not None:
            t[(j, *(slice(0, s) for s in p.shape))] = p.to(dtype=ref.dtype, device=ref.device)
    return t


def update_tables(updates: Sequence[LayerUpdate | None], ref: Tensor) -> tuple[Tensor | None, ...]:
    """The T tasks' updates of one layer as (A (T, r, in), B (T, out, r), scale (T, out), shift (T, out))
    tables (None where no task has that part); ``ref`` gives dtype and device."""
    some = [u for u in updates if u is not None]
    A = B = scale = shift = None
    lowrank = [u for u in some if u.A is not None]
    if lowrank:
        r = max(u.A.shape[0] for u in lowrank)
        A = _table([None if u is None else u.A for u in updates], 0.0, (r, lowrank[0].A.shape[1]), ref)
        B = _table([None if u is None else u.B for u in updates], 0.0, (lowrank[0].B.shape[0], r), ref)
    scaled = [u.scale for u in some if u.scale is not None]
    if scaled:
        scale = _table([None if u is None else u.scale for u in updates], 1.0, tuple(scaled[0].shape), ref)
    shifted = [u.shift for u in some if u.shift is not None]
    if shifted:
        shift = _table([None if u is None else u.shift for u in updates], 0.0, tuple(shifted[0].shape), ref)
    return A, B, scale, shift


def task_tap_tables(task_taps: Sequence[dict[int, dict[str, LayerUpdate]]], num_blocks: int,
                    ref: Tensor) -> list[dict[str, tuple[Tensor | None, ...]]]:
    """Per block: layer name -> the T tasks' tables (:func:`update_tables`), for layers some task taps."""
    out: list[dict[str, tuple[Tensor | None, ...]]] = []
    for i in range(num_blocks):
        names = sorted({n for t in task_taps for n in t.get(i, {})})
        out.append({n: update_tables([t.get(i, {}).get(n) for t in task_taps], ref) for n in names})
    return out


class MixedTaps:
    """Block-loop hooks: ``inner``'s hooks (the mixed prompts) plus every sample's task taps.
    ``tables`` come from :func:`task_tap_tables`; ``task_index`` (B,) maps each sample to its task row."""

    def __init__(self, inner: BlockHooks, tables: list[dict[str, tuple[Tensor | None, ...]]],
                 task_index: Tensor) -> None:
        self.inner = inner
        self.taps: list[Taps | None] = []
        for block in tables:
            taps = {name: BatchedTap(*(None if t is None else t.index_select(0, task_index) for t in parts))
                    for name, parts in block.items()}
            self.taps.append(taps or None)

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        tokens, given = self.inner.block_input(i, tokens, batch)
        return tokens, dc_replace(given, taps=self.taps[i]) if self.taps[i] else given

    def pool(self, backbone: Backbone, tokens: Tokens) -> Any:
        return self.inner.pool(backbone, tokens)

    def fuse(self, features: Any, images: Tensor) -> Any:
        return self.inner.fuse(features, images)
