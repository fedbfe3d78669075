"""vptune's data layer: lazy readers, per-protocol transforms, VTAB-1k splits and procedural tasks.

Entry point for training code::

    ds = open_split(DataConfig(root="vtab-1k/dtd"), "train800", backbone.preprocessing, train=True)
    x, y = ds[0]          # float tensor (3, S, S), int label

Every reader is lazy: images are decoded per item (in DataLoader workers), never a split at once.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from vptune.backbones.base import Preprocessing
from vptune.data.arrays import IdxReader, NpzReader
from vptune.data.dataset import ImageDataset, scan_unreadable
from vptune.data.hf_disk import HfDiskReader, is_hf_disk_folder
from vptune.data.readers import (
    FORMATS,
    ClassFolderReader,
    FgvcReader,
    Reader,
    TFRecordReader,
    VtabReader,
    is_image,
)
from vptune.data.tasks import VTAB_SPLITS, list_vtab_tasks, task_info
from vptune.data.transforms import build_transform, load_image
from vptune.errors import VptuneError, check_choice

__all__ = [
    "FORMATS",
    "VTAB_SPLITS",
    "DataConfig",
    "ImageDataset",
    "build_transform",
    "detect_format",
    "list_vtab_tasks",
    "load_image",
    "open_reader",
    "open_split",
    "task_info",
]


@dataclass
class DataConfig:
    """Where a dataset lives and how to read it (see :func:`open_split`)."""

    root: str  # dataset folder (VTAB task folder, class folder, FGVC folder, TFRecord dir, idx/npz file...)
    format: str = "auto"  # "auto" | "vtab" | "class-folder" | "fgvc" | "tfrecord" | "idx" | "npz" | "hf-disk"
    protocol: str = "vtab"  # transform protocol: "vtab" | "fgvc"
    input_size: int | None = None  # None: the backbone's preprocessing.input_size
    num_workers: int = 2
    skip_corrupt: bool = False  # scan once, drop unreadable images (with a warning) instead of failing
    fraction: float = 1.0  # keep this fraction of training splits (stratified, deterministic from seed)
    image_dir: str | None = None  # FGVC: folder the json paths are relative to (default: auto)
    tfrecord_image_key: str = "image"
    tfrecord_label_key: str = "label"
    tfrecord_label_divisor: float = 1.0  # VTAB dSprites: 2 (x position), 2.5 (orientation)
    tfrecord_split_specs: dict[str, str] = field(default_factory=dict)  # e.g. {"val200": "train[45000:45200]"}
    num_classes: int = 0  # 0: from the data; set to force a class count (TFRecord without metadata)


def detect_format(root: str) -> str:
    """Name the format of ``root`` or raise :class:`VptuneError` saying what was looked for."""
    if not os.path.exists(root):
        raise VptuneError(f"dataset not found: {root}")
    if os.path.isfile(root):
        name = os.path.basename(root)
        if name.endswith(".npz"):
            return "npz"
        if "idx" in name and "ubyte" in name:
            return "idx"
        raise VptuneError(f"cannot tell the format of file {root}; give a folder, an .npz or an idx file")
    names = os.listdir(root)
    if is_hf_disk_folder(root):
        return "hf-disk"
    if any(n[:-4] in VTAB_SPLITS for n in names if n.endswith(".txt")):
        return "vtab"
    if any(n in ("train.json", "val.json", "test.json") for n in names):
        return "fgvc"
    if any(".tfrecord" in n for n in names):
        return "tfrecord"
    if any("idx" in n and "ubyte" in n for n in names):
        return "idx"
    if any(n.endswith(".npz") for n in names):
        return "npz"
    if any(os.path.isdir(os.path.join(root, n)) and not n.startswith(".") for n in names):
        return "class-folder"
    raise VptuneError(
        f"cannot tell the dataset format of {root}: found no VTAB split files (train800.txt ...), FGVC json "
        "(train.json ...), TFRecord files, idx or npz files, a Hugging Face save_to_disk folder "
        "(dataset_dict.json), or class sub-folders")


def open_reader(cfg: DataConfig) -> Reader:
    """The :class:`Reader` for ``cfg.root`` (format detected when ``cfg.format == "auto"``)."""
    check_choice("data format", cfg.format, FORMATS)
    fmt = detect_format(cfg.root) if cfg.format == "auto" else cfg.format
    if fmt == "vtab":
        reader: Reader = VtabReader(cfg.root)
    elif fmt == "class-folder":
        reader = ClassFolderReader(cfg.root)
    elif fmt == "fgvc":
        reader = FgvcReader(cfg.root, cfg.image_dir)
    elif fmt == "tfrecord":
        reader = TFRecordReader(cfg.root, cfg.tfrecord_image_key, cfg.tfrecord_label_key, cfg.num_classes,
                                cfg.tfrecord_label_divisor, cfg.tfrecord_split_specs)
    elif fmt == "idx":
        reader = IdxReader(cfg.root)
    elif fmt == "hf-disk":
        reader = HfDiskReader(cfg.root)
    else:
        reader = NpzReader(cfg.root)
    if cfg.num_classes and fmt != "tfrecord":
        reader.num_classes = int(cfg.num_classes)
        reader.class_names = [str(i) for i in range(reader.num_classes)]
    return reader


def stratified_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Indices keeping ``fraction`` of each class (at least one per class present), deterministic."""
    if not 0.0 < fraction <= 1.0:
        raise VptuneError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep: list[int] = []
    for y in sorted(by_class):
        idx = np.asarray(by_class[y])
        n = max(1, math.floor(fraction * len(idx) + 0.5))
        keep.extend(int(i) for i in rng.permutation(idx)[:n])
    return sorted(keep)


