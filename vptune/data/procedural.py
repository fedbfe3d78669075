"""Procedural VTAB Structured tasks, rendered offline and deterministically with numpy + Pillow.

* dSprites-style (``dsprites_loc``, ``dsprites_ori``): a white square, ellipse or heart on black, 64 x 64;
  factors as in dSprites: 6 scales, 40 orientations in [0, 2 pi], 32 x and 32 y positions. VTAB labels:
  ``x_position // 2`` and ``floor(orientation / 2.5)`` (32 and 40 values binned into 16 classes).
* CLEVR-style (``clevr_count``, ``clevr_dist``): 3 to 10 shaded spheres, cubes and cylinders (rubber or
  metal, CLEVR's 8 colours, 2 sizes) on a ground plane with shadows, seen by a perspective camera placed as
  in CLEVR and ray-cast per pixel. Labels: ``count - 3`` (8 classes) and the bin of the closest object's
  camera depth over VTAB's thresholds ``[0, 8, 8.5, 9, 9.5, 10, 100]`` (6 classes).

Every sample is drawn from ``np.random.default_rng([seed, index])`` (order-free, so workers can share the
work) and its generating parameters are stored in ``params.jsonl`` so labels can be recomputed exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from vptune.errors import VptuneError

# ------------------------------------------------------------------------------------------------------
# dSprites
# ------------------------------------------------------------------------------------------------------

DSPRITES_SHAPES = ("square", "ellipse", "heart")
DSPRITES_SCALES = tuple(float(v) for v in np.linspace(0.5, 1.0, 6))
DSPRITES_ORIENTATIONS = tuple(float(v) for v in np.linspace(0.0, 2 * math.pi, 40))
DSPRITES_POSITIONS = tuple(float(v) for v in np.linspace(0.0, 1.0, 32))
DSPRITES_HALF = 0.16  # half size of a scale-1 shape, in image units
DSPRITES_MARGIN = 0.23  # centres stay in [margin, 1 - margin] so every rotated shape fits


def sample_dsprites(rng: np.random.Generator) -> dict:
    """Latent factor indices of one dSprites sample."""
    return {
        "shape": int(rng.integers(3)),
        "scale": int(rng.integers(6)),
        "orientation": int(rng.integers(40)),
        "x_position": int(rng.integers(32)),
        "y_position": int(rng.integers(32)),
    }


def dsprites_center(params: dict) -> tuple[float, float]:
    """Shape centroid ``(x, y)`` in image units (0..1, y down)."""
    span = 1.0 - 2 * DSPRITES_MARGIN
    return (DSPRITES_MARGIN + span * DSPRITES_POSITIONS[params["x_position"]],
            DSPRITES_MARGIN + span * DSPRITES_POSITIONS[params["y_position"]])


def _polygon_centroid(pts: np.ndarray) -> np.ndarray:
    x, y = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    return np.array([((x + x1) * cross).sum() / (6 * area), ((y + y1) * cross).sum() / (6 * area)])


def _shape_outline(shape: str) -> np.ndarray:
    """(K, 2) outline in shape units (y up), area centroid at the origin, extent about [-1, 1]."""
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "ellipse":
        pts = np.stack([np.cos(t), 0.5 * np.sin(t)], axis=1)
    else:
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        pts = np.stack([x, y], axis=1) / 17.0
    return pts - _polygon_centroid(pts)


def render_dsprites(params: dict, size: int = 64, supersample: int = 4) -> Image.Image:
    """A binary ('L', 0/255) ``size x size`` image of one dSprites sample."""
    big = size * supersample
    pts = _shape_outline(DSPRITES_SHAPES[params["shape"]]) * DSPRITES_HALF * DSPRITES_SCALES[params["scale"]]
    th = DSPRITES_ORIENTATIONS[params["orientation"]]
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    pts = pts @ rot.T  # (K, 2), counter-clockwise with y up
    cx, cy = dsprites_center(params)
    # unit coordinate u sits at canvas coordinate u * big - 0.5 (Pillow's integer coords are pixel centres)
    xy = [(float((cx + px) * big - 0.5), float((cy - py) * big - 0.5)) for px, py in pts]
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon(xy, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return small.point(lambda v: 255 if v >= 128 else 0)


def dsprites_labels(params: dict) -> dict[str, int]:
    """VTAB labels: ``floor(value / (n_values / 16))`` for x position (32) and orientation (40)."""
    return {"dsprites_loc": int(params["x_position"] // (32 / 16)),
            "dsprites_ori": math.floor(params["orientation"] / (40 / 16))}


# ------------------------------------------------------------------------------------------------------
# CLEVR
# ------------------------------------------------------------------------------------------------------

CLEVR_SHAPES = ("cube", "sphere", "cylinder")
CLEVR_COLORS = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
CLEVR_SIZES = {"large": 0.7, "small": 0.35}
CLEVR_MATERIALS = ("rubber", "metal")
CLEVR_CAMERA = (7.36, -6.93, 4.96)  # CLEVR's camera position, looking at the origin
CLEVR_FOV = 49.1  # horizontal field of view, degrees (35 mm lens on a 32 mm sensor)
CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
CLEVR_MIN_COUNT, CLEVR_MAX_COUNT = 3, 10
LIGHT = np.array([0.45, -0.75, 0.9]) / np.linalg.norm([0.45, -0.75, 0.9])


def _camera() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Camera position and its forward / right / up unit vectors."""
    pos = np.array(CLEVR_CAMERA)
    fwd = -pos / np.linalg.norm(pos)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    return pos, fwd, right, np.cross(right, fwd)


