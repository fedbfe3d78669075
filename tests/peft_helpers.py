"""Shared checks of the tap methods (LoRA, DoRA, SSF): tiny ViT and Swin backbones, perturbation as
training would, the save/load round trip and the merge equivalence."""

from __future__ import annotations

from pathlib import Path

import torch

import vptune
from vptune.backbones.swin import SwinConfig, SwinTransformer
from vptune.backbones.vit import VisionTransformer, ViTConfig

C = 3  # classes
BACKBONES = {
    "vit": lambda: VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    # 36 px: a 9x9 map, padded to whole windows in stage 0 (the taps see the padded windows)
    "swin": lambda: SwinTransformer(SwinConfig(img_size=36, patch_size=4, embed_dim=16, depths=(2, 2),
                                               num_heads=(2, 4), window_size=4)),
}


def backbone(arch: str):
    torch.manual_seed(0)
    return BACKBONES[arch]().eval()


def images(arch: str, n: int = 2) -> torch.Tensor:
    size = 32 if arch == "vit" else 36
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def perturb(model, scale: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def block_layers(bb, names):
    """(block index, name, module) of every named layer of every block."""
    return [(i, n, bb.get_submodule(bb.block_prefix(i) + n)) for i in range(bb.num_blocks) for n in names]


def check_trains_and_round_trips(model, bb, x: torch.Tensor, tmp_path: Path) -> None:
    """Only declared tensors get gradients; the backbone is not copied or changed; save/load is bit-exact."""
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model.train()
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        assert p.requires_grad == name.startswith(("method.", "head.")), name
    assert model.backbone is bb
    perturb(model)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = vptune.TunedModel.from_pretrained(tmp_path, backbone=bb).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def check_merge(model, merge, x: torch.Tensor) -> None:
    """merge(model) is a plain backbone whose logits with the task's head equal the model's (1e-5),
    and the model's own backbone is left unchanged."""
    perturb(model, 0.2, seed=3)
    model.eval()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        plain = merge(model)
        assert type(plain) is type(model.backbone) and plain is not model.backbone
        merged = model.forward_head(plain(x))
        torch.testing.assert_close(merged, ref, rtol=0, atol=1e-5)
        assert (merged - model.forward_head(model.backbone(x))).abs().max() > 1e-3  # the update matters
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert plain.fingerprint() != model.backbone.fingerprint()
