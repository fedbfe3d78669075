"""Atomic writes survive a writer killed mid-write (SIGKILL, no chance to clean up): the target is always
absent, the old or a new complete file, never a torn one. The writers are subprocesses of
:func:`vptune.io.atomic_write_bytes`; a plain ``open(..., "wb")`` writer killed the same way is shown torn,
so the check can fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZE = 4 << 20  # 4 MiB per write: long enough that a kill lands inside writes
CHILD = r"""
import os, sys, time
from pathlib import Path
from vptune.io import atomic_write_bytes

path, mode, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if mode == "pause":  # stop inside the write: the data is in the temp file, the rename has not happened
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        print("inside", flush=True)
        time.sleep(120)
    os.fsync = fsync
    atomic_write_bytes(path, b"n" * size)
elif mode == "plain":  # the non-atomic writer: half the new content, then stopped
    with open(path, "wb") as f:
        f.write(b"n" * (size // 2))
        f.flush()
        print("inside", flush=True)
        time.sleep(120)
else:  # "loop": rewrite the file again and again, alternating two contents
    print("inside", flush=True)
    i = 0
    while True:
        atomic_write_bytes(path, (b"a" if i % 2 else b"b") * size)
        i += 1
"""


def start(path: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode, str(SIZE)], stdout=subprocess.PIPE,
                            env=env, text=True)


def wait_inside(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()  # blocks until the child is inside its write
    assert line.strip() == "inside", f"writer did not start (exit {proc.poll()})"


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def content_kind(path: Path) -> str:
    """'absent', 'old', 'a', 'b', 'new' (one complete content) or 'torn'."""
    if not path.exists():
        return "absent"
    data = path.read_bytes()
    for kind, byte in (("old", b"o"), ("a", b"a"), ("b", b"b"), ("new", b"n")):
        if data == byte * SIZE:
            return kind
    return "torn"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_writer_killed_mid_write_leaves_the_old_or_a_new_complete_file(tmp_path: Path) -> None:
    paused, plain = tmp_path / "paused.bin", tmp_path / "plain.bin"
    loops = [tmp_path / f"loop{i}.bin" for i in range(4)]
    for path in (paused, plain, *loops[:2]):  # two loop targets start absent, the others hold an old file
        path.write_bytes(b"o" * SIZE)
    procs = {path: start(path, mode) for path, mode in ((paused, "pause"), (plain, "plain"))}
    procs.update({path: start(path, "loop") for path in loops})
    for proc in procs.values():
        wait_inside(proc)
    # killed inside atomic_write_bytes (after the data, before the rename): the old file, untouched
    kill(procs[paused])
    assert content_kind(paused) == "old"
    # the checker sees a torn file: a plain writer killed the same way leaves half the new content
    kill(procs[plain])
    assert content_kind(plain) == "torn"
    # killed at arbitrary points of a rewrite loop: always one complete content
    for i, path in enumerate(loops):
        time.sleep(0.05 + 0.1 * i)
        kill(procs[path])
        assert content_kind(path) in ({"absent", "a", "b"} if i >= 2 else {"old", "a", "b"}), path
