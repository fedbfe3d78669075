"""The paper's optimisation recipe (VPT, Sec. 4.1 and the reference code), with its lr-0 bug fixed.

- Optimiser per method (``model.method.optimizer``): SGD, momentum 0.9, for linear, MLP, sidetune and VPT;
  AdamW for full, partial, bias and adapter. Only trainable parameters enter the optimiser, so frozen
  ones never get optimiser state.
- ``lr = base_lr * batch_size / 256``.
- Weight decay on weights and prompts; none on biases, norm weights (LayerNorm, BatchNorm, GroupNorm) or
  other 0-/1-D parameters (e.g. the sidetune blend alpha).
- Schedule stepped every iteration: linear warmup from ``lr * warmup_start_factor`` (never 0; the reference
  code's first epoch runs at lr 0), then cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vptune.engine.config import OptimCfg
from vptune.errors import check_choice

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
              nn.modules.instancenorm._InstanceNorm)


def scaled_lr(optim: OptimCfg) -> float:
    """The peak learning rate: ``base_lr * batch_size / 256`` (the paper's linear scaling rule)."""
    return optim.base_lr * optim.batch_size / 256.0


def resolve_optimizer_name(optim: OptimCfg, model: nn.Module) -> str:
    """``optim.optimizer``, or the method's own (the paper's) when it is ``"auto"``."""
    check_choice("optimizer", optim.optimizer, ("auto", "sgd", "adamw"))
    if optim.optimizer != "auto":
        return optim.optimizer
    return str(getattr(getattr(model, "method", None), "optimizer", "sgd"))


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that get no weight decay: biases, norm weights and 1-D/0-D tensors except prompts."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            own = module.named_parameters(recurse=False)
            names.update(f"{mod_name}.{n}" if mod_name else n for n, _ in own)
    for name, p in model.named_parameters():
        is_prompt = "prompt" in name
        if name.endswith(".bias") or (p.ndim <= 1 and not is_prompt):
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups of trainable parameters: with and without weight decay (empty groups left out)."""
    skip = no_decay_names(model)
    trainable = model.trainable_parameters() if hasattr(model, "trainable_parameters") else [
        (n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in trainable if n not in skip]
    plain = [(n, p) for n, p in trainable if n in skip]
    groups = [{"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in plain], "names": [n for n, _ in plain], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim: OptimCfg) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters only, at the scaled peak lr."""
    name = resolve_optimizer_name(optim, model)
    groups = param_groups(model, optim.weight_decay)
    if not groups:
        from vptune.errors import VptuneError

        raise VptuneError("the model has no trainable parameters")
    lr = scaled_lr(optim)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    return torch.optim.AdamW(groups, lr=lr)


class WarmupCosine:
    """Per-iteration lr: linear warmup from ``start_factor * lr`` to ``lr`` over ``warmup_steps``, then
    cosine to ``min_lr`` at ``total_steps``. ``step()`` after every optimiser step; ``lr_at(0) > 0``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 start_factor: float = 0.01, min_lr: float = 0.0) -> None:
        self.optimizer = optimizer
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps))
        self.start_factor = float(start_factor)
        self.min_lr = float(min_lr)
        self.step_count = 0
        self._apply()

    def factor(self, step: int, base_lr: float) -> float:
        """lr / base_lr at iteration ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = min(1.0, self.min_lr / base_lr) if base_lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        """The first group's lr at iteration ``step``."""
        return self.base_lrs[0] * self.factor(step, self.base_lrs[0])

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.factor(self.step_count, base)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "base_lrs": list(self.base_lrs),
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimCfg, steps_per_epoch: int) -> WarmupCosine:
    """The warmup + cosine schedule for ``optim.epochs`` epochs of ``steps_per_epoch`` iterations."""
    return WarmupCosine(optimizer, total_steps=optim.epochs * steps_per_epoch,
                        warmup_steps=optim.warmup_epochs * steps_per_epoch,
                        start_factor=optim.warmup_start_factor, min_lr=optim.min_lr)
