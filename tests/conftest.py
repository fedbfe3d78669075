"""Shared fixtures. Tests that need the real assets skip with a reason when VPTUNE_ASSETS is unset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vptune.backbones.vit import VisionTransformer, ViTConfig

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**TINY)).eval()


@pytest.fixture
def assets() -> Path:
    root = os.environ.get("VPTUNE_ASSETS")
    if not root:
        pytest.skip("VPTUNE_ASSETS is not set: point it at the shared assets folder to run this test")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"VPTUNE_ASSETS={root} is not a folder")
    return path


@pytest.fixture
def vit_ti_weights(assets: Path) -> Path:
    return assets / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"
