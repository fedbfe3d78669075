"""Run checkpoints: trained tensors, optimiser, schedule, epoch and every RNG state, written atomically.

A checkpoint holds only plain containers and tensors (the RNG states of Python and NumPy are stored as
lists), so it loads with ``torch.load(weights_only=True)``: opening one never runs pickled code.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vptune.artifact import atomic_write_bytes, check_format_stamp
from vptune.errors import VptuneError

FORMAT = "vptune-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"


def capture_rng() -> dict[str, Any]:
    """The state of every random generator a run uses (python, numpy, torch, cuda)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(state), gauss],
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back where :func:`capture_rng` found it."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: str | Path, *, model_state: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    scheduler: dict[str, Any], epoch: int, step: int, scaler: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically (a reader sees the previous one or this one, never half)."""
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "rng": capture_rng(),
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (safe load: tensors and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise VptuneError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- corrupt zip, truncated file, foreign pickle
        raise VptuneError(f"cannot read checkpoint {path}: corrupt, truncated or not a vptune checkpoint "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    check_format_stamp(state, path, FORMAT, FORMAT_VERSION, what="run checkpoint",
                       version_label="checkpoint format")
    return state
