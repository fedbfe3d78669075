"""Build the golden task files under ``tests/data/golden/`` (run once, before a refactor).

For each backbone (a tiny seeded ViT and Swin, random init) and each of the nine methods, build the
model, perturb every trained tensor deterministically (so the file is not just the init), save the task
with ``save_pretrained`` and record the logits on a fixed seeded input as ``logits.safetensors``.
``tests/test_golden.py`` rebuilds the same thing with the current code and compares bit for bit.

    PYTHONPATH=$PWD python tests/data/make_golden.py          # rewrite the golden folder
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent / "golden"
METHODS = ("vpt-shallow", "vpt-deep", "linear", "full", "partial-1", "mlp-3", "sidetune", "bias", "adapter")
BACKBONES = ("vit", "swin")
OPTIONS = {"vpt-shallow": {"num_tokens": 3}, "vpt-deep": {"num_tokens": 2}, "sidetune": {"width": 4},
           "adapter": {"reduction": 8}}
NUM_CLASSES = 3


def tiny_backbone(kind: str) -> torch.nn.Module:
    from vptune.backbones.swin import SwinConfig, SwinTransformer
    from vptune.backbones.vit import VisionTransformer, ViTConfig

    torch.manual_seed(1234)
    if kind == "vit":
        return VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)).eval()
    return SwinTransformer(SwinConfig(img_size=16, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(2, 2),
                                      window_size=2)).eval()


def build(kind: str, method: str):
    """The model for (backbone, method) with deterministically perturbed trained tensors, in eval mode."""
    import vptune

    bb = tiny_backbone(kind)
    torch.manual_seed(99)
    model = vptune.create_model(bb, method, NUM_CLASSES, **OPTIONS.get(method, {}))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(model.trainable_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in sorted(model.named_buffers()):
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.mul_(1.0 + 0.1 * torch.rand(b.shape, generator=g))
    return model.eval()


def images(kind: str) -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def logits_of(model, kind: str) -> torch.Tensor:
    """Logits on the fixed input with one intra-op thread (float sums may split differently on more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(images(kind)).contiguous()
    finally:
        torch.set_num_threads(before)


def main(root: Path = ROOT) -> None:
    for kind in BACKBONES:
        for method in METHODS:
            folder = root / kind / method
            model = build(kind, method)
            model.save_pretrained(folder)
            save_file({"logits": logits_of(model, kind)}, str(folder / "logits.safetensors"))
            print(folder, file=sys.stderr)


if __name__ == "__main__":
    main()
