"""Every method on every backbone (ViT, MAE ViT, MoCo-v3 ViT, Swin): forward, backward, exact trainable
counts derived from the architecture, and a save/load round trip (issue: Swin, MAE and MoCo-v3)."""

from __future__ import annotations

import pytest
import torch

import vptune
from vptune.backbones.swin import SwinConfig, SwinTransformer
from vptune.backbones.vit import VisionTransformer, ViTConfig

C, P, R = 3, 4, 4  # classes, prompt length, adapter reduction

BACKBONES = {
    "vit": lambda: VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "mae": lambda: VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               global_pool="image_mean", fc_norm=True)),
    "mocov3": lambda: VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                  num_heads=2, pos_embed="sincos")),
    "swin": lambda: SwinTransformer(SwinConfig(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2),
                                               num_heads=(2, 4), window_size=4)),
}
METHODS = ["linear", "vpt-shallow", "vpt-deep", "full", "partial-1", "mlp-2", "sidetune", "bias", "adapter"]
METHODS += ["lora", "dora", "ssf"]  # issue 14 (defaults: r=8 on attn.qkv and attn.proj)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def expected_count(backbone, method: str) -> int:
    """Trainable parameters from the architecture alone: block widths, parameter names and shapes."""
    infos, d = backbone.block_infos(), backbone.num_features
    head = (d + 1) * C
    named = dict(backbone.named_parameters())
    under = lambda prefixes: _count(p for n, p in named.items() if any(n.startswith(x) for x in prefixes))
    last = [backbone.block_prefix(len(infos) - 1)] + backbone.final_norm_prefixes()
    return head + {
        "linear": 0,
        "vpt-shallow": P * infos[0].dim,
        "vpt-deep": P * sum(b.dim for b in infos),
        "full": _count(named.values()),
        "partial-1": under(last),
        "mlp-2": d * d + d + 2 * d,
        "sidetune": None,
        "bias": _count(p for n, p in named.items() if n.endswith(".bias")),
        "adapter": sum(2 * b.dim * (b.dim // R) + b.dim // R + b.dim for b in infos),
        "lora": sum(8 * (b.dim + 3 * b.dim) + 8 * (b.dim + b.dim) for b in infos),  # r (in + out), qkv and proj
        "dora": sum(8 * 4 * b.dim + 3 * b.dim + 8 * 2 * b.dim + b.dim for b in infos),  # LoRA + m (out,)
        "ssf": sum(2 * (7 * b.dim + int(4.0 * b.dim)) for b in infos),  # gamma, beta after 6 layers (mlp_ratio 4)
    }[method]


def _options(method: str) -> dict:
    return {"num_tokens": P} if method.startswith("vpt") else {"reduction": R} if method == "adapter" else \
        {"width": 4} if method == "sidetune" else {}


@pytest.mark.parametrize("arch", sorted(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_method_on_backbone(arch, method, tmp_path):
    torch.manual_seed(0)
    backbone = BACKBONES[arch]().eval()
    model = vptune.create_model(backbone, method, C, **_options(method))
    if method != "sidetune":
        assert model.num_trainable_parameters() == expected_count(backbone, method)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = vptune.TunedModel.from_pretrained(tmp_path, backbone=backbone).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_swin_deep_prompts_take_each_stage_width():
    backbone = BACKBONES["swin"]()
    model = vptune.create_model(backbone, "vpt-deep", C, num_tokens=P)
    widths = [tuple(model.method.prompts[i].shape) for i in range(backbone.num_blocks)]
    assert widths == [(P, 16), (P, 16), (P, 32), (P, 32)]


def test_family_sources_map_to_swin(tmp_path):
    from safetensors.torch import save_file

    backbone = BACKBONES["swin"]()
    save_file(backbone.state_dict(), str(tmp_path / "w.safetensors"))
    cfg = backbone.config.to_dict()
    loaded = vptune.create_backbone("swin_tiny_patch4_window7_224", weights=tmp_path / "w.safetensors",
                                    source="timm", **{k: cfg[k] for k in ("img_size", "embed_dim", "depths",
                                                                          "num_heads", "window_size")})
    assert loaded.load_report.source == "timm-swin"
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), backbone.eval()(x))


# --- issue 14: VPT's successors (vpt-kv, vfpt, gated), same matrix -------------------------------------
KV = 2  # key-value prompts per block
SUCCESSORS = {"vpt-kv": {"num_tokens": P, "kv_tokens": KV}, "vfpt": {"num_tokens": P, "fourier_ratio": 0.5},
              "gated": {"num_tokens": P}}


def successor_count(backbone, method: str) -> int:
    """Trainable parameters from the formulas: N*(2*L + p)*d (vpt-kv), N*p*d (vfpt), p*d_0 + 2N (gated:
    a gate and an attention temperature per block)."""
    dims = [b.dim for b in backbone.block_infos()]
    head = (backbone.num_features + 1) * C
    return head + {"vpt-kv": sum((2 * KV + P) * d for d in dims), "vfpt": P * sum(dims),
                   "gated": P * dims[0] + 2 * len(dims)}[method]


@pytest.mark.parametrize("arch", sorted(BACKBONES))
@pytest.mark.parametrize("method", sorted(SUCCESSORS))
def test_successor_on_backbone(arch, method, tmp_path):
    torch.manual_seed(0)
    backbone = BACKBONES[arch]().eval()
    model = vptune.create_model(backbone, method, C, **SUCCESSORS[method])
    assert model.num_trainable_parameters() == successor_count(backbone, method)
    assert not any(n.startswith("backbone.") for n in model.trainable_names)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = vptune.TunedModel.from_pretrained(tmp_path, backbone=backbone).eval()
    assert set(loaded.trained_state_dict()) == set(model.trained_state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
