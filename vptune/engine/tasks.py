"""Using finished tasks: rebuild a task on its backbone, evaluate or predict, and describe what a task
folder, run folder or checkpoint holds (the library side of ``vptune eval / predict / info``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vptune.artifact import TASK_JSON, WEIGHTS, load_task, read_task_json
from vptune.backbones import create_backbone, load_weights
from vptune.backbones.registry import family_of
from vptune.data import DataConfig, build_transform, load_image, open_split
from vptune.engine.checkpoint import CHECKPOINT, load_checkpoint
from vptune.engine.evaluate import evaluate, label_names_for, predict_topk, resolve_device
from vptune.engine.runfolder import read_result, read_run_config
from vptune.errors import VptuneError

RUN_MARKERS = ("config.yaml", "result.json", CHECKPOINT)


# ------------------------------------------------------------------------------------------ loading

def task_backbone(meta: dict[str, Any], weights: str | None = None, name: str | None = None,
                  source: str | None = None) -> Any:
    """The backbone a task was trained on: ``weights`` (default: the path its training recorded) loaded
    into ``name``'s config, or by default into the exact architecture stamped in ``task.json``."""
    recorded = meta.get("training", {}).get("backbone", {}) or {}
    weights = weights or recorded.get("weights")
    if not weights:
        raise VptuneError("the task records no backbone weights path: pass --weights FILE_OR_FOLDER "
                          "(the pretrained backbone the task was trained on)")
    if not Path(weights).exists():
        raise VptuneError(f"backbone weights {weights} do not exist; pass --weights FILE_OR_FOLDER")
    source = source or recorded.get("source") or "auto"
    if name:
        overrides = recorded.get("config", {}) if name == recorded.get("name") else {}
        return create_backbone(name, weights=weights, source=source, **overrides)
    ident = meta.get("backbone", {})
    family = family_of(str(ident.get("arch")))
    backbone = family.cls(family.config_cls.from_dict(dict(ident.get("config", {}))))
    load_weights(backbone, weights, source=source)
    return backbone


def load_task_model(task: str | Path, weights: str | None = None, backbone_name: str | None = None,
                    source: str | None = None, backbone: Any = None) -> Any:
    """A :class:`~vptune.model.TunedModel` from a task folder (or a run folder holding ``task/``)."""
    task = resolve_task_dir(task)
    meta = read_task_json(task)
    if backbone is None:
        backbone = task_backbone(meta, weights, backbone_name, source)
    return load_task(task, backbone)


def resolve_task_dir(path: str | Path) -> Path:
    """``path`` itself when it holds ``task.json``; ``path/task`` for a finished run folder."""
    path = Path(path)
    if (path / TASK_JSON).is_file() or not (path / "task" / TASK_JSON).is_file():
        return path
    return path / "task"


def task_protocol(model_or_meta: Any, default: str = "vtab") -> str:
    """The data protocol the task was trained with (recorded in its training summary)."""
    meta = model_or_meta if isinstance(model_or_meta, dict) else {}
    return str(meta.get("training", {}).get("data", {}).get("protocol") or default)


def evaluate_task(model: Any, data_root: str, split: str = "test", *, data_format: str = "auto",
                  protocol: str = "vtab", batch_size: int = 64, num_workers: int = 2, device: str = "auto",
                  precision: str = "fp32") -> dict[str, Any]:
    """Metrics of a task model on one split of a dataset (see :func:`vptune.engine.evaluate.evaluate`)."""
    dev = resolve_device(device)
    dc = DataConfig(root=data_root, format=data_format, protocol=protocol, num_workers=num_workers)
    ds = open_split(dc, split, model.preprocessing, train=False)
    if ds.num_classes != model.num_classes:
        raise VptuneError(f"split {split!r} of {data_root} has {ds.num_classes} classes but the task has "
                          f"{model.num_classes}")
    model.to(dev)
    return evaluate(model, ds, device=dev, precision=precision, batch_size=batch_size,
                    num_workers=num_workers)


def predict_files(model: Any, paths: Sequence[str], *, k: int = 5, protocol: str = "vtab",
                  device: str = "auto", batch_size: int = 32) -> list[dict[str, Any]]:
    """Top-k ``{"label", "index", "prob"}`` predictions for each image file, in order."""
    dev = resolve_device(device)
    model.to(dev)
    transform = build_transform(model.preprocessing, protocol, train=False)
    out: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        batch = torch.stack([transform(load_image(p)) for p in chunk])
        probs, idx = predict_topk(model, batch, k, device=dev)
        for path, p_row, i_row in zip(chunk, probs.tolist(), idx.tolist()):
            names = label_names_for(model, i_row)
            out.append({"path": str(path), "top": [{"label": n, "index": i, "prob": p}
                                                   for n, i, p in zip(names, i_row, p_row)]})
    return out