def sample_clevr(rng: np.random.Generator, n_objects: int | None = None) -> dict:
    """A CLEVR-style scene: objects on the ground in [-3, 3]^2, no two closer than r1 + r2 + 0.25."""
    n = int(rng.integers(CLEVR_MIN_COUNT, CLEVR_MAX_COUNT + 1)) if n_objects is None else n_objects
    objects: list[dict] = []
    while len(objects) < n:
        for _ in range(200):
            size = str(rng.choice(list(CLEVR_SIZES)))
            r = CLEVR_SIZES[size]
            x, y = (float(v) for v in rng.uniform(-3, 3, 2))
            if all(math.hypot(x - o["x"], y - o["y"]) > r + CLEVR_SIZES[o["size"]] + 0.25 for o in objects):
                objects.append({
                    "shape": str(rng.choice(CLEVR_SHAPES)), "color": str(rng.choice(list(CLEVR_COLORS))),
                    "material": str(rng.choice(CLEVR_MATERIALS)), "size": size, "x": round(x, 6),
                    "y": round(y, 6), "rotation": round(float(rng.uniform(0, 360)), 4)})
                break
        else:  # no room: start over
            objects = []
    return {"objects": objects}


def clevr_depths(params: dict) -> list[float]:
    """Camera depth (distance along the view axis) of every object's centre, as CLEVR's pixel_coords[2]."""
    pos, fwd, _, _ = _camera()
    out = []
    for o in params["objects"]:
        r = CLEVR_SIZES[o["size"]] / (math.sqrt(2) if o["shape"] == "cube" else 1.0)
        out.append(float(np.dot(np.array([o["x"], o["y"], r]) - pos, fwd)))
    return out


def clevr_labels(params: dict) -> dict[str, int]:
    """VTAB labels: ``count - 3`` and the closest depth's bin (max i with threshold[i] < depth)."""
    d = min(clevr_depths(params))
    thr = CLEVR_DIST_THRESHOLDS
    return {"clevr_count": len(params["objects"]) - CLEVR_MIN_COUNT,
            "clevr_dist": max(i for i in range(len(thr)) if thr[i] < d)}


