"""Draw VTAB-1k splits (train800 / val200 / train800val200 / test) and write them as a task folder.

Output layout (what most VTAB-1k code reads)::

    <out>/<task>/train800.txt         lines "images/train/<class>/<file> <label>", relative to <task>/
    <out>/<task>/val200.txt
    <out>/<task>/train800val200.txt   train800 then val200
    <out>/<task>/test.txt
    <out>/<task>/classes.json         {"num_classes": K, "class_names": [...]}  (+ labels.txt, one a line)
    <out>/<task>/images/{train,val,test}/...
    <out>/<task>/.vptune-task.json    written last: the build parameters (a complete task is skipped)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vptune.data.readers import ClassFolderReader
from vptune.errors import VptuneError

MARKER = ".vptune-task.json"
LINK_MODES = ("copy", "symlink", "hardlink")


@dataclass
class Item:
    """One image to place in a task folder: ``write(dest_path)`` puts it there; ``rel`` names it."""

    rel: str  # path under images/<split>/
    label: int
    write: Callable[[str], None]


def draw_splits(n_pool: int, seed: int, n_train: int = 800, n_val: int = 200, test_cap: int | None = None,
                n_test_pool: int | None = None) -> dict[str, list[int]]:
    """Deterministic VTAB-1k split indices from ``seed``.

    One pool: a permutation gives train (first ``n_train``), val (next ``n_val``) and test (the rest, capped).
    With ``n_test_pool`` (a separate test set), train/val come from the pool and test from the test set.
    """
    if n_train < 1 or n_val < 0:
        raise VptuneError(f"bad split sizes: train {n_train}, val {n_val}")
    need = n_train + n_val + (0 if n_test_pool is not None else 1)
    if n_pool < need:
        raise VptuneError(f"{n_pool} images are too few for train {n_train} + val {n_val}"
                          + (" + a test set" if n_test_pool is None else ""))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_pool)
    out = {"train800": [int(i) for i in perm[:n_train]], "val200": [int(i) for i in perm[n_train:n_train + n_val]]}
    if n_test_pool is None:
        test = perm[n_train + n_val:]
    else:
        if n_test_pool < 1:
            raise VptuneError("the test set is empty")
        test = rng.permutation(n_test_pool)
    if test_cap is not None and test_cap > 0:
        test = test[:test_cap]
    out["test"] = [int(i) for i in test]
    return out


def read_marker(task_dir: str) -> dict | None:
    """The build parameters of a complete task folder, or None."""
    path = os.path.join(task_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_complete(task_dir: str, params: dict, force: bool = False) -> bool:
    """True when ``task_dir`` was already built with ``params``; an error if built with other ones."""
    done = read_marker(task_dir)
    if done is None or force:
        return False
    if done.get("params") != params:
        raise VptuneError(f"{task_dir} was built with other settings ({done.get('params')}); "
                          "use another output folder or --force to rebuild it")
    return True


def write_task(task_dir: str, splits: dict[str, Sequence[Item]], class_names: Sequence[str], params: dict,
               progress: bool = True) -> str:
    """Place every item's image and write the split files, classes files and (last) the marker."""
    os.makedirs(task_dir, exist_ok=True)
    marker = os.path.join(task_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    folder = {"train800": "train", "val200": "val", "test": "test"}
    lines: dict[str, list[str]] = {}
    total = sum(len(v) for v in splits.values())
    bar = _progress(total, os.path.basename(task_dir), progress)
    for split, items in splits.items():
        rows = []
        for it in items:
            rel = f"images/{folder.get(split, split)}/{it.rel}"
            dest = os.path.join(task_dir, rel)
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                it.write(dest)
            rows.append(f"{rel} {it.label}")
            bar.update(1)
        lines[split] = rows
    bar.close()
    return finish_task(task_dir, lines, class_names, params)


def finish_task(task_dir: str, lines: dict[str, list[str]], class_names: Sequence[str], params: dict) -> str:
    """Write the split files (``train800val200`` = train800 + val200), classes files and the marker."""
    lines = dict(lines)
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        _write_text(os.path.join(task_dir, f"{split}.txt"), "".join(r + "\n" for r in rows))
    write_classes(task_dir, class_names)
    counts = {s: len(r) for s, r in lines.items()}
    _write_text(os.path.join(task_dir, MARKER), json.dumps({"params": params, "counts": counts}, indent=1))
    return task_dir


def write_classes(task_dir: str, class_names: Sequence[str]) -> None:
    """``classes.json`` and ``labels.txt`` (one class name a line, label order)."""
    names = [str(n) for n in class_names]
    _write_text(os.path.join(task_dir, "classes.json"),
                json.dumps({"num_classes": len(names), "class_names": names}, indent=1))
    _write_text(os.path.join(task_dir, "labels.txt"), "".join(n + "\n" for n in names))


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def file_writer(src: str, mode: str = "copy") -> Callable[[str], None]:
    """A writer placing ``src`` at the destination by copy, symlink or hardlink."""
    src = os.path.abspath(src)

    def write(dest: str) -> None:
        if mode == "symlink":
            os.symlink(src, dest)
        elif mode == "hardlink":
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        else:
            shutil.copyfile(src, dest)

    return write


def class_folder_pools(src: str) -> tuple[list[str], list[tuple[str, str, int]], list[tuple[str, str, int]] | None]:
    """``(class_names, trainval_pool, test_pool)`` of a class folder; items ``(path, rel, label)``.

    With split folders (``train/``, ``test/`` ...) train/val are drawn from ``train`` (or ``trainval``)
    and test from ``test``; otherwise everything is one pool.
    """
    reader = ClassFolderReader(src)

    def pool(split: str) -> list[tuple[str, str, int]]:
        base = src if split == "all" else os.path.join(src, split)
        source, labels = reader.load(split)
        return [(p, os.path.relpath(p, base).replace(os.sep, "/"), y) for p, y in zip(source.paths, labels)]

    if reader.splits == ["all"]:
        return reader.class_names, pool("all"), None
    tv = next((s for s in ("trainval", "train") if s in reader.splits), None)
    if tv is None or "test" not in reader.splits:
        raise VptuneError(f"{src} has split folders {reader.splits} but no train/ and test/ pair")
    return reader.class_names, pool(tv), pool("test")


def vtab1k_from_class_folder(src: str, out: str, seed: int = 0, test_cap: int | None = None,
                             task_name: str | None = None, n_train: int = 800, n_val: int = 200,
                             mode: str = "copy", force: bool = False, progress: bool = True) -> str:
    """Draw VTAB-1k splits from a class folder and write ``<out>/<task_name>/``; returns that folder.

    Deterministic from ``seed``. A folder already built with the same settings is left as it is.
    """
    if mode not in LINK_MODES:
        raise VptuneError(f"unknown image mode {mode!r}; valid choices: {', '.join(LINK_MODES)}")
    if not os.path.isdir(src):
        raise VptuneError(f"class folder not found: {src}")
    name = task_name or os.path.basename(os.path.normpath(src))
    task_dir = os.path.join(out, name)
    params = {"source": os.path.abspath(src), "seed": seed, "train": n_train, "val": n_val,
              "test_cap": test_cap, "mode": mode}
    if is_complete(task_dir, params, force):
        return task_dir
    names, pool, test_pool = class_folder_pools(src)
    idx = draw_splits(len(pool), seed, n_train, n_val, test_cap, None if test_pool is None else len(test_pool))
    splits = {}
    for split, ids in idx.items():
        items = test_pool if (split == "test" and test_pool is not None) else pool
        splits[split] = [Item(items[i][1], items[i][2], file_writer(items[i][0], mode)) for i in ids]
    return write_task(task_dir, splits, names, params, progress)
