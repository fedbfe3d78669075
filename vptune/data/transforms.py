"""Image decoding and per-protocol transforms, with Pillow + numpy + torch only (no torchvision).

Protocols (VPT reference code, see ``REFERENCE.md``):

* ``vtab``: resize to ``(S, S)`` with the backbone's interpolation (bilinear), no augmentation.
* ``fgvc``: resize to ``(R, R)`` with ``R = round(S * 256 / 224)``, then a random ``S x S`` crop and a random
  horizontal flip for training, a center crop for evaluation.

Every transform ends with ``to_tensor`` + normalisation: a float tensor ``(3, S, S)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

from vptune.backbones.base import Preprocessing
from vptune.errors import VptuneError, check_choice

PROTOCOLS = ("vtab", "fgvc")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# TensorFlow's bilinear resize (tf.image.resize, half-pixel centres, no antialiasing when shrinking), as
# the reference code's VTAB pipeline resizes; the task stores it as its interpolation.
TF_BILINEAR = "tf_bilinear"
# Pillow refuses truncated files by default; keep it that way (a truncated file is a corrupt file).
ImageFile.LOAD_TRUNCATED_IMAGES = False


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode (L, LA, P, RGBA, CMYK, I;16, I, F ...) -> RGB. Alpha is dropped (black background
    stays what the colour channels hold), 16/32-bit and float images are rescaled to 0..255."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((a - lo) * scale).round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; :class:`VptuneError` naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError as e:
        raise VptuneError(f"image file not found: {path}") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VptuneError(f"cannot read image {path}: {e}") from e


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG ...) as RGB; :class:`VptuneError` naming ``name`` if bad."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VptuneError(f"cannot decode image {name}: {e}") from e


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    # ---------------------------------------------------------------------------------------------
    # (H, W, 3) uint8 -> (3, H, W) float in [0, 1] -> (x - mean) / std, per channel
    # ---------------------------------------------------------------------------------------------
    arr = np.asarray(to_rgb(img), dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
    return x.sub_(m).div_(s)


def fgvc_resize_size(input_size: int) -> int:
    """The FGVC resize side for a crop of ``input_size`` (256 for 224, the reference ratio)."""
    return round(input_size * 256 / 224)


class Transform:
    """A picklable image -> tensor transform (DataLoader workers may pickle it)."""

    def __init__(self, protocol: str, train: bool, size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear") -> None:
        check_choice("protocol", protocol, PROTOCOLS)
        check_choice("interpolation", interpolation, (*INTERPOLATIONS, TF_BILINEAR))
        if int(size) < 8:
            raise VptuneError(f"input size must be at least 8 pixels, got {size}")
        self.protocol, self.train, self.size = protocol, bool(train), int(size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.interpolation = interpolation

    @property
    def deterministic(self) -> bool:
        """Whether an image always maps to the same tensor (no random crop or flip)."""
        return self.protocol == "vtab" or not self.train

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if self.interpolation == TF_BILINEAR:
            return self._tf_call(img)
        resample = INTERPOLATIONS[self.interpolation]
        s = self.size
        if self.protocol == "vtab":
            img = img.resize((s, s), resample)
        else:
            r = fgvc_resize_size(s)
            img = img.resize((r, r), resample)
            if self.train:
                top = int(torch.randint(0, r - s + 1, (1,)))
                left = int(torch.randint(0, r - s + 1, (1,)))
                img = img.crop((left, top, left + s, top + s))
                if bool(torch.rand(()) < 0.5):
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                off = round((r - s) / 2.0)
                img = img.crop((off, off, off + s, off + s))
        return to_tensor(img, self.mean, self.std)

    def _tf_call(self, img: Image.Image) -> torch.Tensor:
        """The same protocol with TensorFlow's bilinear resize on float pixels (no rounding to uint8)."""
        s = self.size
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()  # (3, H, W)
        r = s if self.protocol == "vtab" else fgvc_resize_size(s)
        x = tf_bilinear_resize(x, r, r)  # (3, r, r), values in [0, 255]
        if self.protocol == "fgvc":
            if self.train:
                top = int(torch.randint(0, r - s + 1, (1,)))
                left = int(torch.randint(0, r - s + 1, (1,)))
                x = x[:, top:top + s, left:left + s]
                if bool(torch.rand(()) < 0.5):
                    x = x.flip(-1)
            else:
                off = round((r - s) / 2.0)
                x = x[:, off:off + s, off:off + s]
        m = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        sd = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x / 255.0 - m) / sd

    def __repr__(self) -> str:
        return (f"Transform(protocol={self.protocol!r}, train={self.train}, size={self.size}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")


def tf_bilinear_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, H, W) float -> (C, height, width) as ``tf.image.resize(..., method="bilinear")``: sample
    positions at half-pixel centres, ``src = (dst + 0.5) * in / out - 0.5`` clamped to the image, two-tap
    linear interpolation, no antialiasing when shrinking (unlike Pillow's resize)."""
    import torch.nn.functional as F

    return F.interpolate(x.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=False).squeeze(0)


def build_transform(preprocessing: Preprocessing, protocol: str, train: bool,
                    input_size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The transform of ``protocol`` for a backbone's ``preprocessing`` (input size overridable)."""
    size = int(input_size or preprocessing.input_size)
    return Transform(protocol, train, size, preprocessing.mean, preprocessing.std,
                     preprocessing.interpolation)
