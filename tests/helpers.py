"""Plain helpers shared by the tests (fixtures live in ``conftest.py``): the tiny ViT every CPU test uses
and the pieces of a VTAB-style task folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vptune.backbones.vit import VisionTransformer, ViTConfig

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# the start of a train config on the tiny ViT (a registered name, overridden by TINY)
TINY_BACKBONE_YAML = "backbone:\n  name: vit_tiny_patch16_224\n" f"  config: {json.dumps(TINY)}\n"


def tiny_vit(seed: int = 0) -> VisionTransformer:
    """The tiny ViT in eval mode, its random weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return VisionTransformer(ViTConfig(**TINY)).eval()


def save_tiny_vit(path: Path, seed: int = 0) -> Path:
    """Save the state dict of a tiny ViT built after ``torch.manual_seed(seed)`` as safetensors."""
    torch.manual_seed(seed)
    save_file(VisionTransformer(ViTConfig(**TINY)).state_dict(), str(path))
    return path


def write_split_files(folder: Path, lines: dict[str, list[str]]) -> None:
    """VTAB-style split lists: ``<split>.txt`` per split, plus ``train800val200`` (train800 + val200)."""
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
