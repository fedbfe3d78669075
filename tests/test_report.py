"""`vptune report`: exact tables on fake run folders (mean ± std, group means, both overall means, total
params), data formats, task groups, CSV, and valid PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from vptune.engine import report as R

BACKBONE = 1_000_000
# method -> task -> (test top-1 per seed, trainable parameters, data format in the config)
RUNS = {
    "vpt-deep": {"cifar100": ([70.0, 72.0, 74.0], 10_000), "dtd10": ([60.0, 62.0], 5_000), "eurosat": ([90.0], 2_000),
                 "dsprites_loc": ([40.0, 50.0, 60.0], 3_000), "clevr_count": ([30.0, 30.0, 30.0], 4_000)},
    "linear": {"cifar100": ([50.0, 52.0], 1_000), "eurosat": ([81.0], 100), "dsprites_loc": ([20.0], 200)},
    "full": {"cifar100": ([80.0], BACKBONE + 100), "eurosat": ([95.0], BACKBONE + 100)},
}
FORMATS = {"vpt-deep": "vtab", "linear": "tfrecord", "full": "auto"}


def write_result(folder: Path, *, test: float | None, val: float | None = None, trainable: int = 0,
                 fmt: str = "vtab", root: str = "/nonexistent/data/x", method: str = "vpt-deep", seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = {"status": "done", "val": {"top1": val} if val is not None else None,
              "test": {"top1": test} if test is not None else None, "epochs": 100,
              "trainable_parameters": trainable, "stored_bytes": 4 * trainable, "backbone_parameters": BACKBONE,
              "method": method, "wall_s": 1.0,
              "config": {"data": {"root": root, "format": fmt, "fraction": 1.0}, "method": {"name": method},
                         "runtime": {"seed": seed}}}
    (folder / "result.json").write_text(json.dumps(result))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for method, tasks in RUNS.items():
        for task, (values, trainable) in tasks.items():
            for seed, v in enumerate(values):
                write_result(root / task / method / "final" / f"seed{seed}", test=v, trainable=trainable,
                             fmt=FORMATS[method], method=method.split("-")[0], seed=seed)
            # a grid run whose test number must never reach the report
            write_result(root / task / method / "grid" / "lr0.1_wd0", test=99.0, val=99.0, trainable=trainable)
    # a run outside the sweep layout: task and method from its config
    write_result(tmp_path / "misc" / "run1", test=55.0, trainable=700, root="/x/svhn", method="vpt-shallow", seed=5)
    # a data-fraction final run gets its own method label
    write_result(root / "cifar100" / "vpt-deep" / "final" / "seed0_frac0.5", test=65.0, trainable=10_000)
    return tmp_path


def test_task_groups() -> None:
    for name in ("dtd10", "cifar10", "mnist", "caltech101", "cifar100", "oxford_iiit_pet", "svhn"):
        assert R.task_group(name) == "Natural", name
    for name in ("eurosat", "resisc45", "pcam", "patch_camelyon", "diabetic_retinopathy"):
        assert R.task_group(name) == "Specialized", name
    for name in ("dsprites_loc", "dsprites_xy", "clevr_count", "clevr_whatever", "smallnorb_azi", "smallnorb_x",
                 "dmlab", "kitti_dist", "kitti", "kitti_foo"):
        assert R.task_group(name) == "Structured", name
    assert R.task_group("my_own_task") == "Other"


def test_report_numbers_are_exact(runs: Path) -> None:
    records = R.find_runs([runs / "sweep", runs / "misc"])
    assert all(r.test_top1 != 99.0 for r in records)  # grid runs left out
    rep = R.build_report(records)
    assert rep.methods == ["full", "linear", "vpt-shallow", "vpt-deep", "vpt-deep (frac 0.5)"]  # paper order
    assert rep.tasks == ["cifar100", "svhn", "dtd10", "eurosat", "clevr_count", "dsprites_loc"]
    c = rep.cells[("cifar100", "vpt-deep")]
    assert (c.mean, c.std, c.n, c.seeds) == (72.0, 2.0, 3, [0, 1, 2])
    c = rep.cells[("dtd10", "vpt-deep")]
    assert c.mean == 61.0 and c.std == pytest.approx(2 ** 0.5) and c.group == "Natural"
    assert rep.cells[("eurosat", "vpt-deep")].std == 0.0  # one seed
    assert rep.cells[("dsprites_loc", "vpt-deep")].std == pytest.approx(10.0)
    s = rep.summaries["vpt-deep"]
    assert s.group_means == {"Natural": 66.5, "Specialized": 90.0, "Structured": 40.0}
    assert s.mean_tasks == pytest.approx(60.6) and s.mean_groups == pytest.approx(65.5)
    assert s.trainable_per_task == 4_800 and s.stored_bytes_per_task == 19_200
    assert s.total_params == pytest.approx(1.024)  # (1e6 + 24,000) / 1e6
    assert s.formats == ["JPEG folder (VTAB-1k export)"]
    lin = rep.summaries["linear"]
    assert lin.mean_tasks == pytest.approx((51 + 81 + 20) / 3) and lin.total_params == pytest.approx(1.0013)
    assert lin.formats == ["TFDS (TFRecord)"]
    full = rep.summaries["full"]
    assert full.total_params == pytest.approx(2.0002)  # every task stores the backbone: no shared copy
    assert full.formats[0].startswith("unknown")
    assert rep.cells[("svhn", "vpt-shallow")].seeds == [5]
    assert rep.cells[("cifar100", "vpt-deep (frac 0.5)")].mean == 65.0
    assert not rep.all_vtab


def test_markdown_csv_and_plots(runs: Path) -> None:
    _, files = R.write_report([runs / "sweep"], runs / "out")
    md = files["markdown"].read_text()
    assert "| Natural | cifar100 | 80.00 ± 0.00 (1) | 51.00 ± 1.41 (2) | 72.00 ± 2.00 (3) | 65.00 ± 0.00 (1) |" in md
    assert "| **Structured** | group mean | – | 20.00 | 40.00 | – |" in md
    assert "| **All** | Mean of the tasks present (5) | 87.50 | 50.67 | 60.60 | 65.00 |" in md
    assert "| **All** | Mean of the group means (3) | 87.50 | 50.67 | 65.50 | 65.00 |" in md
    assert "| vpt-deep | 5 | 4,800 | 19.2KB | 1.02x | JPEG folder (VTAB-1k export) |" in md
    assert "| full | 2 | 1.00M | 4.00MB | 2.00x |" in md
    with open(files["csv"]) as f:
        rows = {(r["task"], r["method"]): r for r in csv.DictReader(f)}
    r = rows[("dsprites_loc", "vpt-deep")]
    assert (r["group"], r["n_seeds"], r["mean_top1"], r["std_top1"], r["values"]) == \
        ("Structured", "3", "50.0000", "10.0000", "40;50;60")
    with open(files["summary"]) as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    assert summary["vpt-deep"]["mean_group_means"] == "65.5000" and summary["vpt-deep"]["total_params_x"] == "1.0240"
    assert summary["vpt-deep"]["mean_other"] == ""
    for key in ("accuracy_vs_params", "per_task"):
        data = files[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(files[key]) as img:
            img.verify()


def test_all_19_tasks_use_the_19_task_label() -> None:
    from vptune.data import list_vtab_tasks

    records = [R.RunRecord(t, "m", 0, float(i), 10, 40, 1000, "x", "") for i, t in enumerate(list_vtab_tasks())]
    rep = R.build_report(records)
    assert rep.all_vtab and "| **All** | Mean of the 19 tasks | 9.00 |" in R.to_markdown(rep)
    # Natural 0..6 -> 3, Specialized 7..10 -> 8.5, Structured 11..18 -> 14.5
    assert rep.summaries["m"].mean_groups == pytest.approx((3 + 8.5 + 14.5) / 3)


def test_report_cli(runs: Path, capsys: pytest.CaptureFixture) -> None:
    from vptune.cli import main

    assert main(["report", str(runs / "sweep"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# vptune report") and (runs / "sweep/report/report.md").is_file()
    assert not (runs / "sweep/report/per_task.png").exists()
    assert main(["report", str(runs / "nothing")]) == 2
    assert "no such runs folder" in capsys.readouterr().err
    (runs / "empty").mkdir()
    assert main(["report", str(runs / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_methods_follow_the_papers_table_order() -> None:
    labels = ["vpt-deep", "adapter", "mlp-3", "partial-12", "partial-2", "linear", "full", "bias", "sidetune",
              "vpt-shallow", "my-method", "vpt-deep (frac 0.5)", "mlp-1"]
    assert sorted(labels, key=R._method_order) == [
        "full", "linear", "partial-2", "partial-12", "mlp-1", "mlp-3", "sidetune", "bias", "adapter",
        "vpt-shallow", "vpt-deep", "vpt-deep (frac 0.5)", "my-method"]
