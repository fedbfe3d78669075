"""Vision Transformer (Dosovitskiy et al. 2021) with prompt slots, in timm's parameter names.

Layout of the token sequence (VPT paper, Sec. 3.2, Eq. 1): ``[CLS, P_1..P_p, patches]``. Prompts are
inserted after the position embedding, so they carry none, and [CLS] stays at index 0. The same class
serves supervised (timm / JAX / Hugging Face), MAE (mean-pooled image tokens through ``fc_norm``) and
MoCo-v3 (fixed 2-D sin-cos position embedding) checkpoints through its config.
"""

from __future__ import annotations

import math
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
from vptune.errors import VptuneError, check_choice

POOL_MODES = ("cls", "image_mean", "prompt_mean")


@dataclass
class ViTConfig(ConfigDict):
    family_name = "ViT"

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    global_pool: str = "cls"  # one of POOL_MODES
    fc_norm: bool = False  # MAE: norm after pooling instead of before
    pos_embed: str = "learn"  # "learn" | "sincos" (MoCo-v3: fixed 2-D sin-cos)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)



IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": ViTConfig(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": ViTConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "mae_vit_base_patch16": ViTConfig(
        global_pool="image_mean", fc_norm=True, mean=IMAGENET_MEAN, std=IMAGENET_STD
    ),
    "mae_vit_large_patch16": ViTConfig(
        embed_dim=1024, depth=24, num_heads=16, global_pool="image_mean", fc_norm=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ),
    "mocov3_vit_small_patch16": ViTConfig(
        embed_dim=384, depth=12, num_heads=12, pos_embed="sincos", mean=IMAGENET_MEAN, std=IMAGENET_STD
    ),
    "mocov3_vit_base_patch16": ViTConfig(pos_embed="sincos", mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # (B, d, H/ps, W/ps)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, computed by ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise VptuneError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, kv_extra: Tensor | None = None,
                taps: Taps | None = None,
                kv_prompts: tuple[Tensor, Tensor] | None = None, temperature: Tensor | None = None) -> Tensor:
        """``kv_extra`` ((1 or B), p, C), already normalised: extra tokens that are attended to but
        produce no output (VPT-deep prompts whose outputs the next block discards). ``kv_prompts``:
        learned (key, value) tokens, each (L, C) or (B, L, C), concatenated to K and V after the
        projection (E2VPT's key-value prompts): never queries, no outputs. ``temperature``: a scalar tau,
        softmax(q k^T / (sqrt(d_h) tau)) (gated prompt tuning's attention shaping), as q / tau."""
        B, N, C = x.shape
        qkv = tapped(self.qkv, x, taps, "attn.qkv").reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if temperature is not None:
            q = q / temperature.to(q.dtype)
        if kv_extra is not None:
            w, b = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
            Bp, p = kv_extra.shape[:2]
            kv = F.linear(kv_extra, w, b).reshape(Bp, p, 2, self.num_heads, C // self.num_heads)
            kv = kv.permute(2, 0, 3, 1, 4).expand(-1, B, -1, -1, -1)  # (2, B, heads, p, head_dim)
            k, v = torch.cat([k, kv[0]], dim=2), torch.cat([v, kv[1]], dim=2)  # (B, heads, N+p, hd)
        if kv_prompts is not None:
            k, v = (torch.cat([t, split_heads(e.to(t.dtype), self.num_heads, B)], dim=2)
                    for t, e in zip((k, v), kv_prompts))  # (B, heads, N(+p)+L, head_dim)
            if attn_mask is not None:  # key mask (B, 1, 1, N): learned keys are always attended to
                attn_mask = F.pad(attn_mask, (0, k.shape[2] - attn_mask.shape[-1]), value=True)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, head_dim)
        return tapped(self.proj, x.transpose(1, 2).reshape(B, N, C), taps, "attn.proj")