def _rays(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera origin (3,) and unit ray directions (H*W, 3), row-major from the top-left pixel."""
    pos, fwd, right, up = _camera()
    tx = math.tan(math.radians(CLEVR_FOV) / 2)
    ty = tx * height / width
    u = ((np.arange(width) + 0.5) / width * 2 - 1) * tx  # (W,)
    v = (1 - (np.arange(height) + 0.5) / height * 2) * ty  # (H,)
    d = fwd[None, None, :] + u[None, :, None] * right + v[:, None, None] * up  # (H, W, 3)
    d = d.reshape(-1, 3)
    return pos, d / np.linalg.norm(d, axis=1, keepdims=True)


def _hit_sphere(c: np.ndarray, r: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    oc = o - c  # (N, 3) or (3,)
    b = (d * oc).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
    t = np.where(t > 1e-4, t, np.inf)
    p = o + d * np.where(np.isfinite(t), t, 0)[:, None]
    return t, (p - c) / r


def _hit_box(c: np.ndarray, h: float, rot: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cs, sn = math.cos(rot), math.sin(rot)
    to_obj = np.array([[cs, sn, 0], [-sn, cs, 0], [0, 0, 1.0]])  # world -> object (rotation by -rot)
    po = (o - c) @ to_obj.T  # (N, 3) or (3,)
    do = d @ to_obj.T  # (N, 3)
    do = np.where(np.abs(do) < 1e-12, 1e-12, do)
    t1, t2 = (-h - po) / do, (h - po) / do  # (N, 3)
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    tnear, tfar = tmin.max(1), tmax.min(1)
    t = np.where((tnear <= tfar) & (tnear > 1e-4), tnear, np.inf)
    axis = tmin.argmax(1)
    n_obj = np.zeros_like(do)
    n_obj[np.arange(len(do)), axis] = -np.sign(do[np.arange(len(do)), axis])
    return t, n_obj @ to_obj  # back to world (inverse rotation = transpose)


def _hit_cylinder(c: np.ndarray, r: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    oc = o - c  # centre at height r: the cylinder spans z in [c_z - r, c_z + r]
    oc = np.broadcast_to(oc, d.shape)
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (oc[:, 0] * d[:, 0] + oc[:, 1] * d[:, 1])
    cc = oc[:, 0] ** 2 + oc[:, 1] ** 2 - r * r
    disc = b * b - 4 * a * cc
    ts = np.where((disc > 0) & (a > 1e-12), (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, 1e-12)), np.inf)
    zs = oc[:, 2] + ts * d[:, 2]
    ts = np.where((ts > 1e-4) & (np.abs(zs) <= r), ts, np.inf)
    dz = np.where(np.abs(d[:, 2]) < 1e-12, 1e-12, d[:, 2])
    tc = (r - oc[:, 2]) / dz  # top cap
    xc, yc = oc[:, 0] + tc * d[:, 0], oc[:, 1] + tc * d[:, 1]
    tc = np.where((tc > 1e-4) & (xc * xc + yc * yc <= r * r), tc, np.inf)
    t = np.minimum(ts, tc)
    side = oc + d * np.where(np.isfinite(ts), ts, 0)[:, None]
    n = np.where((ts <= tc)[:, None], side * np.array([1 / r, 1 / r, 0.0]), np.array([0, 0, 1.0]))
    return t, n


def _hit_exact(obj: dict, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = CLEVR_SIZES[obj["size"]]
    if obj["shape"] == "cube":
        h = r / math.sqrt(2)
        return _hit_box(np.array([obj["x"], obj["y"], h]), h, math.radians(obj["rotation"]), o, d)
    c = np.array([obj["x"], obj["y"], r])
    return (_hit_sphere if obj["shape"] == "sphere" else _hit_cylinder)(c, r, o, d)


def _hit(obj: dict, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(t (N,), normal (N, 3))`` of rays ``o + t d`` against one object; t = inf on a miss.

    Rays are first culled by the object's bounding sphere, so only the few that may hit it are traced."""
    r = CLEVR_SIZES[obj["size"]]
    zc = r / math.sqrt(2) if obj["shape"] == "cube" else r
    cb = np.array([obj["x"], obj["y"], zc])
    oc = o - cb  # (N, 3) or (3,)
    b = d @ oc if oc.ndim == 1 else np.einsum("ij,ij->i", d, oc)
    cc = (oc * oc).sum(-1) - (r * 1.75) ** 2  # bounding radius: sqrt(3) h for cubes, sqrt(2) r for cylinders
    cand = np.flatnonzero((b * b - cc > 0) & ((b < 0) | (cc < 0)))
    t = np.full(d.shape[0], np.inf)
    n = np.zeros_like(d)
    if cand.size:
        tc, nc = _hit_exact(obj, o if o.ndim == 1 else o[cand], d[cand])
        t[cand], n[cand] = tc, nc
    return t, n


def render_clevr_buffers(params: dict, width: int = 192, height: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast a scene: ``(rgb float (H, W, 3) in [0, 1], object id (H, W), -1 for the ground)``."""
    objs = params["objects"]
    o, d = _rays(width, height)  # (3,), (N, 3)
    n_rays = d.shape[0]
    # ---------------------------------------------------------------------------------------------
    # primary rays: nearest of K objects and the ground plane z = 0
    # ---------------------------------------------------------------------------------------------
    hits = [_hit(ob, o, d) for ob in objs]
    ts = np.stack([t for t, _ in hits]) if hits else np.full((1, n_rays), np.inf)  # (K, N)
    ids = ts.argmin(0)  # (N,)
    t_obj = ts[ids, np.arange(n_rays)]  # (N,)
    t_ground = np.where(d[:, 2] < 0, -o[2] / np.where(d[:, 2] < 0, d[:, 2], -1), np.inf)  # (N,)
    on_obj = t_obj < t_ground
    t = np.where(on_obj, t_obj, t_ground)
    p = o + d * np.where(np.isfinite(t), t, 0)[:, None]  # (N, 3) hit points
    normal = np.tile(np.array([0, 0, 1.0]), (n_rays, 1))
    for k, (_, nk) in enumerate(hits):
        sel = on_obj & (ids == k)
        normal[sel] = nk[sel]
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    # ---------------------------------------------------------------------------------------------
    # shadow rays towards the key light, then Lambert + ambient (+ Blinn-Phong on metal)
    # ---------------------------------------------------------------------------------------------
    so = p + normal * 1e-3
    sd = np.broadcast_to(LIGHT, so.shape)
    lit = np.ones(n_rays, dtype=bool)
    for ob in objs:
        lit &= ~np.isfinite(_hit(ob, so, sd)[0])
    ndl = np.clip(normal @ LIGHT, 0, None)  # (N,)
    fill = np.clip(normal @ -_camera()[1], 0, None)
    albedo = np.full((n_rays, 3), 0.55)
    spec = np.zeros(n_rays)
    half = LIGHT - d
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    for k, ob in enumerate(objs):
        sel = on_obj & (ids == k)
        albedo[sel] = np.array(CLEVR_COLORS[ob["color"]]) / 255.0
        if ob["material"] == "metal":
            spec[sel] = 0.8 * np.clip((normal[sel] * half[sel]).sum(1), 0, None) ** 60
            albedo[sel] *= 0.75
    shade = 0.3 + 0.75 * ndl * lit + 0.15 * fill
    rgb = np.clip(albedo * shade[:, None] + (spec * lit)[:, None], 0, 1)
    obj_id = np.where(on_obj, ids, -1)
    return rgb.reshape(height, width, 3), obj_id.reshape(height, width)


def _to_image(rgb: np.ndarray, width: int, height: int) -> Image.Image:
    img = Image.fromarray((rgb * 255 + 0.5).astype(np.uint8), "RGB")
    return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BOX)


def render_clevr(params: dict, width: int = 96, supersample: int = 2) -> Image.Image:
    """An RGB ``width x (2/3 width)`` image of a scene (antialiased by supersampling)."""
    height = round(width * 2 / 3)
    rgb, _ = render_clevr_buffers(params, width * supersample, height * supersample)
    return _to_image(rgb, width, height)


def visible_pixels(params: dict, width: int = 96, supersample: int = 2) -> list[float]:
    """How many pixels of a ``width``-wide image each object covers (counted at the supersampled size)."""
    _, ids = render_clevr_buffers(params, width * supersample, round(width * 2 / 3) * supersample)
    return [float((ids == k).sum()) / supersample**2 for k in range(len(params["objects"]))]


def sample_visible_clevr(rng: np.random.Generator, width: int = 96, min_fraction: float = 0.002,
                         supersample: int = 2) -> tuple[dict, Image.Image]:
    """A scene where every object shows at least ``min_fraction`` of the image (as CLEVR requires),
    and its image."""
    n = int(rng.integers(CLEVR_MIN_COUNT, CLEVR_MAX_COUNT + 1))
    height = round(width * 2 / 3)
    need = max(4.0, min_fraction * width * height) * supersample**2
    for _ in range(100):
        params = sample_clevr(rng, n)
        rgb, ids = render_clevr_buffers(params, width * supersample, height * supersample)
        if min(int((ids == k).sum()) for k in range(n)) >= need:
            return params, _to_image(rgb, width, height)
    raise VptuneError(f"could not place {n} visible objects after 100 tries")


# ------------------------------------------------------------------------------------------------------
# Families, tasks and the generator
# ------------------------------------------------------------------------------------------------------

FAMILIES: dict[str, dict] = {
    "dsprites": {"size": 64, "tasks": ("dsprites_loc", "dsprites_ori"), "labels": dsprites_labels},
    "clevr": {"size": 96, "tasks": ("clevr_count", "clevr_dist"), "labels": clevr_labels},
}
PROCEDURAL_TASKS: dict[str, tuple[str, int]] = {
    "dsprites_loc": ("dsprites", 16), "dsprites_ori": ("dsprites", 16),
    "clevr_count": ("clevr", 8), "clevr_dist": ("clevr", 6),
}


def task_class_names(task: str) -> list[str]:
    """Human-readable class names of a procedural task."""
    if task == "dsprites_loc":
        return [f"x_position {2 * i}-{2 * i + 1}" for i in range(16)]
    if task == "dsprites_ori":
        return [f"orientation bin {i}" for i in range(16)]
    if task == "clevr_count":
        return [f"{n} objects" for n in range(CLEVR_MIN_COUNT, CLEVR_MAX_COUNT + 1)]
    thr = CLEVR_DIST_THRESHOLDS
    return [f"closest depth {thr[i]}-{thr[i + 1]}" for i in range(len(thr) - 1)]


def family_of(task: str) -> str:
    """The generator family of a procedural task; :class:`VptuneError` listing the valid tasks."""
    if task not in PROCEDURAL_TASKS:
        raise VptuneError(f"unknown procedural task {task!r}; valid tasks: {', '.join(PROCEDURAL_TASKS)}")
    return PROCEDURAL_TASKS[task][0]


def make_sample(family: str, seed: int, index: int, size: int | None = None) -> tuple[dict, Image.Image]:
    """Parameters and image of sample ``index`` of a family, from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    size = size or FAMILIES[family]["size"]
    if family == "dsprites":
        params = sample_dsprites(rng)
        return params, render_dsprites(params, size)
    params, img = sample_visible_clevr(rng, size)
    params["width"] = size
    return params, img


def _make_and_save(args: tuple[str, int, int, int | None, str]) -> str:
    family, seed, index, size, path = args
    params, img = make_sample(family, seed, index, size)
    img.save(path, optimize=False)
    labels = FAMILIES[family]["labels"](params)
    return json.dumps({"file": os.path.basename(path), "index": index, "params": params, "labels": labels})


def generate_pool(family: str, out_dir: str, n: int, seed: int = 0, size: int | None = None,
                  workers: int = 2, progress: bool = True) -> list[dict]:
    """Render ``n`` samples to ``out_dir/images/NNNNN.png`` and ``out_dir/params.jsonl``; returns the records."""
    if family not in FAMILIES:
        raise VptuneError(f"unknown generator {family!r}; valid: {', '.join(FAMILIES)}")
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    jobs = [(family, seed, i, size, os.path.join(img_dir, f"{i:05d}.png")) for i in range(n)]
    from tqdm import tqdm

    bar = {"total": n, "desc": f"rendering {family}", "unit": "img", "disable": not progress, "leave": False}
    if workers > 1 and n >= 200:
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # children use numpy/PIL only
        with mp.get_context(method).Pool(workers) as pool:
            lines = list(tqdm(pool.imap(_make_and_save, jobs, chunksize=16), **bar))
    else:
        lines = [_make_and_save(j) for j in tqdm(jobs, **bar)]
    with open(os.path.join(out_dir, "params.jsonl"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return [json.loads(line) for line in lines]


def read_params(task_dir: str) -> list[dict]:
    """The records of ``params.jsonl`` (file, index, params, labels)."""
    path = os.path.join(task_dir, "params.jsonl")
    if not os.path.isfile(path):
        raise VptuneError(f"no params.jsonl in {task_dir}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


LabelFn = Callable[[dict], dict[str, int]]
