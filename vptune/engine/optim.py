"""Optimisers, parameter groups and lr schedules (VPT, Sec. 4.1 and the reference code; recipes.py).

- Optimiser per method: ``model.method.optimizer`` (vptune's recipe: AdamW for prompts) or, with
  ``optimizer: paper``, ``model.method.paper_optimizer`` (SGD, momentum 0.9, for linear, MLP, sidetune and
  VPT; AdamW for full, partial, bias and adapter). Only trainable parameters enter the optimiser, so
  frozen ones never get optimiser state.
- Peak lr: ``base_lr`` (``lr_scaling: none``) or ``base_lr * batch_size / 256`` (``linear``, the paper's
  rule); without a ``base_lr`` the method's ``default_lr`` for its optimiser. Per-group factors
  (``lr_scale``) over the groups a method declares (``lr_groups``) plus ``head`` and ``other``.
- Weight decay on weights and prompts; none on biases, norm weights (LayerNorm, BatchNorm, GroupNorm),
  other 0-/1-D parameters (e.g. the sidetune blend alpha) or what a method declares in
  ``no_decay_patterns``.
- Schedule stepped every iteration: linear warmup from ``lr * warmup_start_factor`` (never 0; the reference
  code's first epoch runs at lr 0), then cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from vptune.engine.config import OPTIMIZERS, OptimCfg
from vptune.errors import VptuneError, check_choice

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
              nn.modules.instancenorm._InstanceNorm)


def method_optimizer(method: Any, choice: str) -> str:
    """The optimiser ``choice`` means for ``method`` (a Method or its class): ``auto`` = the method's in
    vptune's recipe, ``paper`` = the paper's (Sec. 4.1), else the named one."""
    check_choice("optimizer", choice, OPTIMIZERS)
    if choice == "auto":
        return str(getattr(method, "optimizer", "sgd"))
    if choice == "paper":
        return str(getattr(method, "paper_optimizer", "sgd"))
    return choice


def resolve_optimizer_name(optim: OptimCfg, model: nn.Module) -> str:
    """``optim.optimizer`` resolved for ``model``'s method (:func:`method_optimizer`)."""
    return method_optimizer(getattr(model, "method", None), optim.optimizer)


def scaled_lr(optim: OptimCfg, model: nn.Module | None = None) -> float:
    """The peak learning rate: ``base_lr`` (lr_scaling none) or ``base_lr * batch_size / 256`` (linear, the
    paper's rule). Without a base_lr, the method's default peak lr for its optimiser (never scaled)."""
    if optim.base_lr is None:
        method = getattr(model, "method", None)
        if method is None:
            raise VptuneError("optim.base_lr is not set and there is no method to take a default lr from")
        return float(method.default_lr[resolve_optimizer_name(optim, model)])
    factor = optim.batch_size / 256.0 if optim.lr_scaling == "linear" else 1.0
    return float(optim.base_lr) * factor


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that get no weight decay: biases, norm weights, 0-D/1-D tensors, and what the
    method declares in ``no_decay_patterns`` (anchored patterns)."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            own = module.named_parameters(recurse=False)
            names.update(f"{mod_name}.{n}" if mod_name else n for n, _ in own)
    declared = [re.compile(p) for p in getattr(getattr(model, "method", None), "no_decay_patterns", ())]
    for name, p in model.named_parameters():
        if name.endswith(".bias") or p.ndim <= 1 or any(c.match(name) for c in declared):
            names.add(name)
    return names


def lr_group_of(model: nn.Module) -> tuple[Any, list[str]]:
    """(name -> lr group, valid group names): ``head`` for the head, the method's declared ``lr_groups``,
    ``other`` for any trained tensor they do not name."""
    declared = getattr(getattr(model, "method", None), "lr_groups", {})
    compiled = [(g, [re.compile(p) for p in pats]) for g, pats in declared.items()]

    def group(name: str) -> str:
        if name.startswith("head."):
            return "head"
        return next((g for g, pats in compiled if any(c.match(name) for c in pats)), "other")
    return group, ["head", *declared, "other"]


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_scale: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in groups of (lr group, with/without weight decay), empty groups left out.
    Each group's ``lr`` is ``lr * lr_scale[group]`` (factor 1 for groups not named)."""
    skip = no_decay_names(model)
    group_of, valid = lr_group_of(model)
    scales = dict(lr_scale or {})
    unknown = sorted(set(scales) - set(valid))
    if unknown:
        raise VptuneError(f"optim.lr_scale names unknown group(s) {unknown}; groups of this method: "
                          f"{', '.join(valid)}")
    trainable = model.trainable_parameters() if hasattr(model, "trainable_parameters") else [
        (n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for g in valid:
        for decay in (True, False):
            members = [(n, p) for n, p in trainable if group_of(n) == g and (n not in skip) == decay]
            if members:
                entry = {"params": [p for _, p in members], "names": [n for n, _ in members], "group": g,
                         "weight_decay": weight_decay if decay else 0.0}
                if lr is not None:
                    entry["lr"] = lr * float(scales.get(g, 1.0))
                groups.append(entry)
    return groups


def build_optimizer(model: nn.Module, optim: OptimCfg) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters only, at the peak lr (per-group scaled)."""
    name = resolve_optimizer_name(optim, model)
    lr = scaled_lr(optim, model)
    groups = param_groups(model, optim.weight_decay, lr, optim.lr_scale)
    if not groups:
        raise VptuneError("the model has no trainable parameters")
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


class ReferenceEpochSchedule(WarmupCosine):
    """The reference code's schedule (``recipe: reference``): a LambdaLR stepped once per epoch with
    ``lambda(e) = e / warmup_epochs`` for ``e < warmup_epochs`` (epoch 0 runs at lr 0), else
    ``max(0, 0.5 * (1 + cos(pi * (e - warmup_epochs) / (epochs - warmup_epochs))))``, for the 0-based
    epoch ``e``; ``min_lr`` and ``warmup_start_factor`` do not apply. ``step()`` still runs every
    iteration; the lr changes at epoch boundaries only."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int,
                 steps_per_epoch: int) -> None:
        self.epochs, self.warmup_epochs = max(1, int(epochs)), max(0, int(warmup_epochs))
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        super().__init__(optimizer, total_steps=self.epochs * self.steps_per_epoch,
                         warmup_steps=self.warmup_epochs * self.steps_per_epoch, start_factor=0.0)

    def factor(self, step: int, base_lr: float) -> float:
        e = step // self.steps_per_epoch
        if e < self.warmup_epochs:
            return e / self.warmup_epochs
        progress = (e - self.warmup_epochs) / max(1, self.epochs - self.warmup_epochs)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimCfg, steps_per_epoch: int) -> WarmupCosine:
    """The schedule for ``optim.epochs`` epochs of ``steps_per_epoch`` iterations: per-iteration warmup +
    cosine (``schedule: step``) or the reference code's per-epoch staircase (``schedule: epoch``)."""
    if optim.schedule == "epoch":
        return ReferenceEpochSchedule(optimizer, optim.epochs, optim.warmup_epochs, steps_per_epoch)
    return WarmupCosine(optimizer, total_steps=optim.epochs * steps_per_epoch,
                        warmup_steps=optim.warmup_epochs * steps_per_epoch,
                        start_factor=optim.warmup_start_factor, min_lr=optim.min_lr)
