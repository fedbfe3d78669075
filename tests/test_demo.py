"""`vptune demo`: a --quick run end to end (outputs, table, task folders, mixed batch, cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vptune.cli import build_parser, main
from vptune.demo import METHODS, shapes
from vptune.demo.pretrain import PretrainRecipe, load_cached


def test_cli_lists_demo() -> None:
    assert "demo" in build_parser().format_help()


def test_tasks_are_deterministic_and_balanced() -> None:
    for task in (shapes.UPSTREAM, *shapes.DOWNSTREAM.values()):
        x1, y1 = task.make(np.random.default_rng(3), 400, 32)
        x2, y2 = task.make(np.random.default_rng(3), 400, 32)
        assert x1.shape == (400, 32, 32, 3) and x1.dtype == np.uint8
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
        counts = np.bincount(y1, minlength=task.num_classes)
        assert len(counts) == task.num_classes and counts.min() > 0, (task.name, counts)
    assert len(shapes.DOWNSTREAM) >= 3


def test_cache_key_follows_the_recipe() -> None:
    a, b = PretrainRecipe(), PretrainRecipe(epochs=13)
    assert a.key() == PretrainRecipe().key() and a.key() != b.key()


def _run(out: Path, cache: Path, capsys: pytest.CaptureFixture) -> tuple[dict, str]:
    rc = main(["demo", "--quick", "--no-assets", "--no-progress", "--out", str(out), "--cache", str(cache)])
    assert rc == 0
    text = capsys.readouterr().out
    return json.loads((out / "results.json").read_text()), text


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    summary, text = _run(out, cache, capsys)

    # outputs
    for name in ("results.json", "results.md", "demo.png"):
        assert (out / name).is_file(), name
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["pretrain"]["cached"] is False
    assert "[1/4]" in text and "[4/4]" in text and "done in" in text

    # the table: 4 methods x >= 3 tasks, with accuracy, parameters and bytes per task
    tasks = [t["name"] for t in summary["tasks"]]
    assert len(tasks) >= 3 and summary["methods"] == list(METHODS)
    got = {(r["task"], r["method"]) for r in summary["results"]}
    assert got == {(t, m) for t in tasks for m in METHODS}
    for r in summary["results"]:
        assert 0.0 <= r["top1"] <= 100.0 and r["trainable_parameters"] > 0 and r["stored_bytes"] > 0
    md = (out / "results.md").read_text()
    for t in tasks:
        assert f"| {t} (" in md
    assert all(m in md for m in METHODS) and "bytes stored per task" in md and "trainable parameters" in md
    by = {(r["task"], r["method"]): r for r in summary["results"]}
    t0 = tasks[0]
    assert by[(t0, "full")]["stored_bytes"] > 10 * by[(t0, "vpt-deep")]["stored_bytes"]
    assert by[(t0, "linear")]["trainable_parameters"] < by[(t0, "vpt-shallow")]["trainable_parameters"] \
        < by[(t0, "vpt-deep")]["trainable_parameters"] < by[(t0, "full")]["trainable_parameters"]

    # task folders load back on the cached backbone and reproduce their test accuracy
    import vptune
    backbone, _ = load_cached(Path(summary["pretrain"]["folder"]))
    x, _ = shapes.DOWNSTREAM[t0].make(np.random.default_rng(0), 8, 32)
    for m in METHODS:
        model = vptune.TunedModel.from_pretrained(out / "tasks" / t0 / m, backbone=backbone)
        assert model.method_name == m
        with torch.inference_mode():
            assert model(shapes.to_tensor(x)).shape == (8, shapes.DOWNSTREAM[t0].num_classes)

    # the mixed batch went through one MultiTaskModel and equals the per-task predictions
    mixed = summary["mixed_batch"]
    assert mixed["matches"] is True and mixed["max_abs_diff"] < 1e-3
    assert len({r["task"] for r in mixed["rows"]}) >= 3
    assert len(mixed["tasks_loaded"]) == 3 * len(tasks)

    # second run: the cache skips pretraining
    summary2, text2 = _run(out, cache, capsys)
    assert summary2["pretrain"]["cached"] is True
    assert "pretraining skipped" in text2
    assert len(summary2["results"]) == len(summary["results"])


@pytest.mark.slow
def test_quick_demo_with_assets(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["demo", "--quick", "--no-progress", "--assets", str(assets), "--out", str(tmp_path / "o"),
               "--cache", str(tmp_path / "c")])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "results.json").read_text())
    assert summary["mode"] == "assets" and len(summary["tasks"]) >= 3
    assert {r["method"] for r in summary["results"]} == set(METHODS)
    assert summary["mixed_batch"]["matches"] is True


def test_bad_threads_is_a_user_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--threads", "0", "--out", os.devnull]) == 2
    assert "threads" in capsys.readouterr().err
