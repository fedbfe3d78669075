"""Smoke test of benchmarks/speed.py: one round on a tiny ViT, output JSON schema (not the numbers)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
TINY = "img_size=32,patch_size=8,embed_dim=32,depth=2,num_heads=2"


def _load():
    spec = importlib.util.spec_from_file_location("vptune_bench_speed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_speed_script_smoke(tmp_path: Path) -> None:
    speed = _load()
    out = tmp_path / "speed_{device}.json"
    argv = ["--backbones", "vit_tiny_patch16_224", "--vit-override", TINY, "--input-size", "32",
            "--batch-size", "2", "--num-classes", "3", "--num-tokens", "2", "--steps", "1", "--warmup", "0",
            "--methods", "linear,full,vpt-deep", "--memory", "off", "--ablation",
            "--ablation-skip", "compile", "--out", str(out), "--quiet"]
    report = speed.main(argv)
    path = tmp_path / "speed_cpu.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert path.with_suffix(".md").read_text().startswith("Batch 2, 32px, cpu fp32")

    assert {"command", "machine", "date", "commit", "config", "results", "ablation"} <= set(report)
    assert {"cpu", "cores", "torch", "threads"} <= set(report["machine"])
    assert report["command"].startswith("python benchmarks/speed.py")
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"linear", "full", "vpt-deep"}
    for r in rows.values():
        assert {"backbone", "method", "trainable_params", "train_ips", "train_ratio_vs_full", "infer_ips",
                "memory_ratio_vs_full"} <= set(r)
        assert r["train_ips"] > 0 and r["infer_ips"] > 0
    assert rows["full"]["train_ratio_vs_full"] == 1.0
    assert rows["linear"]["trainable_params"] == 32 * 3 + 3
    items = {a["item"] for a in report["ablation"]}
    assert {"a", "b", "c", "e", "g"} <= items and "d" not in items
    for a in report["ablation"]:
        assert {"backbone", "name", "workload", "metric", "baseline", "optimised", "baseline_value",
                "optimised_value", "ratio"} <= set(a)
        assert a["ratio"] is not None and a["ratio"] > 0

    # the per-configuration memory probe that the subprocesses run (here in-process, to stay fast)
    args = speed.parse_args(argv)
    mem = speed.measure_single(speed.Job("vit_tiny_patch16_224", "vpt-deep"), args)
    assert {"memory_source", "baseline_mb", "peak_mb", "delta_mb", "step_s"} <= set(mem)
    assert mem["peak_mb"] >= mem["delta_mb"] and len(mem["step_s"]) == args.memory_steps
    assert dataclasses.asdict(speed.Job("x", "y"))["attention"] == "sdpa"
