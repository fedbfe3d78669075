"""Swin Transformer (Liu et al. 2021) with prompt slots, in timm (>= 0.9) parameter names.

Parameter layout (ours = timm >= 0.9): ``patch_embed.proj``, ``patch_embed.norm``,
``layers.{s}.downsample.{norm,reduction}`` at the START of stage ``s >= 1``,
``layers.{s}.blocks.{b}.{norm1, attn.qkv, attn.relative_position_bias_table, attn.proj, norm2, mlp.fc1,
mlp.fc2}``, ``norm``. No head (methods add their own). ``relative_position_index`` is a non-persistent
buffer and the shifted-window mask is computed on the fly, so neither is in the state dict. Patch merging
concatenates the 2x2 neighbours in the order of the Microsoft code, x0..x3 = ``[0::2, 0::2]``,
``[1::2, 0::2]``, ``[0::2, 1::2]``, ``[1::2, 1::2]``; timm >= 0.9's reshape-permute and Hugging Face give
the same order, so the converters (``convert_swin.py``) move merge weights without permuting them.

How prompts flow (VPT paper Sec. 3.2 and its reference code, ``PromptedSwinTransformer``):

- The image tokens stay a (B, H*W, C) map; the p prompts are kept apart in ``Tokens.prompts`` (B, p, C).
- In every block the prompts go through ``norm1`` with the image tokens, are prepended to each local
  window's tokens (the same prompts for every window: an ``expand`` to (B, nW, p, C) and one ``cat``, no
  loop over windows), get zero relative-position bias and are never masked by the shifted-window mask.
  Their attention outputs are averaged over the windows, then they share the residuals and the FFN
  (and an optional FFN adapter) with the image tokens.
- At patch merging (start of stages 1..3) the default ``prompt_merge="carry"`` tiles the prompts to 4C
  and passes them through the pretrained merge norm and reduction, so they enter the next stage at 2C (the
  reference code). ``prompt_merge="drop"`` discards them there instead (the paper's "ignored during patch
  merging"). Deep prompts handed to ``run_block`` replace whatever prompts are there, so they take each
  stage's width (``block_infos()[i].dim``).
- ``pool``: "image_mean" (default) averages the final-normed image tokens only; "image_prompt_mean"
  averages prompts and image tokens together, as the reference code does; "prompt_mean" averages the
  prompts only.

Differences from the reference code, on purpose: prompts are broadcast to the windows of their own sample
(the reference expands (B, p, C) to (nW, B, p, C) and reshapes to (nW*B, p, C) while the windows are
ordered (B, nW), which mixes samples whenever prompts differ across the batch, i.e. after block 0), and
the default pool excludes prompts. ``location="add"`` adds one prompt per image token (p = H*W of that
block's stage) to the image tokens. Mixed batches (``prompt_replace``, see :mod:`vptune.backbones.base`)
work as for the ViT; with ``prompt_merge="drop"`` a sample whose prompts were to flow on (False) has lost
them at the merge, so its slots of the next stage's prompts are masked out (``prompt_mask``).

Input sizes: any. Like Hugging Face, the image is padded to a multiple of the patch size, each block pads
its feature map with zeros (after ``norm1``) to a multiple of the window and crops afterwards, and patch
merging pads odd sizes. A stage whose map is no larger than the window uses one window of that size and
no shift (as timm, Microsoft and Hugging Face do at their native sizes); its relative-position bias is
the exact sub-table of the pretrained one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vptune.backbones.base import (
    Backbone,
    BlockInfo,
    ConfigDict,
    Preprocessing,
    Taps,
    Tokens,
    expand_prompts,
    tapped,
)
from vptune.backbones.registry import register_arch
from vptune.backbones.vit import DropPath, Mlp, split_heads
from vptune.errors import VptuneError, check_choice

POOL_MODES = ("image_mean", "image_prompt_mean", "prompt_mean")
PROMPT_MERGE_MODES = ("carry", "drop")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHIFT_MASK_VALUE = -100.0  # what timm, Microsoft and Hugging Face add across shifted-window regions


@dataclass
class SwinConfig(ConfigDict):
    family_name = "Swin"

    img_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    global_pool: str = "image_mean"  # one of POOL_MODES
    prompt_merge: str = "carry"  # one of PROMPT_MERGE_MODES: what patch merging does with prompts
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD



_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}
_S = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)}
_B = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}
_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)}

SWIN_CONFIGS: dict[str, SwinConfig] = {
    "swin_tiny_patch4_window7_224": SwinConfig(**_T),
    "swin_small_patch4_window7_224": SwinConfig(**_S),
    "swin_base_patch4_window7_224": SwinConfig(**_B),
    "swin_base_patch4_window12_384": SwinConfig(img_size=384, window_size=12, **_B),
    "swin_large_patch4_window7_224": SwinConfig(**_L),
    "swin_large_patch4_window12_384": SwinConfig(img_size=384, window_size=12, **_L),
}


def relative_position_index(window: int, table_window: int) -> Tensor:
    """(N, N) index into a ((2*table_window - 1)**2, heads) bias table for a window of ``window`` tokens
    per side (N = window**2); ``window <= table_window`` reads the exact sub-table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + table_window - 1) * (2 * table_window - 1) + (rel[1] + table_window - 1)


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, window*window, C), windows ordered (B, row, col)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (H // window) * (W // window), window * window, C)


def window_reverse(windows: Tensor, window: int, H: int, W: int) -> Tensor:
    """(B * nW, window*window, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shift_mask(H: int, W: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(nW, N, N) 0/-100 mask that keeps shifted windows from mixing regions that were not adjacent."""
    h, w = torch.arange(H, device=device), torch.arange(W, device=device)
    h_region = (h >= H - window).long() + (h >= H - shift).long()
    w_region = (w >= W - window).long() + (w >= W - shift).long()
    regions = (h_region[:, None] * 3 + w_region[None, :]).to(torch.float32)  # (H, W)
    win = window_partition(regions[None, :, :, None], window)[..., 0]  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias and prompt rows/columns.

    ``forward(x, window, shift_mask, num_prompts, key_pad)``: x is (B*nW, p + N, C), prompts first.
    One additive float mask (bias + shift mask + padding-prompt mask) goes to
    ``scaled_dot_product_attention``; prompt rows and columns get zero bias and are never shift-masked.
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise VptuneError(f"Swin width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        index = relative_position_index(window, window)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def relative_bias(self, window: int) -> Tensor:
        """(heads, N, N) relative-position bias for a (window x window) window."""
        if window == self.window:
            index = self.relative_position_index
        else:
            index = relative_position_index(window, self.window).to(self.relative_position_bias_table.device)
        N = window * window
        return self.relative_position_bias_table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, batch: int, window: int, mask: Tensor | None, num_prompts: int,
                key_pad: Tensor | None, taps: Taps | None = None,
                kv_learned: tuple[Tensor, Tensor] | None = None, temperature: Tensor | None = None) -> Tensor:
        """``temperature`` tau: softmax((q k^T / sqrt(d_h) + bias) / tau + masks), as q / tau and bias / tau."""
        BW, L, C = x.shape
        nW, h = BW // batch, self.num_heads
        qkv = tapped(self.qkv, x, taps, "attn.qkv").reshape(BW, L, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B*nW, heads, L, head_dim)
        bias = self.relative_bias(window).to(q.dtype)  # (heads, N, N)
        if temperature is not None:
            tau = temperature.to(q.dtype)
            q, bias = q / tau, bias / tau
        p = num_prompts
        if p:
            bias = F.pad(bias, (p, 0, p, 0))  # zero bias on prompt rows and columns
        attn_mask = bias[None]  # (1, heads, L, L)
        if kv_learned is not None:  # learned keys/values (E2VPT) in every window: zero bias, never masked
            k, v = (torch.cat([t, self._window_kv(e.to(t.dtype), batch, nW)], dim=2)
                    for t, e in zip((k, v), kv_learned))
            n_kv = k.shape[2] - L
            attn_mask = F.pad(attn_mask, (0, n_kv))  # (1, heads, L, L + L_kv)
            mask = None if mask is None else F.pad(mask, (0, n_kv))
            if key_pad is not None:
                key_pad = torch.cat([key_pad, key_pad.new_zeros(key_pad.shape[0], n_kv)], dim=1)
        if mask is None and key_pad is None:  # one mask for every window: plain 4-D attention
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:  # masks that vary per window and/or sample broadcast over (B, nW) without a copy
            attn_mask = attn_mask[None]  # (1, 1, heads, L, L)
            if mask is not None:
                m = F.pad(mask.to(q.dtype), (p, 0, p, 0)) if p else mask.to(q.dtype)  # prompts never masked
                attn_mask = attn_mask + m[None, :, None]  # (1, nW, heads, L, L)
            if key_pad is not None:  # (B, L) True = padding prompt
                pad = torch.zeros(key_pad.shape, dtype=q.dtype, device=q.device)
                pad = pad.masked_fill(key_pad, float("-inf"))
                attn_mask = attn_mask + pad[:, None, None, None, :]  # (B, nW, heads, L, L)
            q = q.view(batch, nW, h, L, -1)
            k, v = (t.view(batch, nW, h, t.shape[2], -1) for t in (k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).view(BW, h, L, -1)
        return tapped(self.proj, out.transpose(1, 2).reshape(BW, L, C), taps, "attn.proj")

    def _window_kv(self, t: Tensor, batch: int, nW: int) -> Tensor:
        """(L, C) or (B, L, C) learned keys or values -> (B*nW, heads, L, head_dim): each sample's own in
        every one of its windows (shared ones expanded without a copy where possible)."""
        if t.dim() == 2:
            return split_heads(t, self.num_heads, batch * nW)
        per_sample = split_heads(t, self.num_heads, batch)  # (B, heads, L, hd)
        return per_sample.unsqueeze(1).expand(-1, nW, -1, -1, -1).reshape(batch * nW, *per_sample.shape[1:])


class SwinBlock(nn.Module):
    """(Shifted-)window block: x + Attn(LN(x)), then x + FFN(LN(x)) (+ an optional adapter on FFN)."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, qkv_bias: bool,
                 eps: float, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def window_and_shift(self, grid: tuple[int, int]) -> tuple[int, int]:
        """A map no larger than the window is one window without shift (timm / Microsoft / HF rule)."""
        if min(grid) <= self.window:
            return min(grid), 0
        return self.window, self.shift

    def forward(self, x: Tensor, grid: tuple[int, int], prompts: Tensor | None = None,
                prompt_mask: Tensor | None = None,
                ffn_adapter: nn.Module | None = None, taps: Taps | None = None,
                kv_learned: tuple[Tensor, Tensor] | None = None,
                temperature: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, H*W, C), prompts (B, p, C) or None -> the same shapes."""
        B, HW, C = x.shape
        H, W = grid
        p = 0 if prompts is None else prompts.shape[1]
        seq = x if prompts is None else torch.cat([prompts, x], dim=1)  # (B, p + HW, C)
        normed = tapped(self.norm1, seq, taps, "norm1")
        window, shift = self.window_and_shift(grid)
        img = normed[:, p:].view(B, H, W, C)
        pad_h, pad_w = (window - H % window) % window, (window - W % window) % window
        if pad_h or pad_w:  # zero-pad to whole windows after norm1, as Hugging Face and timm do
            img = F.pad(img, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if shift:
            img = torch.roll(img, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(img, window)  # (B*nW, N, C)
        nW, N = windows.shape[0] // B, window * window
        if p:  # the same prompts in every window of their sample: expand (no copy) and one cat
            pw = normed[:, :p].unsqueeze(1).expand(B, nW, p, C)
            windows = torch.cat([pw, windows.view(B, nW, N, C)], dim=2).view(B * nW, p + N, C)
        mask = shift_mask(Hp, Wp, window, shift, x.device) if shift else None
        key_pad = None
        if p and prompt_mask is not None:
            key_pad = torch.cat([~prompt_mask, prompt_mask.new_zeros(B, N)], dim=1)
        out = self.attn(windows, B, window, mask, p, key_pad, taps, kv_learned, temperature)  # (B*nW, p + N, C)
        img = window_reverse(out[:, p:], window, Hp, Wp)
        if shift:
            img = torch.roll(img, shifts=(shift, shift), dims=(1, 2))
        img = img[:, :H, :W].reshape(B, HW, C)
        attn_out = img if not p else torch.cat([out[:, :p].view(B, nW, p, C).mean(dim=1), img], dim=1)
        seq = seq + self.drop_path(attn_out)
        h = self.mlp(tapped(self.norm2, seq, taps, "norm2"), taps)
        if ffn_adapter is not None:  # Pfeiffer placement: adapter on the FFN output, inside the residual
            h = h + ffn_adapter(h)
        seq = seq + self.drop_path(h)
        return (seq, None) if not p else (seq[:, p:], seq[:, :p])


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (x0..x3, see the module docstring) -> LayerNorm(4C) -> Linear(4C, 2C)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        B, _, C = x.shape
        H, W = grid
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:  # odd maps are zero-padded bottom/right, as Hugging Face and timm do
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, 2[row], W/2, 2[col], C) -> channel blocks ordered (col, row): x0, x1, x2, x3
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, -1, 4 * C)
        return self.reduction(self.norm(x)), (H // 2, W // 2)

    def merge_prompts(self, prompts: Tensor) -> Tensor:
        """(B, p, C) -> (B, p, 2C): tiled to 4C and through the pretrained norm and reduction."""
        return self.reduction(self.norm(prompts.repeat(1, 1, 4)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int, eps: float) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        ps = self.patch_size
        H, W = images.shape[-2:]
        if H % ps or W % ps:  # pad bottom/right to whole patches, as Hugging Face does
            images = F.pad(images, (0, (ps - W % ps) % ps, 0, (ps - H % ps) % ps))
        x = self.proj(images)  # (B, C, gh, gw)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class SwinStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[SwinBlock]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


class SwinTransformer(Backbone):
    """A Swin Transformer whose blocks can be run one at a time with prompts (the vptune protocol).

    ``run_block(i, ...)`` takes the global block index over all stages and runs the patch merging of
    stage s itself when block i is the first block of stage s >= 1.
    """

    arch = "swin"
    pool_modes = POOL_MODES
    exports_onnx = True  # prompts padded to the widest stage; block i reads its stage's width

    def __init__(self, config: SwinConfig, input_size: int | None = None) -> None:
        super().__init__()
        check_choice("pool mode", config.global_pool, POOL_MODES)
        check_choice("prompt merge mode", config.prompt_merge, PROMPT_MERGE_MODES)
        if len(config.depths) != len(config.num_heads) or not config.depths:
            raise VptuneError(f"Swin depths {tuple(config.depths)} and num_heads {tuple(config.num_heads)} "
                              "must be non-empty and of the same length")
        self.config = config
        c = config
        self.stage_dims = [c.embed_dim * 2 ** s for s in range(len(c.depths))]
        self.num_features = self.stage_dims[-1]
        self.patch_size = (c.patch_size, c.patch_size)
        self.preprocessing = Preprocessing(input_size or c.img_size, tuple(c.mean), tuple(c.std))
        self.patch_embed = PatchEmbed(c.patch_size, 3, c.embed_dim, c.norm_eps)
        self.pos_drop = nn.Dropout(c.drop_rate)
        dpr = torch.linspace(0, c.drop_path_rate, sum(c.depths)).tolist()
        self._where: list[tuple[int, int]] = []  # global block index -> (stage, block in stage)
        layers = []
        for s, (depth, heads) in enumerate(zip(c.depths, c.num_heads)):
            dim = self.stage_dims[s]
            blocks = []
            for b in range(depth):
                shift = 0 if b % 2 == 0 else c.window_size // 2
                blocks.append(SwinBlock(dim, heads, c.window_size, shift, c.mlp_ratio, c.qkv_bias, c.norm_eps,
                                        c.drop_rate, dpr[len(self._where)]))
                self._where.append((s, b))
            down = PatchMerging(self.stage_dims[s - 1], c.norm_eps) if s > 0 else nn.Identity()
            layers.append(SwinStage(down, blocks))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(self.num_features, eps=c.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def embed(self, images: Tensor) -> Tokens:
        x, grid = self.patch_embed(images)
        return Tokens(x=self.pos_drop(x), num_prompts=0, grid=grid)

    def run_block(self, i: int, tokens: Tokens, prompts: Tensor | None = None, *, location: str = "prepend",
                  ffn_adapter: nn.Module | None = None, prompt_replace: Tensor | None = None,
                  prompt_outputs: bool = True, taps: Taps | None = None,
                  kv_prompts: tuple[Tensor, Tensor] | None = None, prompt_gate: Tensor | None = None,
                  attn_temperature: Tensor | None = None) -> Tokens:
        # prompt_outputs=False (a hint that this block's prompt outputs will be discarded) is not used:
        # Swin's prompts are averaged over windows and may be carried through patch merging.
        if not 0 <= i < len(self._where):
            raise VptuneError(f"block index {i} out of range; this Swin has {len(self._where)} blocks")
        s, b = self._where[i]
        dropped_here = False
        if tokens.x.shape[-1] != self.stage_dims[s]:
            if b == 0 and s > 0 and tokens.x.shape[-1] == self.stage_dims[s - 1]:
                # prompts about to be replaced for every sample need not go through the merge
                replacing = prompts is not None and location == "prepend" and prompt_replace is None
                dropped_here = tokens.prompts is not None and self.config.prompt_merge == "drop"
                tokens = self._merge(s, tokens, replacing)
            else:
                raise VptuneError(f"block {i} (stage {s}) expects {self.stage_dims[s]}-wide tokens, got "
                                  f"{tokens.x.shape[-1]}; run the blocks in order")
        if prompts is not None:
            tokens = self._place_prompts(i, tokens, prompts, location, prompt_replace)
            if dropped_here and prompt_replace is not None and location == "prepend":
                # mixed batch, prompt_merge="drop": samples whose prompts were to flow on (False) lost
                # them at this merge, so their slots of the new prompts are never attended to
                keep = prompt_replace.view(-1, 1).to(torch.bool)
                mask = keep if tokens.prompt_mask is None else tokens.prompt_mask & keep
                tokens = replace(tokens, prompt_mask=mask.expand(-1, tokens.num_prompts))
        block = self.layers[s].blocks[b]
        x, P = block(tokens.x, tokens.grid, tokens.prompts, tokens.prompt_mask, ffn_adapter, taps, kv_prompts,
                     attn_temperature)
        if prompt_gate is not None and P is not None:  # gated prompts: P' = g f(P) + (1 - g) P
            P = prompt_gate * P + (1 - prompt_gate) * tokens.prompts
        return replace(tokens, x=x, prompts=P)

    def _merge(self, s: int, tokens: Tokens, replacing: bool) -> Tokens:
        down = self.layers[s].downsample
        x, grid = down(tokens.x, tokens.grid)
        if tokens.prompts is None or replacing or self.config.prompt_merge == "drop":
            # dropped ("ignored during patch merging"), or about to be replaced by deep prompts anyway;
            # prompt_mask is kept for the deep prompts that follow
            return replace(tokens, x=x, grid=grid, prompts=None, num_prompts=0)
        return replace(tokens, x=x, grid=grid, prompts=down.merge_prompts(tokens.prompts))

    def _place_prompts(self, i: int, tokens: Tokens, prompts: Tensor, location: str,
                       prompt_replace: Tensor | None) -> Tokens:
        x = tokens.x
        P = expand_prompts(prompts.to(x.dtype), x.shape[0])  # (B, p, C)
        if P.shape[-1] != x.shape[-1]:
            raise VptuneError(f"prompts for block {i} must be {x.shape[-1]} wide (this stage's width, see "
                              f"block_infos()), got {P.shape[-1]}")
        if location == "prepend":  # insert, or replace the previous block's prompt outputs (VPT-deep)
            mask = tokens.prompt_mask
            if mask is not None and mask.shape[1] != P.shape[1]:
                raise VptuneError(f"prompt_mask covers {mask.shape[1]} prompts but {P.shape[1]} were given")
            if prompt_replace is not None and tokens.prompts is not None:  # per sample: replace or flow on
                if P.shape[1] != tokens.num_prompts:
                    raise VptuneError(f"prompt_replace needs as many prompts ({P.shape[1]}) as the sequence "
                                      f"holds ({tokens.num_prompts})")
                P = torch.where(prompt_replace.view(-1, 1, 1), P, tokens.prompts)
            return replace(tokens, prompts=P, num_prompts=P.shape[1])
        if location == "add":  # one prompt per image token of this stage, added element-wise
            if P.shape[1] != x.shape[1]:
                raise VptuneError(f"location='add' needs one prompt per image token of block {i}'s stage "
                                  f"({x.shape[1]}), got {P.shape[1]}")
            if prompt_replace is not None:  # per sample: add (True) or leave the image tokens (False)
                P = P * prompt_replace.view(-1, 1, 1).to(P.dtype)
            return replace(tokens, x=x + P)
        raise VptuneError(f"unknown prompt location {location!r}; valid choices: prepend, add")

    def pool(self, tokens: Tokens, mode: str | None = None) -> Tensor:
        mode = mode or self.config.global_pool
        check_choice("pool mode", mode, POOL_MODES)
        x = self.norm(tokens.x)
        if mode == "image_mean":
            return x.mean(dim=1)
        if tokens.prompts is None:
            raise VptuneError(f"pool mode {mode!r} needs prompts, but none reached the last block (were "
                              "they dropped at patch merging?)")
        P = self.norm(tokens.prompts)
        w = (torch.ones(P.shape[:2], dtype=P.dtype, device=P.device) if tokens.prompt_mask is None
             else tokens.prompt_mask.to(P.dtype))[..., None]  # (B, p, 1)
        if mode == "prompt_mean":
            return (P * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return ((P * w).sum(dim=1) + x.sum(dim=1)) / (w.sum(dim=1) + x.shape[1])  # image_prompt_mean

    def block_prefix(self, i: int) -> str:
        s, b = self._where[i]
        return f"layers.{s}.blocks.{b}."

    def final_norm_prefixes(self) -> list[str]:
        return ["norm."]

    def block_infos(self) -> list[BlockInfo]:
        heads = self.config.num_heads
        return [BlockInfo(index=i, dim=self.stage_dims[s], num_heads=heads[s], stage=s)
                for i, (s, _) in enumerate(self._where)]


def _register() -> None:
    register_arch("swin", SwinTransformer, SwinConfig, SWIN_CONFIGS)


_register()
