"""A small, fast, vectorised renderer of coloured 2-D shapes, and the demo's procedural tasks.

The project's own generators (:mod:`vptune.data.procedural`) draw one dSprites or CLEVR sample at a time
with Pillow (and ray-cast CLEVR per pixel); at the demo's scale (~16k images at 32 x 32, several times
per run) that costs minutes, so the demo renders batches in numpy instead: each object is drawn inside
its own window at 2x supersampling and box-filtered down. Everything is drawn from one
``numpy.random.Generator``, so a (task, seed) pair always gives the same images.

Shapes (0..3): square, circle, triangle, tee ("T", the only one without rotational symmetry); six
saturated colours on a dark, slightly noisy background.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SHAPES = ("square", "circle", "triangle", "tee")
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLORS = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 220, 40], [220, 60, 220],
                   [40, 210, 220]], np.float32) / 255.0
BACKGROUND = 0.08
RENDERER_VERSION = 1  # bump when images change: it is part of the pretraining cache key


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of shape-local coordinates (u right, v up, object radius 1)."""
    if shape == 0:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if shape == 1:
        return u * u + v * v <= 0.64
    if shape == 2:
        return (v >= -0.5) & (np.abs(u) * 1.7320508 <= 1.0 - v)
    return (((np.abs(u) <= 0.95) & (v >= 0.4) & (v <= 0.95))
            | ((np.abs(u) <= 0.3) & (v >= -0.95) & (v <= 0.95)))


def render(shape: np.ndarray, color: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray,
           theta: np.ndarray, present: np.ndarray, size: int, rng: np.random.Generator | None = None,
           noise: float = 0.03, supersample: int = 2, chunk: int = 512,
           coverage: np.ndarray | None = None) -> np.ndarray:
    """``(N, K)`` object parameters (centre and radius in pixels, angle in radians) -> uint8
    ``(N, size, size, 3)`` images; later objects are drawn over earlier ones. ``coverage``: an optional
    float ``(N,)`` array that receives the fraction of the image that objects cover."""
    n_img, k_obj = shape.shape
    ss = supersample
    half = math.ceil(1.35 * float(r.max()) + 1)  # the tee's corners reach 1.34 radii
    win = 2 * half * ss
    pad = (size + 2 * half) * ss
    out = np.empty((n_img, size, size, 3), np.uint8)
    ar = (np.arange(win, dtype=np.float32) + 0.5) / ss
    for s in range(0, n_img, chunk):
        e = min(n_img, s + chunk)
        n = e - s
        canvas = np.full((n, pad, pad, 3), BACKGROUND, np.float32)
        cover = np.zeros((n, pad, pad), bool) if coverage is not None else None
        nidx = np.arange(n)[:, None, None]
        for k in range(k_obj):
            x0 = np.floor(cx[s:e, k]).astype(int) - half
            y0 = np.floor(cy[s:e, k]).astype(int) - half
            dx = (x0[:, None] + ar[None])[:, None, :] - cx[s:e, k, None, None]
            dy = (y0[:, None] + ar[None])[:, :, None] - cy[s:e, k, None, None]
            c = np.cos(theta[s:e, k])[:, None, None].astype(np.float32)
            sn = np.sin(theta[s:e, k])[:, None, None].astype(np.float32)
            rr = r[s:e, k, None, None]
            u, v = (dx * c + dy * sn) / rr, (dx * sn - dy * c) / rr  # v points up
            mask = np.zeros((n, win, win), bool)
            for q in np.unique(shape[s:e, k]):
                sel = shape[s:e, k] == q
                mask[sel] = _inside(int(q), u[sel], v[sel])
            mask &= present[s:e, k, None, None]
            rows = ((y0 + half) * ss)[:, None] + np.arange(win)[None]
            cols = ((x0 + half) * ss)[:, None] + np.arange(win)[None]
            ri, ci = rows[:, :, None], cols[:, None, :]
            col = COLORS[color[s:e, k]][:, None, None, :]
            canvas[nidx, ri, ci] = np.where(mask[..., None], col, canvas[nidx, ri, ci])
            if cover is not None:
                cover[nidx, ri, ci] |= mask
        lo, hi = half * ss, (half + size) * ss
        if cover is not None:
            coverage[s:e] = cover[:, lo:hi, lo:hi].mean(axis=(1, 2))
        img = canvas[:, lo:hi, lo:hi].reshape(n, size, ss, size, ss, 3).mean(axis=(2, 4))
        if rng is not None and noise:
            img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
        out[s:e] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def place(rng: np.random.Generator, n: int, k: int, counts: np.ndarray, rmin: float, rmax: float, size: int,
          margin: float = 1.0, spacing: float = 1.1, tries: int = 32) -> tuple[np.ndarray, ...]:
    """Radii and non-overlapping centres (rejection sampling, vectorised over images) for ``counts[i]``
    objects of image ``i``; returns ``cx, cy, r, present``, each ``(n, k)``."""
    r = rng.uniform(rmin, rmax, (n, k)).astype(np.float32)
    present = np.arange(k)[None, :] < counts[:, None]
    cx = np.full((n, k), -1e3, np.float32)
    cy = np.full((n, k), -1e3, np.float32)
    rows = np.arange(n)
    for j in range(k):
        lo, hi = r[:, j:j + 1] + margin, size - r[:, j:j + 1] - margin
        cand_x = lo + (hi - lo) * rng.random((n, tries), dtype=np.float32)
        cand_y = lo + (hi - lo) * rng.random((n, tries), dtype=np.float32)
        ok = np.ones((n, tries), bool)
        for i in range(j):
            d2 = (cand_x - cx[:, i:i + 1]) ** 2 + (cand_y - cy[:, i:i + 1]) ** 2
            ok &= d2 >= (spacing * (r[:, j:j + 1] + r[:, i:i + 1])) ** 2
        first = np.where(ok.any(axis=1), ok.argmax(axis=1), 0)
        cx[:, j], cy[:, j] = cand_x[rows, first], cand_y[rows, first]
    return cx, cy, r, present


