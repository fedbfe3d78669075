"""Data-parallel training: the per-process sampling contract, and two gloo processes under torchrun that
train a tiny task to the same weights as one process with the same global batch, resume included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import TINY_BACKBONE_YAML, save_tiny_vit, write_split_files
from vptune.engine import distributed as D
from vptune.engine.evaluate import make_loader
from vptune.errors import VptuneError

# 27 training images in global batches of 8: 8, 8, 8, 3 -- the last one splits 2 / 1 over two processes
SPLITS = {"train800": 27, "val200": 13, "test": 11}
RGB = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.float32)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ sampling contract

def test_epoch_permutation_is_the_trainers_loader_order() -> None:
    for n, seed, epoch in ((10, 0, 1), (37, 3, 5)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = make_loader(list(range(n)), n, shuffle=True, generator=gen)
        assert next(iter(loader)).tolist() == D.epoch_permutation(n, seed, epoch).tolist()


@pytest.mark.parametrize("n, bs, world, drop_last", [(27, 8, 2, False), (33, 8, 4, True), (30, 12, 4, False),
                                                      (9, 8, 4, False)])
def test_rank_batches_partition_each_global_batch(n: int, bs: int, world: int, drop_last: bool) -> None:
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    single = [b.tolist() for b in make_loader(list(range(n)), bs, shuffle=True, generator=gen, drop_last=drop_last)]
    per_rank = [D.rank_batches(n, bs, 5, 2, r, world, drop_last) for r in range(world)]
    assert all(len(p) == len(single) for p in per_rank)
    for k, batch in enumerate(single):
        parts = [p[k] for p in per_rank]
        assert all(b.global_size == len(batch) for b in parts)
        real = [i for b in parts for i in b.indices[:b.valid]]
        assert sorted(real) == sorted(batch)  # each global batch split exactly, nothing repeated
        assert all(b.indices[:b.valid] == batch[r::world] for r, b in enumerate(parts))
        assert all(b.valid == len(b.indices) or (b.valid == 0 and len(b.indices) == 1) for b in parts)
    # the strided share of the global permutation, in chunks of bs / world (full batches)
    perm = D.epoch_permutation(n, 5, 2).tolist()
    full = [b for b in per_rank[1] if b.global_size == bs]
    assert [i for b in full for i in b.indices] == perm[1::world][:len(full) * (bs // world)]
    if n == 9:  # the last global batch holds one image: ranks 1..3 get a weight-0 padding image
        assert [b.valid for b in (p[-1] for p in per_rank)] == [1, 0, 0, 0]


def test_launch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in D.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert D.launch_env() is None and not D.launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.launch_env() == (0, 1, 0) and not D.launched()  # one process: the plain trainer
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.launch_env() == (3, 4, 1) and D.launched()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(VptuneError, match="inconsistent"):
        D.launch_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(VptuneError, match="RANK"):
        D.launch_env()
    assert D.resolve_ddp_device("cpu", 3).type == "cpu"


def test_unused_parameter_probe_leaves_no_trace() -> None:
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(48, 2)
            self.unused = torch.nn.Parameter(torch.zeros(2))
            self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(self.drop(x.flatten(1)))

    model, data = Model().train(), [(torch.randn(3, 4, 4), 0)]
    rng = torch.get_rng_state()
    assert D.unused_trainable_parameters(model, data, torch.device("cpu")) == ["unused"]
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    assert all(p.grad is None for p in model.parameters())


def test_a_process_that_joined_a_group_leaves_without_interpreter_teardown(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo frees a finished collective on its worker thread, which aborts the process if that happens while
    the interpreter finalises (SIGABRT after a good run, about 1 launch in 40): the entry point of a process
    that joined a group exits with os._exit and main's status; any other process exits normally."""
    from vptune import cli

    exits: list[int] = []
    monkeypatch.setattr(D.os, "_exit", exits.append)
    with pytest.raises(SystemExit) as plain:
        cli.run([])  # no command: main prints the help and returns 2
    assert plain.value.code == 2 and exits == []
    monkeypatch.setattr(D, "_joined", True)
    with pytest.raises(SystemExit):  # the patched os._exit returns, so run goes on to sys.exit
        cli.run([])
    assert exits == [2]


# ------------------------------------------------------------------------------------------ torchrun end to end

