"""Backbones: our own ViT (and Swin) with timm parameter names, and their pretrained-weight loaders."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from vptune.backbones import (  # noqa: F401
    convert,
    convert_swin,
    swin,
    vit,
)
from vptune.backbones.base import Backbone, BlockInfo, Preprocessing, Tokens
from vptune.backbones.checkpoint import (
    LoadReport,
    config_from_folder,
    detect_source,
    family_for,
    load_weights,
    read_state_dict,
)
from vptune.backbones.registry import list_backbones, resolve
from vptune.checks import coerce_fields
from vptune.errors import VptuneError

logger = logging.getLogger("vptune")

__all__ = [
    "Backbone", "BlockInfo", "LoadReport", "Preprocessing", "Tokens", "config_from_folder", "create_backbone",
    "detect_source", "list_backbones", "load_weights", "read_state_dict",
]


def create_backbone(name: str | None = None, weights: str | Path | None = None, *, source: str = "auto",
                    input_size: int | None = None, strict: bool = True, **config_overrides: Any) -> Backbone:
    """Build a backbone by registered ``name`` (see :func:`list_backbones`) and optionally load ``weights``.

    ``weights``: a checkpoint file or a folder (``model.safetensors`` / ``pytorch_model.bin``); a folder
    with a ``config.json`` (timm-style or Hugging Face) needs no ``name`` -- when both are given, ``name``
    wins. ``source``: the checkpoint layout (``auto``, ``timm``, ``jax``, ``hf``, ``mae``, ``mocov3``, ...).
    ``input_size``: the image side the backbone will see (``preprocessing.input_size``); position
    embeddings are interpolated to it at run time. ``config_overrides``: config fields (e.g.
    ``depth=2``); unknown keys raise :class:`VptuneError` listing the valid ones. The
    :class:`LoadReport` is logged (logger ``vptune``) and attached as ``backbone.load_report``.
    """
    family, config, interpolation = _family_and_config(name, weights)
    config = _apply_overrides(config, config_overrides)
    try:
        backbone: Backbone = family.cls(config)
    except (RuntimeError, MemoryError, OverflowError, ZeroDivisionError, ValueError) as e:  # absurd sizes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VptuneError(f"cannot build the backbone with config overrides {config_overrides}: "
                          f"{type(e).__name__}: {first}") from None
    if input_size is not None:
        ps = backbone.patch_size[0]
        if not isinstance(input_size, int) or input_size <= 0 or input_size % ps:
            raise VptuneError(f"input_size must be a positive multiple of the patch size {ps}, "
                              f"got {input_size!r}")
        backbone.preprocessing.input_size = input_size
    if interpolation in ("bilinear", "bicubic"):
        backbone.preprocessing.interpolation = interpolation
    backbone.load_report = None
    if weights is not None:
        report = load_weights(backbone, weights, source=source, strict=strict)
        logger.info("%s", report)
        backbone.load_report = report
    return backbone


def _family_and_config(name: str | None, weights: str | Path | None) -> tuple[Any, Any, str | None]:
    if weights is not None and not Path(weights).exists():
        raise VptuneError(f"weights {weights} do not exist (give a checkpoint file or a weights folder)")
    folder = Path(weights) if weights is not None and Path(weights).is_dir() else None
    has_config = folder is not None and (folder / "config.json").is_file()
    interpolation = None
    if has_config:
        raw = config_from_folder(folder)
        interpolation = _read_interpolation(folder)
    if name is not None:
        family, config = resolve(name)
    elif has_config:
        family, config = family_for(raw[0]), raw[1]
    else:
        raise VptuneError("give a backbone name or a weights folder with a config.json; "
                          f"valid names: {', '.join(list_backbones())}")
    return family, config, interpolation


def _read_interpolation(folder: Path) -> str | None:
    import json

    try:
        value = json.loads((folder / "config.json").read_text()).get("interpolation")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``config`` with ``overrides`` applied: unknown keys are refused with the valid ones, and each value is
    converted to its field's type (``depth="2"`` -> 2; ``depth="abc"`` is one VptuneError naming the key)."""
    if not overrides:
        return config
    valid = sorted(f.name for f in dataclasses.fields(config))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise VptuneError(f"unknown config keys {unknown}; valid keys: {', '.join(valid)}")
    fixed = coerce_fields(type(config), {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()},
                          "backbone.config")
    for key, value in fixed.items():  # a size (a positive whole number by default) stays positive
        default = getattr(config, key)
        if type(default) is int and default > 0 and type(value) is int and value < 1:
            raise VptuneError(f"backbone.config.{key} must be >= 1, got {value}")
    return dataclasses.replace(config, **fixed)
