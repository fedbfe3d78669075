"""VTAB-1k splits drawn from datasets that are not image folders: an ``.npz`` (MedMNIST's layout included)
or a Hugging Face ``save_to_disk`` folder. Each drawn image is written as a PNG, so the task folder is a
plain VTAB-1k folder (``train800.txt`` ...) like the ones :func:`vptune.data.vtab.vtab1k_from_class_folder`
writes; the draw is the same deterministic one (:func:`vptune.data.vtab.draw_splits`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vptune.data import DataConfig, open_reader
from vptune.data.hf_disk import is_hf_disk_folder
from vptune.data.vtab import Item, draw_splits, is_complete, write_task
from vptune.errors import VptuneError


def is_array_dataset(src: str) -> bool:
    """Whether ``src`` is an ``.npz`` file or a Hugging Face ``save_to_disk`` folder."""
    return (os.path.isfile(src) and src.endswith(".npz")) or (os.path.isdir(src) and is_hf_disk_folder(src))


def png_writer(source: Any, i: int) -> Callable[[str], None]:
    """A writer saving item ``i`` of ``source`` as a PNG at the destination."""
    def write(dest: str) -> None:
        source.load(i).save(dest, format="PNG")
    return write


def vtab1k_from_dataset(src: str, out: str, seed: int = 0, test_cap: int | None = None,
                        task_name: str | None = None, n_train: int = 800, n_val: int = 200, force: bool = False,
                        progress: bool = True) -> str:
    """Draw VTAB-1k splits from an npz / ``save_to_disk`` dataset and write ``<out>/<task_name>/``.

    train800/val200 come from its ``trainval`` (else ``train``) split and test from its ``test`` split; a
    dataset without a test split is one pool (train, val, then test from the rest)."""
    reader = open_reader(DataConfig(root=src))
    name = task_name or os.path.splitext(os.path.basename(os.path.normpath(src)))[0]
    task_dir = os.path.join(out, name)
    params = {"source": os.path.abspath(src), "seed": seed, "train": n_train, "val": n_val,
              "test_cap": test_cap, "mode": "png"}
    if is_complete(task_dir, params, force):
        return task_dir
    pool_split = next((s for s in ("trainval", "train") if s in reader.splits), None)
    if pool_split is None:
        raise VptuneError(f"{src} has splits {', '.join(reader.splits)}; expected a train (or trainval) split")
    pool, pool_labels = reader.load(pool_split)
    test = reader.load("test") if "test" in reader.splits and pool_split != "test" else None
    idx = draw_splits(len(pool_labels), seed, n_train, n_val, test_cap, None if test is None else len(test[1]))
    splits = {}
    for split, ids in idx.items():
        (source, labels), origin = (test, "test") if split == "test" and test is not None else \
            ((pool, pool_labels), pool_split)
        splits[split] = [Item(f"{origin}_{i:06d}.png", labels[i], png_writer(source, i)) for i in ids]
    return write_task(task_dir, splits, reader.class_names, params, progress)
