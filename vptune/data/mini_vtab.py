"""mini-VTAB: a CPU-sized VTAB-1k built offline from the real assets and the procedural generators.

Tasks (each with train800 / val200 / train800val200 / test, test capped at 1,000, in the VTAB-1k folder
layout of :mod:`vptune.data.vtab`):

* Natural: ``caltech101`` (102 classes incl. BACKGROUND_Google), ``dtd10`` (10), ``cifar10`` (10; train/val
  from its train folder, test from its test folder), ``mnist`` (10; idx test set, written as PNG).
* Structured: ``dsprites_loc``, ``dsprites_ori`` (one dSprites pool, two labelings, as in VTAB) and
  ``clevr_count``, ``clevr_dist`` (one CLEVR pool, two labelings).

``scale`` shrinks every split (tests use 0.05). Re-running on a complete output skips each finished task.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from tqdm import tqdm

from vptune.data.arrays import IdxReader
from vptune.data.procedural import FAMILIES, PROCEDURAL_TASKS, family_of, generate_pool, task_class_names
from vptune.data.tasks import NATURAL, STRUCTURED
from vptune.data.vtab import (
    Item,
    draw_splits,
    finish_task,
    is_complete,
    read_marker,
    vtab1k_from_class_folder,
    write_task,
)
from vptune.errors import VptuneError

MINI_VTAB_TASKS: dict[str, tuple[int, str]] = {
    "caltech101": (102, NATURAL), "dtd10": (10, NATURAL), "cifar10": (10, NATURAL), "mnist": (10, NATURAL),
    "dsprites_loc": (16, STRUCTURED), "dsprites_ori": (16, STRUCTURED),
    "clevr_count": (8, STRUCTURED), "clevr_dist": (6, STRUCTURED),
}
REAL_SOURCES = {"caltech101": "caltech101", "dtd10": "dtd10", "cifar10": "cifar10"}


def split_sizes(scale: float = 1.0, test_cap: int = 1000) -> tuple[int, int, int]:
    """``(train, val, test_cap)`` at ``scale`` (1.0: 800, 200, 1000)."""
    if not 0.0 < scale <= 1.0:
        raise VptuneError(f"scale must be in (0, 1], got {scale}")
    return max(1, round(800 * scale)), max(1, round(200 * scale)), max(1, round(test_cap * scale))


def procedural_sizes(n: int) -> tuple[int, int, int]:
    """``(train, val, test)`` for ``n`` generated samples: 80/20 of min(1000, n/2), the rest test."""
    trainval = min(1000, n // 2)
    n_train = max(1, round(0.8 * trainval))
    n_val = max(1, trainval - n_train)
    if n - n_train - n_val < 1:
        raise VptuneError(f"need at least 3 samples, got {n}")
    return n_train, n_val, n - n_train - n_val


def _link_pool(src_dir: str, dst_dir: str) -> None:
    """Reuse a rendered pool: hard-link (or copy) its images and copy its params.jsonl."""
    os.makedirs(os.path.join(dst_dir, "images"), exist_ok=True)
    for f in sorted(os.listdir(os.path.join(src_dir, "images"))):
        src, dst = os.path.join(src_dir, "images", f), os.path.join(dst_dir, "images", f)
        if not os.path.exists(dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    shutil.copyfile(os.path.join(src_dir, "params.jsonl"), os.path.join(dst_dir, "params.jsonl"))


def write_procedural_task(task: str, task_dir: str, n_train: int, n_val: int, n_test: int, seed: int = 0,
                          size: int | None = None, workers: int = 2, force: bool = False,
                          reuse_from: str | None = None, progress: bool = True) -> str:
    """Render ``n_train + n_val + n_test`` samples of a procedural task into a VTAB-1k task folder.

    Samples are i.i.d., so splits are consecutive index ranges. ``reuse_from``: a sibling task of the same
    family built with the same samples (its images are linked, not re-rendered).
    """
    family = family_of(task)
    size = size or FAMILIES[family]["size"]
    n = n_train + n_val + n_test
    params = {"task": task, "family": family, "seed": seed, "n": n, "size": size,
              "train": n_train, "val": n_val}
    if is_complete(task_dir, params, force):
        return task_dir
    os.makedirs(task_dir, exist_ok=True)
    sibling = read_marker(reuse_from) if reuse_from else None
    same = {k: v for k, v in params.items() if k != "task"}
    if sibling and {k: v for k, v in sibling["params"].items() if k != "task"} == same:
        _link_pool(reuse_from, task_dir)
        with open(os.path.join(task_dir, "params.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        records = generate_pool(family, task_dir, n, seed, size, workers, progress)
    rows = [f"images/{r['file']} {r['labels'][task]}" for r in records]
    lines = {"train800": rows[:n_train], "val200": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    return finish_task(task_dir, lines, task_class_names(task), params)


def mnist_task(idx_dir: str, task_dir: str, seed: int, n_train: int, n_val: int, test_cap: int,
               force: bool = False, progress: bool = True) -> str:
    """The MNIST idx test set as a VTAB-1k task (only the drawn images are written, as PNG)."""
    params = {"source": os.path.abspath(idx_dir), "seed": seed, "train": n_train, "val": n_val,
              "test_cap": test_cap}
    if is_complete(task_dir, params, force):
        return task_dir
    reader = IdxReader(idx_dir)
    split = "test" if "test" in reader.splits else reader.splits[0]
    source, labels = reader.load(split)

    def writer(i: int):
        return lambda dest: source.load(i).convert("L").save(dest)

    idx = draw_splits(len(labels), seed, n_train, n_val, test_cap)
    splits = {s: [Item(f"{labels[i]}/{i:05d}.png", labels[i], writer(i)) for i in ids] for s, ids in idx.items()}
    return write_task(task_dir, splits, [str(i) for i in range(10)], params, progress)


def find_datasets(assets: str | None) -> str:
    """The ``datasets`` folder of an assets folder (or the folder itself)."""
    if not assets:
        raise VptuneError("no assets folder: pass --assets DIR or set VPTUNE_ASSETS")
    for cand in (os.path.join(assets, "datasets"), assets):
        if all(os.path.isdir(os.path.join(cand, d)) for d in ("caltech101", "dtd10", "cifar10", "mnist")):
            return cand
    raise VptuneError(f"{assets} has no datasets/{{caltech101,dtd10,cifar10,mnist}} folders")


def build_mini_vtab(assets: str | None, out: str, seed: int = 0, scale: float = 1.0,
                    tasks: list[str] | None = None, workers: int = 2, force: bool = False,
                    progress: bool = True) -> dict[str, str]:
    """Build mini-VTAB under ``out``; returns ``{task: folder}``. Finished tasks are skipped."""
    names = list(MINI_VTAB_TASKS) if tasks is None else tasks
    for t in names:
        if t not in MINI_VTAB_TASKS:
            raise VptuneError(f"unknown mini-VTAB task {t!r}; valid tasks: {', '.join(MINI_VTAB_TASKS)}")
    data = find_datasets(assets) if any(t not in PROCEDURAL_TASKS for t in names) else None
    n_train, n_val, cap = split_sizes(scale)
    os.makedirs(out, exist_ok=True)
    done: dict[str, str] = {}
    first_of: dict[str, str] = {}
    for t in tqdm(names, desc="mini-VTAB", unit="task", disable=not progress):
        task_dir = os.path.join(out, t)
        if t in REAL_SOURCES:
            done[t] = vtab1k_from_class_folder(os.path.join(data, REAL_SOURCES[t]), out, seed, cap, t,
                                               n_train, n_val, "copy", force, progress)
        elif t == "mnist":
            done[t] = mnist_task(os.path.join(data, "mnist"), task_dir, seed, n_train, n_val, cap, force, progress)
        else:
            fam = family_of(t)
            done[t] = write_procedural_task(t, task_dir, n_train, n_val, cap, seed, None, workers, force,
                                            first_of.get(fam), progress)
            first_of.setdefault(fam, task_dir)
    _write_index(out, seed, scale)
    return done


def _write_index(out: str, seed: int, scale: float) -> None:
    """``mini_vtab.json``: every task present, its class count, group and split sizes."""
    index = {"seed": seed, "scale": scale, "tasks": {}}
    for t, (k, group) in MINI_VTAB_TASKS.items():
        marker = read_marker(os.path.join(out, t))
        if marker:
            index["tasks"][t] = {"num_classes": k, "group": group, "counts": marker.get("counts", {})}
    with open(os.path.join(out, "mini_vtab.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)


def group_means(scores: dict[str, float]) -> dict[str, float]:
    """Per-group means of task scores and both overall means (of tasks, and of group means)."""
    groups: dict[str, list[float]] = {}
    for t, v in scores.items():
        groups.setdefault(MINI_VTAB_TASKS.get(t, (0, "Other"))[1], []).append(v)
    out = {g: float(np.mean(v)) for g, v in groups.items()}
    out["mean_of_tasks"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    out["mean_of_groups"] = float(np.mean([out[g] for g in groups])) if groups else float("nan")
    return out
