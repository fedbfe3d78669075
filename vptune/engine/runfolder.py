"""The run folder: its file names, reading a finished run back, and the one writer of a finished run
(``task/`` then ``result.json``, last) with the one builder of its summary. The trainer
(:mod:`vptune.engine.trainer`) and the one-pass linear sweep (:mod:`vptune.engine.features`) both write
their runs through :func:`run_summary` and :func:`write_finished_run`, so a run folder reads the same
whichever path trained it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from vptune.artifact import WEIGHTS
from vptune.engine.checkpoint import CHECKPOINT
from vptune.engine.config import TrainConfig, config_diff, config_to_dict
from vptune.engine.evaluate import brief, host_summary
from vptune.errors import VptuneError
from vptune.io import atomic_write_bytes, atomic_write_json
from vptune.model import TunedModel

logger = logging.getLogger("vptune")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
TASK_DIR = "task"
TB_DIR = "tb"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, RESULT_FILE, CHECKPOINT, TASK_DIR, TB_DIR)


def read_result(out: str | Path) -> dict[str, Any] | None:
    """The ``result.json`` of a run folder, or None when absent or unreadable."""
    path = Path(out) / RESULT_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_run_config(out: str | Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of a run folder as a dict, or None when absent."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VptuneError(f"{path} is corrupt ({e}); pass --overwrite to start the run over") from None
    return data if isinstance(data, dict) else {}


def prepare_output(out: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Decide what an existing run folder means: the stored result (same config, finished), go on
    (new folder, ``resume`` or ``overwrite``), or a refusal naming what differs."""
    if overwrite:
        clear_run(out)
        return None
    old = read_run_config(out)
    if old is None:
        return None
    diff = config_diff(old, config_to_dict(cfg))
    result = read_result(out)
    if not diff and result is not None and (result.get("status") == "done" or not resume):
        return result
    if resume:
        if diff:
            logger.warning("resuming %s with a changed config: %s", out, ", ".join(diff[:8]))
        return None
    if diff:
        raise VptuneError(f"output folder {out} holds a run with a different config ({', '.join(diff[:8])} "
                          "differ); pass --resume to continue it with this config, --overwrite to start "
                          "over, or choose another --output")
    if (out / CHECKPOINT).is_file():
        raise VptuneError(f"output folder {out} holds an unfinished run of this config; pass --resume to "
                          "continue it or --overwrite to start over")
    return None


def clear_run(out: Path) -> None:
    """Delete the files a run writes (and nothing else) from ``out``."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs after ``epoch`` (written before an interruption, never checkpointed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= epoch:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def data_summary(cfg: TrainConfig, n_train: int, n_val: int, n_test: int) -> dict[str, Any]:
    """The ``data`` entry of a run summary: where the data came from and the split sizes."""
    d = cfg.data
    root = str(Path(d.root).resolve()) if d.root else None
    return {"root": root, "format": d.format, "protocol": d.protocol, "train_split": d.train_split,
            "val_split": d.val_split, "test_split": d.test_split, "n_train": n_train, "n_val": n_val,
            "n_test": n_test}


def run_summary(cfg: TrainConfig, model: TunedModel, *, status: str, val: dict | None, test: dict | None,
                epochs: int, steps: int, optimizer: str, lr: float, data: dict[str, Any], device: str,
                precision: str, wall: float, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a run (``result.json``; task.json's ``training`` holds it with brief metrics).
    ``stored_bytes`` is None until :func:`write_finished_run` has written the task."""
    b = cfg.backbone
    weights = str(Path(b.weights).resolve()) if b.weights else None
    return {
        "status": status, "val": val, "test": test, "epochs": epochs, "epochs_planned": cfg.optim.epochs,
        "steps": steps,
        "trainable_parameters": model.num_trainable_parameters(), "stored_bytes": None,
        "backbone_parameters": model.num_backbone_parameters(), "method": model.method_name,
        "options": model.method.option_dict() if options is None else options, "num_classes": model.num_classes,
        "optimizer": optimizer, "lr": lr,
        "backbone": {"name": b.name, "weights": weights, "source": b.source, "input_size": b.input_size,
                     "config": dict(b.config), "sha256": model.backbone.fingerprint()},
        "data": data,
        "seed": cfg.runtime.seed, "device": device, "precision": precision,
        "config": config_to_dict(cfg), "wall_s": round(wall, 3), "host": host_summary(device),
    }


def write_finished_run(out: Path, model: TunedModel, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/task/`` (its task.json holds the summary with brief metrics and the stored size), then
    ``out/result.json`` (last: the completion marker); returns the summary with ``stored_bytes`` set."""
    training = {**summary, "val": brief(summary["val"]), "test": brief(summary["test"])}
    model.save_pretrained(out / TASK_DIR, training=training)  # stored_bytes filled in there
    summary["stored_bytes"] = (out / TASK_DIR / WEIGHTS).stat().st_size
    atomic_write_json(out / RESULT_FILE, summary)
    return summary
