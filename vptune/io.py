"""Small file helpers every layer may use: atomic writes, format stamps, and "read a file or raise".

A reader sees either the old or the new file, never half of one: data goes to a temp file in the same
folder, is flushed and fsynced, then renamed over the target (``os.replace`` is atomic on POSIX and
Windows). A missing or corrupt file gets one :class:`~vptune.errors.VptuneError` naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from vptune.errors import VptuneError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old or the new file, never half."""
    path = Path(path)
    if path.is_dir():
        raise VptuneError(f"cannot write {path}: it is a folder")
    if path.parent.exists() and not path.parent.is_dir():
        raise VptuneError(f"cannot write {path}: {path.parent} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_format_stamp(obj: Any, path: Path, fmt: str, version: int, *, what: str,
                       version_label: str) -> None:
    """Refuse a file whose ``format`` is not ``fmt`` (``"<path> is not a vptune <what> ..."``) or whose
    ``format_version`` is newer than ``version`` (``"<path> has <version_label> N; ... upgrade vptune"``)."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise VptuneError(f"{path} is not a vptune {what} (format {fmt!r} expected)")
    if int(obj.get("format_version", 0)) > version:
        raise VptuneError(f"{path} has {version_label} {obj['format_version']}; this vptune reads up to "
                          f"{version}: upgrade vptune")


def read_json(path: Path, *, missing: str, corrupt: str = "is corrupt") -> Any:
    """Parse a JSON file; ``"<missing>"`` when absent, ``"<path> <corrupt>: <why>"`` when unparsable."""
    path = Path(path)
    if not path.is_file():
        raise VptuneError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VptuneError(f"{path} {corrupt}: {e}") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (backbone ``config.json`` and the like)."""
    path = Path(path)
    out = read_json(path, missing=f"{str(path)!r} does not exist", corrupt="cannot be parsed")
    if not isinstance(out, dict):
        raise VptuneError(f"{str(path)!r} must hold a JSON object")
    return out


def read_json_or_none(path: Path) -> Any:
    """A JSON file's contents, or None when it is absent or unreadable (completion markers)."""
    path = Path(path)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_yaml_mapping(path: Path, *, hint: str = "") -> dict[str, Any] | None:
    """A YAML file as a dict ({} for a non-mapping), None when absent; corrupt -> one VptuneError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VptuneError(f"{path} is corrupt ({e}){hint}") from None
    return data if isinstance(data, dict) else {}


def read_safetensors(path: Path, *, missing: str) -> dict[str, Any]:
    """Tensors of a safetensors file (never unpickles); ``missing`` when absent, one error when corrupt."""
    path = Path(path)
    if not path.is_file():
        raise VptuneError(missing)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VptuneError(f"{path} is corrupt or not a safetensors file: {e}") from None
