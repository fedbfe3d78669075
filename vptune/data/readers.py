"""Dataset readers: each turns a folder (or file) into named splits of ``(Source, labels)``.

Formats: ``vtab`` (``<task>/{train800,val200,train800val200,test}.txt``), ``class-folder`` (``<class>/<img>``,
optionally under split folders such as ``train/`` and ``test/``), ``fgvc`` (``{train,val,test}.json``),
``tfrecord`` (TFDS-prepared ``<name>-<split>.tfrecord-XXXXX-of-YYYYY`` files), ``idx`` (MNIST-style) and
``npz`` (image arrays, MedMNIST's layout included; both in :mod:`vptune.data.arrays`); ``hf-disk`` (Hugging Face ``save_to_disk`` folders) lives
in :mod:`vptune.data.hf_disk`. Labels are read without decoding a single image.
"""

from __future__ import annotations

import json
import os
import re
from typing import ClassVar

import numpy as np

from vptune.data.dataset import FileSource, Source, TFRecordSource
from vptune.data.tasks import VTAB_SPLITS, VTAB_TASKS, canonical_task
from vptune.data.tfrecord import DERIVED_LABELS, PIXEL_SCALE, parse_example, read_record, scan_records
from vptune.errors import VptuneError

FORMATS = ("auto", "vtab", "class-folder", "fgvc", "tfrecord", "idx", "npz", "hf-disk")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
TFRECORD_RE = re.compile(r"^(?P<name>.+)-(?P<split>[^-]+)\.tfrecord(?:-(?P<shard>\d+)-of-\d+)?$")
SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test", "trainval")


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


class Reader:
    """Splits of one dataset. Subclasses fill ``splits``, ``num_classes``, ``class_names``, ``_load``."""

    format = ""

    def __init__(self, root: str) -> None:
        self.root = str(root)
        self.splits: list[str] = []
        self.num_classes = 0
        self.class_names: list[str] = []

    def load(self, split: str) -> tuple[Source, list[int]]:
        """``(source, labels)`` of ``split``; :class:`VptuneError` listing the splits if unknown."""
        if split not in self.splits:
            raise VptuneError(f"unknown split {split!r} for {self.format} data at {self.root}; "
                              f"available splits: {', '.join(self.splits) or 'none'}")
        return self._load(split)

    def _load(self, split: str) -> tuple[Source, list[int]]:
        raise NotImplementedError

    def _default_names(self) -> list[str]:
        return [str(i) for i in range(self.num_classes)]


# ------------------------------------------------------------------------------------------------------
# class folders
# ------------------------------------------------------------------------------------------------------


def _images_under(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f) and not f.startswith("."))
    return out


