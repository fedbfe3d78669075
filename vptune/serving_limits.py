"""The input side of ``vptune serve``: its settings and limits (:class:`ServeConfig`), the error every
guard answers with (:class:`ApiError`), the guarded image decoding (:func:`decode_upload`: accepted
content types, the pixel limit checked from the header before decoding, corrupt input -> 400) and the
server's own checks of a task folder before it is served (:func:`check_task_meta`,
:func:`check_task_model`: types, a bounded input size and class count, finite tensors -- whatever
:func:`vptune.artifact.load_task` checks, the server stays safe).

:mod:`vptune.serve` re-exports all of it."""

# (no "from __future__ import annotations", as in vptune.serve)

import io
import math
from dataclasses import dataclass, field
from typing import Any

from vptune.data.transforms import to_rgb
from vptune.errors import VptuneError

IMAGE_TYPES = {
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
}
MULTIPART_SLACK = 64 * 1024  # multipart framing and small fields on top of the image bytes


@dataclass
class ServeConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    image_types: dict[str, str] = field(default_factory=lambda: dict(IMAGE_TYPES))
    default_top_k: int = 5
    allow_task_loading: bool = True  # False: no admin routes (add, reload, remove) at all
    task_root: str | None = None  # tasks load on first use from here; POST /v1/tasks is off without it
    max_input_size: int = 1024  # largest task input side served (a 4096 px ViT task runs for hours)
    max_classes: int = 100_000
    max_resident_tasks: int = 64  # least recently used tasks beyond these are unloaded
    max_resident_mb: float = 4096.0  # ... and beyond this much task memory (own backbone copies count)
    reload_check_s: float = 1.0  # a resident task's files are checked for changes at most this often
    compute_workers: int = 2  # batching threads: one slow batch leaves the others serving
    token: str | None = None  # required as "Authorization: Bearer <token>" except on /healthz
    shutdown_timeout_s: float = 5.0  # SIGTERM: in-flight requests get this long, then the server exits

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise VptuneError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.max_wait_ms < math.inf:
            raise VptuneError(f"max_wait_ms must be a finite number >= 0, got {self.max_wait_ms}")
        if self.default_top_k < 1:
            raise VptuneError(f"the default top-k must be >= 1, got {self.default_top_k}")
        if not 0 <= self.shutdown_timeout_s < math.inf:
            raise VptuneError(f"the shutdown timeout must be a finite number >= 0 s, got {self.shutdown_timeout_s}")
        if self.max_upload_bytes < 1 or self.max_pixels < 1 or self.max_queue < 1:
            raise VptuneError("max_upload_bytes, max_pixels and max_queue must be >= 1")
        if not self.request_timeout_s > 0:
            raise VptuneError(f"the request timeout must be > 0 s, got {self.request_timeout_s}")
        if self.max_input_size < 1 or self.max_classes < 1:
            raise VptuneError("max_input_size and max_classes must be >= 1")
        if self.max_resident_tasks < 1 or not self.max_resident_mb > 0:
            raise VptuneError("max_resident_tasks must be >= 1 and max_resident_mb > 0")
        if self.compute_workers < 1:
            raise VptuneError(f"compute_workers must be >= 1, got {self.compute_workers}")
        if self.token is not None and len(self.token) < 8:
            raise VptuneError("the API token must have at least 8 characters")


