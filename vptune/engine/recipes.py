"""Training recipes: named presets of config values that a config's own keys override.

``recipe: default`` is vptune's recipe, chosen by a validation-only study on mini-VTAB
(``benchmarks/recipe_study.py``, BENCHMARKS.md "Recipe study"); its values are the dataclass defaults of
:mod:`vptune.engine.config` plus each method's declared ``optimizer`` and ``default_lr``.

``recipe: reference`` reproduces the training of the paper's reference code (REFERENCE.md, "The reference
code's exact training behaviour"), for people who want to compare with the paper's numbers:

- the paper's optimiser per method (SGD momentum 0.9 for linear/mlp/sidetune/VPT, AdamW otherwise) and
  its linear scaling rule ``lr = base_lr * batch_size / 256``, batch size 128;
- the lr schedule stepped once per epoch, warmup from lr 0 in ``warmup_epochs`` levels, then a per-epoch
  cosine staircase (:class:`vptune.engine.optim.ReferenceEpochSchedule`);
- a kaiming-normal (fan-out) head with bias -4.595 and no head norm;
- ImageNet mean/std for every backbone and bilinear resizing without antialiasing (TensorFlow's);
- five final seeds 42, 44, 82, 100, 800 in sweeps (:data:`REFERENCE_SEEDS`).

Where vptune's default differs, and why (measured; BENCHMARKS.md): AdamW for prompts, because the
prompts' gradients through a frozen ViT are tiny in early blocks and SGD at any lr that keeps the head
stable barely moves them; a per-iteration schedule with warmup from 1% (the reference's first epoch runs
at lr 0); a small head init (the reference's starts the loss near 30 on a large-feature backbone); the
checkpoint's own normalisation and antialiased resizing (what the backbone was trained with).
"""

from __future__ import annotations

import copy
from typing import Any

from vptune.errors import check_choice

REFERENCE_SEEDS = (42, 44, 82, 100, 800)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "reference": {
        "method": {"head_norm": "none", "head_init": "reference"},
        "optim": {"optimizer": "paper", "lr_scaling": "linear", "schedule": "epoch",
                  "warmup_start_factor": 0.0, "batch_size": 128},
        "data": {"normalize": "imagenet", "antialias": False},
    },
}


def with_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` laid over its recipe's preset (``data["recipe"]``, default ``"default"``): keys the
    config sets win, the preset fills the others."""
    name = data.get("recipe", "default")
    check_choice("recipe", name, tuple(RECIPES))
    return _merge(copy.deepcopy(RECIPES[str(name)]), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base
