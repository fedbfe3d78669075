"""The server's task set, in the manner of multi-adapter servers (LoRAX, S-LoRA, vLLM's per-request
adapters): task folders load on first use -- by folder name from ``task_root``, or from a folder named at
start or over the admin route -- and stay in a bounded least-recently-used set (``max_resident_tasks``
and ``max_resident_mb``), so thousands of task folders can sit on disk behind one backbone.

A resident task's ``task.json``/``weights.safetensors`` are checked for changes (stat: mtime, size,
inode) at most every ``reload_check_s``; a changed task is loaded beside the old one and swapped in
atomically (:meth:`~vptune.multitask.MultiTaskModel.add_model` with ``replace``): a request sees the old
or the new task, never a mix. A folder that changes while it loads is read again; one that fails to
load keeps the old task serving. Every load is checked at the server's boundary
(:func:`~vptune.serving_limits.check_task_meta`, :func:`~vptune.serving_limits.check_task_model`)
before it is served. The store's lock is never held across a load or a forward pass."""

# (no "from __future__ import annotations", as in vptune.serve)

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vptune.artifact import load_task, read_task_json
from vptune.errors import VptuneError
from vptune.multitask import TASK_NAME, MultiTaskModel, TaskEntry
from vptune.serving_limits import ApiError, ServeConfig, check_task_meta, check_task_model, task_bytes

logger = logging.getLogger("vptune.serve")
_FILES = ("task.json", "weights.safetensors")


@dataclass
class _Resident:
    entry: TaskEntry
    source: Path | None  # None: an in-memory task (never evicted nor reloaded)
    signature: Any
    nbytes: int
    checked: float  # time.monotonic() of the last change check
    bad_signature: Any = None  # files that failed to load (not retried until they change again)


def folder_signature(folder: Path) -> Any:
    """What changes when a task folder's files are rewritten (None: no task.json)."""
    sig = []
    for name in _FILES:
        try:
            st = os.stat(folder / name)
        except OSError:
            if name == "task.json":
                return None
            sig.append(None)
            continue
        sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sig)


