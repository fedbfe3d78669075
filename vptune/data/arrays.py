"""Array datasets: ``idx`` (MNIST-style ``*-images-idx3-ubyte[.gz]`` with their labels) and ``npz`` (image
arrays; MedMNIST's ``{train,val,test}_{images,labels}`` layout included). Labels are read without decoding
an image; images are memory-mapped where the file allows it (see :class:`~vptune.data.dataset.ArraySource`).
"""

from __future__ import annotations

import gzip
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from vptune.data.dataset import ArraySource, Source
from vptune.data.readers import Reader
from vptune.errors import VptuneError

IDX_RE = re.compile(r"^(?P<prefix>.+?)[-_.]images?[-_.]idx\d[-_.]ubyte(?:\.gz)?$")

IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_header(path: str) -> tuple[tuple[int, ...], str, int]:
    """``(shape, dtype, payload_offset)`` of an idx file (gzipped or not)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
                raise VptuneError(f"{path} is not an idx file (bad magic number)")
            ndim = head[3]
            dims = np.frombuffer(f.read(4 * ndim), dtype=">u4")
    except (OSError, EOFError) as e:
        raise VptuneError(f"cannot read idx file {path}: {e}") from e
    return tuple(int(d) for d in dims), IDX_DTYPES[head[2]], 4 + 4 * ndim


def read_idx(path: str) -> np.ndarray:
    """The whole array of a (small) idx file, e.g. labels."""
    shape, dtype, offset = idx_header(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def idx_source(path: str) -> ArraySource:
    shape, dtype, offset = idx_header(path)
    return ArraySource(path, shape, dtype, offset, mode="gzip" if path.endswith(".gz") else "memmap")


class IdxReader(Reader):
    """MNIST-style ``<prefix>-images-idx3-ubyte[.gz]`` + ``<prefix>-labels-idx1-ubyte[.gz]``; t10k = test."""

    format = "idx"

    def __init__(self, root: str) -> None:
        super().__init__(root)
        folder = root if os.path.isdir(root) else os.path.dirname(root)
        if not os.path.exists(root):
            raise VptuneError(f"idx dataset not found: {root}")
        names = [os.path.basename(root)] if os.path.isfile(root) else sorted(os.listdir(folder))
        self._pairs: dict[str, tuple[str, str]] = {}
        for f in names:
            m = IDX_RE.match(f)
            if not m:
                continue
            labels = next((os.path.join(folder, g) for g in sorted(os.listdir(folder))
                           if re.match(re.escape(m["prefix"]) + r"[-_.]labels?[-_.]idx1[-_.]ubyte(\.gz)?$", g)), None)
            if labels is None:
                raise VptuneError(f"no labels file beside {os.path.join(folder, f)} "
                                  f"(expected {m['prefix']}-labels-idx1-ubyte[.gz])")
            split = "test" if m["prefix"].lower().startswith("t10k") else m["prefix"].lower()
            self._pairs[split] = (os.path.join(folder, f), labels)
        if not self._pairs:
            raise VptuneError(f"no idx image files in {root} (expected *-images-idx3-ubyte[.gz])")
        self.splits = sorted(self._pairs, key=lambda s: (s != "train", s))
        self._labels = {s: [int(v) for v in read_idx(lab)] for s, (_, lab) in self._pairs.items()}
        self.num_classes = max(max(v, default=-1) for v in self._labels.values()) + 1
        self.class_names = self._default_names()

    def _load(self, split: str) -> tuple[Source, list[int]]:
        src = idx_source(self._pairs[split][0])
        labels = self._labels[split]
        if len(src) != len(labels):
            raise VptuneError(f"{self._pairs[split][0]} has {len(src)} images but its labels file {len(labels)}")
        return src, labels


NPZ_PAIRS = (("images", "labels"), ("image", "label"), ("x", "y"), ("X", "y"))


def npz_member_source(path: str, member: str) -> ArraySource:
    """An :class:`ArraySource` over one npz member, memory-mapped when stored uncompressed."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member + ".npy")
        with z.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            header_len = f.tell()
    if info.compress_type == zipfile.ZIP_STORED and not fortran and not dtype.hasobject:
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        offset = info.header_offset + 30 + name_len + extra_len + header_len
        return ArraySource(path, shape, dtype.str, offset, mode="memmap", member=member)
    return ArraySource(path, shape, dtype.str, mode="npz", member=member)


