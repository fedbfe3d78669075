"""Lazy image sources and :class:`ImageDataset`.

A *source* knows how to decode item ``i`` of a split as a PIL image, and nothing else: image files, idx /
npz arrays (memory-mapped where the file allows it, uint8 kept as uint8) and TFRecord files (an index of
record offsets; bytes read per item). Nothing is decoded until ``__getitem__`` runs, normally inside a
DataLoader worker, so a split never sits in memory as float32.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from vptune.data.tfrecord import parse_example, read_record
from vptune.data.transforms import decode_image, load_image, to_rgb
from vptune.errors import VptuneError


class Source:
    """Item ``i`` -> PIL image. Subclasses keep open handles out of their pickled state."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """A name for item ``i`` in messages (a file path, or ``file[index]``)."""
        raise NotImplementedError

    def probe(self, i: int) -> None:
        """Decode item ``i`` as cheaply as possible, raising :class:`VptuneError` if it is unreadable."""
        self.load(i)


class FileSource(Source):
    """One image file per item."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def describe(self, i: int) -> str:
        return self.paths[i]

    def probe(self, i: int) -> None:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (64, 64))  # DCT-domain downscale: a full pass over the data, cheaply
                img.load()
        except FileNotFoundError as e:
            raise VptuneError(f"image file not found: {path}") from e
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise VptuneError(f"cannot read image {path}: {e}") from e


def array_to_image(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) array -> RGB image; floats in [0, 1] are scaled to 0..255."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float64)
        if a.size and a.max() <= 1.0 and a.min() >= 0.0:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(np.ascontiguousarray(a)))


class ArraySource(Source):
    """Items of one (N, H, W[, C]) array stored in a file at ``offset`` (idx payload or an npz member).

    ``mode``: ``"memmap"`` (raw bytes at ``offset``, mapped on first use in each process), ``"gzip"``
    (an idx.gz file, decompressed once per process into a uint8 array) or ``"npz"`` (a compressed npz
    member, loaded once per process as stored).
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: str, offset: int = 0, mode: str = "memmap",
                 member: str = "") -> None:
        self.path, self.shape, self.dtype, self.offset = path, tuple(shape), dtype, offset
        self.mode, self.member = mode, member
        self._arr: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}

    def _array(self) -> np.ndarray:
        if self._arr is None:
            if self.mode == "memmap":
                self._arr = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
            elif self.mode == "gzip":
                with gzip.open(self.path, "rb") as f:
                    raw = f.read()
                n = int(np.prod(self.shape))
                self._arr = np.frombuffer(raw, dtype=self.dtype, count=n, offset=self.offset).reshape(self.shape)
            else:
                with np.load(self.path) as z:
                    self._arr = z[self.member]
        return self._arr

    def __len__(self) -> int:
        return self.shape[0]

    def load(self, i: int) -> Image.Image:
        try:
            return array_to_image(np.asarray(self._array()[i]))
        except (OSError, ValueError, EOFError) as e:
            raise VptuneError(f"cannot read {self.describe(i)}: {e}") from e

    def describe(self, i: int) -> str:
        return f"{self.path}{':' + self.member if self.member else ''}[{i}]"


class TFRecordSource(Source):
    """Items are records of TFRecord files: ``index[i] = (file_number, data_offset, length)``.

    ``pixel_scale``: a factor for images whose pixels are all 0 or 1 (TFDS dSprites; VTAB multiplies them by
    255, see :data:`vptune.data.tfrecord.PIXEL_SCALE`); images with larger values are left as decoded."""

    def __init__(self, files: Sequence[str], index: Sequence[tuple[int, int, int]], image_key: str = "image",
                 verify: bool = False, pixel_scale: int = 1) -> None:
        self.files, self.index = list(files), list(index)
        self.image_key, self.verify, self.pixel_scale = image_key, verify, int(pixel_scale)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def _handle(self, k: int):
        if self._pid != os.getpid():  # forked into a worker: never share file positions with the parent
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = open(self.files[k], "rb")  # noqa: SIM115 (kept open per worker)
        return self._handles[k]

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> Image.Image:
        k, offset, length = self.index[i]
        data = read_record(self._handle(k), offset, length, verify=self.verify, name=self.files[k])
        feats = parse_example(data, [self.image_key])
        values = feats.get(self.image_key)
        if not values or not isinstance(values[0], bytes):
            raise VptuneError(f"{self.describe(i)} has no encoded image under feature {self.image_key!r}")
        img = decode_image(values[0], self.describe(i))
        if self.pixel_scale != 1:
            arr = np.asarray(img)  # (H, W, 3) uint8
            if arr.max(initial=0) <= 1:
                img = Image.fromarray(arr * np.uint8(self.pixel_scale))
        return img

    def describe(self, i: int) -> str:
        k, offset, _ = self.index[i]
        return f"{self.files[k]}@{offset}"


def scan_unreadable(source: Source, indices: Sequence[int] | None = None, workers: int = 2,
                    progress: bool = False) -> list[tuple[int, str]]:
    """Try to decode every item; return ``(index, message)`` for each unreadable one."""
    idx = list(range(len(source))) if indices is None else list(indices)

    def probe(i: int) -> tuple[int, str] | None:
        try:
            source.probe(i)
            return None
        except VptuneError as e:
            return (i, str(e))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(probe, idx)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(idx), desc="scanning images", unit="img")
        return [r for r in results if r is not None]


class ImageDataset(torch.utils.data.Dataset):
    """A lazy labelled split: ``dataset[i] -> (float tensor (3, S, S), int label)``.

    Attributes: ``num_classes``, ``class_names``, ``labels`` (every label of the split, no decoding),
    ``name`` (what it was opened from), ``source`` and ``indices`` (which source items it exposes).
    """

    def __init__(self, source: Source, labels: Sequence[int], num_classes: int, class_names: Sequence[str],
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 indices: Sequence[int] | None = None, skip_corrupt: bool = False, name: str = "") -> None:
        self.source = source
        self.indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
        all_labels = [int(v) for v in labels]
        self.labels: list[int] = [all_labels[i] for i in self.indices]
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.name = name
        self._warned = False

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, i: int) -> Image.Image:
        """The decoded RGB image of item ``i`` (no transform)."""
        return self.source.load(self.indices[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.indices)
        for attempt in range(min(n, 32)):
            j = (i + attempt) % n
            try:
                img = self.load_image(j)
                break
            except VptuneError as e:
                if not self.skip_corrupt:
                    raise VptuneError(f"{e} (run `vptune data check` to list every unreadable image, "
                                      "or open the data with skip_corrupt=True)") from e
                if not self._warned:
                    warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
                    self._warned = True
        else:
            raise VptuneError(f"no readable image near item {i} of {self.name}")
        x = self.transform(img) if self.transform is not None else img
        return x, self.labels[j]

    def class_counts(self) -> list[int]:
        """How many items each class has in this split."""
        counts = [0] * self.num_classes
        for y in self.labels:
            if 0 <= y < self.num_classes:
                counts[y] += 1
        return counts

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, n={len(self)}, num_classes={self.num_classes})"