# ------------------------------------------------------------------------------------------ describing

def describe(path: str | Path) -> dict[str, Any]:
    """What a task folder, run folder or run checkpoint holds (for ``vptune info``)."""
    path = Path(path)
    if not path.exists():
        raise VptuneError(f"{path} does not exist")
    if path.is_file():
        return describe_checkpoint(path)
    if (path / TASK_JSON).is_file():
        return describe_task(path)
    if any((path / m).exists() for m in RUN_MARKERS):
        return describe_run(path)
    raise VptuneError(f"{path} is neither a task folder (task.json), a run folder (config.yaml, result.json, "
                      f"{CHECKPOINT}) nor a checkpoint file")


def describe_task(path: Path) -> dict[str, Any]:
    meta = read_task_json(path)
    training = meta.get("training", {}) or {}
    ident = meta.get("backbone", {})
    weights = path / WEIGHTS
    return {
        "kind": "task", "path": str(path), "method": meta.get("method"), "options": meta.get("options", {}),
        "num_classes": meta.get("num_classes"), "label_names": meta.get("label_names"),
        "trained_parameters": meta.get("trained_parameters"),
        "stored_bytes": weights.stat().st_size if weights.is_file() else None,
        "stored_tensors": len(meta.get("stored_tensors", [])),
        "backbone": {"arch": ident.get("arch"), "config": ident.get("config"), "sha256": ident.get("sha256"),
                     "name": training.get("backbone", {}).get("name"),
                     "weights": training.get("backbone", {}).get("weights")},
        "preprocessing": meta.get("preprocessing"),
        "vptune_version": meta.get("vptune_version"),
        "training": {k: training.get(k) for k in ("status", "epochs", "val", "test", "optimizer", "lr",
                                                  "seed") if k in training},
    }


def describe_run(path: Path) -> dict[str, Any]:
    result, config = read_result(path), read_run_config(path) or {}
    planned = config.get("optim", {}).get("epochs")
    info: dict[str, Any] = {"kind": "run", "path": str(path), "method": config.get("method", {}).get("name"),
                            "epochs_planned": planned}
    if result is not None:
        info.update(status=result.get("status"), epochs=result.get("epochs"), wall_s=result.get("wall_s"),
                    val_top1=(result.get("val") or {}).get("top1"),
                    test_top1=(result.get("test") or {}).get("top1"))
    elif (path / CHECKPOINT).is_file():
        ck = load_checkpoint(path / CHECKPOINT)
        info.update(status="interrupted", epochs=ck["epoch"], steps=ck["step"])
    else:
        info.update(status="not started", epochs=0)
    if (path / "task" / TASK_JSON).is_file():
        info["task"] = describe_task(path / "task")
    info["config"] = config
    return info


def describe_checkpoint(path: Path) -> dict[str, Any]:
    ck = load_checkpoint(path)
    extra = ck.get("extra", {}) or {}
    config = extra.get("config") or {}
    tensors = ck.get("model", {})
    return {
        "kind": "checkpoint", "path": str(path), "epoch": ck["epoch"], "step": ck["step"],
        "method": config.get("method", {}).get("name"),
        "epochs_planned": config.get("optim", {}).get("epochs"),
        "trained_tensors": len(tensors), "trained_values": int(sum(t.numel() for t in tensors.values())),
        "bytes": path.stat().st_size, "config": config,
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable lines for :func:`describe` output."""
    lines = [f"{info['kind']}: {info['path']}"]
    skip = {"kind", "path", "config", "task", "label_names", "preprocessing"}
    for key, value in info.items():
        if key in skip or value is None:
            continue
        if key == "backbone":
            value = _backbone_line(value)
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"  {key}: {value}")
    if info.get("label_names"):
        names = info["label_names"]
        lines.append(f"  classes: {', '.join(map(str, names[:20]))}{' ...' if len(names) > 20 else ''}")
    if "task" in info:
        lines.extend("  " + line for line in format_info(info["task"]).splitlines())
    return "\n".join(lines)


def _backbone_line(b: dict[str, Any]) -> str:
    cfg = b.get("config") or {}
    dims = ", ".join(f"{k}={cfg[k]}" for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
                     if k in cfg)
    parts = [str(b.get("name") or b.get("arch")), f"({dims})" if dims else "",
             f"sha256 {str(b.get('sha256', ''))[:12]}", f"weights {b['weights']}" if b.get("weights") else ""]
    return " ".join(p for p in parts if p)