def npz_split_members(keys: set[str]) -> dict[str, tuple[str, str]]:
    """``{split: (images_key, labels_key)}`` of the paired members of one npz file: ``x_<split>``/
    ``y_<split>`` (Keras style) and ``<split>_images``/``<split>_labels`` (MedMNIST: ``train_images``,
    ``val_images``, ``test_images`` ...)."""
    out = {}
    for k in sorted(keys):
        if k.startswith("x_") and "y_" + k[2:] in keys:
            out[k[2:]] = (k, "y_" + k[2:])
        elif k.endswith("_images") and k[:-7] + "_labels" in keys:
            out[k[:-7]] = (k, k[:-7] + "_labels")
    return out


def npz_labels(z: Any, images: str, labels: str, where: str) -> list[int]:
    """The class labels of one split: ``(N,)`` or ``(N, 1)`` integers, as many as the images."""
    y = np.asarray(z[labels])
    if y.ndim == 2 and y.shape[1] != 1:
        raise VptuneError(f"{where}: {labels} has shape {y.shape}: multi-label data (one column per label) is "
                          "not supported; vptune trains single-label classifiers ((N,) or (N, 1) labels)")
    if y.ndim > 2 or (y.size and not np.issubdtype(y.dtype, np.integer)
                      and not np.all(np.mod(y, 1) == 0)):
        raise VptuneError(f"{where}: {labels} must hold integer class labels, shape (N,) or (N, 1)")
    n = _npz_shape(z, images)[0]
    if y.reshape(-1).shape[0] != n:
        raise VptuneError(f"{where}: {images} has {n} images but {labels} has {y.reshape(-1).shape[0]} labels")
    return [int(v) for v in y.reshape(-1)]


def _npz_shape(z: Any, member: str) -> tuple[int, ...]:
    """The shape of an npz member without loading it (read from its .npy header)."""
    with z.zip.open(member + ".npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(header(f)[0])


class NpzReader(Reader):
    """``.npz`` arrays: ``x_<split>``/``y_<split>`` or ``<split>_images``/``<split>_labels`` pairs (MedMNIST's
    layout, read as is: uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` images, ``(N, 1)`` labels), or
    ``images``/``labels`` in ``<split>.npz``."""

    format = "npz"

    def __init__(self, root: str) -> None:
        super().__init__(root)
        if not os.path.exists(root):
            raise VptuneError(f"npz dataset not found: {root}")
        files = [root] if os.path.isfile(root) else sorted(str(p) for p in Path(root).glob("*.npz"))
        self._members: dict[str, tuple[str, str, str]] = {}
        for path in files:
            try:
                with np.load(path) as z:
                    keys = set(z.files)
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise VptuneError(f"cannot read npz file {path}: {e}") from e
            for split, (xk, yk) in npz_split_members(keys).items():
                self._members[split] = (path, xk, yk)
            for xi, yi in NPZ_PAIRS:
                if xi in keys and yi in keys:
                    self._members[Path(path).stem] = (path, xi, yi)
                    break
        if not self._members:
            raise VptuneError(f"no image arrays in {root}; expected x_<split>/y_<split>, <split>_images/"
                              "<split>_labels (MedMNIST) or images/labels members")
        self.splits = sorted(self._members, key=lambda s: (s != "train", s))
        self._labels = {}
        for s, (path, xk, yk) in self._members.items():
            with np.load(path) as z:
                self._labels[s] = npz_labels(z, xk, yk, path)
        self.num_classes = max(max(v, default=-1) for v in self._labels.values()) + 1
        self.class_names = self._default_names()

    def _load(self, split: str) -> tuple[Source, list[int]]:
        path, xk, _ = self._members[split]
        return npz_member_source(path, xk), self._labels[split]
