"""Runs that are interrupted, killed or started twice (issue 15, item 3): one writer per run folder, Ctrl-C
stops at a step boundary with a checkpoint the resumed run continues exactly from, and SIGKILL at any
moment leaves only files that load (or none)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.engine import run_training
from vptune.engine.checkpoint import load_checkpoint
from vptune.engine.config import config_from_dict
from vptune.engine.runlock import LOCK_FILE, RunLock
from vptune.engine.trainer import Trainer
from vptune.errors import VptuneError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
COLORS = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])


class NoisyColors(torch.utils.data.Dataset):
    """4 colour classes; every item adds fresh noise from the global torch RNG (like a random augmentation),
    so a resumed run matches only if the RNG state of the step boundary is restored too."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % 4 for i in range(n)]
        self.x = COLORS[self.labels][:, :, None, None] * 0.5 + 0.3 * torch.randn(n, 3, 32, 32, generator=g)
        self.num_classes = 4

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(3, 32, 32), self.labels[i]


def splits() -> dict:
    return {"train": NoisyColors(48, 1), "val": NoisyColors(16, 2), "test": NoisyColors(16, 3)}


def backbone() -> VisionTransformer:
    torch.manual_seed(123)
    return VisionTransformer(ViTConfig(**TINY))


def cfg(out: Path, epochs: int = 4):
    return config_from_dict({
        "method": {"name": "vpt-deep", "options": {"num_tokens": 2, "dropout": 0.1}},
        "optim": {"epochs": epochs, "warmup_epochs": 1, "batch_size": 16, "base_lr": 2.5, "optimizer": "paper",
                  "lr_scaling": "linear"},  # the paper's SGD recipe (AdamW at 2.5 would diverge)
        "data": {"num_workers": 0, "val_split": "val200"}, "runtime": {"progress": False, "precision": "fp32"},
        "output": str(out)})


# ------------------------------------------------------------------------------------------ the lock

def test_a_second_run_on_a_held_folder_is_refused_naming_the_owner(tmp_path):
    with RunLock(tmp_path / "run"):
        owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["hostname"] == socket.gethostname()
        with pytest.raises(VptuneError, match=f"in use by process {os.getpid()} on "):
            run_training(cfg(tmp_path / "run"), datasets=splits(), backbone=backbone())
    assert not (tmp_path / "run").exists()  # released; the folder it created (empty) is gone again


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "hostname": socket.gethostname(),
                                                          "started": time.time()}))
    summary = run_training(cfg(tmp_path / "run", epochs=1), datasets=splits(), backbone=backbone())
    assert summary["status"] == "done" and not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"pid": 1, "hostname": "elsewhere", "started": 0}))
    with pytest.raises(VptuneError, match=r"on elsewhere .*delete .*\.vptune\.lock"):
        RunLock(tmp_path / "run").acquire()


