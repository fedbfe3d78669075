"""Task artifacts: a folder with ``task.json`` and ``weights.safetensors`` (peft's save format).

``weights.safetensors`` holds only the trained tensors (prompts and head for VPT: ~4 bytes per trained
parameter); ``task.json`` holds what a deployment needs to rebuild the task on a shared backbone: the
method and its options, classes, preprocessing, and the backbone's identity (architecture, config and
sha256 of its pretrained weights), stamped with the format and library versions. Loading on another
backbone is refused with a message naming both. Writes are atomic (temp file, then rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vptune.backbones.base import Backbone, Preprocessing
from vptune.errors import VptuneError
from vptune.io import atomic_write_bytes, atomic_write_json, check_format_stamp
from vptune.model import TunedModel, create_model, register_persistence
from vptune.version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "TASK_JSON", "WEIGHTS", "atomic_write_bytes", "atomic_write_json",
           "check_format_stamp", "load_task", "read_task_json", "read_weights", "save_task", "task_metadata",
           "verify_backbone"]

FORMAT = "vptune-task"
FORMAT_VERSION = 1
TASK_JSON = "task.json"
WEIGHTS = "weights.safetensors"


def task_metadata(model: Any, stored: list[str], training: dict[str, Any] | None = None) -> dict[str, Any]:
    """``task.json`` contents; ``stored`` names the tensors in ``weights.safetensors``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vptune_version": __version__,
        "method": model.method_name,
        "options": model.method.option_dict(),
        "head_norm": getattr(model, "head_norm", "none"),
        "num_classes": model.num_classes,
        "label_names": model.label_names,
        "backbone": model.backbone.identity(),
        "preprocessing": model.preprocessing.to_dict(),
        "trained_parameters": model.num_trainable_parameters(),
        "stored_tensors": sorted(stored),
        "training": training or {},
    }


def save_task(model: Any, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
    """Write ``task.json`` and ``weights.safetensors`` (trained tensors only) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in model.trained_state_dict().items()}
    payload = save(state, metadata={"format": FORMAT, "method": model.method_name})  # bytes, written once
    atomic_write_bytes(directory / WEIGHTS, payload)
    atomic_write_json(directory / TASK_JSON, task_metadata(model, list(state), training))
    return directory


def read_task_json(directory: str | Path) -> dict[str, Any]:
    """Parse and check ``task.json``; a missing or corrupt file gets one clear VptuneError."""
    path = Path(directory) / TASK_JSON
    if not Path(directory).is_dir():
        raise VptuneError(f"task folder {directory} does not exist")
    if not path.is_file():
        raise VptuneError(f"{directory} is not a vptune task folder: {TASK_JSON} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VptuneError(f"{path} is corrupt: {e}") from None
    check_format_stamp(meta, path, FORMAT, FORMAT_VERSION, what="task file", version_label="format version")
    return meta


def verify_backbone(meta: dict[str, Any], backbone: Backbone, where: str) -> None:
    """Refuse a backbone other than the one the task was trained on, naming both."""
    want, have = meta.get("backbone", {}), backbone.identity()
    same_arch = want.get("arch") == have["arch"] and want.get("config") == have["config"]
    if not same_arch or want.get("sha256") != have["sha256"]:
        raise VptuneError(
            f"task {where} was trained on backbone {_describe(want)}, but the given backbone is "
            f"{_describe(have)}; load the task with the backbone it was trained on")


def _describe(identity: dict[str, Any]) -> str:
    cfg = identity.get("config", {})
    dims = "x".join(str(cfg.get(k)) for k in ("embed_dim", "depth") if k in cfg)
    return f"{identity.get('arch', '?')} {dims} (weights sha256 {str(identity.get('sha256', '?'))[:12]})"


def read_weights(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise VptuneError(f"{directory} is not a complete task folder: {WEIGHTS} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VptuneError(f"{path} is corrupt or not a safetensors file: {e}") from None


def load_task(directory: str | Path, backbone: Backbone, *, check_backbone: bool = True) -> TunedModel:
    """Rebuild a :class:`~vptune.model.TunedModel` from a task folder on ``backbone``."""
    meta = read_task_json(directory)
    if check_backbone:
        verify_backbone(meta, backbone, str(directory))
    model = create_model(backbone, meta["method"], int(meta["num_classes"]),
                         label_names=meta.get("label_names"), head_norm=meta.get("head_norm", "none"),
                         **meta.get("options", {}))
    state = read_weights(directory)
    expected = model.trained_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VptuneError(f"{directory}/{WEIGHTS} does not match its task.json: missing {missing[:10]}, "
                          f"unexpected {unexpected[:10]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise VptuneError(f"{directory}/{WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)
    if "preprocessing" in meta:
        model.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    return model


register_persistence(save_task, load_task)  # TunedModel.save_pretrained / from_pretrained
