"""Upstream pretraining of the demo's small ViT, cached by a hash of its recipe.

The cache folder ``<cache>/<key>/`` holds ``model.safetensors`` (the backbone, timm names),
``config.json`` (the ViT config, the recipe and the upstream validation accuracy) and nothing else;
``key`` is the first 16 hex digits of the sha256 of the recipe (which includes the renderer version),
so any change to how the backbone would be made gives a new folder and never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vptune.artifact import atomic_write_bytes, atomic_write_json
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.demo import shapes
from vptune.engine.trainer import SilentBar, progress_bar
from vptune.errors import VptuneError


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that decides the pretrained weights (hashed into the cache key)."""

    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    pos_embed: str = "sincos"  # fixed: tokens keep their position (see the package docstring)
    n_train: int = 12000
    n_val: int = 1000
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    seed: int = 0

    def vit_config(self) -> ViTConfig:
        return ViTConfig(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                         depth=self.depth, num_heads=self.num_heads, pos_embed=self.pos_embed)

    def key(self) -> str:
        blob = json.dumps({"recipe": asdict(self), "renderer": shapes.RENDERER_VERSION,
                           "upstream": shapes.UPSTREAM.name}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cached(folder: Path) -> tuple[VisionTransformer, dict[str, Any]] | None:
    """The cached backbone and its config.json, or None when the folder is absent or incomplete."""
    from safetensors.torch import load_file

    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not (cfg_path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(cfg_path.read_text())
        model = VisionTransformer(ViTConfig.from_dict(meta["vit_config"]))
        model.load_state_dict(load_file(str(weights)), strict=True)
    except Exception:  # noqa: BLE001 -- a corrupt or foreign cache entry is simply rebuilt
        return None
    return model.eval(), meta


def pretrain(recipe: PretrainRecipe, cache_root: Path, *, log: Callable[[str], None] = print,
             progress: bool = True) -> tuple[VisionTransformer, dict[str, Any]]:
    """The pretrained backbone (from the cache when there) and a summary (``cached``, ``val_top1``...)."""
    folder = cache_root / recipe.key()
    hit = load_cached(folder)
    if hit is not None:
        model, meta = hit
        log(f"  cached backbone found in {folder} (upstream val top-1 {meta['val_top1']:.1f}%): "
            "pretraining skipped")
        return model, {**meta, "cached": True, "folder": str(folder), "wall_s": 0.0}
    t0 = time.time()
    rng = np.random.default_rng([recipe.seed, 1000])
    log(f"  rendering {recipe.n_train:,} + {recipe.n_val:,} upstream images ({shapes.UPSTREAM.description})")
    x, y = shapes.UPSTREAM.make(rng, recipe.n_train + recipe.n_val, recipe.img_size)
    x = shapes.to_tensor(x)
    y = torch.from_numpy(y)
    xtr, ytr, xval, yval = x[:recipe.n_train], y[:recipe.n_train], x[recipe.n_train:], y[recipe.n_train:]
    torch.manual_seed(recipe.seed)
    model = VisionTransformer(recipe.vit_config())
    if recipe.pos_embed == "sincos":
        model.pos_embed.requires_grad_(False)
    head = torch.nn.Linear(recipe.embed_dim, shapes.UPSTREAM.num_classes)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = recipe.n_train // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    warm = max(1, int(total * recipe.warmup_frac))
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = progress_bar(total, "  pretraining", progress)
    step, val = 0, 0.0
    for epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(recipe.n_train, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            lr = recipe.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = torch.nn.functional.cross_entropy(head(model(xtr[idx])), ytr[idx])
            value = float(loss.detach())
            if not math.isfinite(value):
                raise VptuneError("demo pretraining diverged (non-finite loss)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", refresh=False)
        val = _accuracy(model, head, xval, yval)
        bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", val=f"{val:.1f}%")
        if isinstance(bar, SilentBar):
            log(f"  pretraining epoch {epoch + 1}/{recipe.epochs}: loss {value:.3f}, upstream val top-1 {val:.1f}% "
                f"({time.time() - t0:.0f} s)")
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # a plain backbone again; TunedModel decides what trains
    wall = time.time() - t0
    meta = {"vit_config": model.config.to_dict(), "recipe": asdict(recipe), "key": recipe.key(),
            "renderer_version": shapes.RENDERER_VERSION, "upstream_task": shapes.UPSTREAM.name,
            "upstream_classes": list(shapes.UPSTREAM.class_names), "val_top1": round(val, 2),
            "pretrain_wall_s": round(wall, 1)}
    _save(folder, model, meta)
    log(f"  pretrained in {wall:.0f} s: upstream val top-1 {val:.1f}% ({shapes.UPSTREAM.num_classes} classes); "
        f"cached in {folder}")
    return model, {**meta, "cached": False, "folder": str(folder), "wall_s": round(wall, 1)}


def _accuracy(model: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        hits = sum(int((head(model(x[i:i + 256])).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
    return 100.0 * hits / max(1, len(x))


def _save(folder: Path, model: VisionTransformer, meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    payload = save(state, metadata={"format": "vptune-demo-backbone"})  # bytes, written once
    atomic_write_bytes(folder / "model.safetensors", payload)
    atomic_write_json(folder / "config.json", meta)  # written last: marks the entry complete
