"""Shared fixtures. Tests that need the real assets skip with a reason when VPTUNE_ASSETS is unset."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY
from tests.helpers import tiny_vit as make_tiny_vit
from vptune.backbones.vit import VisionTransformer

__all__ = ["TINY"]  # re-exported (tests import it from here)
_LOG_LEVEL, _LOG_HANDLERS = logging.getLogger("vptune").level, list(logging.getLogger("vptune").handlers)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_vptune_logger():
    """Each test sees the "vptune" logger as a fresh process does: a command that sets it up (train,
    prune) in one test must not make another command's stderr chattier (test order independence)."""
    yield
    log = logging.getLogger("vptune")
    log.setLevel(_LOG_LEVEL)
    log.handlers[:] = _LOG_HANDLERS


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster when other processes load the cores.
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return make_tiny_vit()


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
