"""What every benchmark result records about where it ran: machine and commit (read-only git)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine_info(device: Any = None) -> dict[str, Any]:
    """CPU model, cores, torch version and threads, load average at the start, and the GPU if used."""
    import torch

    from vptune.engine.evaluate import cpu_has_native_bf16, cpu_model

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "python": platform.python_version()}
    info["cpu_native_bf16"] = cpu_has_native_bf16()  # avx512_bf16 / amx_bf16 in /proc/cpuinfo
    try:
        info["load_avg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(device if device is not None else 0)
    return info


def git_commit() -> str | None:
    """``git rev-parse HEAD`` (+ ``-dirty`` when tracked files differ)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False)
        sha = head.stdout.strip() or None
        return f"{sha}-dirty" if sha and dirty.stdout.strip() else sha
    except (OSError, subprocess.SubprocessError):
        return None


def add_asset_args(parser: Any, data: Path, out: Path) -> None:
    """``--assets`` (default ``$VPTUNE_ASSETS``), ``--data`` and ``--out`` of the mini-VTAB benchmarks."""
    parser.add_argument("--assets", default=os.environ.get("VPTUNE_ASSETS"))
    parser.add_argument("--data", default=str(data))
    parser.add_argument("--out", default=str(out))
