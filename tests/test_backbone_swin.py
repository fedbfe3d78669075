"""Swin backbone: parity with Hugging Face, the prompted-window path against a slow per-window reference,
prompt flow through patch merging, and the checkpoint layouts (HF, Microsoft, timm) giving identical
outputs. Tiny random models only (embed 32, depths (2, 2), heads (2, 4))."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from vptune.backbones import create_backbone, load_weights
from vptune.backbones.checkpoint import config_from_folder, detect_source
from vptune.backbones.convert_swin import convert_hf_swin
from vptune.backbones.swin import PatchMerging, SwinConfig, SwinTransformer
from vptune.errors import VptuneError

transformers = pytest.importorskip("transformers")

TINY = {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_swin(size: int, window: int, seed: int = 0):
    """A random HF SwinModel with non-trivial relative-position tables and norms (HF inits them 0 / 1)."""
    torch.manual_seed(seed)
    cfg = transformers.SwinConfig(image_size=size, patch_size=4, embed_dim=32, depths=[2, 2],
                                  num_heads=[2, 4], window_size=window)
    model = transformers.SwinModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias_table" in name or "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model


def run(backbone, images, prompts=None, pool_mode=None, location="prepend"):
    """prompts: None, one tensor (shallow, block 0) or a list with one entry per block (deep)."""
    tokens = backbone.embed(images)
    for i in range(backbone.num_blocks):
        p = prompts[i] if isinstance(prompts, list) else (prompts if i == 0 else None)
        tokens = backbone.run_block(i, tokens, p, location=location)
    return tokens, backbone.pool(tokens, pool_mode)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = hf_swin(64, 4)
    folder = tmp_path_factory.mktemp("hf_swin")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def swin(hf_folder):
    return create_backbone(weights=hf_folder[1]).eval()


# ------------------------------------------------------------------------------ Hugging Face parity

@pytest.mark.parametrize("size,window", [(64, 4), (56, 7), (72, 4), (60, 4)])
def test_matches_hugging_face(tmp_path, size, window):
    """Native sizes (shifted windows in both stages; window == map in stage 1) and non-native ones
    (padding to whole windows; an odd map at patch merging)."""
    model = hf_swin(size, window, seed=size)
    model.save_pretrained(tmp_path)
    ours = create_backbone(weights=tmp_path).eval()
    assert ours.load_report.source == "hf-swin" and ours.load_report.complete
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(images)
        tokens, pooled = run(ours, images)
    assert rel_err(pooled, ref.pooler_output) < 1e-5
    assert rel_err(ours.norm(tokens.x), ref.last_hidden_state) < 1e-5


def test_hf_config_and_in_memory_names(hf_folder, swin):
    model, folder = hf_folder
    name, cfg = config_from_folder(folder)
    assert name == "swin" and cfg.embed_dim == 32 and cfg.depths == (2, 2) and cfg.window_size == 4
    # transformers >= 5 renames modules in memory (q_proj, o_proj, mlp.fc1, ...): same weights either way
    converted = convert_hf_swin(model.state_dict())
    own = swin.state_dict()
    assert set(converted) == set(own)
    assert all(torch.equal(converted[k], own[k]) for k in own)


# ------------------------------------------------------------------------ slow per-window reference

def ms_shift_mask(H, W, window, shift):
    """The Microsoft code's loop over the 9 shifted regions."""
    img = torch.zeros(H, W)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    return img


