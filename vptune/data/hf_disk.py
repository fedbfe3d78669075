"""Hugging Face ``datasets`` folders written by ``save_to_disk``, read with pyarrow (``datasets`` itself is
not needed).

Layout (datasets 2.x-5.x)::

    folder/dataset_dict.json            {"splits": ["train", "test"]}      (a DatasetDict; absent for one split)
    folder/<split>/state.json           {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], ...}
    folder/<split>/dataset_info.json    {"features": {"img": {"_type": "Image"},
                                                      "label": {"_type": "ClassLabel", "names": [...]}}}
    folder/<split>/data-*.arrow         Arrow IPC streams; an Image column is struct<bytes, path>

The image column is the first ``Image`` feature; the label column the first ``ClassLabel`` (its names become
the class names), else an integer column named ``label``/``labels``. Labels are read from their column
alone; image bytes stay memory-mapped until an item is decoded.
"""

from __future__ import annotations

import json
import os
from typing import Any

from PIL import Image

from vptune.data.dataset import Source
from vptune.data.readers import Reader
from vptune.data.transforms import decode_image, load_image
from vptune.errors import VptuneError

LABEL_NAMES = ("label", "labels", "fine_label", "coarse_label")


def is_hf_disk_folder(root: str) -> bool:
    """Whether ``root`` looks like a ``save_to_disk`` folder (a DatasetDict or a single Dataset)."""
    return os.path.isfile(os.path.join(root, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(root, "state.json")) and os.path.isfile(os.path.join(root, "dataset_info.json")))


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
    except ImportError:
        raise VptuneError("reading a Hugging Face datasets folder needs pyarrow: pip install pyarrow "
                          "(or datasets)") from None
    return pa


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise VptuneError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise VptuneError(f"{path} must hold a JSON object")
    return data


def _read_column(files: list[str], column: str) -> list[Any]:
    pa = _pyarrow()
    out: list[Any] = []
    for path in files:
        try:
            with pa.memory_map(path) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise VptuneError(f"cannot read Arrow file {path}: {e}") from None
        if column not in table.column_names:
            raise VptuneError(f"{path} has no column {column!r} (columns: {', '.join(table.column_names)})")
        out.extend(table.column(column).to_pylist())
    return out


def _num_rows(path: str) -> int:
    pa = _pyarrow()
    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all().num_rows
    except (OSError, pa.ArrowInvalid) as e:
        raise VptuneError(f"cannot read Arrow file {path}: {e}") from None


class ArrowImageSource(Source):
    """Items of an ``Image`` column of Arrow stream files (memory-mapped once per process)."""

    def __init__(self, files: list[str], column: str) -> None:
        self.files, self.column = list(files), column
        self._rows: list[tuple[int, int]] | None = None
        self._tables: list[Any] = []
        self._n = sum(_num_rows(path) for path in files)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None, "_tables": []}

    def _open(self) -> None:
        pa = _pyarrow()
        self._tables, self._rows = [], []
        for k, path in enumerate(self.files):
            table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
            self._tables.append(table.column(self.column))
            self._rows.extend((k, j) for j in range(table.num_rows))

    def __len__(self) -> int:
        return self._n

    def load(self, i: int) -> Image.Image:
        if self._rows is None:
            self._open()
        k, j = self._rows[i]
        value = self._tables[k][j].as_py()
        if isinstance(value, dict) and value.get("bytes"):
            return decode_image(value["bytes"], self.describe(i))
        if isinstance(value, dict) and value.get("path"):
            return load_image(value["path"])
        raise VptuneError(f"{self.describe(i)} holds no image bytes or path")

    def describe(self, i: int) -> str:
        return f"{self.files[0] if len(self.files) == 1 else os.path.dirname(self.files[0])}[{i}]"


class HfDiskReader(Reader):
    """A ``save_to_disk`` folder: splits from ``dataset_dict.json`` (one folder: split ``train``)."""

    format = "hf-disk"

    def __init__(self, root: str) -> None:
        super().__init__(root)
        if not os.path.isdir(root) or not is_hf_disk_folder(root):
            raise VptuneError(f"{root} is not a Hugging Face datasets folder (no dataset_dict.json or "
                              "state.json + dataset_info.json)")
        _pyarrow()
        dd = os.path.join(root, "dataset_dict.json")
        if os.path.isfile(dd):
            names = _read_json(dd).get("splits") or []
            self._dirs = {str(s): os.path.join(root, str(s)) for s in names}
        else:
            self._dirs = {"train": root}
        self.splits = list(self._dirs)
        first = self._features(self.splits[0]) if self.splits else {}
        self.image_col, self.label_col, names = _columns(first, os.path.join(root, "dataset_info.json"))
        self._labels = {s: self._read_labels(s) for s in self.splits}
        self.num_classes = len(names) if names else max((max(v, default=-1) for v in self._labels.values()),
                                                        default=-1) + 1
        self.class_names = list(names) if names else self._default_names()

    def _features(self, split: str) -> dict[str, Any]:
        return _read_json(os.path.join(self._dirs[split], "dataset_info.json")).get("features") or {}

    def _files(self, split: str) -> list[str]:
        state = _read_json(os.path.join(self._dirs[split], "state.json"))
        files = [os.path.join(self._dirs[split], f["filename"]) for f in state.get("_data_files", [])]
        if not files:
            raise VptuneError(f"{self._dirs[split]}/state.json lists no data files")
        return files

    def _read_labels(self, split: str) -> list[int]:
        values = _read_column(self._files(split), self.label_col)
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            raise VptuneError(f"split {split!r} of {self.root}: column {self.label_col!r} must hold integer "
                              "class labels")
        return values

    def _load(self, split: str) -> tuple[Source, list[int]]:
        return ArrowImageSource(self._files(split), self.image_col), self._labels[split]


def _columns(features: dict[str, Any], where: str) -> tuple[str, str, list[str] | None]:
    """``(image column, label column, class names or None)`` from a ``dataset_info.json`` features dict."""
    image = next((k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "Image"), None)
    if image is None:
        raise VptuneError(f"{where}: no Image feature among {', '.join(features) or 'no features'}; vptune reads "
                          "datasets with an Image column and a ClassLabel column")
    labels = [k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "ClassLabel"]
    if labels:
        label = next((k for k in LABEL_NAMES if k in labels), labels[0])
        return image, label, [str(n) for n in features[label].get("names") or []] or None
    label = next((k for k in LABEL_NAMES if k in features), None)
    if label is None:
        raise VptuneError(f"{where}: no ClassLabel feature and no column named {', '.join(LABEL_NAMES)}")
    return image, label, None
