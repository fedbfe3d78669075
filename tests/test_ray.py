"""The ``ray`` sweep backend on a local Ray instance (2 CPUs, no dashboard, 127.0.0.1): the same runs,
layout and selection as the local backend; failed runs retried, then reported (failures.json, an error);
and the GPU-hours line of the cost estimate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.engine import sweep as S
from vptune.engine.config import config_to_dict
from vptune.errors import VptuneError

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
SIZES = {"train800": 24, "val200": 12, "test": 15}


# ------------------------------------------------------------------------------------------ no Ray needed

def test_cost_estimate_has_gpu_hours() -> None:
    est = S.CostEstimate(runs=6, done=1, work=[("vpt-deep", 100, 800)] * 5, feature_images=0, seconds=None)
    line = S.format_compute(est, 0.5, 1.0)
    assert line == ("compute: 2.50 run-hours x 1 GPU(s) per run = 2.50 GPU-hours "
                    "(from --hours-per-run 0.5 x 5 run(s))")
    assert "= 5.00 GPU-hours" in S.format_compute(est, 0.5, 2.0)
    assert "unknown" in S.format_compute(est, None, 1.0) and "--hours-per-run" in S.format_compute(est, None, 1.0)
    est.seconds, est.timed_runs = 7200.0, 3
    assert S.format_compute(est, None, 0.5) == ("compute: 2.00 run-hours x 0.5 GPU(s) per run = 1.00 GPU-hours "
                                                "(from the timing of 3 finished run(s))")
    assert "on CPU, 0 GPU-hours" in S.format_compute(est, None, 0.0)
    assert S.format_compute(S.CostEstimate(1, 1, [], 0, None), 0.5, 1.0) is None
    with pytest.raises(VptuneError, match="hours-per-run"):
        S.format_compute(est, -1.0, 1.0)


def test_ray_backend_is_registered_and_checks_options() -> None:
    assert "ray" in S.BACKENDS and S.backend_factory("ray") is S.BACKENDS["ray"]
    with pytest.raises(VptuneError, match="valid choices: local, ray"):
        S.backend_factory("slurm")
    pytest.importorskip("ray", reason="ray is not installed (pip install 'vptune[ray]')")
    with pytest.raises(VptuneError, match="unknown ray backend option"):
        S.BACKENDS["ray"](S.Env(), print, gpus=1)
    with pytest.raises(VptuneError, match="cpus-per-run"):
        S.BACKENDS["ray"](S.Env(), print, cpus_per_run=0)


# ------------------------------------------------------------------------------------------ fixtures

def make_task(root: Path, name: str = "toy", classes: int = 3) -> Path:
    folder = root / name
    rng = np.random.default_rng(0)
    lists: dict[str, list[str]] = {}
    for split, n in SIZES.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            y = i % classes
            arr = rng.integers(0, 90, (16, 16, 3)) + np.array([80 * y, 200 - 80 * y, 120])[None, None, :] * 0.6
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"images/{split}/{i}.png")
            lists.setdefault(split, []).append(f"images/{split}/{i}.png {y}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raydata")
    make_task(root)
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(**TINY))
    weights = root / "vit.safetensors"
    save_file({k: t.contiguous() for k, t in vit.state_dict().items()}, str(weights))
    return {"data": root, "weights": weights}


def sweep_dict(out: Path, a: dict[str, Path], **extra: Any) -> dict[str, Any]:
    d = {"base": {"backbone": {"name": "vit_tiny_patch16_224", "weights": str(a["weights"]), "config": TINY},
                  "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 8},
                  "runtime": {"device": "cpu", "progress": False, "eval_every": 0},
                  "data": {"num_workers": 0}},
         "output": str(out), "tasks": {"root": str(a["data"]), "names": ["toy"]},
         "methods": [{"name": "vpt-deep", "options": {"num_tokens": 2}}],
         "grid": {"lr": [5.0, 0.25], "wd": [0.0, 0.01]}, "seeds": 1}
    d.update(extra)
    return d


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'vptune[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fake trainers below, on workers
    yield ray
    ray.shutdown()


class FakeTrainer:
    """Stands in for run_training in a worker: fails the first ``fail_first`` attempts of every run (and
    every attempt of runs with lr ``always_fail``), counting attempts in files next to the run folder."""

    def __init__(self, fail_first: int = 0, always_fail: float | None = None) -> None:
        self.fail_first, self.always_fail = fail_first, always_fail

    def __call__(self, cfg: Any, *, resume: bool = False, overwrite: bool = False, backbone: Any = None) -> dict:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        marker = out.parent / f"{out.name}.attempts"
        attempts = int(marker.read_text()) + 1 if marker.is_file() else 1
        marker.write_text(str(attempts))
        if attempts <= self.fail_first or cfg.optim.base_lr == self.always_fail:
            raise RuntimeError(f"boom {attempts} in {out.name}")
        result = {"status": "done", "epochs": cfg.optim.epochs, "config": config_to_dict(cfg), "wall_s": 1.0,
                  "data": {"n_train": 24}, "method": cfg.method.name,
                  "val": {"top1": 50.0 + cfg.optim.base_lr - cfg.optim.weight_decay} if cfg.data.val_split else None,
                  "test": {"top1": 40.0} if cfg.data.test_split else None}
        (out / "result.json").write_text(json.dumps(result))
        return result


# ------------------------------------------------------------------------------------------ on Ray

def relative_results(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("result.json")} | \
           {str(p.relative_to(root)) for p in root.rglob("selection.json")}


@pytest.mark.slow
def test_ray_sweep_selects_like_the_local_backend(ray_local: Any, assets: dict[str, Path], tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = S.run_sweep(S.parse_sweep(sweep_dict(tmp_path / "local", assets)), log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    logs: list[str] = []
    spec = S.parse_sweep(sweep_dict(tmp_path / "ray", assets, backend="ray"))
    out = S.run_sweep(spec, log=logs.append, hours_per_run=0.5, backend_options={"cpus_per_run": 1, "max_retries": 0})
    assert "compute: 2.50 run-hours on CPU, 0 GPU-hours (from --hours-per-run 0.5 x 5 run(s))" in logs[0]
    assert any(m.startswith("ray: 4 job(s) submitted") for m in logs) and sum("done toy/" in m for m in logs) == 5
    assert sorted(out.trained) == sorted(str(tmp_path / "ray" / Path(f).relative_to(tmp_path / "local"))
                                         for f in local.trained) and len(out.trained) == 5
    # same layout, same selection (on the driver), same numbers
    assert relative_results(tmp_path / "ray") == relative_results(tmp_path / "local")
    assert out.choices == {k: S.GridScore(**{**c.__dict__, "folder": c.folder.replace(str(tmp_path / "local"),
                                                                                        str(tmp_path / "ray"))})
                           for k, c in local.choices.items()}
    sel = [json.loads((tmp_path / b / "toy/vpt-deep/selection.json").read_text()) for b in ("local", "ray")]
    assert [g["val_top1"] for g in sel[0]["grid"]] == [g["val_top1"] for g in sel[1]["grid"]]
    assert len({g["val_top1"] for g in sel[0]["grid"]}) > 1  # the grid points differ: a real choice
    tests = [json.loads((tmp_path / b / "toy/vpt-deep/final/seed0/result.json").read_text())["test"] for b in
             ("local", "ray")]
    assert tests[0]["top1"] == tests[1]["top1"] and tests[0]["confusion"] == tests[1]["confusion"]
    assert not (tmp_path / "ray/failures.json").exists() and ray_local.is_initialized()  # caller's Ray stays
    # idempotent: nothing left to train, nothing submitted
    again: list[str] = []
    assert S.run_sweep(spec, log=again.append).trained == [] and not any("submitted" in m for m in again)


@pytest.mark.slow
def test_failed_runs_are_retried_then_reported(ray_local: Any, assets: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # every run fails once: one retry each, and the sweep completes
    spec = S.parse_sweep(sweep_dict(tmp_path / "flaky", assets, backend="ray"))
    env = S.Env(train_fn=FakeTrainer(fail_first=1), backbone="fake")
    out = S.run_sweep(spec, env=env, log=lambda m: None, backend_options={"max_retries": 1})
    assert len(out.trained) == 5 and out.choices[("toy", "vpt-deep", 1.0)].lr == 5.0
    attempts = sorted(int(p.read_text()) for p in (tmp_path / "flaky").rglob("*.attempts"))
    assert attempts == [2] * 5

    # lr 0.25 always fails: after its retry it is reported -- failures.json, the log, an error (exit 2)
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep_dict(tmp_path / "bad", assets, backend="ray")))
    real_env = S.Env
    monkeypatch.setattr(S, "Env", lambda progress=True: real_env(train_fn=FakeTrainer(always_fail=0.25),
                                                                backbone="fake", progress=progress))
    from vptune.cli import main

    assert main(["sweep", str(sweep_file), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "2 sweep job(s) failed after retries" in captured.err and "boom 2" in captured.err
    assert captured.out.count("FAILED toy/vpt-deep/grid/lr0.25_wd") >= 2
    failures = json.loads((tmp_path / "bad/failures.json").read_text())["failures"]
    assert sorted(f["job"] for f in failures) == ["toy/vpt-deep/grid/lr0.25_wd0", "toy/vpt-deep/grid/lr0.25_wd0.01"]
    assert all(f["attempts"] == 2 and f["error"] == "RuntimeError: boom 2 in " + Path(f["folders"][0]).name
               for f in failures)
    assert (tmp_path / "bad/toy/vpt-deep/grid/lr5_wd0/result.json").is_file()  # the others finished
    assert not (tmp_path / "bad/toy/vpt-deep/selection.json").exists()  # no selection on a partial grid