def _fgvc_fraction_split(reader: Reader, split: str, fraction: float) -> str | None:
    """``train_{pct}`` when an FGVC folder ships that file for ``fraction``."""
    if reader.format != "fgvc" or split != "train" or fraction >= 1.0:
        return None
    pct = fraction * 100
    names = [f"train_{round(pct)}"] if abs(pct - round(pct)) < 1e-9 else []
    names.append(f"train_{pct:g}")
    return next((n for n in names if n in reader.splits), None)


def _check_labels(labels: list[int], num_classes: int, where: str) -> None:
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise VptuneError(f"{len(bad)} label(s) out of range 0..{num_classes - 1} in {where} "
                          f"(e.g. {sorted(set(bad))[:5]}); fix the split file or the class count")


def open_split(cfg: DataConfig, split: str, preprocessing: Preprocessing, train: bool,
               seed: int = 0) -> ImageDataset:
    """Open one split of a dataset as a lazy :class:`ImageDataset` with the protocol's transform.

    ``train`` picks the training transform (FGVC: random crop + flip). ``cfg.fraction`` < 1 keeps a
    stratified fraction of training splits (names starting with ``train``), chosen from ``seed``.
    """
    reader = open_reader(cfg)
    real_split = _fgvc_fraction_split(reader, split, cfg.fraction) or split
    source, labels = reader.load(real_split)
    where = f"split {split!r} of {cfg.root}"
    _check_labels(labels, reader.num_classes, where)
    indices = list(range(len(labels)))
    if cfg.fraction < 1.0 and split.startswith("train") and real_split == split:
        indices = stratified_subset(labels, cfg.fraction, seed)
    if cfg.skip_corrupt:
        bad = scan_unreadable(source, indices, workers=max(1, cfg.num_workers))
        if bad:
            names = "; ".join(msg for _, msg in bad[:3])
            warnings.warn(f"skipping {len(bad)} unreadable image(s) in {where}: {names}", stacklevel=2)
            drop = {i for i, _ in bad}
            indices = [i for i in indices if i not in drop]
    if not indices:
        raise VptuneError(f"{where} has no images")
    transform = build_transform(preprocessing, cfg.protocol, train, cfg.input_size)
    return ImageDataset(source, labels, reader.num_classes, reader.class_names, transform, indices,
                        cfg.skip_corrupt, name=f"{cfg.root}:{split}")


def is_image_file(name: str) -> bool:
    """Whether ``name`` has an image extension vptune reads."""
    return is_image(name)