def slow_block(block, x, grid, prompts):
    """One prompted Swin block, looping over samples and windows one at a time."""
    B, _, C = x.shape
    H, W = grid
    window, shift = block.window_and_shift(grid)
    assert H % window == 0 and W % window == 0
    attn, heads, p = block.attn, block.attn.num_heads, prompts.shape[1]
    regions = ms_shift_mask(H, W, window, shift) if shift else torch.zeros(H, W)  # shifted-map coords
    idx = torch.arange(window)
    rel = torch.stack(torch.meshgrid(idx, idx, indexing="ij")).flatten(1)
    rel = rel[:, :, None] - rel[:, None, :]
    table_w = attn.window
    index = (rel[0] + table_w - 1) * (2 * table_w - 1) + rel[1] + table_w - 1
    bias = attn.relative_position_bias_table[index]
    bias = bias.permute(2, 0, 1)  # (heads, N, N)
    x_out, p_out = torch.empty_like(x), torch.zeros_like(prompts)
    n_windows = (H // window) * (W // window)
    for b in range(B):
        img = torch.roll(block.norm1(x[b]).view(H, W, C), (-shift, -shift), (0, 1))
        pn = block.norm1(prompts[b])
        out_map = torch.empty(H, W, C)
        for r in range(0, H, window):
            for c in range(0, W, window):
                win = img[r:r + window, c:c + window].reshape(-1, C)
                lab = regions[r:r + window, c:c + window].reshape(-1)
                seq = torch.cat([pn, win])  # (p + N, C)
                L = seq.shape[0]
                qkv = attn.qkv(seq).view(L, 3, heads, C // heads).permute(1, 2, 0, 3)
                q, k, v = qkv[0], qkv[1], qkv[2]
                logits = q @ k.transpose(-2, -1) / math.sqrt(C // heads)
                full = torch.zeros(heads, L, L)
                full[:, p:, p:] = bias + torch.where(lab[:, None] != lab[None, :], -100.0, 0.0)
                o = attn.proj(((logits + full).softmax(-1) @ v).transpose(0, 1).reshape(L, C))
                p_out[b] += o[:p] / n_windows
                out_map[r:r + window, c:c + window] = o[p:].view(window, window, C)
        x_out[b] = torch.roll(out_map, (shift, shift), (0, 1)).reshape(H * W, C)
    x, prompts = x + x_out, prompts + p_out
    seq = torch.cat([prompts, x], dim=1)
    seq = seq + block.mlp(block.norm2(seq))
    return seq[:, p:], seq[:, :p]


def slow_merge(down, x, grid, prompts):
    B, _, C = x.shape
    H, W = grid
    m = x.view(B, H, W, C)
    cat = torch.cat([m[:, 0::2, 0::2], m[:, 1::2, 0::2], m[:, 0::2, 1::2], m[:, 1::2, 1::2]], dim=-1)
    x = down.reduction(down.norm(cat.reshape(B, -1, 4 * C)))
    prompts = down.reduction(down.norm(torch.cat([prompts] * 4, dim=-1)))
    return x, (H // 2, W // 2), prompts


def test_prompted_windows_match_slow_reference(swin):
    """Shallow prompts, different per sample (the reference code's batch mixing would fail this), through
    plain and shifted blocks and a carried patch merging."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    prompts = torch.randn(2, 3, 32)
    with torch.no_grad():
        tokens = swin.embed(images)
        x, grid, P = tokens.x, tokens.grid, prompts
        for i, info in enumerate(swin.block_infos()):
            s, b = swin._where[i]
            if b == 0 and s > 0:
                x, grid, P = slow_merge(swin.layers[s].downsample, x, grid, P)
            x, P = slow_block(swin.layers[s].blocks[b], x, grid, P)
            tokens = swin.run_block(i, tokens, prompts if i == 0 else None)
            assert tokens.grid == grid and tokens.prompts.shape == (2, 3, info.dim)
            assert rel_err(tokens.x, x) < 1e-5 and rel_err(tokens.prompts, P) < 1e-5, f"block {i}"
        # shifted blocks were exercised in both stages (map 16 and 8 > window 4)
        shifted = [swin.layers[s].blocks[1].window_and_shift(g) for s, g in ((0, (16, 16)), (1, (8, 8)))]
        assert shifted == [(4, 2), (4, 2)]
        pooled = swin.pool(tokens, "image_prompt_mean")
        assert rel_err(pooled, swin.norm(torch.cat([P, x], 1)).mean(1)) < 1e-5


def test_patch_merge_orders_agree():
    """timm >= 0.9's reshape-permute order equals Microsoft's / HF's x0..x3 concatenation."""
    torch.manual_seed(2)
    down = PatchMerging(8, 1e-5)
    x = torch.randn(2, 6 * 4, 8)
    with torch.no_grad():
        ours, grid = down(x, (6, 4))
        ref, ref_grid, _ = slow_merge(down, x, (6, 4), torch.zeros(2, 1, 8))
    assert grid == ref_grid == (3, 2) and torch.equal(ours, ref)


# --------------------------------------------------------------------------------- prompt flow

def test_deep_prompt_shapes_and_merging_options(swin):
    infos = swin.block_infos()
    assert [(i.dim, i.num_heads, i.stage) for i in infos] == [(32, 2, 0), (32, 2, 0), (64, 4, 1), (64, 4, 1)]
    prefixes = [f"layers.{s}.blocks.{b}." for s in (0, 1) for b in (0, 1)]
    assert [swin.block_prefix(i) for i in range(4)] == prefixes
    assert swin.final_norm_prefixes() == ["norm."] and swin.num_features == 64
    images = torch.randn(2, 3, 64, 64)
    deep = [torch.randn(5, info.dim) for info in infos]
    with torch.no_grad():
        tokens = swin.embed(images)
        for i, info in enumerate(infos):
            tokens = swin.run_block(i, tokens, deep[i])
            assert tokens.prompts.shape == (2, 5, info.dim) and tokens.x.shape[-1] == info.dim
        with pytest.raises(VptuneError, match="64 wide"):
            swin.run_block(2, swin.run_block(0, swin.embed(images), deep[0]), deep[0])
        # shallow prompts are carried through merging: C -> 2C
        tokens, _ = run(swin, images, deep[0])
        assert tokens.prompts.shape == (2, 5, 64) and tokens.num_prompts == 5
        # ... or dropped there
        swin.config.prompt_merge = "drop"
        try:
            dropped, _pooled = run(swin, images, deep[0])
            assert dropped.prompts is None and dropped.num_prompts == 0
            with pytest.raises(VptuneError, match="needs prompts"):
                swin.pool(dropped, "prompt_mean")
            # deep prompts still enter every stage
            tokens, _ = run(swin, images, deep)
            assert tokens.prompts.shape == (2, 5, 64)
        finally:
            swin.config.prompt_merge = "carry"


def test_pool_modes_padding_prompts_and_add(swin):
    torch.manual_seed(3)
    images = torch.randn(2, 3, 64, 64)
    prompts = torch.randn(2, 3, 32)
    with torch.no_grad():
        tokens, image_mean = run(swin, images, prompts)
        _, plain = run(swin, images)
        assert not torch.allclose(image_mean, plain)  # the prompts did something
        P, x = swin.norm(tokens.prompts), swin.norm(tokens.x)
        assert torch.allclose(image_mean, x.mean(1), atol=1e-6)
        assert torch.allclose(swin.pool(tokens, "prompt_mean"), P.mean(1), atol=1e-6)
        # a padding prompt (prompt_mask False) is never attended to: image tokens as with 2 prompts only
        t = swin.embed(images)
        t.prompt_mask = torch.tensor([[True, True, False], [True, True, True]])
        for i in range(swin.num_blocks):
            t = swin.run_block(i, t, prompts if i == 0 else None)
        two, _ = run(swin, images[:1], prompts[:1, :2])
        assert rel_err(t.x[:1], two.x) < 1e-5
        assert rel_err(swin.pool(t, "prompt_mean")[:1], swin.norm(two.prompts).mean(1)) < 1e-5
        deep = [torch.randn(2, 3, info.dim) for info in swin.block_infos()]  # the mask holds across stages
        t = swin.embed(images)
        t.prompt_mask = torch.tensor([[True, True, False], [True, True, True]])
        for i in range(swin.num_blocks):
            t = swin.run_block(i, t, deep[i])
        two, _ = run(swin, images[:1], [d[:1, :2] for d in deep])
        assert rel_err(t.x[:1], two.x) < 1e-5
        # location="add": one prompt per image token of the stage
        added, pooled = run(swin, images, torch.randn(256, 32) * 0.1, location="add")
        assert added.prompts is None and pooled.shape == (2, 64)
        with pytest.raises(VptuneError, match="one prompt per image token"):
            swin.run_block(0, swin.embed(images), prompts, location="add")
        with pytest.raises(VptuneError, match="valid choices"):
            swin.pool(tokens, "cls")


def test_prompts_get_gradients(swin):
    prompts = torch.zeros(4, 32, requires_grad=True)
    _, pooled = run(swin, torch.randn(1, 3, 64, 64), prompts)
    pooled.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- layouts

def test_ms_and_timm_layouts_match_hf(tmp_path, hf_folder, swin):
    ours = {k: v.clone() for k, v in swin.state_dict().items()}
    head = {"weight": torch.randn(10, 64), "bias": torch.randn(10)}
    buffers = {f"layers.{s}.blocks.{b}.attn.relative_position_index": torch.zeros(16, 16, dtype=torch.long)
               for s in (0, 1) for b in (0, 1)}
    timm_sd = {**ours, **buffers, **{f"head.fc.{k}": v for k, v in head.items()}}
    ms_sd = {**buffers, **{f"head.{k}": v for k, v in head.items()},
             "layers.1.blocks.1.attn_mask": torch.zeros(4, 16, 16)}
    for k, v in ours.items():
        ms_sd[k.replace("layers.1.downsample.", "layers.0.downsample.")] = v
    torch.save({"model": ms_sd}, tmp_path / "swin_ms.pth")
    save_file(timm_sd, str(tmp_path / "swin_timm.safetensors"))
    images = torch.randn(2, 3, 64, 64)
    prompts = torch.randn(3, 32)
    with torch.no_grad():
        _, want = run(swin, images, prompts)
        for file, source in (("swin_ms.pth", "ms-swin"), ("swin_timm.safetensors", "timm-swin")):
            other = create_backbone("swin_tiny_patch4_window7_224", tmp_path / file, **TINY, window_size=4)
            other.eval()
            assert other.load_report.source == source and other.load_report.complete
            assert any(k.startswith("head.") for k in other.load_report.dropped)
            _, got = run(other, images, prompts)
            assert torch.equal(got, want), source
    assert detect_source(ms_sd) == "ms-swin" and detect_source(timm_sd) == "timm-swin"
    # a Swin checkpoint offered to a ViT is named, not half-loaded
    vit = create_backbone("vit_tiny_patch16_224", depth=1)
    with pytest.raises(VptuneError, match="swin"):
        load_weights(vit, tmp_path / "swin_timm.safetensors")


def test_configs_and_errors():
    names = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
             "swin_base_patch4_window12_384"]
    from vptune.backbones.registry import resolve

    for name in names:
        fam, cfg = resolve(name)
        assert fam.arch == "swin" and SwinConfig.from_dict(cfg.to_dict()) == cfg
    assert resolve("swin_base_patch4_window12_384")[1].window_size == 12
    with pytest.raises(VptuneError, match="unknown Swin config keys"):
        SwinConfig.from_dict({"depth": 3})
    with pytest.raises(VptuneError, match="prompt merge mode"):
        SwinTransformer(SwinConfig(**TINY, prompt_merge="keep"))
    b = SwinTransformer(SwinConfig(**TINY, window_size=4))
    assert b.identity()["arch"] == "swin" and b.preprocessing.mean == (0.485, 0.456, 0.406)
    assert not any("relative_position_index" in k or "attn_mask" in k for k in b.state_dict())
    with pytest.raises(VptuneError, match="run the blocks in order"):
        b.run_block(3, b.embed(torch.randn(1, 3, 64, 64)))


def test_ffn_adapter_inside_the_residual(swin):
    """An adapter a(h) = h doubles the FFN output: the same as doubling fc2 (Pfeiffer placement, as ViT)."""
    images, prompts = torch.randn(1, 3, 64, 64), torch.randn(2, 32)
    with torch.no_grad():
        t = swin.run_block(0, swin.embed(images), prompts, ffn_adapter=torch.nn.Identity())
        fc2 = swin.layers[0].blocks[0].mlp.fc2
        fc2.weight.mul_(2), fc2.bias.mul_(2)
        try:
            ref = swin.run_block(0, swin.embed(images), prompts)
        finally:
            fc2.weight.div_(2), fc2.bias.div_(2)
    assert rel_err(t.x, ref.x) < 1e-5 and rel_err(t.prompts, ref.prompts) < 1e-5


@pytest.mark.parametrize("merge", ["carry", "drop"])
def test_mixed_batch_prompt_replace(swin, merge):
    """One pass, sample 0 VPT-deep and sample 1 VPT-shallow (prompt_replace False), equals two passes."""
    torch.manual_seed(4)
    images = torch.randn(2, 3, 64, 64)
    deep = [torch.randn(2, 3, info.dim) for info in swin.block_infos()]
    replace_ = torch.tensor([True, False])
    swin.config.prompt_merge = merge
    try:
        with torch.no_grad():
            t = swin.embed(images)
            for i in range(swin.num_blocks):
                t = swin.run_block(i, t, deep[i], prompt_replace=replace_)
            alone_deep, _ = run(swin, images[:1], [d[:1] for d in deep])
            alone_shallow, _ = run(swin, images[1:], deep[0][1:])
    finally:
        swin.config.prompt_merge = "carry"
    assert rel_err(t.x[:1], alone_deep.x) < 1e-5 and rel_err(t.x[1:], alone_shallow.x) < 1e-5
    if merge == "carry":
        assert rel_err(t.prompts[1:], alone_shallow.prompts) < 1e-5
    else:
        assert alone_shallow.prompts is None and t.prompt_mask.tolist() == [[True] * 3, [False] * 3]
