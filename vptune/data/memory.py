"""Decoded splits kept in memory, shared by the runs of one process.

A VTAB-1k run sees the same few thousand images every epoch, and a sweep trains dozens of runs on the same
splits (REFERENCE.md: grid on train800/val200, finals on train800val200, test). When a split's transform is
deterministic (the ``vtab`` protocol, or any evaluation transform) its output tensors never change, so
decoding, resizing and normalising them again each epoch and each run is pure waste; on a 2-core machine a
DataLoader worker doing it also competes with the training threads. :func:`in_memory` decodes such a split
once into one ``(N, 3, S, S)`` float32 tensor, keyed by what determines its content, and later runs of the
process reuse it. Batches are bit-identical to the lazy dataset's (same tensors, same sampler order).

The cache is bounded: ``VPTUNE_MEMORY_CACHE_MB`` (default 2048; 0 turns it off). A split larger than the
budget stays lazy, and the least recently used splits are dropped to make room.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any

import torch
from torch.utils.data import Dataset

from vptune.data.dataset import ImageDataset

DEFAULT_BUDGET_MB = 2048
_CACHE: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


class MemoryDataset(Dataset):
    """A decoded split: ``dataset[i] -> (x[i], label)``; other attributes come from the lazy dataset."""

    in_memory = True

    def __init__(self, base: ImageDataset, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.base, self.images, self.label_tensor = base, images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.label_tensor[i])

    def __getattr__(self, name: str) -> Any:  # num_classes, class_names, labels, name, source, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"MemoryDataset({self.base!r})"


def budget_bytes() -> int:
    """The cache budget in bytes (``VPTUNE_MEMORY_CACHE_MB``, default 2048 MB)."""
    raw = os.environ.get("VPTUNE_MEMORY_CACHE_MB", str(DEFAULT_BUDGET_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"VPTUNE_MEMORY_CACHE_MB must be a number of megabytes, got {raw!r}") from None
    return int(max(mb, 0.0) * 2**20)


def cache_key(ds: ImageDataset) -> str | None:
    """What determines a split's tensors (source items, transform), or None if they are not fixed."""
    transform = ds.transform
    if transform is None or not getattr(transform, "deterministic", False) or ds.skip_corrupt:
        return None
    h = hashlib.sha256(repr((type(ds.source).__name__, ds.name, len(ds.source), repr(transform))).encode())
    h.update(torch.tensor(ds.indices, dtype=torch.int64).numpy().tobytes())
    h.update(torch.tensor(ds.labels, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _make_room(need: int, budget: int) -> None:
    used = sum(x.numel() * x.element_size() for x, _ in _CACHE.values())
    while _CACHE and used + need > budget:
        x, _ = _CACHE.popitem(last=False)[1]
        used -= x.numel() * x.element_size()


def in_memory(ds: Dataset, workers: int = 0) -> Dataset:
    """``ds`` decoded once into memory (by ``workers`` DataLoader processes) when its transform is
    deterministic and it fits the budget, else ``ds`` itself. Splits already decoded are reused."""
    if not isinstance(ds, ImageDataset) or len(ds) == 0:
        return ds
    key = cache_key(ds)
    if key is None:
        return ds
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return MemoryDataset(ds, *_CACHE[key])
    first, _ = ds[0]
    need = first.numel() * first.element_size() * len(ds)
    budget = budget_bytes()
    if need > budget:
        return ds
    images = torch.empty((len(ds), *first.shape), dtype=first.dtype)
    pos = 0
    for x, _ in torch.utils.data.DataLoader(ds, batch_size=64, num_workers=max(0, int(workers))):
        images[pos:pos + len(x)] = x  # (B, 3, S, S), in order
        pos += len(x)
    labels = torch.tensor(ds.labels, dtype=torch.int64)
    _make_room(need, budget)
    _CACHE[key] = (images, labels)
    return MemoryDataset(ds, images, labels)


def clear() -> None:
    """Forget every decoded split."""
    _CACHE.clear()
