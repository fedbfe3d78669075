"""Procedural structured tasks (dSprites / CLEVR style) and the mini-VTAB build."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vptune.backbones.base import Preprocessing
from vptune.cli import main
from vptune.data import DataConfig, open_split
from vptune.data.mini_vtab import MINI_VTAB_TASKS, build_mini_vtab, split_sizes
from vptune.data.procedural import (
    CLEVR_DIST_THRESHOLDS,
    DSPRITES_MARGIN,
    clevr_depths,
    clevr_labels,
    dsprites_labels,
    make_sample,
    read_params,
    render_clevr,
    render_clevr_buffers,
    render_dsprites,
)

PRE = Preprocessing(input_size=32)


def _split_rows(task_dir, split):
    with open(os.path.join(task_dir, f"{split}.txt")) as f:
        return [ln.split() for ln in f if ln.strip()]


@pytest.fixture(scope="module")
def dsprites_task(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    assert main(["data", "generate", "dsprites_loc", "--out", str(out), "--n", "300", "--seed", "7",
                 "--workers", "1"]) == 0
    return str(out / "dsprites_loc")


def test_dsprites_labels_recomputed_from_params_and_pixels(dsprites_task):
    records = read_params(dsprites_task)
    assert len(records) == 300
    rows = {r[0]: int(r[1]) for s in ("train800", "val200", "test") for r in _split_rows(dsprites_task, s)}
    assert len(rows) == 300 and len(_split_rows(dsprites_task, "train800")) == 120
    span = 1 - 2 * DSPRITES_MARGIN
    for rec in records:
        p = rec["params"]
        assert rows[f"images/{rec['file']}"] == p["x_position"] // 2 == dsprites_labels(p)["dsprites_loc"]
        assert dsprites_labels(p)["dsprites_ori"] == int(p["orientation"] // 2.5) < 16
        a = np.asarray(Image.open(os.path.join(dsprites_task, "images", rec["file"])))
        assert a.shape == (64, 64) and set(np.unique(a)) <= {0, 255}
        assert np.array_equal(a, np.asarray(render_dsprites(p)))  # parameters reproduce the pixels
        cx = (np.nonzero(a)[1].mean() + 0.5) / 64  # centroid of the white shape, image units
        x_index = round((cx - DSPRITES_MARGIN) / span * 31)
        assert x_index == p["x_position"] and x_index // 2 == rows[f"images/{rec['file']}"]
    labels = [r["labels"]["dsprites_loc"] for r in records]
    assert min(labels) == 0 and max(labels) == 15
    ds = open_split(DataConfig(root=dsprites_task), "train800", PRE, train=True)
    assert ds.num_classes == 16 and ds[0][0].shape == (3, 32, 32)


def test_dsprites_orientation_bins_cover_16_classes():
    bins = {dsprites_labels({"x_position": 0, "orientation": o})["dsprites_ori"] for o in range(40)}
    assert bins == set(range(16))
    assert [dsprites_labels({"x_position": x, "orientation": 0})["dsprites_loc"] for x in (0, 1, 2, 31)] == [0, 0, 1, 15]


def test_clevr_labels_recomputed_and_objects_visible():
    for i in range(6):
        p, img = make_sample("clevr", 11, i)
        n = len(p["objects"])
        assert 3 <= n <= 10 and clevr_labels(p)["clevr_count"] == n - 3
        d = min(clevr_depths(p))
        lab = clevr_labels(p)["clevr_dist"]
        assert CLEVR_DIST_THRESHOLDS[lab] < d <= CLEVR_DIST_THRESHOLDS[lab + 1]
        assert img.size == (96, 64) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(render_clevr(p, 96)))  # deterministic from params
        _, ids = render_clevr_buffers(p, 192, 128)
        seen = [int((ids == k).sum()) for k in range(n)]
        assert len(set(np.unique(ids)) - {-1}) == n and min(seen) >= 4 * 12  # every object is visible


def test_clevr_closest_object_depth_matches_pixels():
    """The object whose depth is smallest is the one drawn lowest in the image (nearest the camera)."""
    p, _ = make_sample("clevr", 3, 0)
    _, ids = render_clevr_buffers(p, 192, 128)
    bottom = {k: np.nonzero(ids == k)[0].max() for k in range(len(p["objects"]))}
    depths = clevr_depths(p)
    assert int(np.argmin(depths)) == max(bottom, key=lambda k: (bottom[k], -depths[k]))


def test_mini_vtab_from_assets(tmp_path):
    assets = os.environ.get("VPTUNE_ASSETS")
    if not assets:
        pytest.skip("VPTUNE_ASSETS is not set (point it at the shared assets folder to build mini-VTAB)")
    out = str(tmp_path / "mini")
    done = build_mini_vtab(assets, out, seed=0, scale=0.02, workers=1, progress=False)
    n_train, n_val, cap = split_sizes(0.02)
    assert set(done) == set(MINI_VTAB_TASKS) and (n_train, n_val, cap) == (16, 4, 20)
    for task, (k, _group) in MINI_VTAB_TASKS.items():
        rows = {s: _split_rows(done[task], s) for s in ("train800", "val200", "train800val200", "test")}
        assert [len(rows[s]) for s in ("train800", "val200", "train800val200", "test")] == [16, 4, 20, 20]
        files = {s: {os.path.realpath(os.path.join(done[task], p)) for p, _ in r} for s, r in rows.items()}
        assert not files["train800"] & files["val200"] and not files["train800val200"] & files["test"]
        assert all(0 <= int(y) < k for r in rows.values() for _, y in r)
        ds = open_split(DataConfig(root=done[task]), "test", PRE, train=False)
        assert ds.num_classes == k and ds[0][0].shape == (3, 32, 32)
    assert main(["data", "mini-vtab", "--assets", assets, "--out", out, "--scale", "0.02"]) == 0  # skips
    clevr = read_params(done["clevr_dist"])
    assert [r["labels"]["clevr_dist"] for r in clevr] == [clevr_labels(r["params"])["clevr_dist"] for r in clevr]


def test_mini_vtab_needs_assets(tmp_path, monkeypatch):
    monkeypatch.delenv("VPTUNE_ASSETS", raising=False)
    assert main(["data", "mini-vtab", "--out", str(tmp_path), "--assets", ""]) == 2
    assert main(["data", "mini-vtab", "--out", str(tmp_path), "--assets", str(tmp_path)]) == 2