def _angles(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.uniform(0.0, 2 * math.pi, (n, k)).astype(np.float32)


# ------------------------------------------------------------------------------------------ the tasks

@dataclass(frozen=True)
class ShapeTask:
    """A procedural task: ``make(rng, n, size) -> (uint8 images (n, size, size, 3), int64 labels (n,))``."""

    name: str
    like: str  # the VTAB task it stands in for
    description: str
    class_names: tuple[str, ...]
    make: Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def make_upstream(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """1-4 objects sharing one shape and one colour, each at a random place, angle and size;
    label = shape x colour (24 classes), which says nothing about where, how turned or how many."""
    k = 4
    counts = rng.integers(1, k + 1, n)
    shape = np.repeat(rng.integers(0, 4, n)[:, None], k, axis=1)
    color = np.repeat(rng.integers(0, 6, n)[:, None], k, axis=1)
    s = size / 32
    cx, cy, r, present = place(rng, n, k, counts, 3.0 * s, 6.0 * s, size)
    images = render(shape, color, cx, cy, r, _angles(rng, n, k), present, size, rng)
    return images, (shape[:, 0] * 6 + color[:, 0]).astype(np.int64)


def make_count(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """1-6 objects of mixed shapes and colours; label = count - 1."""
    k = 6
    counts = rng.integers(1, k + 1, n)
    s = size / 32
    cx, cy, r, present = place(rng, n, k, counts, 2.5 * s, 4.5 * s, size)
    images = render(rng.integers(0, 4, (n, k)), rng.integers(0, 6, (n, k)), cx, cy, r, _angles(rng, n, k),
                    present, size, rng)
    return images, (counts - 1).astype(np.int64)


def make_tees(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """0-4 tees among 1-2 other shapes, all colours mixed; label = the number of tees (a filtered count,
    like CLEVR questions of the form "how many cylinders")."""
    k = 6
    n_tee, n_other = rng.integers(0, 5, n), rng.integers(1, 3, n)
    shape = rng.integers(0, 3, (n, k))
    shape[np.arange(k)[None, :] < n_tee[:, None]] = 3
    s = size / 32
    cx, cy, r, present = place(rng, n, k, n_tee + n_other, 2.5 * s, 4.5 * s, size)
    images = render(shape, rng.integers(0, 6, (n, k)), cx, cy, r, _angles(rng, n, k), present, size, rng)
    return images, n_tee.astype(np.int64)


# quartiles of the covered fraction over 20,000 images (seed 0): four balanced classes
COVERAGE_EDGES = (0.043, 0.078, 0.113)


def make_coverage(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """1-6 objects of mixed shapes, colours and sizes; label = how much of the image they cover
    (quartile bins): a density task, like count but summing areas."""
    k = 6
    counts = rng.integers(1, k + 1, n)
    s = size / 32
    cx, cy, r, present = place(rng, n, k, counts, 2.0 * s, 5.0 * s, size)
    cov = np.zeros(n, np.float64)
    images = render(rng.integers(0, 4, (n, k)), rng.integers(0, 6, (n, k)), cx, cy, r, _angles(rng, n, k),
                    present, size, rng, coverage=cov)
    return images, np.searchsorted(np.asarray(COVERAGE_EDGES), cov, side="right").astype(np.int64)


UPSTREAM = ShapeTask("shapes24", "upstream", "shape x colour of 1-4 look-alike objects",
                     tuple(f"{c} {s}" for s in SHAPES for c in COLOR_NAMES), make_upstream)

DOWNSTREAM: dict[str, ShapeTask] = {
    "count": ShapeTask("count", "clevr_count", "how many objects (1-6)",
                       tuple(f"{i} object{'s' if i > 1 else ''}" for i in range(1, 7)), make_count),
    "tees": ShapeTask("tees", "clevr_count, filtered", "how many tees among other shapes (0-4)",
                      tuple(f"{i} tee{'' if i == 1 else 's'}" for i in range(5)), make_tees),
    "coverage": ShapeTask("coverage", "density", "how much of the image objects cover (quartiles)",
                          ("< 4%", "4-8%", "8-11%", "> 11%"), make_coverage),
}


def to_tensor(images: np.ndarray, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
              std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> torch.Tensor:  # noqa: F821
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