def scan_class_folder(root: str) -> dict[str, list[str]]:
    """``{class_name: [image paths]}`` of a ``<class>/<image>`` folder; empty classes are an error."""
    if not os.path.isdir(root):
        raise VptuneError(f"class folder not found: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise VptuneError(f"no class folders in {root} (expected <class>/<image> sub-folders)")
    out = {c: _images_under(os.path.join(root, c)) for c in classes}
    empty = [c for c, files in out.items() if not files]
    if empty:
        raise VptuneError(f"{len(empty)} empty class folder(s) in {root} (no images): {', '.join(empty[:10])}")
    return out


def _has_split_folders(root: str) -> bool:
    subs = [d for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")]
    return bool(subs) and all(d.name.lower() in SPLIT_FOLDERS for d in subs) and all(
        any(e.is_dir() for e in os.scandir(d.path)) for d in subs)


class ClassFolderReader(Reader):
    """``<class>/<image>`` (split ``all``), or ``<split>/<class>/<image>`` with one class list over splits."""

    format = "class-folder"

    def __init__(self, root: str) -> None:
        super().__init__(root)
        if not os.path.isdir(root):
            raise VptuneError(f"dataset folder not found: {root}")
        if _has_split_folders(root):
            self._files = {d: scan_class_folder(os.path.join(root, d))
                           for d in sorted(e.name for e in os.scandir(root) if e.is_dir())}
        else:
            self._files = {"all": scan_class_folder(root)}
        self.splits = list(self._files)
        self.class_names = sorted({c for per in self._files.values() for c in per})
        self.num_classes = len(self.class_names)

    def _load(self, split: str) -> tuple[Source, list[int]]:
        index = {c: i for i, c in enumerate(self.class_names)}
        paths, labels = [], []
        for c, files in self._files[split].items():
            paths.extend(files)
            labels.extend([index[c]] * len(files))
        return FileSource(paths), labels


# ------------------------------------------------------------------------------------------------------
# VTAB-1k folders
# ------------------------------------------------------------------------------------------------------


def read_split_file(path: str) -> list[tuple[str, int]]:
    """Lines ``relative/path label`` -> ``[(path, label)]``; :class:`VptuneError` naming file:line if bad."""
    if not os.path.isfile(path):
        raise VptuneError(f"split file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise VptuneError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
            out.append((parts[0], int(parts[1])))
    return out


def read_classes_file(folder: str) -> list[str] | None:
    """Class names from ``classes.json`` (a list, or ``{"class_names": [...]}``) or ``labels.txt``."""
    cj = os.path.join(folder, "classes.json")
    if os.path.isfile(cj):
        with open(cj, encoding="utf-8") as f:
            data = json.load(f)
        names = data.get("class_names") if isinstance(data, dict) else data
        if not isinstance(names, list):
            raise VptuneError(f"{cj}: expected a list of class names or {{'class_names': [...]}}")
        return [str(n) for n in names]
    lt = os.path.join(folder, "labels.txt")
    if os.path.isfile(lt):
        with open(lt, encoding="utf-8") as f:
            return [ln.rstrip("\n") for ln in f if ln.strip()]
    return None


class VtabReader(Reader):
    """A VTAB-1k task folder. Classes: the 19-task table by folder name, else a classes file, else max+1."""

    format = "vtab"
    EXTRA_IGNORED: ClassVar[set[str]] = {"labels.txt", "classes.txt", "readme.txt"}

    def __init__(self, root: str) -> None:
        super().__init__(root)
        if not os.path.isdir(root):
            raise VptuneError(f"VTAB task folder not found: {root}")
        txt = sorted(f[:-4] for f in os.listdir(root) if f.endswith(".txt") and f.lower() not in self.EXTRA_IGNORED)
        self.splits = [s for s in VTAB_SPLITS if s in txt] + [s for s in txt if s not in VTAB_SPLITS]
        if not self.splits:
            raise VptuneError(f"no split files in {root}; expected {', '.join(s + '.txt' for s in VTAB_SPLITS)}")
        self.task = canonical_task(os.path.basename(os.path.normpath(root)))
        names = read_classes_file(root)
        if self.task is not None:
            self.num_classes = VTAB_TASKS[self.task][0]
            self.class_names = names if names and len(names) == self.num_classes else self._default_names()
        elif names is not None:
            self.num_classes, self.class_names = len(names), names
        else:
            top = max((y for s in self.splits for _, y in read_split_file(self._file(s))), default=-1)
            self.num_classes = top + 1
            self.class_names = self._default_names()

    def _file(self, split: str) -> str:
        return os.path.join(self.root, split + ".txt")

    def _load(self, split: str) -> tuple[Source, list[int]]:
        rows = read_split_file(self._file(split))
        paths = [os.path.join(self.root, p) for p, _ in rows]
        return FileSource(paths), [y for _, y in rows]


# ------------------------------------------------------------------------------------------------------
# FGVC json splits
# ------------------------------------------------------------------------------------------------------


class FgvcReader(Reader):
    """``{train,val,test}.json`` (+ ``train_{pct}.json``) mapping ``relative_path -> class_id``.

    One label mapping over *every* split file (sorted class ids -> 0..K-1). The reference code remaps each
    split on its own, which shifts labels whenever a split lacks a class; this one never does.

    A folder with ``train.json`` but no ``val.json`` (a public train/test release) gets the paper's 90/10
    split (REFERENCE.md: "the public train sets are split 90/10 into train/val"): ``val`` is 10% of each
    class of ``train.json`` (at least one image of a class with two or more), drawn with a fixed seed, so it
    is the same on every machine; ``train`` is the other 90% and ``trainval`` the whole file.
    """

    VAL_FRACTION = 0.1
    VAL_SEED = 0

    format = "fgvc"
    SPLIT_RE = re.compile(r"^(train|val|test)(_[\w.]+)?\.json$")

    def __init__(self, root: str, image_dir: str | None = None) -> None:
        super().__init__(root)
        if not os.path.isdir(root):
            raise VptuneError(f"FGVC dataset folder not found: {root}")
        files = sorted(f for f in os.listdir(root) if self.SPLIT_RE.match(f))
        order = {"train": 0, "val": 1, "test": 2}
        self.splits = sorted((f[:-5] for f in files), key=lambda s: (order.get(s, 3), s))
        if not self.splits:
            raise VptuneError(f"no FGVC split files in {root}; expected train.json, val.json, test.json")
        self._anno = {s: self._read(os.path.join(root, s + ".json")) for s in self.splits}
        self.derived_val = "val" not in self._anno and "train" in self._anno
        if self.derived_val:
            self._split_train()
        ids = {v for a in self._anno.values() for v in a.values()}
        self._ids = sorted(ids, key=lambda v: (0, int(v), "") if re.fullmatch(r"-?\d+", v) else (1, 0, v))
        self._map = {v: i for i, v in enumerate(self._ids)}
        self.num_classes = len(self._ids)
        self.class_names = list(self._ids)
        self.image_dir = self._find_image_dir(image_dir)

    def _split_train(self) -> None:
        """``train.json`` -> ``train`` (90%), ``val`` (10% of each class) and ``trainval`` (all of it)."""
        full = self._anno["train"]
        by_class: dict[str, list[str]] = {}
        for path, cid in full.items():
            by_class.setdefault(cid, []).append(path)
        rng = np.random.default_rng(self.VAL_SEED)
        val: set[str] = set()
        for cid in sorted(by_class):
            paths = sorted(by_class[cid])
            n = round(self.VAL_FRACTION * len(paths)) or (1 if len(paths) > 1 else 0)
            val.update(paths[i] for i in rng.permutation(len(paths))[:n])
        self._anno["train"] = {p: c for p, c in full.items() if p not in val}
        self._anno["val"] = {p: c for p, c in full.items() if p in val}
        self._anno["trainval"] = full
        self.splits = ["train", "val", *(s for s in self.splits if s != "train"), "trainval"]

    @staticmethod
    def _read(path: str) -> dict[str, str]:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise VptuneError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise VptuneError(f"{path}: expected a JSON object {{relative_path: class_id}}")
        return {str(k): str(v) for k, v in data.items()}

    def _find_image_dir(self, image_dir: str | None) -> str:
        if image_dir:
            base = image_dir if os.path.isabs(image_dir) else os.path.join(self.root, image_dir)
            if not os.path.isdir(base):
                raise VptuneError(f"FGVC image folder not found: {base}")
            return base
        first = next((k for a in self._anno.values() for k in a), None)
        candidates = [os.path.join(self.root, d) for d in ("images", "Images", "")]
        for base in candidates:
            if first is None or os.path.exists(os.path.join(base, first)):
                return base
        raise VptuneError(f"cannot find FGVC image {first!r} under {self.root} (tried images/, Images/ "
                          "and the folder itself); set DataConfig.image_dir")

    def _load(self, split: str) -> tuple[Source, list[int]]:
        anno = self._anno[split]
        paths = [os.path.join(self.image_dir, k) for k in anno]
        return FileSource(paths), [self._map[v] for v in anno.values()]


# ------------------------------------------------------------------------------------------------------
# TFDS TFRecord folders
# ------------------------------------------------------------------------------------------------------


def _find_num_classes(obj: object, key: str) -> int | None:
    """Search a TFDS ``features.json`` / ``dataset_info.json`` for the class count of feature ``key``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, dict):
                found = _find_num_classes(v, "numClasses") or _find_num_classes(v, "num_classes")
                if found:
                    return found
            if k in ("numClasses", "num_classes") and not isinstance(v, (dict, list)):
                return int(v)
            found = _find_num_classes(v, key) if isinstance(v, (dict, list)) and k != key else None
            if found:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_num_classes(v, key)
            if found:
                return found
    return None


def _parse_spec(spec: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """``"train[:800]+validation[:200]"`` -> ``[(split, start, stop)]`` (ints or percentages)."""
    out = []
    for part in spec.split("+"):
        m = re.fullmatch(r"\s*([\w.]+)\s*(?:\[\s*([-\d.]*%?)\s*:\s*([-\d.]*%?)\s*\])?\s*", part)
        if not m or m[1] not in sizes:
            raise VptuneError(f"bad TFRecord split {part!r}; available splits: {', '.join(sizes)}")
        n = sizes[m[1]]
        out.append((m[1], _bound(m[2] or "", 0, n), _bound(m[3] or "", n, n)))
    return out


def _bound(s: str, default: int, n: int) -> int:
    """A slice bound (``"800"``, ``"-200"``, ``"90%"`` or empty) clipped to ``0..n``."""
    if not s:
        return default
    v = round(float(s[:-1]) * n / 100) if s.endswith("%") else int(s)
    return max(0, min(n, v if v >= 0 else n + v))


class TFRecordReader(Reader):
    """TFDS-prepared TFRecord shards read straight from disk (no TensorFlow).

    Splits: the TFDS ones found (``train``, ``validation``, ``test`` ...), any slice spec such as
    ``train[:800]`` or ``train[:800]+validation[:200]``, and the VTAB-1k names mapped by ``split_specs``
    (default: ``train800 = train[:800]``, ``val200 = validation[:200]`` or ``train[800:1000]``).
    Labels: integer feature ``label_key``, floor-divided by ``label_divisor``; or a label VTAB derives from
    TFDS fields (:data:`~vptune.data.tfrecord.DERIVED_LABELS`): ``label_key`` ``clevr/count_all``,
    ``clevr/closest_object_distance``, ``dsprites/label_x_position``, ``dsprites/label_orientation``, or the
    VTAB task names ``clevr_count`` ... -- chosen automatically for a folder named after one of those tasks
    when ``label_key`` is the default ``label``.
    """

    format = "tfrecord"

    def __init__(self, root: str, image_key: str = "image", label_key: str = "label", num_classes: int = 0,
                 label_divisor: float = 1.0, split_specs: dict[str, str] | None = None) -> None:
        super().__init__(root)
        if not os.path.isdir(root):
            raise VptuneError(f"TFRecord folder not found: {root}")
        folder = os.path.basename(os.path.normpath(root)).lower().replace("-", "_")
        if label_key == "label" and folder in DERIVED_LABELS:
            label_key = folder  # e.g. a folder "clevr_count" holding TFDS clevr shards
        self.image_key, self.label_key, self.label_divisor = image_key, label_key, float(label_divisor)
        self.derived = DERIVED_LABELS.get(label_key)
        self.pixel_scale = PIXEL_SCALE.get(label_key, 1)  # dSprites: 0/1 pixels x 255, as VTAB does
        if self.derived is not None and not num_classes:
            num_classes = self.derived[2]
        self._files: dict[str, list[str]] = {}
        for f in sorted(os.listdir(root)):
            m = TFRECORD_RE.match(f)
            if m:
                self._files.setdefault(m["split"], []).append(os.path.join(root, f))
        if not self._files:
            raise VptuneError(f"no TFRecord files in {root} (expected <name>-<split>.tfrecord-00000-of-00001)")
        self._index: dict[str, tuple[list[tuple[int, int, int]], list[int]]] = {}
        self.specs = self._default_specs() | dict(split_specs or {})
        self.splits = list(self._files) + [s for s in self.specs if s not in self._files]
        names = self._names_file()
        self.num_classes = int(num_classes) or (len(names) if names else 0) or self._info_classes() or 0
        self.class_names = names if names and len(names) == self.num_classes else []

    def _default_specs(self) -> dict[str, str]:
        val = "validation[:200]" if "validation" in self._files else "train[800:1000]"
        specs = {"train800": "train[:800]", "val200": val, "train800val200": f"train[:800]+{val}"}
        if "test" in self._files:
            specs["test"] = "test"
        return specs if "train" in self._files else {}

    def _names_file(self) -> list[str] | None:
        path = os.path.join(self.root, f"{self.label_key}.labels.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return [ln.rstrip("\n") for ln in f if ln.strip()]
        return None

    def _info_classes(self) -> int | None:
        for name in ("features.json", "dataset_info.json"):
            path = os.path.join(self.root, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    found = _find_num_classes(json.load(f), self.label_key)
                if found:
                    return found
        return None

    def index(self, split: str) -> tuple[list[tuple[int, int, int]], list[int]]:
        """``(records, labels)`` of a TFDS split: one pass over its files, parsing only the label."""
        if split not in self._index:
            files = self._files[split]
            records, labels = [], []
            for k, path in enumerate(files):
                with open(path, "rb") as f:
                    for offset, length in scan_records(path):
                        records.append((k, offset, length))
                        labels.append(self._label(read_record(f, offset, length, name=path), f"{path}@{offset}"))
            self._index[split] = (records, labels)
        return self._index[split]

    def _label(self, record: bytes, where: str) -> int:
        if self.derived is not None:
            keys, fn, _ = self.derived
            try:
                return int(fn(parse_example(record, keys)))
            except VptuneError as e:
                raise VptuneError(f"{where}: {e}") from None
        values = parse_example(record, [self.label_key]).get(self.label_key)
        if not values or not isinstance(values[0], int):
            raise VptuneError(f"{where}: no integer feature {self.label_key!r}")
        return int(values[0] // self.label_divisor)

    def finish(self) -> None:
        """Fill the class count (max label + 1) when no metadata gave it."""
        if not self.num_classes:
            top = max((max(self.index(s)[1], default=-1) for s in self._files), default=-1)
            self.num_classes = top + 1
        if len(self.class_names) != self.num_classes:
            self.class_names = self._default_names()

    def load(self, split: str) -> tuple[Source, list[int]]:
        """Like :meth:`Reader.load`, also accepting slice specs such as ``train[:800]``."""
        if split not in self.splits and "[" not in split and "+" not in split:
            return super().load(split)
        return self._load(split)

    def _load(self, split: str) -> tuple[Source, list[int]]:
        spec = self.specs.get(split, split)
        sizes = {s: len(self.index(s)[0]) for s in self._files}
        files: list[str] = []
        records, labels = [], []
        for s, a, b in _parse_spec(spec, sizes):
            base = len(files)
            files.extend(self._files[s])
            rec, lab = self.index(s)
            records.extend((k + base, off, n) for k, off, n in rec[a:b])
            labels.extend(lab[a:b])
        self.finish()
        return TFRecordSource(files, records, self.image_key, pixel_scale=self.pixel_scale), labels
