"""The demo's options and downstream recipe (a module of their own: :mod:`vptune.demo.real` reads them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DemoOptions:
    out: str = "demo_out"
    cache: str | None = None  # None: $VPTUNE_CACHE, else ~/.cache/vptune/demo
    assets: str | None = None  # None: $VPTUNE_ASSETS unless no_assets
    no_assets: bool = False
    quick: bool = False
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))


@dataclass
class DownstreamRecipe:
    n_train: int = 800
    n_test: int = 400
    epochs: int = 30
    warmup_epochs: int = 3
    batch_size: int = 32
    num_tokens: int = 8
    sgd_base_lr: float = 1.0
    sgd_weight_decay: float = 1e-4
    vpt_base_lr: float | None = None  # None: sgd_base_lr
    vpt_grad_clip: float | None = 5.0
    full_base_lr: float = 1e-3
    full_weight_decay: float = 0.01

    def train_config(self, method: str, output: Path, seed: int) -> dict[str, Any]:
        opts = {"num_tokens": self.num_tokens} if method.startswith("vpt") else {}
        if method == "full":
            optim = {"optimizer": "adamw", "base_lr": self.full_base_lr, "weight_decay": self.full_weight_decay}
        else:
            optim = {"optimizer": "sgd", "base_lr": self.sgd_base_lr, "weight_decay": self.sgd_weight_decay}
            if method.startswith("vpt"):
                optim["grad_clip"] = self.vpt_grad_clip
                if self.vpt_base_lr is not None:
                    optim["base_lr"] = self.vpt_base_lr
        optim.update(batch_size=self.batch_size, epochs=self.epochs, warmup_epochs=self.warmup_epochs)
        return {"method": {"name": method, "options": opts}, "optim": optim,
                "data": {"num_workers": 0},
                "runtime": {"device": "cpu", "progress": False, "eval_every": 0, "seed": seed},
                "output": str(output)}
