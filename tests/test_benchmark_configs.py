"""The benchmark sweep configs parse, plan the expected runs (dry run included) and the mini-VTAB benchmark
script's flags shrink the plan as documented. Fast: nothing trains, no image is read."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vptune.engine import sweep as S

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
MINI_TASKS = ["caltech101", "dtd10", "cifar10", "mnist", "dsprites_loc", "dsprites_ori", "clevr_count", "clevr_dist"]
NINE = ["linear", "full", "partial-1", "mlp-3", "sidetune", "bias", "adapter", "vpt-shallow", "vpt-deep"]
SGD_LRS = set(S.PAPER_SGD_LRS) | {0.02, 0.005}  # VPT and sidetune: below the paper's grid (see the yaml)
ADAMW_LRS = set(S.PAPER_ADAMW_LRS)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_tasks(root: Path, tasks: list[str] = MINI_TASKS) -> Path:
    """Split lists only (train800 / val200 / train800val200 / test): enough for planning and the cost estimate,
    which read labels and never open an image."""
    for t in tasks:
        d = root / t
        d.mkdir(parents=True, exist_ok=True)
        rows = {s: [f"images/{s}/{i}.jpg {i % 2}" for i in range(n)]
                for s, n in (("train800", 800), ("val200", 200), ("test", 500))}
        rows["train800val200"] = rows["train800"] + rows["val200"]
        for s, lines in rows.items():
            (d / f"{s}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("name, size, epochs, seeds, shape",
                         [("mini_vtab", 112, 3, 2, (2, 1)), ("mini_vtab_224", 224, 20, 3, (3, 2))])
def test_mini_vtab_sweeps_plan(name: str, size: int, epochs: int, seeds: int, shape: tuple[int, int]) -> None:
    spec = S.load_sweep(SWEEPS / f"{name}.yaml")
    assert [t.name for t in spec.tasks] == MINI_TASKS
    assert [m.label for m in spec.methods] == NINE
    assert spec.base["backbone"]["name"] == "vit_tiny_patch16_224"
    assert spec.base["backbone"]["input_size"] == size
    assert spec.base["optim"]["epochs"] == epochs and len(spec.seeds) == seeds >= 2
    assert spec.splits.select == "val200" and spec.splits.test == "test"
    by = {m.label: m for m in spec.methods}
    assert len(by["linear"].grid.lr) * len(by["linear"].grid.wd) == 40  # the paper's grid, one pass
    for label in NINE[1:]:
        g = by[label].grid
        assert (len(g.lr), len(g.wd)) == shape, label
        paper = SGD_LRS if label in ("mlp-3", "sidetune", "vpt-shallow", "vpt-deep") else ADAMW_LRS
        assert set(g.lr) <= paper, (label, g.lr)  # the paper's scale for the method's optimiser
    grid = S.plan_grid(spec)
    per_task = 40 + 8 * shape[0] * shape[1]
    assert len(grid) == 8 * per_task
    assert sum(r.one_pass for r in grid) == 8 * 40  # linear: every head in one pass per task
    assert all(r.config["data"]["test_split"] is None for r in grid)  # grid runs never see test
    assert len({r.folder for r in grid}) == len(grid)
    # the finals: one per (task, method, seed) once a choice exists
    choices = {(t.name, m.label, 1.0): S.GridScore(m.grid.lr[0], m.grid.wd[0], (), 1.0, 50.0)
               for t in spec.tasks for m in spec.methods}
    final = S.plan_final(spec, choices)
    assert len(final) == 8 * 9 * seeds
    assert all(r.config["data"]["train_split"] == "train800val200" for r in final)


def test_mini_vtab_dry_run_counts(tmp_path: Path) -> None:
    spec = S.load_sweep(SWEEPS / "mini_vtab.yaml")
    root = fake_tasks(tmp_path / "data")
    for t in spec.tasks:
        t.root = str(root / t.name)
    spec.output = str(tmp_path / "out")
    logs: list[str] = []
    outcome = S.run_sweep(spec, dry_run=True, log=logs.append)
    est = outcome.estimate
    assert est.runs == 448 + 8 * 9 * 2 and est.done == 0
    assert len(est.work) == 8 * 8 * (2 + 2)  # separate runs: 8 methods x (2 grid + 2 finals) per task
    assert {e for _, e, _ in est.work} == {3}
    assert {n for _, _, n in est.work} == {800, 1000}
    assert "448 grid run(s) + 144 final run(s)" in logs[0]
    assert not (tmp_path / "out").exists()


def test_other_sweeps_parse() -> None:
    for path in sorted(SWEEPS.glob("*.yaml")):
        spec = S.load_sweep(path)
        assert S.plan_grid(spec), path.name


def test_benchmark_flags_shrink_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load_script("mini_vtab")
    weights = tmp_path / "assets" / "weights" / bench.WEIGHTS_NAME
    weights.mkdir(parents=True)
    data = fake_tasks(tmp_path / "data", ["dtd10"])
    args = bench.parse_args(["--assets", str(tmp_path / "assets"), "--data", str(data), "--out", str(tmp_path / "o"),
                             "--tasks", "dtd10", "--methods", "linear,vpt-deep", "--epochs", "1", "--grid", "1x1",
                             "--seeds", "1", "--input-size", "64", "--device", "cpu"])
    spec = bench.load_spec(args)
    assert [t.name for t in spec.tasks] == ["dtd10"] and spec.tasks[0].root == str(data / "dtd10")
    assert [m.label for m in spec.methods] == ["linear", "vpt-deep"]
    assert spec.seeds == [42]
    assert spec.base["optim"]["epochs"] == 1 and spec.base["optim"]["warmup_epochs"] == 0
    assert spec.base["backbone"]["input_size"] == 64 and spec.base["runtime"]["device"] == "cpu"
    assert spec.base["backbone"]["weights"] == str(weights)
    grid = S.plan_grid(spec)
    assert [(r.method, r.lr, r.wd) for r in grid] == [("linear", 50.0, 0.01), ("vpt-deep", 0.02, 0.0001)]
    # warmup keeps the config's fraction (1 of 3) when only --epochs is given
    spec30 = bench.load_spec(bench.parse_args(["--assets", str(tmp_path / "assets"), "--epochs", "30"]))
    assert spec30.base["optim"]["warmup_epochs"] == 10
    with pytest.raises(Exception, match="unknown method"):
        bench.load_spec(bench.parse_args(["--assets", str(tmp_path / "assets"), "--methods", "vpt"]))
    monkeypatch.delenv("VPTUNE_ASSETS", raising=False)
    with pytest.raises(Exception, match="no backbone weights"):
        bench.load_spec(bench.parse_args(["--assets", ""]))
