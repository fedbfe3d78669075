"""Our ViT against Hugging Face's ``ViTModel`` (random weights through the ``hf`` converter), position-
embedding interpolation, and MoCo-v3's fixed sin-cos position embedding."""

from __future__ import annotations

import pytest
import torch

from vptune.backbones import create_backbone, load_weights
from vptune.backbones.convert import convert_hf, detect_hf
from vptune.backbones.vit import VisionTransformer, ViTConfig, resize_pos_embed, sincos_pos_embed
from vptune.errors import VptuneError

transformers = pytest.importorskip("transformers")


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (LayerNorm gains around 1, all biases non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.05 * noise)


def _hf_vit(eps: float, patch: int, image: int, layers: int, qkv_bias: bool = True, seed: int = 0):
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                 intermediate_size=256, patch_size=patch, image_size=image,
                                 layer_norm_eps=eps, qkv_bias=qkv_bias, attn_implementation="eager")
    model = transformers.ViTModel(cfg).eval()
    _randomize(model, seed)
    return model


def _ours_from_hf(hf) -> VisionTransformer:
    c = hf.config
    cfg = ViTConfig(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.hidden_size,
                    depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                    mlp_ratio=c.intermediate_size / c.hidden_size, qkv_bias=c.qkv_bias,
                    norm_eps=c.layer_norm_eps)
    ours = VisionTransformer(cfg).eval()
    report = load_weights(ours, hf.state_dict(), source="hf")
    assert report.complete and report.dropped == ["pooler.dense.bias", "pooler.dense.weight"]
    return ours


def _all_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    tokens = model.embed(x)
    for i in range(model.num_blocks):
        tokens = model.run_block(i, tokens)
    return model.norm(tokens.x)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (a - b).norm() / b.norm()
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("eps,patch,image,layers", [(1e-12, 8, 32, 2), (1e-6, 16, 64, 4), (1e-12, 16, 48, 3)])
def test_matches_hf_vit(eps: float, patch: int, image: int, layers: int) -> None:
    hf = _hf_vit(eps, patch, image, layers)
    ours = _ours_from_hf(hf)
    x = torch.randn(3, 3, image, image, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        _close(ours(x), ref[:, 0])  # pooled [CLS] after the final LayerNorm
        _close(_all_tokens(ours, x), ref)
        for i in range(3):  # per sample too, so one large sample cannot hide another's error
            _close(ours(x)[i], ref[i, 0])


def test_matches_hf_vit_without_qkv_bias() -> None:
    hf = _hf_vit(1e-12, 8, 32, 2, qkv_bias=False)
    assert "blocks.0.attn.qkv.bias" not in convert_hf(hf.state_dict())
    ours = _ours_from_hf(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ours(x), hf(pixel_values=x).last_hidden_state[:, 0])


def test_eps_kept() -> None:
    """HF's LayerNorm eps (1e-12) reaches every norm of ours, not timm's 1e-6."""
    hf = _hf_vit(1e-12, 8, 32, 2)
    ours = _ours_from_hf(hf)
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert ours.config.norm_eps == 1e-12 and len(norms) == 5 and all(m.eps == 1e-12 for m in norms)


def test_hf_task_model_prefix_and_head() -> None:
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=256, patch_size=8, image_size=32, num_labels=5,
                                 attn_implementation="eager")
    clf = transformers.ViTForImageClassification(cfg).eval()
    _randomize(clf)
    sd = clf.state_dict()
    assert detect_hf(sd) and any(k.startswith("vit.") for k in sd)
    ours = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                       norm_eps=cfg.layer_norm_eps)).eval()
    report = load_weights(ours, sd, keep_head=True)
    assert report.source == "hf" and report.complete and set(report.head) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = ours(x) @ report.head["head.weight"].t() + report.head["head.bias"]
        _close(logits, clf(pixel_values=x).logits)


def test_pos_embed_interpolation_matches_hf_upsampling() -> None:
    """Inputs larger than the config: bicubic interpolation as HF's ``interpolate_pos_encoding``."""
    hf = _hf_vit(1e-12, 8, 32, 2)
    ours = _ours_from_hf(hf)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        _close(_all_tokens(ours, x), ref)


@pytest.mark.parametrize("size", [112, 128, 224])
def test_other_input_sizes_run_on_224_config(size: int) -> None:
    model = create_backbone("vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=4, input_size=size)
    model.eval()
    assert model.preprocessing.input_size == size and model.pos_embed.shape[1] == 1 + 14 * 14
    with torch.no_grad():
        tokens = model.embed(torch.randn(2, 3, size, size))
        out = model(torch.randn(2, 3, size, size))
    assert tokens.grid == (size // 16, size // 16) and tokens.x.shape[1] == 1 + (size // 16) ** 2
    assert out.shape == (2, 64) and torch.isfinite(out).all()


def test_resize_pos_embed() -> None:
    pe = torch.randn(1, 1 + 14 * 14, 32)
    assert resize_pos_embed(pe, (14, 14)) is pe  # same grid: identity
    small = resize_pos_embed(pe, (7, 7))
    assert small.shape == (1, 50, 32) and torch.equal(small[:, 0], pe[:, 0])  # [CLS] slot kept
    big = resize_pos_embed(pe, (28, 28))
    assert big.shape == (1, 1 + 28 * 28, 32)
    with pytest.raises(VptuneError, match="non-square"):
        resize_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))


@pytest.mark.parametrize("size", [100, 225])
def test_bad_input_size(size: int) -> None:
    model = create_backbone("vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(VptuneError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, size, size))
    with pytest.raises(VptuneError, match="multiple of the patch size"):
        create_backbone("vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, input_size=size)


def _moco_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo-v3 ``vits.py: build_2d_sincos_position_embedding``, verbatim in substance."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")  # the torch default MoCo-v3 relied on
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pe = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), pe], dim=1)


def test_sincos_matches_mocov3() -> None:
    assert torch.equal(sincos_pos_embed(64, (14, 14)), _moco_sincos(14, 14, 64))
    model = create_backbone("mocov3_vit_small_patch16", embed_dim=64, depth=1, num_heads=4)
    assert torch.equal(model.pos_embed.data, _moco_sincos(14, 14, 64))


def test_unknown_name_and_override() -> None:
    with pytest.raises(VptuneError, match="valid choices: .*vit_base_patch16_224"):
        create_backbone("vit_bogus")
    with pytest.raises(VptuneError, match="valid keys: .*embed_dim"):
        create_backbone("vit_tiny_patch16_224", embed_dims=10)
    with pytest.raises(VptuneError, match="give a backbone name"):
        create_backbone()