def split_heads(t: Tensor, heads: int, batch: int) -> Tensor:
    """(L, C) or (B, L, C) learned keys or values -> (batch, heads, L, C // heads), shared ones expanded."""
    t = t.unsqueeze(0) if t.dim() == 2 else t
    Bt, L, C = t.shape
    return t.reshape(Bt, L, heads, C // heads).transpose(1, 2).expand(batch, -1, -1, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, taps: Taps | None = None) -> Tensor:
        h = self.drop(self.act(tapped(self.fc1, x, taps, "mlp.fc1")))
        return self.drop(tapped(self.fc2, h, taps, "mlp.fc2"))


class DropPath(nn.Module):
    """Stochastic depth per sample (inactive in eval mode, so inactive in every frozen block)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x)) (+ an optional adapter on FFN)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float,
                 drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, ffn_adapter: nn.Module | None = None,
                kv_prompts: Tensor | None = None, taps: Taps | None = None,
                kv_learned: tuple[Tensor, Tensor] | None = None, temperature: Tensor | None = None) -> Tensor:
        kv = None if kv_prompts is None else self.norm1(kv_prompts)
        extra = {} if kv_learned is None else {"kv_prompts": kv_learned}  # learned K/V (E2VPT): only when set
        if temperature is not None:
            extra["temperature"] = temperature
        if taps:  # taps go to attn only when some (a patched forward may take none)
            extra["taps"] = taps
        h = tapped(self.norm1, x, taps, "norm1")
        x = x + self.drop_path(self.attn(h, attn_mask, kv, **extra))
        h = self.mlp(tapped(self.norm2, x, taps, "norm2"), taps)
        if ffn_adapter is not None:  # Pfeiffer placement: adapter on the FFN output, inside the residual
            h = h + ffn_adapter(h)
        return x + self.drop_path(h)


def sincos_pos_embed(dim: int, grid: tuple[int, int], temperature: float = 10000.0) -> Tensor:
    """MoCo-v3's fixed 2-D sin-cos position embedding, (1, 1 + gh*gw, dim) with a zero [CLS] slot."""
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                            indexing="ij")
    if dim % 4:
        raise VptuneError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = xx.flatten()[:, None] * omega[None]  # (N, d/4)
    out_h = yy.flatten()[:, None] * omega[None]
    # MoCo-v3 (vits.py) builds meshgrid(grid_w, grid_h) with "ij" indexing, so its first half ("out_w")
    # varies with the row (slow) index of the raster order: row terms first, to match its checkpoints.
    pe = torch.cat([out_h.sin(), out_h.cos(), out_w.sin(), out_w.cos()], dim=1)  # (N, d)
    return torch.cat([torch.zeros(1, dim), pe], dim=0)[None]


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """Interpolate (1, 1+N, d) position embeddings to a new patch grid (bicubic, as timm); [CLS] kept."""
    cls_pe, patch_pe = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patch_pe.shape[1])
    if old * old != patch_pe.shape[1]:
        raise VptuneError(f"cannot resize a non-square position embedding of {patch_pe.shape[1]} patches")
    if (old, old) == tuple(grid):
        return pos_embed
    pe = patch_pe.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, d, old, old)
    pe = F.interpolate(pe, size=grid, mode="bicubic", align_corners=False, antialias=grid[0] < old)
    return torch.cat([cls_pe, pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


class VisionTransformer(Backbone):
    """A ViT whose blocks can be run one at a time with prompts (the vptune backbone protocol)."""

    arch = "vit"
    pool_modes = POOL_MODES
    num_prefix_tokens = 1  # [CLS]
    exports_onnx = True

    def __init__(self, config: ViTConfig, input_size: int | None = None) -> None:
        super().__init__()
        check_choice("pool mode", config.global_pool, POOL_MODES)
        check_choice("position embedding", config.pos_embed, ("learn", "sincos"))
        self.config = config
        d, ps = config.embed_dim, config.patch_size
        self.num_features = d
        self.patch_size = (ps, ps)
        self.preprocessing = Preprocessing(input_size or config.img_size, config.mean, config.std)
        grid = (config.img_size // ps, config.img_size // ps)
        self.patch_embed = PatchEmbed(ps, 3, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid[0] * grid[1], d))
        self.pos_drop = nn.Dropout(config.drop_rate)
        dpr = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.mlp_ratio, config.qkv_bias, config.norm_eps, config.drop_rate, dpr[i])
            for i in range(config.depth)
        )
        self.norm = nn.Identity() if config.fc_norm else nn.LayerNorm(d, eps=config.norm_eps)
        self.fc_norm = nn.LayerNorm(d, eps=config.norm_eps) if config.fc_norm else nn.Identity()
        self._init_weights(grid)

    def _init_weights(self, grid: tuple[int, int]) -> None:
        if self.config.pos_embed == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed(self.config.embed_dim, grid))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, images: Tensor) -> Tokens:
        B, _, H, W = images.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise VptuneError(f"input {H}x{W} is not divisible by the patch size {ph}x{pw}")
        x = self.patch_embed(images)  # (B, d, gh, gw)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, N, d)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, d)
        x = self.pos_drop(x + resize_pos_embed(self.pos_embed, grid))
        return Tokens(x=x, num_prompts=0, grid=grid)

    def run_block(self, i: int, tokens: Tokens, prompts: Tensor | None = None, *, location: str = "prepend",
                  ffn_adapter: nn.Module | None = None, prompt_replace: Tensor | None = None,
                  prompt_outputs: bool = True, taps: Taps | None = None,
                  kv_prompts: tuple[Tensor, Tensor] | None = None, prompt_gate: Tensor | None = None,
                  attn_temperature: Tensor | None = None) -> Tokens:
        if prompts is not None and not prompt_outputs and location == "prepend" and prompt_replace is None \
                and tokens.prompt_mask is None and not taps and prompt_gate is None and attn_temperature is None:
            return self._run_block_kv_prompts(i, tokens, prompts, ffn_adapter, kv_prompts)
        if prompts is not None:
            tokens = self._place_prompts(tokens, prompts, location, prompt_replace)
        x = self.blocks[i](tokens.x, self._attn_mask(tokens), ffn_adapter, taps=taps, kv_learned=kv_prompts,
                           temperature=attn_temperature)
        if prompt_gate is not None and tokens.num_prompts:  # gated prompts: P' = g f(P) + (1 - g) P
            p, old = tokens.num_prompts, tokens.x[:, 1:1 + tokens.num_prompts]
            gated = prompt_gate * x[:, 1:1 + p] + (1 - prompt_gate) * old
            x = torch.cat([x[:, :1], gated, x[:, 1 + p:]], dim=1)
        return replace(tokens, x=x)

    def _run_block_kv_prompts(self, i: int, tokens: Tokens, prompts: Tensor, ffn_adapter: nn.Module | None,
                              kv_learned: tuple[Tensor, Tensor] | None = None) -> Tokens:
        """Block i where the prompts only supply keys and values: their outputs would be replaced by
        the next block's prompts (VPT-deep), so they are not computed. Attention does not depend on the
        order of keys, so [CLS] and patch outputs equal the full ``[CLS, P, patches]`` computation."""
        x, p_old, c = tokens.x, tokens.num_prompts, self.num_prefix_tokens
        if p_old:
            x = torch.cat([x[:, :c], x[:, c + p_old:]], dim=1)  # (B, 1+N, d): drop stale prompt outputs
        P = prompts.to(x.dtype)
        P = P.unsqueeze(0) if P.dim() == 2 else P  # (1 or B, p, d): K/V computed once when shared
        x = self.blocks[i](x, None, ffn_adapter, kv_prompts=P, kv_learned=kv_learned)
        return replace(tokens, x=x, num_prompts=0)

    def _place_prompts(self, tokens: Tokens, prompts: Tensor, location: str,
                       prompt_replace: Tensor | None = None) -> Tokens:
        x, p_old, c = tokens.x, tokens.num_prompts, self.num_prefix_tokens  # c: [CLS]
        P = expand_prompts(prompts.to(x.dtype), x.shape[0])  # (B, p, d)
        if location == "prepend":  # insert after [CLS], or overwrite the previous block's prompt outputs
            if prompt_replace is not None and p_old:  # per sample: replace (True) or let flow on (False)
                if P.shape[1] != p_old:
                    raise VptuneError(f"prompt_replace needs as many prompts ({P.shape[1]}) as the sequence "
                                      f"holds ({p_old})")
                P = torch.where(prompt_replace.view(-1, 1, 1), P, x[:, c:c + p_old])
            x = torch.cat([x[:, :c], P, x[:, c + p_old:]], dim=1)  # (B, 1+p+N, d)
            return replace(tokens, x=x, num_prompts=P.shape[1])
        if location == "add":  # add element-wise to the patch tokens; the sequence length stays
            n = x.shape[1] - c - p_old
            if P.shape[1] != n:
                raise VptuneError(f"location='add' needs one prompt per patch ({n}), got {P.shape[1]}")
            if prompt_replace is not None:  # per sample: add (True) or leave the patch tokens (False)
                P = P * prompt_replace.view(-1, 1, 1).to(P.dtype)
            return replace(tokens, x=torch.cat([x[:, :c + p_old], x[:, c + p_old:] + P], dim=1))
        raise VptuneError(f"unknown prompt location {location!r}; valid choices: prepend, add")

    def _attn_mask(self, tokens: Tokens) -> Tensor | None:
        """(B, 1, 1, N) bool key mask when some prompt slots are padding (mixed-length batches)."""
        if tokens.prompt_mask is None:
            return None
        B, N = tokens.x.shape[:2]
        keep = torch.ones(B, N, dtype=torch.bool, device=tokens.x.device)
        c = self.num_prefix_tokens
        keep[:, c:c + tokens.num_prompts] = tokens.prompt_mask
        return keep[:, None, None, :]

    def pool(self, tokens: Tokens, mode: str | None = None) -> Tensor:
        mode = mode or self.config.global_pool
        check_choice("pool mode", mode, POOL_MODES)
        x, p, c = self.norm(tokens.x), tokens.num_prompts, self.num_prefix_tokens
        if mode == "cls":
            out = x[:, 0]
        elif mode == "image_mean":
            out = x[:, c + p:].mean(dim=1)
        else:
            if p == 0:
                raise VptuneError("pool mode 'prompt_mean' needs prompts, but the sequence holds none")
            out = self._masked_prompt_mean(x[:, c:c + p], tokens.prompt_mask)
        return self.fc_norm(out)  # (B, d)

    @staticmethod
    def _masked_prompt_mean(prompts: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return prompts.mean(dim=1)
        w = mask.to(prompts.dtype)[..., None]  # (B, p, 1)
        return (prompts * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)

    def block_prefix(self, i: int) -> str:
        return f"blocks.{i}."

    def final_norm_prefixes(self) -> list[str]:
        return ["fc_norm."] if self.config.fc_norm else ["norm."]

    def block_infos(self) -> list[BlockInfo]:
        c = self.config
        return [BlockInfo(index=i, dim=c.embed_dim, num_heads=c.num_heads) for i in range(c.depth)]


def _register() -> None:
    register_arch("vit", VisionTransformer, ViTConfig, VIT_CONFIGS)


_register()