class ApiError(Exception):
    """An error answered as ``{"error": ...}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "") -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type_ or {
            400: "bad_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            409: "conflict",
            413: "payload_too_large",
            415: "unsupported_media_type",
            422: "unprocessable",
            500: "internal",
            503: "unavailable",
            504: "timeout",
        }.get(status, "error")


# --- image decoding ---------------------------------------------------------------------------------
def decode_upload(data: bytes, content_type: str | None, cfg: ServeConfig):  # -> PIL.Image.Image (RGB)
    """Bytes of an uploaded image -> RGB PIL image, or :class:`ApiError` 415/413/400."""
    from PIL import Image, UnidentifiedImageError


    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in cfg.image_types:
        raise ApiError(
            415,
            f"image content type {ctype or '(none)'!r} is not accepted; send one of "
            f"{', '.join(sorted(cfg.image_types))}",
        )
    if not data:
        raise ApiError(400, "the image part is empty")
    formats = sorted(set(cfg.image_types.values()))
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            w, h = img.size
            if w * h > cfg.max_pixels:
                raise ApiError(413, f"image is {w}x{h} = {w * h} pixels; the limit is {cfg.max_pixels}")
            if w < 1 or h < 1:
                raise ApiError(400, f"image has an empty size {w}x{h}")
            img.load()
            return to_rgb(img)
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"cannot decode the image: not a valid {'/'.join(formats)} file") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as e:
        raise ApiError(400, f"cannot decode the image (corrupt or truncated): {e}") from None


# --- task folders ------------------------------------------------------------------------------------
def check_task_meta(meta: Any, cfg: ServeConfig, where: str) -> None:
    """Refuse (:class:`ApiError` 422) a ``task.json`` whose fields the server relies on have the wrong
    type or exceed its limits, before anything is built from it."""
    if not isinstance(meta, dict):
        raise ApiError(422, f"{where}: task.json is not an object")
    if not isinstance(meta.get("method"), str):
        raise ApiError(422, f"{where}: task.json 'method' must be a string")
    _check_int(meta.get("num_classes"), "num_classes", cfg.max_classes, where)
    labels = meta.get("label_names")
    if labels is not None and (
        not isinstance(labels, list)
        or len(labels) != meta["num_classes"]
        or not all(isinstance(x, str) for x in labels)
    ):
        raise ApiError(422, f"{where}: task.json 'label_names' must be num_classes strings")
    if not isinstance(meta.get("options", {}), dict):
        raise ApiError(422, f"{where}: task.json 'options' must be an object")
    pre = meta.get("preprocessing", {})
    if not isinstance(pre, dict):
        raise ApiError(422, f"{where}: task.json 'preprocessing' must be an object")
    if "input_size" in pre:
        _check_int(pre["input_size"], "preprocessing.input_size", cfg.max_input_size, where)
    for key in ("mean", "std"):
        value = pre.get(key, [0.5, 0.5, 0.5])
        if not (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        ) or (key == "std" and min(value) <= 0):
            raise ApiError(422, f"{where}: task.json 'preprocessing.{key}' must be 3 finite numbers")


def _check_int(value: Any, name: str, limit: int, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"{where}: task.json '{name}' must be an integer, got {value!r}")
    if not 1 <= value <= limit:
        raise ApiError(422, f"{where}: task.json '{name}' is {value}; this server accepts 1 to {limit}")


def check_task_model(model: Any, cfg: ServeConfig, where: str) -> None:
    """Refuse (:class:`ApiError` 422) a loaded task whose input size or class count exceeds the limits,
    whose input size the backbone's patches do not divide, or whose trained tensors are not all finite."""
    size = int(model.preprocessing.input_size)
    if not 1 <= size <= cfg.max_input_size:
        raise ApiError(422, f"{where}: input size {size} is over this server's limit {cfg.max_input_size}")
    patch = getattr(model.backbone, "patch_size", None)
    if isinstance(patch, (tuple, list)) and any(size % int(p) for p in patch):
        raise ApiError(422, f"{where}: input size {size} is not a multiple of the backbone's patch size {patch}")
    if not 1 <= int(model.num_classes) <= cfg.max_classes:
        raise ApiError(422, f"{where}: {model.num_classes} classes; this server accepts up to {cfg.max_classes}")
    import torch

    for name, tensor in model.trained_state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ApiError(422, f"{where}: tensor {name!r} holds NaN or infinite values")


def task_bytes(model: Any, backbone: Any) -> int:
    """Memory a loaded task adds on top of the shared ``backbone`` (its own tensors, a copied backbone
    included), in bytes."""
    shared = {t.data_ptr() for t in [*backbone.parameters(), *backbone.buffers()]}
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.data_ptr()
        if ptr in shared or ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total