def test_two_cli_trainings_on_one_output_cannot_both_write(tmp_path):
    """The reported race: the second `vptune train` on a folder in use exits 2 with one line."""
    args = ["train", "--method", "linear", "--output", str(tmp_path / "run"), "--data", str(tmp_path)]
    with RunLock(tmp_path / "run"):
        proc = subprocess.run([sys.executable, "-m", "vptune", *args], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    started = proc.stderr.split("(started ")[1].split(")")[0]
    assert proc.stderr.strip().splitlines() == [(
        f"vptune: error: output folder {tmp_path / 'run'} is in use by process {os.getpid()} on "
        f"{socket.gethostname()} (started {started}); wait for it to finish, stop it, or choose another --output")]


# ------------------------------------------------------------------------------------------ Ctrl-C

def interrupt_at(monkeypatch, step: int) -> None:
    """Send this process SIGINT right after training step ``step`` (the handler only sets a flag)."""
    original = Trainer.train_step

    def train_step(self, *a, **k):
        out = original(self, *a, **k)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_sigint_mid_epoch_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    full = run_training(cfg(tmp_path / "a"), datasets=splits(), backbone=backbone())
    interrupt_at(monkeypatch, 5)  # 3 steps per epoch: two steps into epoch 2
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at epoch 2, step 5: .*--resume"):
        run_training(cfg(tmp_path / "b"), datasets=splits(), backbone=backbone())
    ck = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert (ck["epoch"], ck["step"], ck["extra"]["epoch_step"]) == (1, 5, 2)
    assert not (tmp_path / "b" / LOCK_FILE).exists()
    monkeypatch.undo()
    resumed = run_training(cfg(tmp_path / "b"), resume=True, datasets=splits(), backbone=backbone())
    assert resumed["status"] == "done" and resumed["steps"] == full["steps"] == 12
    a, b = load_file(tmp_path / "a/task/weights.safetensors"), load_file(tmp_path / "b/task/weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in la] == pytest.approx([r["train_loss"] for r in lb], rel=0, abs=1e-9)
    assert resumed["test"]["top1"] == full["test"]["top1"]


def test_sigint_through_the_cli_exits_130_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from tests.helpers import TINY_BACKBONE_YAML, save_tiny_vit
    from tests.test_cli_train import write_png
    from vptune.cli import main

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(8):
            write_png(tmp_path / "data" / c / f"{i}.png", ord(c) - 97, rng)
    (tmp_path / "c.yaml").write_text(TINY_BACKBONE_YAML + "method:\n  name: linear\ndata:\n  train_split: all\n"
                                     "  test_split: null\n  num_workers: 0\noptim:\n  epochs: 3\n  batch_size: 4\n")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")
    args = ["train", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path / "data"), "--weights",
            str(weights), "--output", str(tmp_path / "run"), "--no-progress"]
    interrupt_at(monkeypatch, 2)
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vptune: interrupted at epoch 1, step 2: checkpoint written to ")
    assert err[-1].endswith("(vptune train ... --resume)") and "Traceback" not in "".join(err)
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 12


# ------------------------------------------------------------------------------------------ SIGKILL

CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.test_edges_run import backbone, cfg, splits
from vptune.engine import run_training
from pathlib import Path
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # torch imports dynamo lazily here: not timed
out = Path({out!r})
print("ready", flush=True)
for i in range(1000):
    t0 = time.monotonic()
    run_training(cfg(out, epochs=3), overwrite=(i % 3 != 2), resume=(i % 3 == 2), datasets=splits(),
                 backbone=backbone())
    print(f"done {{time.monotonic() - t0:.3f}}", flush=True)
    time.sleep(0.5)  # a finished task sits in the folder while the process is still alive
"""


def check_run_folder(out: Path, bb: VisionTransformer) -> dict[str, bool]:
    """Every artifact in ``out`` is complete (loads), or absent. Returns which were present."""
    from vptune.artifact import load_task

    present = {}
    ck = out / "checkpoint.pt"
    present["checkpoint"] = ck.is_file()
    if ck.is_file():
        assert load_checkpoint(ck)["epoch"] in (0, 1, 2, 3)
    present["task"] = (out / "task").exists()
    if present["task"]:
        model = load_task(out / "task", bb)
        assert model.num_classes == 4
    present["result"] = (out / "result.json").is_file()
    if present["result"]:
        assert json.loads((out / "result.json").read_text())["status"] == "done"
    return present


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_half_written_task_or_checkpoint(tmp_path):
    """Every other kill lands at a random moment inside a run (checkpoints being written, tasks being
    saved); the others land just after a run finished (a complete task present). The run's duration is
    measured on this machine first, so the random kills cover a whole run however fast the CPU is."""
    out, bb = tmp_path / "run", backbone()
    rng = np.random.default_rng(15)
    seen: dict[str, int] = {"checkpoint": 0, "task": 0, "result": 0}
    budget = time.monotonic() + 90
    kills, run_s = 0, None
    while kills < 14 and time.monotonic() < budget:
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), out=str(out))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        if run_s is None or kills % 2:  # wait for a finished run, kill while it sits there
            line = child.stdout.readline().split()
            assert line and line[0] == "done", child.stderr.read()
            run_s = run_s or float(line[1])
        else:  # anywhere in the first run or just past it
            time.sleep(float(rng.uniform(0.0, 1.2 * run_s)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, child.stderr.read()  # it was still working when killed
        kills += 1
        for key, there in check_run_folder(out, bb).items():
            seen[key] += there
    assert kills >= 8
    assert seen["checkpoint"] and seen["task"]  # the kills did land while those files existed
    # what is left resumes (the stale lock of the killed process is taken over) to a loadable task
    summary = run_training(cfg(out, epochs=3), resume=True, datasets=splits(), backbone=bb)
    assert summary["status"] == "done" and all(check_run_folder(out, bb).values())
