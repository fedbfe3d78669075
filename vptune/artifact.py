"""Task artifacts: a folder with ``task.json`` and ``weights.safetensors`` (peft's save format).

``weights.safetensors`` holds only the trained tensors (prompts and head for VPT: ~4 bytes per trained
parameter); ``task.json`` holds what a deployment needs to rebuild the task on a shared backbone: the
method and its options, classes, preprocessing, and the backbone's identity (architecture, config and
sha256 of its pretrained weights), stamped with the format and library versions. Loading on another
backbone is refused with a message naming both.

Nothing lost, nothing mixed: :func:`save_task` writes the whole folder into a temporary sibling and renames
it into place (a reader sees the old task, the new one, or briefly none -- never a mix), and ``task.json``
records the sha256 of its weights, checked by :func:`load_task` together with every key, type and value
the rebuild needs (a task without its ``preprocessing`` is refused, never run at a default size).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save

from vptune.backbones.base import Backbone, Preprocessing
from vptune.checks import coerce_fields
from vptune.errors import VptuneError
from vptune.io import atomic_write_bytes, atomic_write_json, check_format_stamp
from vptune.methods.base import HEAD_NORMS, parse_method_name
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
    """Write ``task.json`` and ``weights.safetensors`` (trained tensors only) into ``directory``.

    The folder is replaced as a whole: both files are written into a temporary sibling
    (``.<name>.tmp-*``), which is then renamed into place, so a reader (or a kill at any moment) sees the
    old task, the new one, or (between the two renames of a replacement) none -- never a mix. ``task.json``
    also carries the sha256 and size of its weights (checked by :func:`load_task`) and, when ``training``
    has a ``stored_bytes`` key, that size in it: the folder is written once, never patched afterwards. A folder that
    holds other files too is updated file by file instead (each file atomic; the sha256 catches a mix).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise VptuneError(f"cannot save a task to {directory}: it is a file, not a folder")
    state = {k: v.contiguous().cpu() for k, v in model.trained_state_dict().items()}
    payload = save(state, metadata={"format": FORMAT, "method": model.method_name})  # bytes, written once
    if training is not None and "stored_bytes" in training:  # the trainer's summary: filled in here, once
        training = {**training, "stored_bytes": len(payload)}
    meta = task_metadata(model, list(state), training)
    meta["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    meta["weights_bytes"] = len(payload)
    text = (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode()
    if directory.exists() and not _is_pure_task_folder(directory):
        atomic_write_bytes(directory / WEIGHTS, payload)
        atomic_write_bytes(directory / TASK_JSON, text)
        return directory
    _replace_folder(directory, {WEIGHTS: payload, TASK_JSON: text})
    return directory


def _is_pure_task_folder(directory: Path) -> bool:
    """Whether ``directory`` is a folder holding nothing but task files (so it may be replaced whole)."""
    if not directory.is_dir():
        return False
    return all(p.name in (TASK_JSON, WEIGHTS) or p.name.startswith(f".{TASK_JSON}.")
               or p.name.startswith(f".{WEIGHTS}.") for p in directory.iterdir())


def _replace_folder(directory: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh temporary sibling of ``directory`` and rename it into place."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{directory.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.tmp-"))
    old = None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.tmp-"))
            os.replace(directory, old / "old")
        os.replace(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        if old is not None and not directory.exists() and (old / "old").exists():
            os.replace(old / "old", directory)  # put the previous task back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_task_json(directory: str | Path) -> dict[str, Any]:
    """Parse and check ``task.json``; a missing or corrupt file gets one clear VptuneError."""
    path = Path(directory) / TASK_JSON
    if not Path(directory).is_dir():
        raise VptuneError(f"task folder {directory} " + ("is a file, not a folder" if Path(directory).exists()
                                                         else "does not exist"))
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


MAX_INPUT_SIZE = 4096
MAX_CLASSES = 1_000_000
REQUIRED = {"method": str, "num_classes": int, "options": dict, "preprocessing": dict}


def validate_task_meta(meta: dict[str, Any], where: str) -> None:
    """Refuse a ``task.json`` with missing or mistyped keys, a bad class count or bad preprocessing.

    Required: ``method`` (str), ``num_classes`` (int, 1..1e6), ``options`` (mapping) and ``preprocessing``
    (``input_size`` a positive int up to 4096, ``mean``/``std`` three finite numbers, std > 0): a task
    without its preprocessing is refused rather than run at a default size it was not trained at."""
    for key, tp in REQUIRED.items():
        if key not in meta:
            raise VptuneError(f"{where} is incomplete: required key {key!r} is missing")
        value = meta[key]
        if not isinstance(value, tp) or isinstance(value, bool):
            raise VptuneError(f"{where}: {key!r} must be {tp.__name__}, got {value!r}")
    if not 1 <= meta["num_classes"] <= MAX_CLASSES:
        raise VptuneError(f"{where}: num_classes must be in 1..{MAX_CLASSES}, got {meta['num_classes']}")
    names = meta.get("label_names")
    if names is not None and (not isinstance(names, list) or len(names) != meta["num_classes"]):
        raise VptuneError(f"{where}: label_names must be a list of {meta['num_classes']} names or null")
    if not isinstance(meta.get("backbone", {}), dict):
        raise VptuneError(f"{where}: 'backbone' must be a mapping")
    if meta.get("head_norm", "none") not in HEAD_NORMS:
        raise VptuneError(f"{where}: head_norm must be one of {', '.join(HEAD_NORMS)}, got {meta['head_norm']!r}")
    _check_preprocessing(meta["preprocessing"], where)


def _check_preprocessing(prep: dict[str, Any], where: str) -> None:
    size = prep.get("input_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_INPUT_SIZE:
        raise VptuneError(f"{where}: preprocessing.input_size must be an int in 1..{MAX_INPUT_SIZE}, "
                          f"got {size!r}")
    for key in ("mean", "std"):
        v = prep.get(key)
        ok = isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not ok or (key == "std" and min(v) <= 0):
            raise VptuneError(f"{where}: preprocessing.{key} must be 3 finite numbers"
                              f"{' > 0' if key == 'std' else ''}, got {v!r}")
    if not isinstance(prep.get("interpolation", "bilinear"), str):
        raise VptuneError(f"{where}: preprocessing.interpolation must be a string")


def read_weights(directory: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tensors of ``weights.safetensors``: checked against ``meta``'s sha256 (when it records one)
    and refused when any floating tensor holds NaN or infinity."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise VptuneError(f"{directory} is not a complete task folder: {WEIGHTS} is missing")
    data = path.read_bytes()
    want = (meta or {}).get("weights_sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise VptuneError(f"{path} does not match its {TASK_JSON} (sha256 differs): the folder mixes two "
                          "saves or was edited; save the task again")
    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise VptuneError(f"{path} is corrupt or not a safetensors file: {e}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise VptuneError(f"{path}: tensor {name} holds NaN or infinite values; the task is unusable")
    return state


def load_task(directory: str | Path, backbone: Backbone, *, check_backbone: bool = True) -> TunedModel:
    """Rebuild a :class:`~vptune.model.TunedModel` from a task folder on ``backbone``.

    ``task.json`` is validated first (:func:`validate_task_meta`), the method options are converted to
    their declared types, and the weights must match the recorded sha256, names and shapes."""
    meta = read_task_json(directory)
    where = str(Path(directory) / TASK_JSON)
    validate_task_meta(meta, where)
    if check_backbone:
        verify_backbone(meta, backbone, str(directory))
    options = _task_options(meta, where)
    try:
        model = create_model(backbone, meta["method"], meta["num_classes"],
                             label_names=meta.get("label_names"),
                             head_norm=meta.get("head_norm", "none"), **options)
    except (TypeError, ValueError) as e:
        if isinstance(e, VptuneError):
            raise VptuneError(f"{where}: {e}") from None
        raise VptuneError(f"{where}: cannot build method {meta['method']!r} from its options: {e}") from None
    state = read_weights(directory, meta)
    _check_state(state, model.trained_state_dict(), directory)
    model.load_state_dict(state, strict=False)
    model.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    return model


def _task_options(meta: dict[str, Any], where: str) -> dict[str, Any]:
    cls, _ = parse_method_name(meta["method"])
    return coerce_fields(cls.options_cls, meta["options"], f"{where}: options")


def _check_state(state: dict[str, Any], expected: dict[str, Any], directory: str | Path) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VptuneError(f"{directory}/{WEIGHTS} does not match its task.json: missing {missing[:10]}, "
                          f"unexpected {unexpected[:10]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise VptuneError(f"{directory}/{WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(expected[name].shape)}")


register_persistence(save_task, load_task)  # TunedModel.save_pretrained / from_pretrained