@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A VTAB-style folder of PNGs (3 colour classes), tiny ViT weights (safetensors) and a config."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "colors"
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {}
    for split, n in SPLITS.items():
        for i in range(n):
            rel = f"images/{split}/{i:03d}.png"
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            img = np.clip(RGB[i % 3] + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(data / rel)
            lines.setdefault(split, []).append(f"{rel} {i % 3}")
    write_split_files(data, lines)
    weights = save_tiny_vit(root / "vit_tiny.safetensors")
    config = root / "tiny.yaml"
    config.write_text(
        TINY_BACKBONE_YAML
        + "method:\n  name: vpt-deep\n  options: {num_tokens: 2, dropout: 0.0}\n"
        "data:\n  train_split: train800\n  val_split: val200\n  test_split: test\n  num_workers: 0\n"
        "optim:\n  epochs: 2\n  warmup_epochs: 1\n  batch_size: 8\n  base_lr: 5.0\n  weight_decay: 0.001\n"
        "  optimizer: paper\n  lr_scaling: linear\n"
        "runtime:\n  device: cpu\n  seed: 7\n  progress: false\n  precision: fp32\n")
    return {"data": data, "weights": weights, "config": config}


def train_args(a: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(a["config"]), "--data", str(a["data"]), "--weights", str(a["weights"]),
            "--output", str(out), "--no-progress", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "vptune", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(assets: dict[str, Path], tmp_path: Path) -> None:
    from vptune.cli import main

    # one process, global batch 8 (in this process, one thread)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_args(assets, tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(before)
    one = json.loads((tmp_path / "one/result.json").read_text())

    # two processes, 4 images each per step; interrupted after epoch 1 (max_steps), then resumed
    steps_per_epoch = 4  # 27 images / 8
    first = torchrun(train_args(assets, tmp_path / "two", "--set", f"runtime.max_steps={steps_per_epoch}"))
    stopped = json.loads((tmp_path / "two/result.json").read_text())
    assert stopped["status"] == "stopped" and stopped["epochs"] == 1
    assert "stopped: 1 epochs" in first.stdout  # every process returns rank 0's summary
    second = torchrun(train_args(assets, tmp_path / "two", "--resume"))
    assert second.stderr.count("resumed") == 1  # rank 0 logs; the other process is quiet
    two = json.loads((tmp_path / "two/result.json").read_text())

    assert two["status"] == "done" and two["epochs"] == 2 and two["steps"] == one["steps"] == 8
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 4, "global_batch": 8,
                                  "find_unused_parameters": False}
    assert two["lr"] == one["lr"] == 5.0 * 8 / 256  # the lr rule uses the global batch
    wa, wb = (load_file(str(tmp_path / f"{r}/task/weights.safetensors")) for r in ("one", "two"))
    assert set(wa) == set(wb) and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)
    # metrics of the whole split, summed over the two shards (13 val images: 7 + 6)
    for split in ("val", "test"):
        assert two[split]["n"] == one[split]["n"] == SPLITS["val200" if split == "val" else "test"]
        assert two[split]["confusion"] == one[split]["confusion"] and two[split]["top1"] == one[split]["top1"]
        assert two[split]["loss"] == pytest.approx(one[split]["loss"], abs=1e-5)
    # rank 0 alone wrote the run folder: one metrics line per epoch, kept across the resume
    lines = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for a, b in zip(lines, ref):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5) and a["train_acc"] == b["train_acc"]
        assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"])
    assert (tmp_path / "two/task/task.json").is_file() and (tmp_path / "two/checkpoint.pt").is_file()


@pytest.mark.slow
def test_a_launch_on_a_locked_output_is_refused_on_every_process(assets: dict[str, Path], tmp_path: Path) -> None:
    from vptune.engine.runlock import LOCK_FILE, RunLock

    out = tmp_path / "run"
    with RunLock(out):  # what a running launch (its rank 0) or a one-process run holds on the folder
        proc = torchrun(train_args(assets, out), check=False)
        assert proc.returncode != 0
        # rank 0 takes the lock and fails; rank 1 gets its refusal (the two lines may interleave on stderr)
        assert proc.stderr.count(f"is in use by process {os.getpid()} ") == 2, proc.stderr[-5000:]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing was written
    # a stale lock (its process is gone) is taken over by rank 0 and released when the launch ends
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    out.mkdir(exist_ok=True)  # the holder above created it and removed it on release (it stayed empty)
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(gone.stdout), "hostname": socket.gethostname(),
                                             "started": 0}))
    torchrun(train_args(assets, out, "--set", "runtime.max_steps=1"))
    assert json.loads((out / "result.json").read_text())["steps"] == 1 and not (out / LOCK_FILE).exists()
