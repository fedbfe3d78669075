"""One writer per run folder: a lock file naming its owner, and a clean stop on Ctrl-C.

:class:`RunLock` creates ``<output>/.vptune.lock`` (JSON: pid, hostname, start time) atomically -- the
content is written to a temporary file first and hard-linked into place, so the lock never exists half
written. A second run on the same folder gets a :class:`~vptune.errors.VptuneError` naming the owner; a
lock whose owner is gone (same host, pid not alive) is stale and taken over. A lock from another host cannot
be checked and is refused with the command to remove it.

:class:`StopOnInterrupt` turns the first SIGINT into a request that the training loop honours at the next
step boundary (:class:`TrainingInterrupted`, a :class:`KeyboardInterrupt`, is raised once the checkpoint
is written); a second SIGINT interrupts at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from vptune.errors import VptuneError

if TYPE_CHECKING:
    from typing_extensions import Self

LOCK_FILE = ".vptune.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """``with RunLock(folder): ...``: hold ``folder/.vptune.lock`` for the duration of a run."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False
        self.created = False

    def acquire(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise VptuneError(f"output {self.folder} is a file, not a folder; choose another --output")
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            if self._create(info):
                self.held = True
                return
            owner = self.owner()
            if owner is not None and not self._stale(owner):
                raise VptuneError(self._held_message(owner))
            self.path.unlink(missing_ok=True)  # stale (or unreadable): take it over
        raise VptuneError(f"cannot take the run lock {self.path}: another process keeps creating it")

    def _create(self, info: dict[str, Any]) -> bool:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f"{LOCK_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            os.link(tmp, self.path)  # atomic, fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def owner(self) -> dict[str, Any] | None:
        """The lock's content, or None when it is absent or unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _stale(owner: dict[str, Any]) -> bool:
        if owner.get("hostname") != socket.gethostname():
            return False
        try:
            return not pid_alive(int(owner.get("pid", -1)))
        except (TypeError, ValueError):
            return True

    def _held_message(self, owner: dict[str, Any]) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
        who = f"process {owner.get('pid')} on {owner.get('hostname')} (started {started})"
        if owner.get("hostname") != socket.gethostname():
            return (f"output folder {self.folder} is in use by {who}; another host's process cannot be "
                    f"checked from here: if it is gone, delete {self.path}")
        return (f"output folder {self.folder} is in use by {who}; wait for it to finish, stop it, or "
                "choose another --output")

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner is not None and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
            if self.created and not any(self.folder.iterdir()):
                self.folder.rmdir()  # a run that failed before writing anything leaves no empty folder

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the trainer after a SIGINT, once the step finished and a checkpoint is written."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopOnInterrupt:
    """While active (main thread only), the first SIGINT sets :attr:`requested`; a second one raises
    :class:`KeyboardInterrupt` at once. The previous handler is restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._active = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._previous)
            self._active = False
