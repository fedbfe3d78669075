"""Decoded splits kept in memory: same tensors and batches as the lazy split, reused, bounded, opt-out."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vptune.backbones.base import Preprocessing
from vptune.data import DataConfig, ImageDataset, memory, open_split
from vptune.engine.evaluate import make_loader

PRE = Preprocessing(input_size=16)


@pytest.fixture()
def folder(tmp_path: Path) -> str:
    """3 classes x 12 random-noise PNGs of assorted sizes."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(12):
            a = rng.integers(0, 256, size=(10 + i, 14 + c, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / f"c{c}" / f"{i:02d}.png")
    return str(tmp_path)


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch: pytest.MonkeyPatch):
    memory.clear()
    monkeypatch.delenv("VPTUNE_MEMORY_CACHE_MB", raising=False)
    yield
    memory.clear()


def _split(folder: str, protocol: str = "vtab", train: bool = True) -> ImageDataset:
    return open_split(DataConfig(root=folder, protocol=protocol), "all", PRE, train=train)


def test_same_items_and_batches_as_the_lazy_split(folder: str) -> None:
    lazy = _split(folder)
    mem = memory.in_memory(lazy)
    assert isinstance(mem, memory.MemoryDataset) and len(mem) == len(lazy) == 36
    assert mem.num_classes == 3 and mem.class_names == ["c0", "c1", "c2"] and mem.labels == lazy.labels
    for i in (0, 17, 35):
        assert torch.equal(mem[i][0], lazy[i][0]) and mem[i][1] == lazy[i][1]
    # a worker-backed loader over the lazy split and the in-process loader over the memory split draw
    # the same minibatches from the same generator
    def batches(ds, workers):
        gen = torch.Generator().manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(make_loader(ds, 8, num_workers=workers, shuffle=True, generator=gen))

    for (xa, ya), (xb, yb) in zip(batches(lazy, 1), batches(mem, 1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_reused_across_opens_and_keyed_by_transform(folder: str) -> None:
    a = memory.in_memory(_split(folder))
    b = memory.in_memory(_split(folder))  # a second run of the same process
    assert b.images.data_ptr() == a.images.data_ptr()
    c = memory.in_memory(_split(folder, train=False))  # eval transform of vtab: same pixels, other key
    assert c.images.data_ptr() != a.images.data_ptr() and torch.equal(c.images, a.images)
    big = open_split(DataConfig(root=folder, protocol="vtab", input_size=24), "all", PRE, train=True)
    assert memory.in_memory(big).images.shape == (36, 3, 24, 24)


def test_random_transforms_and_budget_stay_lazy(folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fgvc_train = _split(folder, protocol="fgvc", train=True)  # random crop + flip: never cached
    assert memory.in_memory(fgvc_train) is fgvc_train
    fgvc_eval = _split(folder, protocol="fgvc", train=False)  # centre crop: fixed
    assert isinstance(memory.in_memory(fgvc_eval), memory.MemoryDataset)
    monkeypatch.setenv("VPTUNE_MEMORY_CACHE_MB", "0")
    lazy = _split(folder, train=True)
    assert memory.in_memory(lazy) is lazy
    monkeypatch.setenv("VPTUNE_MEMORY_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="VPTUNE_MEMORY_CACHE_MB"):
        memory.in_memory(lazy)


def test_least_recently_used_split_is_dropped(folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    one = 36 * 3 * 16 * 16 * 4  # bytes of one decoded split at 16 px
    monkeypatch.setenv("VPTUNE_MEMORY_CACHE_MB", str(1.5 * one / 2**20))  # room for one split, not two
    a = memory.in_memory(_split(folder, train=True))
    b = memory.in_memory(_split(folder, train=False))
    assert isinstance(a, memory.MemoryDataset) and isinstance(b, memory.MemoryDataset)
    assert len(memory._CACHE) == 1  # a was dropped to make room for b
    again = memory.in_memory(_split(folder, train=False))
    assert again.images.data_ptr() == b.images.data_ptr()


def test_training_with_and_without_the_cache_is_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole run (worker-backed lazy loading vs splits decoded once in memory) gives the same numbers."""
    from tests.helpers import TINY, save_tiny_vit, write_split_files
    from vptune.engine.config import config_from_dict
    from vptune.engine.trainer import run_training

    task = tmp_path / "task"
    rng = np.random.default_rng(1)
    lines: dict[str, list[str]] = {}
    for split, n in (("train800", 20), ("val200", 8), ("test", 8)):
        (task / split).mkdir(parents=True)
        lines[split] = []
        for i in range(n):
            y = i % 2
            a = (rng.integers(0, 80, (20, 20, 3)) + 150 * y).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(task / split / f"{i}.png")
            lines[split].append(f"{split}/{i}.png {y}")
    write_split_files(task, lines)
    weights = save_tiny_vit(tmp_path / "vit.safetensors")

    def run(out: str, workers: int) -> dict:
        cfg = config_from_dict({
            "backbone": {"name": "vit_tiny_patch16_224", "config": TINY, "weights": str(weights)},
            "method": {"name": "vpt-deep", "options": {"num_tokens": 2}},
            "data": {"root": str(task), "num_workers": workers, "train_split": "train800",
                     "val_split": "val200", "test_split": "test"},
            "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 8, "base_lr": 1.0},
            "runtime": {"device": "cpu", "progress": False}, "output": str(tmp_path / out)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run_training(cfg)

    monkeypatch.setenv("VPTUNE_MEMORY_CACHE_MB", "0")
    lazy = run("lazy", workers=1)
    monkeypatch.setenv("VPTUNE_MEMORY_CACHE_MB", "64")
    mem = run("mem", workers=1)
    assert len(memory._CACHE) == 3  # train, val and test decoded once
    assert lazy["val"]["loss"] == mem["val"]["loss"] and lazy["test"]["confusion"] == mem["test"]["confusion"]
    def epochs(out: str) -> list[dict]:
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "epoch_s"} for r in rows]

    assert len(epochs("lazy")) == 2 and epochs("lazy") == epochs("mem")