class TaskStore:
    """Resident tasks of a :class:`~vptune.multitask.MultiTaskModel`, loaded on demand; see the module
    docstring. Tasks already registered on the model are adopted (checked against the limits)."""

    def __init__(self, model: MultiTaskModel, cfg: ServeConfig, metrics: Any = None) -> None:
        self.model, self.cfg, self.metrics = model, cfg, metrics
        self.root = Path(cfg.task_root).resolve() if cfg.task_root else None
        self._lock = threading.Lock()  # guards the dicts below; never held across a load
        self._resident: OrderedDict[str, _Resident] = OrderedDict()
        self._sources: dict[str, Path] = {}  # folders named at start or over the admin route
        self._loading: dict[str, threading.Lock] = {}
        for name, entry in model.tasks.items():
            self._adopt(name, entry)
        self._publish()

    def _adopt(self, name: str, entry: TaskEntry) -> None:
        try:
            if entry.meta:
                check_task_meta(entry.meta, self.cfg, name)
            check_task_model(entry.model, self.cfg, name)
        except ApiError as e:
            raise VptuneError(e.message) from None
        source = None if entry.directory == "<memory>" else Path(entry.directory)
        sig = folder_signature(source) if source else None
        nbytes = task_bytes(entry.model, self.model.backbone)
        self._resident[name] = _Resident(entry, source, sig, nbytes, time.monotonic())
        if source:
            self._sources[name] = source

    # --- lookup ----------------------------------------------------------------------------------------
    def peek(self, name: str) -> TaskEntry | None:
        """The resident task ``name`` if no change check is due (cheap: safe on the event loop)."""
        with self._lock:
            res = self._resident.get(name)
            if res is None or (res.source and time.monotonic() - res.checked >= self.cfg.reload_check_s):
                return None
            self._resident.move_to_end(name)
            return res.entry

    def resolve(self, name: str) -> TaskEntry:
        """The task ``name``: resident (reloaded first if its files changed), else loaded from its
        folder; :class:`ApiError` 404 for a task that is nowhere. Blocking: run it off the event loop."""
        with self._lock:
            res = self._resident.get(name)
            if res is not None:
                self._resident.move_to_end(name)
        if res is not None:
            if res.source and time.monotonic() - res.checked >= self.cfg.reload_check_s:
                self._check_changed(name, res)
            with self._lock:
                current = self._resident.get(name)
            return (current or res).entry
        source = self._source_of(name)
        if source is None:
            raise ApiError(404, f"unknown task {name!r}; {self._where()}")
        return self._load(name, source, replace=False)

    def _where(self) -> str:
        with self._lock:
            resident = ", ".join(sorted(self._resident)[:20]) or "(none)"
        root = f"task folders under {str(self.root)!r} load on first use" if self.root else "no task root"
        return f"resident tasks: {resident}; {root}"

    def _source_of(self, name: str) -> Path | None:
        with self._lock:
            if name in self._sources:
                return self._sources[name]
        if self.root is None or not TASK_NAME.match(name):
            return None
        folder = (self.root / name).resolve()
        if folder.parent != self.root or not (folder / "task.json").is_file():
            return None
        return folder

    def _check_changed(self, name: str, res: _Resident) -> None:
        res.checked = time.monotonic()
        sig = folder_signature(res.source)  # type: ignore[arg-type]
        if sig is None or sig == res.signature or sig == res.bad_signature:
            return  # unchanged, mid-rewrite (task.json gone) or known bad: keep serving the old task
        try:
            self._load(name, res.source, replace=True, stale=res.signature)  # type: ignore[arg-type]
        except ApiError as e:
            res.bad_signature = sig
            logger.warning("task %s changed on disk but cannot be reloaded (still serving the old one): %s",
                           name, e.message)

    # --- loading ---------------------------------------------------------------------------------------
    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(name, threading.Lock())

    def _load(self, name: str, source: Path, *, replace: bool, stale: Any = None) -> TaskEntry:
        """Load ``source`` as ``name`` (one loader per name at a time) and make it resident."""
        with self._name_lock(name):
            with self._lock:
                res = self._resident.get(name)
            if res is not None and (not replace or (stale is not None and res.signature != stale)):
                return res.entry  # another thread loaded (or reloaded) it meanwhile
            model, meta, sig, nbytes = self._read(name, source)
            with self._lock:
                entry = self.model.add_model(name, model, replace=True, directory=str(source), meta=meta)
                self._resident[name] = _Resident(entry, source, sig, nbytes, time.monotonic())
                self._resident.move_to_end(name)
                self._evict_over_limits(keep=name)
            if self.metrics:
                self.metrics.task_loads.labels("reloaded" if res is not None else "loaded").inc()
            self._publish()
            return entry

    def _read(self, name: str, source: Path) -> tuple[Any, dict[str, Any], Any, int]:
        """Build and check the task; read again (up to 3 times) if its files change meanwhile."""
        for _ in range(3):
            sig = folder_signature(source)
            if sig is None:
                raise ApiError(404, f"task {name!r}: {source} holds no task.json")
            try:
                meta = read_task_json(source)
                check_task_meta(meta, self.cfg, name)
                model = load_task(source, self.model.backbone, check_backbone=True)
            except VptuneError as e:
                self._failed()
                raise ApiError(400, str(e)) from None
            except ApiError:
                self._failed()
                raise
            try:
                check_task_model(model, self.cfg, name)
            except ApiError:
                self._failed()
                raise
            nbytes = task_bytes(model, self.model.backbone)
            if nbytes > self.cfg.max_resident_mb * 2**20:
                self._failed()
                raise ApiError(422, f"task {name!r} needs {nbytes / 2**20:.0f} MB, over this server's "
                                    f"resident-task memory limit of {self.cfg.max_resident_mb:g} MB")
            if folder_signature(source) == sig:
                return model, meta, sig, nbytes
        return model, meta, sig, nbytes  # still changing: serve this one; the next check reloads it

    def _failed(self) -> None:
        if self.metrics:
            self.metrics.task_loads.labels("failed").inc()

    def _evict_over_limits(self, keep: str) -> None:
        """Unload least recently used reloadable tasks while over a limit (call under ``_lock``)."""
        limit = self.cfg.max_resident_mb * 2**20
        while len(self._resident) > self.cfg.max_resident_tasks or self._bytes() > limit:
            victim = next((n for n, r in self._resident.items() if r.source and n != keep), None)
            if victim is None:
                return
            del self._resident[victim]
            self.model.remove_task(victim)
            if self.metrics:
                self.metrics.evictions.inc()

    def _bytes(self) -> int:
        return sum(r.nbytes for r in self._resident.values())

    def _publish(self) -> None:
        if self.metrics:
            with self._lock:
                n, b = len(self._resident), self._bytes()
            self.metrics.tasks_loaded.set(n)
            self.metrics.resident_bytes.set(b)

    # --- admin -----------------------------------------------------------------------------------------
    def add(self, name: str, path: str | None, replace: bool) -> TaskEntry:
        """Load the folder ``path`` (relative to the task root; default: ``name``) as ``name``."""
        if self.root is None:
            raise ApiError(403, "loading tasks over HTTP is off: start the server with --task-root DIR")
        if not isinstance(name, str) or not TASK_NAME.match(name):
            raise ApiError(422, f"bad task name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
        folder = (self.root / (path if path is not None else name)).resolve()
        if folder != self.root and self.root not in folder.parents:
            raise ApiError(403, f"task folders must lie under the server's task root {str(self.root)!r}")
        with self._lock:
            exists = name in self._resident
        if exists and not replace:
            raise ApiError(409, f'task {name!r} is already loaded; send "replace": true to swap it')
        entry = self._load(name, folder, replace=True)
        with self._lock:
            self._sources[name] = folder
        return entry

    def reload(self, name: str) -> TaskEntry:
        with self._lock:
            res = self._resident.get(name)
        source = res.source if res is not None else self._source_of(name)
        if source is None:
            raise ApiError(404, f"task {name!r} has no folder to reload from; {self._where()}")
        return self._load(name, source, replace=True)

    def remove(self, name: str) -> None:
        """Unload ``name`` and forget its folder (a folder under the task root loads again on its next
        request). Requests already accepted for it are still answered by it."""
        with self._lock:
            known = self._resident.pop(name, None) is not None
            known = self._sources.pop(name, None) is not None or known
            if name in self.model:
                self.model.remove_task(name)
        if not known:
            raise ApiError(404, f"unknown task {name!r}; {self._where()}")
        self._publish()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            items = sorted(self._resident.items())
        return [{**r.entry.describe(), "memory_bytes": r.nbytes} for _, r in items]

    def __len__(self) -> int:
        return len(self._resident)
